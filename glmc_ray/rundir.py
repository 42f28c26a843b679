"""A run directory a person can read and resume: config, metrics.jsonl, checkpoints, final.json, plot.

    <run>/config.yaml      the resolved config
    <run>/version.json     the code that made the run: commit, library versions, device, command (provenance.py)
    <run>/metrics.jsonl    one JSON line per epoch
    <run>/events.out.tfevents.*  the same epochs for TensorBoard, with per-class test accuracy
    <run>/checkpoint.pt    latest full training state (written atomically)
    <run>/best.pt          state at the best validation epoch (only with a validation split)
    <run>/final.json       last-epoch and best-on-validation results, per-class accuracy
    <run>/per_class.png    per-class accuracy against training count, Many/Medium/Few marked
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from glmc_ray import config as config_lib
from glmc_ray import provenance
from glmc_ray.tensorboard_events import EpochEvents

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


PARTIAL_SUFFIX = ".partial"  # temp files of atomic_write; a kill can leave one, the next start removes it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: a crash leaves the old file or the new one, never half.

    The file gets the mode a plain open() would give (mkstemp makes 0600, which other users of a shared
    run folder could not read)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_partial_writes(run: Path) -> list[Path]:
    """Delete temp files that a killed atomic_write left in `run`; returns what was removed."""
    leftovers = sorted(run.glob(f".*{PARTIAL_SUFFIX}"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (the run finished no epoch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"checkpoint {path} cannot be read ({err}); it is not a complete torch checkpoint") from err


def new_stamped_folder(parent: str | Path, name: str) -> Path:
    """Make `<parent>/<name>-<timestamp>` (with a suffix when two start in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(parent).resolve() / f"{name}-{stamp}"
    suffix = 1
    while folder.exists():
        folder = Path(parent).resolve() / f"{name}-{stamp}-{suffix}"
        suffix += 1
    folder.mkdir(parents=True)
    return folder


def new_run_dir(output: str | Path, cfg) -> Path:
    """A fresh `<output>/<cfg.name>-<timestamp>` holding the resolved config.yaml and version.json."""
    run = new_stamped_folder(output, cfg.name)
    config_lib.save(cfg, run / "config.yaml")
    provenance.write_version(run)
    return run


def remove_failed_start(run: Path) -> bool:
    """Delete a fresh run directory that holds no finished epoch (a failed start), so no half-made run is left.

    A run with a checkpoint or a metrics line is kept: it can be resumed or read."""
    finished = (run / CHECKPOINT).exists() or read_metrics(run) or any(run.glob("checkpoint_epoch*"))
    if finished:
        return False
    shutil.rmtree(run, ignore_errors=True)
    return True


@contextlib.contextmanager
def removed_if_failed_start(run: Path, fresh: bool):
    """Around the training of `run`: if it fails and `fresh` (not a resume) and no epoch was saved, the run
    directory is deleted and the user told so; the error goes on."""
    try:
        yield
    except BaseException:
        if fresh and remove_failed_start(run):
            print(f"removed {run}: the run stopped before its first epoch was saved", file=sys.stderr, flush=True)
        raise


def restore_run(run: Path) -> dict:
    """Before an in-process resume: the checkpoint's state; temp files of a killed write are deleted and
    metrics.jsonl becomes exactly the epochs the checkpoint holds."""
    state = load_checkpoint(run / CHECKPOINT)
    remove_partial_writes(run)
    write_metrics(run, state["history"])
    return state


def append_metrics(run: Path, record: dict) -> None:
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run: Path) -> list[dict]:
    """The epoch records of `run/metrics.jsonl`; a cut-off last line (a kill mid-write) is dropped."""
    path = run / METRICS
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # written partly when the process died: the epoch is not committed
            raise ValueError(f"{path}:{number}: not a JSON epoch record ({err})") from None
    return records


def write_metrics(run: Path, records: list[dict]) -> None:
    """Replace metrics.jsonl by `records`: on resume, the history saved in the checkpoint (exactly the
    committed epochs, also when the process died between the checkpoint and its metrics line)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(run / METRICS, lambda tmp: tmp.write_text(text))


def truncate_metrics(run: Path, next_epoch: int) -> None:
    """Keep the records of epochs before `next_epoch` (a replayed epoch then replaces, never duplicates)."""
    write_metrics(run, [r for r in read_metrics(run) if r["epoch"] < next_epoch])


def write_final(run: Path, final: dict, cfg) -> None:
    from glmc_ray.plots import per_class_plot

    document = {**final, "config": config_lib.to_dict(cfg), "version": provenance.read_version(run)}
    atomic_write(run / "final.json", lambda tmp: tmp.write_text(json.dumps(document, indent=1)))
    test = final["last"].get("test")
    if test is not None:
        per_class_plot(test["per_class"], final["class_counts"], run / "per_class.png",
                       title=f"{cfg.name}: last epoch, test top-1 {test['top1']:.2f}%")


class LocalReporter:
    """In-process reporting: every epoch a metrics line and TensorBoard events, then the checkpoint (and
    best.pt) atomically."""

    def __init__(self, run: Path, cfg):
        self.run, self.cfg = run, cfg
        self.events = EpochEvents(run)

    def report(self, record: dict, checkpoint, is_best: bool, per_class: list | None) -> None:
        append_metrics(self.run, record)
        self.events.write(record, per_class)
        save_checkpoint(checkpoint(), self.run / CHECKPOINT)
        if is_best:
            atomic_write(self.run / "best.pt", lambda tmp: shutil.copyfile(self.run / CHECKPOINT, tmp))

    def finish(self, final: dict) -> None:
        self.events.close()
        write_final(self.run, final, self.cfg)
