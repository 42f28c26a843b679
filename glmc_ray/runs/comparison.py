"""Compare finished runs: read run directories (one run, a search experiment, a bench/methods.py experiment,
locally or on object storage), group them (by label, method or config keys), and summarise each group over
its seeds: mean +- std of top-1, balanced top-1, Many / Medium / Few, the 3 rarest classes, post-hoc logit
adjustment, the test top-1 of the best-on-validation epoch, minutes per run, and the code version.

A run is a folder holding final.json (written when a run ends: the last epoch's results, the best epoch on
validation, the class counts, the config and the code version) and metrics.jsonl (its minutes). Runs of
different data (another dataset, subset or number of classes) are never compared: `CompareError` names the
two runs and the key. Runs of one group with different schedules (train.epochs) are grouped apart, and said
so. glmc_ray/compare.py is the command line; bench/methods.py and the search's final seeds use it.
"""
from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from glmc_ray.core import storage
from glmc_ray.core.config import ConfigError
from glmc_ray.runs import plots

FINAL = "final.json"
METRICS_FILE = "metrics.jsonl"
# name: what it is (the table's columns, in this order)
METRICS = {
    "top1": "test top-1 at the last epoch",
    "balanced_top1": "test balanced top-1 (mean of per-class accuracy)",
    "many": "Many-shot classes (> 100 training images)",
    "medium": "Medium-shot classes (20-100)",
    "few": "Few-shot classes (< 20)",
    "rarest3": "the 3 classes with the fewest training images",
    "posthoc_top1": "test top-1 after post-hoc logit adjustment (tau chosen on validation)",
    "posthoc_balanced_top1": "its balanced top-1",
    "top1_at_best_val": "test top-1 at the best epoch on validation (best.pt)",
    "val_balanced_top1": "validation balanced top-1 at the last epoch",
    "minutes": "minutes of training steps per run (evaluation excluded)",
}
# keys that make two runs' numbers incomparable: another dataset, subset or class list
DATA_KEYS = ("source", "classes", "imbalance_factor", "subset_protocol", "subset_seed", "split_file", "val_fraction",
             "val_split", "synthetic_classes", "synthetic_max_count")
STAMP = re.compile(r"(-seed\d+)?-\d{8}-\d{6}(-\d+)?$")  # <name>[-seed<N>]-<YYYYmmdd>-<HHMMSS>[-k]


class CompareError(ConfigError):
    """An input that cannot be compared: not a run or experiment, or runs of different data."""


@dataclass(frozen=True)
class RunResult:
    location: str
    label: str  # the folder's name without its seed and time stamp (the run's name, a bench row's label)
    config: dict
    class_counts: tuple[int, ...]
    metrics: dict  # METRICS' names -> value (None where the run has none: no validation split, no Few class)
    per_class: tuple
    version: str  # the code's git commit (short), "-dirty" for uncommitted changes

    def key(self, dotted: str):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CompareError(f"--group-by {dotted}: not a config key of the run {self.location}", dotted)
            node = node[part]
        return node


@dataclass
class Group:
    name: str
    runs: list[RunResult] = field(default_factory=list)

    def stats(self, metric: str) -> dict:
        values = [run.metrics[metric] for run in self.runs if run.metrics.get(metric) is not None]
        return {"mean": statistics.mean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}

    def per_class(self) -> list:
        return [statistics.mean(column) if None not in column else None
                for column in zip(*(run.per_class for run in self.runs), strict=True)]

    def summary(self) -> dict:
        return {"group": self.name, "runs": [run.location for run in self.runs], "seeds": len(self.runs),
                "epochs": self.runs[0].key("train.epochs"), "metrics": {m: self.stats(m) for m in METRICS},
                "per_class": self.per_class(), "versions": sorted({run.version for run in self.runs})}


def find_runs(location: str) -> list[str]:
    """The finished runs in `location`: itself if it is one, else every run folder below it (a search
    experiment's trials/ and full/, a bench experiment's full/), sorted."""
    fs, path = storage.resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise CompareError(f"{location}: does not exist; expected a run directory or an experiment folder", location)
    if kind == pafs.FileType.File:
        raise CompareError(f"{location}: is a file; expected a run directory or an experiment folder", location)
    found = [info.path for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if info.base_name == FINAL and info.type == pafs.FileType.File]
    if not found:
        raise CompareError(f"{location}: no finished run there (no {FINAL} in it or below); expected a run "
                           f"directory, a search experiment or a bench/methods.py experiment", location)
    folders = sorted({found_path[len(path):].strip("/").rpartition("/")[0] for found_path in found})
    return [storage.join(location, *folder.split("/")) if folder else location for folder in folders]


def read_run(location: str) -> RunResult:
    fs, path = storage.resolve(location)
    final = json.loads(storage.read_text(fs, f"{path}/{FINAL}"))
    last, counts = final["last"], final["class_counts"]
    test, posthoc = last["test"], last.get("test_posthoc") or {}
    rarest = sorted(range(len(counts)), key=lambda c: counts[c])[:3]
    best = (final.get("best_on_val") or {}).get("metrics") or {}
    metrics = {"top1": test["top1"], "balanced_top1": test["balanced_top1"], "many": test.get("many"),
               "medium": test.get("medium"), "few": test.get("few"),
               "rarest3": statistics.mean(test["per_class"][c] for c in rarest),
               "posthoc_top1": posthoc.get("top1"), "posthoc_balanced_top1": posthoc.get("balanced_top1"),
               "top1_at_best_val": best.get("test_top1"),
               "val_balanced_top1": (last.get("val") or {}).get("balanced_top1"),
               "minutes": _minutes(fs, path)}
    version = final.get("version", {})
    commit = (version.get("git_commit") or "unknown")[:10] + ("-dirty" if version.get("git_dirty") else "")
    return RunResult(location, STAMP.sub("", storage.name(location)), final["config"], tuple(counts), metrics,
                     tuple(test["per_class"]), commit)


def _minutes(fs, path: str) -> float | None:
    """Minutes of training steps (metrics.jsonl's train_seconds); a cut-off last line is not an epoch."""
    try:
        text = storage.read_text(fs, f"{path}/{METRICS_FILE}")
    except FileNotFoundError:
        return None
    seconds = 0.0
    for line in text.splitlines():
        try:
            seconds += json.loads(line).get("train_seconds", 0.0)
        except json.JSONDecodeError:
            break
    return seconds / 60


def check_same_data(runs: list[RunResult]) -> None:
    """Every run learnt the same classes from the same training subset, else a CompareError naming both."""
    first = runs[0]
    for run in runs[1:]:
        for key in DATA_KEYS:
            ours, theirs = first.config["data"].get(key), run.config["data"].get(key)
            if ours != theirs:
                raise CompareError(f"data.{key} is {ours!r} in {first.location} and {theirs!r} in {run.location}; "
                                   f"runs of different data are not compared (compare each dataset on its own)",
                                   f"data.{key}")


def group_runs(runs: list[RunResult], by: str = "label") -> tuple[list[Group], list[str]]:
    """(groups in first-seen order, notes): by the run's label, its method, or comma-separated config keys;
    runs of one group with another train.epochs form a group of their own, named with its epochs."""
    groups: dict[str, Group] = {}
    for run in runs:
        name = group_name(run, by)
        groups.setdefault(name, Group(name)).runs.append(run)
    out, notes = [], []
    for group in groups.values():
        schedules = sorted({run.key("train.epochs") for run in group.runs})
        if len(schedules) == 1:
            out.append(group)
            continue
        notes.append(f"note: {group.name}: runs of {', '.join(map(str, schedules))} epochs, compared apart")
        out += [Group(f"{group.name} ({epochs} epochs)", [r for r in group.runs if r.key("train.epochs") == epochs])
                for epochs in schedules]
    return out, notes


def group_name(run: RunResult, by: str) -> str:
    if by == "label":
        return run.label
    if by == "method":
        return run.key("method.name")
    return ", ".join(f"{key}={run.key(key)}" for key in by.split(","))


def compare(locations: list[str], by: str = "label") -> tuple[list[Group], list[str]]:
    """The groups of every finished run in `locations` (each a run or a folder of runs), and the notes."""
    runs = [read_run(run) for location in locations for run in find_runs(location)]
    check_same_data(runs)
    return group_runs(runs, by)


def mean_std(stat: dict, digits: int = 2) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def markdown_table(groups: list[Group], metrics: list[str]) -> str:
    """A row per group, sorted by the first metric (highest first), mean ± std over its runs."""
    def order(group):
        mean = group.stats(metrics[0])["mean"]
        return (mean is None, -(mean or 0.0))

    lines = ["| group | runs | " + " | ".join(metrics) + " | code |", "|---|---|" + "---|" * (len(metrics) + 1)]
    for group in sorted(groups, key=order):
        cells = [mean_std(group.stats(m), 1 if m == "minutes" else 2) for m in metrics]
        versions = ", ".join(sorted({run.version for run in group.runs}))
        lines.append(f"| {group.name} | {len(group.runs)} | " + " | ".join(cells) + f" | {versions} |")
    return "\n".join(lines)


def shown_metrics(groups: list[Group], metrics: list[str]) -> list[str]:
    """`metrics` without those no run has (Few on a dataset without Few classes, post-hoc without validation)."""
    return [m for m in metrics if any(group.stats(m)["mean"] is not None for group in groups)]


def write_outputs(groups: list[Group], folder: Path, metrics: list[str], title: str, inputs: list[str]) -> None:
    """compare.md (the table), compare.csv (mean and std columns), compare.json (every value, per-class accuracy,
    the runs and versions), per_class.png (each group's per-class accuracy against the class counts) and
    groups.png (Many / Medium / Few, mean and std)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.md").write_text(markdown_table(groups, metrics) + "\n")
    with open(folder / "compare.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "runs", *[f"{m}_{s}" for m in metrics for s in ("mean", "std")], "code"])
        for group in groups:
            stats = [group.stats(m) for m in metrics]
            writer.writerow([group.name, len(group.runs), *[v for st in stats for v in (st["mean"], st["std"])],
                             " ".join(sorted({run.version for run in group.runs}))])
    counts = list(groups[0].runs[0].class_counts)
    report = {"inputs": inputs, "metrics": {m: METRICS[m] for m in metrics}, "class_counts": counts,
              "groups": [group.summary() for group in groups]}
    (folder / "compare.json").write_text(json.dumps(report, indent=1))
    plots.methods_per_class_plot({g.name: g.per_class() for g in groups}, counts, folder / "per_class.png", title)
    shares = {g.name: {m: g.stats(m) for m in ("many", "medium", "few")} for g in groups}
    plots.shot_groups_plot(shares, folder / "groups.png", title)
