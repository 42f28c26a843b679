"""TensorBoard event files of the epoch records, in the run directory: `tensorboard --logdir runs/`.

Written with torch's SummaryWriter next to metrics.jsonl (by LocalReporter in-process, by the controller's
metrics callback under Ray), flushed every epoch so a running run shows. Tags: `train/loss`, `train/lr`, ...,
`test/top1`, `test/many`, ..., `val/balanced_top1`, ..., and per-class test accuracy.

Every committed epoch gets its events, whatever stops the run: `events_epoch.json` holds the first epoch
without flushed events, and a writer opened for a later epoch (a resume, a restarted Ray worker group) first
writes the epochs in between from metrics.jsonl (their scalars; the per-class accuracies of such an epoch are
in no file). A stop between an epoch's checkpoint and its events is such a gap.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from numbers import Real
from pathlib import Path

import numpy as np

from glmc_ray.core.storage import atomic_write

SPLITS = ("train", "val", "test", "posthoc")
MARK = "events_epoch.json"  # {"next_epoch": the first epoch whose events are not flushed}


def tag(key: str) -> str:
    """An epoch record key as a TensorBoard tag: test_top1 -> test/top1, train_seconds -> train/seconds,
    loss -> train/loss (the training terms carry no split prefix), posthoc_tau -> posthoc/tau."""
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in SPLITS and name else f"train/{key}"


def class_tag(label: int, digits: int, names: list[str] | None) -> str:
    """03, or 03_cat where the class has a name (spaces as underscores: a tag is one word)."""
    number = f"{label:0{digits}d}"
    return f"{number}_{'_'.join(names[label].split())}" if names else number


class EpochEvents:
    """One writer per process; reopened when the epochs go back (a resumed run, a restarted Ray worker group).
    `committed`: the run's committed epoch records (metrics.jsonl), for the epochs a stop left without events;
    `names`: the classes' names, in label order (their per-class tags are `<label>_<name>`), or None."""

    def __init__(self, run: Path, committed: Callable[[], list[dict]], names: list[str] | None = None):
        self.run, self.committed, self.names = run, committed, names
        self._writer = None
        self._next_epoch = 0

    def write(self, record: dict, per_class: list | None = None) -> None:
        """Scalars of the epoch record (None and non-numbers skipped) and, after an evaluation, the test
        accuracy of each class (%, None for a class without test images)."""
        epoch = record["epoch"]
        if self._writer is None or epoch < self._next_epoch:
            self._open(epoch)
        self._write_scalars(record)
        if per_class is not None:
            self._write_per_class(per_class, epoch)
        self._writer.flush()
        self._next_epoch = epoch + 1
        self._mark(self._next_epoch)

    def _write_scalars(self, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, Real):
                self._writer.add_scalar(tag(key), value, record["epoch"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self, epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        first = min(epoch, self._marked())  # the first epoch whose events may be missing
        # purge_step: TensorBoard hides the events that earlier files hold from that epoch on (written after
        # the checkpoint this process continues from), so a replayed epoch shows once, with its new values.
        self._writer = SummaryWriter(str(self.run), purge_step=first)
        for record in self.committed():  # committed epochs the events lack
            if first <= record["epoch"] < epoch:
                self._write_scalars(record)

    def _marked(self) -> int:
        try:
            return json.loads((self.run / MARK).read_text())["next_epoch"]
        except (OSError, ValueError, KeyError):  # none yet, or cut off by a kill mid-write: replay them all
            return 0

    def _mark(self, next_epoch: int) -> None:
        atomic_write(self.run / MARK, lambda tmp: tmp.write_text(json.dumps({"next_epoch": next_epoch})))

    def _write_per_class(self, accuracies: list, epoch: int) -> None:
        # Two views, for two questions: one scalar per class follows a tail class through training (the tag
        # filter finds one among a thousand), and a histogram over classes shows at a glance how many
        # classes are left behind, which stays readable for ImageNet-LT's 1000 classes.
        digits = len(str(len(accuracies) - 1))
        for label, accuracy in enumerate(accuracies):
            if accuracy is not None:
                self._writer.add_scalar(f"test_per_class/{class_tag(label, digits, self.names)}", accuracy, epoch)
        seen = [a for a in accuracies if a is not None]
        if seen:
            self._writer.add_histogram("test/per_class", np.asarray(seen), epoch)
