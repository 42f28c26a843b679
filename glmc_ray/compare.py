"""Compare finished runs: one table of mean +- std over seeds per group, with CSV, JSON and plots beside it.

    python -m glmc_ray.compare runs/bench-methods/methods-20261207-183658          # a bench experiment, by row
    python -m glmc_ray.compare runs/a-run runs/b-run runs/c-run --group-by method
    python -m glmc_ray.compare runs/<name>-search-<stamp>/full --metric balanced_top1 few
    python -m glmc_ray.compare s3://bucket/runs/cifar10 --group-by optim.lr,method.name

Each argument is a run directory or a folder of runs (a search experiment, a bench/methods.py experiment),
local or on object storage. Runs of different data are refused. See glmc_ray/runs/comparison.py.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from glmc_ray.core.errors import run_command
from glmc_ray.core.version import version_line
from glmc_ray.runs import comparison, rundir

SHOWN = ["top1", "balanced_top1", "many", "medium", "few", "rarest3", "posthoc_top1", "top1_at_best_val", "minutes"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glmc_ray.compare", description=__doc__.split("\n\n")[0],
                                epilog="metrics: " + "; ".join(f"{k}: {v}" for k, v in comparison.METRICS.items()))
    p.add_argument("locations", nargs="+", metavar="RUN_OR_EXPERIMENT",
                   help="a run directory, or a folder holding runs (a search experiment, a bench experiment); "
                        "a local path or a URI such as s3://bucket/prefix")
    p.add_argument("--group-by", default="label", metavar="label|method|KEY[,KEY]",
                   help="label: the run folder's name without its seed and time stamp (a recipe's runs, a bench "
                        "row); method: method.name; or config keys, e.g. optim.lr,method.name (default label)")
    p.add_argument("--metric", nargs="+", default=SHOWN, choices=list(comparison.METRICS), metavar="METRIC",
                   help="the columns, the first sorting the rows (default: " + " ".join(SHOWN) + ")")
    p.add_argument("--output", metavar="DIR",
                   help="where compare.md/.csv/.json, per_class.png and groups.png go (default runs/compare-<stamp>)")
    p.add_argument("--version", action="version", version=version_line())
    return p


def main(argv=None) -> int:
    return run_command(functools.partial(_compare, parser().parse_args(argv)))


def _compare(args) -> int:
    groups, notes = comparison.compare(args.locations, args.group_by)
    for note in notes:
        print(note, file=sys.stderr)
    metrics = comparison.shown_metrics(groups, args.metric)
    print(comparison.markdown_table(groups, metrics))
    folder = Path(args.output) if args.output else rundir.new_stamped_folder("runs", "compare")
    runs = sum(len(g.runs) for g in groups)
    title = f"{runs} runs in {len(groups)} groups (mean over each group's runs)"
    comparison.write_outputs(groups, folder, metrics, title, args.locations)
    print(f"compare.md, compare.csv, compare.json, per_class.png and groups.png in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
