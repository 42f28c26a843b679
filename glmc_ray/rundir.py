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

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from glmc_ray import config as config_lib
from glmc_ray import provenance
from glmc_ray.tensorboard_events import EpochEvents

CHECKPOINT = "checkpoint.pt"


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: a crash leaves the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (the run finished no epoch)")
    return torch.load(path, map_location="cpu", weights_only=False)


def new_run_dir(output: str | Path, cfg) -> Path:
    """A fresh `<output>/<cfg.name>-<timestamp>` holding the resolved config.yaml and version.json."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(output).resolve() / f"{cfg.name}-{stamp}"
    suffix = 1
    while run.exists():
        run = Path(output).resolve() / f"{cfg.name}-{stamp}-{suffix}"
        suffix += 1
    run.mkdir(parents=True)
    config_lib.save(cfg, run / "config.yaml")
    provenance.write_version(run)
    return run


def append_metrics(run: Path, record: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(run: Path, next_epoch: int) -> None:
    """On resume, drop lines of epochs the checkpoint does not contain (written after it, before a crash)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < next_epoch]
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))


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
            shutil.copyfile(self.run / CHECKPOINT, self.run / ".best.tmp")
            os.replace(self.run / ".best.tmp", self.run / "best.pt")

    def finish(self, final: dict) -> None:
        self.events.close()
        write_final(self.run, final, self.cfg)
