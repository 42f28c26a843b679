"""Before a Ray Train resume: which checkpoint the run continues from, and a run directory that agrees with it.

Ray Train restores the latest checkpoint named in `<storage>/<run>/checkpoint_manager_snapshot.json`. Two
things can be out of step with it after a kill:
  - Ray commits a checkpoint before the metrics callback appends its line, and deletes dropped checkpoints
    after that: an epoch missing from metrics.jsonl, or a checkpoint folder no longer tracked;
  - Ray rewrites the snapshot in place (truncate, then write): a kill inside that write leaves it empty or cut
    off, and Ray's own start then fails on it (CheckpointManagerInitializationError) although the checkpoint
    folders are intact. A snapshot naming a folder that is gone fails the same way.
In the first case Ray's snapshot decides. In the second the snapshot is moved aside (kept, renamed) and the run
continues from the newest checkpoint folder that loads; Ray 2.60's trainers refuse `resume_from_checkpoint`, so
the folder travels to the workers in the train loop config (`Resume.folder`), and a checkpoint Ray itself holds
(a worker group restarted later in the same run) wins over it.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import torch

from glmc_ray.runs import rundir

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
STATE_FILE = "state.pt"
STORAGE_FILE = "storage.json"  # in a Ray Train run directory: where its checkpoints are (what a resume needs)
FOLDER = re.compile(r"checkpoint_epoch(\d+)$")


@dataclass
class Resume:
    """Where a resumed run continues: `folder` (a checkpoint folder, path in `storage`'s filesystem) when Ray's
    snapshot could not say, else None (Ray restores its own latest checkpoint, or nothing for a fresh start)."""

    folder: str | None = None


def prepare(run: Path, storage: str) -> Resume:
    """metrics.jsonl becomes the history of the checkpoint the run will continue from; checkpoint folders
    nobody will restore are deleted; an unusable snapshot is moved aside. Says on stderr what it did when it
    departs from Ray's snapshot."""
    from ray.train import Result

    rundir.remove_partial_writes(run)
    fs, experiment = pyarrow.fs.FileSystem.from_uri(_uri(f"{storage.rstrip('/')}/{run.name}"))
    snapshot = f"{experiment}/{SNAPSHOT}"
    problem = _snapshot_problem(fs, snapshot)
    if problem is None:
        try:
            result = Result.from_path(f"{storage.rstrip('/')}/{run.name}")
            history = _history(fs, result.checkpoint.path) if result.checkpoint is not None else []
        except Exception as err:  # noqa: BLE001 - Ray's init error or our read of the folder: either way unusable
            problem = f"cannot be used ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        else:
            _rewrite_metrics(run, history)
            delete_untracked_checkpoints(result)
            return Resume()
    return _fall_back(run, fs, experiment, snapshot, problem)


def _snapshot_problem(fs, snapshot: str) -> str | None:
    """What is wrong with the snapshot file as a file (None: it parses, or there is none and no checkpoint)."""
    info = fs.get_file_info(snapshot)
    if info.type == pyarrow.fs.FileType.NotFound:
        return "is missing"
    if info.size == 0:
        return "is empty (a kill inside Ray's rewrite of it)"
    with fs.open_input_stream(snapshot) as stream:
        text = stream.read().decode("utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"is cut off or corrupt ({len(text)} bytes; {err})"
    return None


def _fall_back(run: Path, fs, experiment: str, snapshot: str, problem: str) -> Resume:
    folders = checkpoint_folders(fs, experiment)
    if not folders and problem == "is missing":  # a run that never committed an epoch: a fresh start
        _rewrite_metrics(run, [])
        return Resume()
    say = [f"Ray's run snapshot {snapshot} {problem}"]
    if fs.get_file_info(snapshot).type != pyarrow.fs.FileType.NotFound:
        aside = f"{snapshot}.unusable-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.move(snapshot, aside)
        say.append(f"moved it to {aside}")
    chosen, history = None, []
    for epoch, folder in sorted(folders, reverse=True):  # newest first
        try:
            _load_state(fs, folder)
            history = _history(fs, folder)
        except Exception as err:  # noqa: BLE001 - any failure to read it makes the folder unusable
            fs.delete_dir(folder)  # Ray would write this epoch's folder again under the same name
            say.append(f"deleted {folder} (unreadable: {type(err).__name__})")
            continue
        chosen = folder
        say.append(f"continuing from the newest intact checkpoint {folder} (epoch {epoch + 1})")
        break
    if chosen is None:
        say.append("no intact checkpoint folder: starting from epoch 0")
    print("resume: " + "; ".join(say), file=sys.stderr, flush=True)
    _rewrite_metrics(run, history)
    return Resume(chosen)


def checkpoint_folders(fs, experiment: str) -> list[tuple[int, str]]:
    infos = fs.get_file_info(pyarrow.fs.FileSelector(experiment, allow_not_found=True))
    return [(int(m.group(1)), info.path) for info in infos
            if info.type == pyarrow.fs.FileType.Directory and (m := FOLDER.match(info.base_name))]


def load_state(folder: str) -> dict:
    """The training state saved in a checkpoint folder (a path or URI Ray's storage gave)."""
    fs, path = pyarrow.fs.FileSystem.from_uri(_uri(folder))
    return _load_state(fs, path)


def _load_state(fs, folder: str) -> dict:
    with fs.open_input_file(f"{folder}/{STATE_FILE}") as file:
        return torch.load(file, map_location="cpu", weights_only=False)


def _history(fs, folder: str) -> list[dict]:
    with fs.open_input_stream(f"{folder}/{rundir.METRICS}") as stream:
        return [json.loads(line) for line in stream.read().decode().splitlines()]


def _rewrite_metrics(run: Path, history: list[dict]) -> None:
    """metrics.jsonl as the checkpoint's history; the controller's event writer then adds the TensorBoard points
    of the epochs whose events were never written (tensorboard_events: their scalars)."""
    rundir.write_metrics(run, history)


def delete_untracked_checkpoints(result) -> None:
    """Delete the checkpoint folders a Ray Train `Result` does not hold: a clean-up cut short by a kill, or
    the folders from before a fall-back (Ray's new snapshot starts empty). A result with no checkpoint
    deletes nothing."""
    if result.checkpoint is None:
        return
    tracked = {result.checkpoint.path, *(c.path for c, _ in result.best_checkpoints or [])}
    for _, folder in checkpoint_folders(result.filesystem, result.path):
        if folder not in tracked:
            result.filesystem.delete_dir(folder)


def _uri(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())
