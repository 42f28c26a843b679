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
import io
import json
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from glmc_ray.core import config as config_lib
from glmc_ray.core.errors import OutputError, kept_checkpoint
from glmc_ray.core.storage import PARTIAL_SUFFIX, atomic_write, remove_partial_writes  # noqa: F401 (used from rundir)
from glmc_ray.runs import provenance
from glmc_ray.runs.tensorboard_events import EpochEvents

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically; a failed write says which checkpoint is still intact (the previous one, if any)."""
    def write(tmp: Path) -> None:
        # Serialised in memory, then written by Python: a full disk is then the OS's own OSError(ENOSPC); torch's
        # zip writer reports a failed write as "enforce fail at inline_container.cc ... unexpected pos".
        buffer = io.BytesIO()
        torch.save(state, buffer)
        tmp.write_bytes(buffer.getbuffer())

    try:
        atomic_write(path, write)
    except OutputError as err:
        raise OutputError(f"{err}; {kept_checkpoint(state['epoch'] - 1)}") from err.__cause__


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (the run finished no epoch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"checkpoint {path} cannot be read ({err}); it is not a complete torch checkpoint") from err


# run folder -> the folders above it that new_stamped_folder made for it (deepest first): a failed start
# removes them again when they are empty, so a mistyped --output leaves nothing behind
_MADE_PARENTS: dict[Path, list[Path]] = {}


def _make_parents(folder: Path) -> list[Path]:
    """`mkdir -p folder`; returns the folders this call made itself (deepest first), not those another
    process made at the same time."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
            made.append(path)
        except FileExistsError:
            if not path.is_dir():
                raise
    return made[::-1]


def new_stamped_folder(parent: str | Path, name: str) -> Path:
    """Make `<parent>/<name>-<timestamp>` (with the next free suffix when others start in the same second,
    also in other processes: each name is claimed by mkdir itself, which only one caller wins)."""
    parent = Path(parent).resolve()
    made = _make_parents(parent)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while True:
        folder = parent / (f"{name}-{stamp}" if suffix == 0 else f"{name}-{stamp}-{suffix}")
        try:
            folder.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        except FileNotFoundError:  # another run's failed start just removed the empty parent it had made
            made = _make_parents(parent)
            continue
        _MADE_PARENTS[folder] = made
        return folder


def new_run_dir(output: str | Path, cfg) -> Path:
    """A fresh `<output>/<cfg.name>-<timestamp>` holding the resolved config.yaml and version.json."""
    try:
        run = new_stamped_folder(output, cfg.name)
    except OSError as err:
        blocked = err.filename and Path(err.filename).exists() and not Path(err.filename).is_dir()
        cause = f"{err.filename} is a file, not a folder" if blocked else f"{err.strerror or err}: {err.filename}"
        raise OutputError(f"--output {output}: cannot make a run directory there ({cause})") from err
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
    for folder in _MADE_PARENTS.pop(run, []):  # e.g. the --output folder this run made, when empty
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's folder, a user's file) or already gone
            break
    return True


@contextlib.contextmanager
def removed_if_failed_start(run: Path, fresh: bool, quiet: tuple = ()):
    """Around the training of `run`: if it fails and `fresh` (not a resume) and no epoch was saved, the run
    directory is deleted and the user told so (not for the `quiet` exceptions: their own line says it); the
    error goes on."""
    try:
        yield
    except BaseException as err:
        if fresh and remove_failed_start(run) and not isinstance(err, quiet):
            print(f"removed {run}: the run stopped before its first epoch was saved", file=sys.stderr, flush=True)
        raise


def restore_run(run: Path) -> dict:
    """Before an in-process resume: the checkpoint's state; temp files of a killed write are deleted and
    metrics.jsonl becomes exactly the epochs the checkpoint holds."""
    if not (run / CHECKPOINT).exists() and _trained_under_ray(run):
        version = provenance.read_version(run) or {}
        started = f" (it was started by: {version['command']})" if version.get("command") else ""
        raise ValueError(f"{run} was trained under Ray Train ({len(read_metrics(run))} epochs in {METRICS}){started}; "
                         f"resume it with Ray options (--workers N, --nodes N or --address, and --storage where "
                         f"its checkpoints are)")
    state = load_checkpoint(run / CHECKPOINT)
    remove_partial_writes(run)
    write_metrics(run, state["history"])
    return state


def _trained_under_ray(run: Path) -> bool:
    """Ray Train keeps its checkpoints in checkpoint_* folders beside its snapshot (or in --storage, where only
    metrics.jsonl, written by its controller, is left here)."""
    return (run / "checkpoint_manager_snapshot.json").exists() or any(run.glob("checkpoint_epoch*")) or \
        bool(read_metrics(run))


def append_metrics(run: Path, record: dict) -> None:
    try:
        with open(run / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a cut-off line is dropped by read_metrics; the checkpoint holds the epoch
        raise OutputError(f"cannot write {run / METRICS}: {err.strerror or err}; the epoch {record['epoch']} "
                          f"checkpoint is intact and --resume rebuilds {METRICS} from it") from err


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
    from glmc_ray.runs.plots import per_class_plot

    document = {**final, "config": config_lib.to_dict(cfg), "version": provenance.read_version(run)}
    atomic_write(run / "final.json", lambda tmp: tmp.write_text(json.dumps(document, indent=1)))
    test = final["last"].get("test")
    if test is not None:
        per_class_plot(test["per_class"], final["class_counts"], run / "per_class.png",
                       title=f"{cfg.name}: last epoch, test top-1 {test['top1']:.2f}%", names=final.get("class_names"))


class LocalReporter:
    """In-process reporting: every epoch a metrics line and TensorBoard events, then the checkpoint (and
    best.pt) atomically. `stop`: whether the command was asked to stop (core/interrupts.py); `names`: the
    classes' names (data.class_names), for the per-class TensorBoard tags."""

    def __init__(self, run: Path, cfg, stop: Callable[[], bool] = lambda: False, names: list[str] | None = None):
        self.run, self.cfg, self.stop_requested = run, cfg, stop
        self.events = EpochEvents(run, lambda: read_metrics(run), names)

    def report(self, record: dict, checkpoint, is_best: bool, per_class: list | None) -> None:
        # The checkpoint first: an epoch is in metrics.jsonl only once it can be resumed (a failed first
        # checkpoint then leaves a run with no epoch, which a failed start removes).
        save_checkpoint(checkpoint(), self.run / CHECKPOINT)
        if is_best:
            try:
                atomic_write(self.run / "best.pt", lambda tmp: shutil.copyfile(self.run / CHECKPOINT, tmp))
            except OutputError as err:
                raise OutputError(f"{err}; {CHECKPOINT} after epoch {record['epoch']} is intact") from err.__cause__
        append_metrics(self.run, record)
        self.events.write(record, per_class)

    def finish(self, final: dict) -> None:
        self.events.close()
        write_final(self.run, final, self.cfg)
