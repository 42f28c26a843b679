"""A run that starts from another run's weights (`train.init_from`): the second stage of a two-stage method
(SHIKE's classifier re-training, RIDE's router); or that learns from another run's model, its teacher
(`method.ride.teacher`, RIDE's distillation; `method.deit_lt.teacher`). The parent is a run directory, in-process
(checkpoint.pt) or Ray Train (its checkpoint folders where its storage.json says, else beside it), or a run's
storage copy (s3://bucket/runs/<run>).

Everything is checked before the run starts: the parent exists and has a checkpoint, and trained the same model
on the same training subset (a different one would not load, or would re-train heads on other data).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from glmc_ray.core import config as config_lib
from glmc_ray.core import storage
from glmc_ray.runs import ray_resume, rundir

PARENT_FILE = "parent.json"  # in the child's run directory
# What fixes the training subset, hence the class counts the parent's heads were trained on
SUBSET_KEYS = ("source", "root", "imbalance_factor", "subset_protocol", "subset_seed", "sample_with_replacement",
               "val_fraction", "val_seed", "train_split")


@dataclass
class Parent:
    run: str  # as given in train.init_from
    checkpoint: str  # checkpoint.pt, or a Ray checkpoint folder (path or URI)
    config: config_lib.Config


def find(init_from: str, key: str = "train.init_from") -> Parent:
    """The parent's config and newest checkpoint; FileNotFoundError / ConfigError naming `key` and what is
    missing."""
    where = f"{key}: {init_from}"
    expected = "expected the run directory of a finished or interrupted run (or its storage copy)"
    if not storage.is_uri(init_from) and not Path(init_from).is_dir():
        found = "is a file" if Path(init_from).exists() else "does not exist"
        raise FileNotFoundError(f"{where} {found}; {expected}")
    fs, path = storage.resolve(init_from)
    config_path = f"{path}/config.yaml"
    try:
        text = storage.read_text(fs, config_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no config.yaml there; {expected}") from None
    except OSError as err:
        raise storage.StorageError(f"{where}: {storage.explain(err, fs)}") from None
    parent_cfg = config_lib.from_dict(yaml.safe_load(text))
    checkpoint = _newest_checkpoint(init_from, fs, path)
    if checkpoint is None:
        raise FileNotFoundError(f"{where}: the run has no checkpoint (no epoch finished); nothing to start from")
    return Parent(init_from, checkpoint, parent_cfg)


def _newest_checkpoint(init_from: str, fs, path: str) -> str | None:
    local = Path(path) / rundir.CHECKPOINT
    if not storage.is_uri(init_from) and local.is_file():
        return str(local)
    experiment = init_from
    recorded = Path(path) / ray_resume.STORAGE_FILE
    if not storage.is_uri(init_from) and recorded.is_file():
        experiment = storage.join(json.loads(recorded.read_text())["storage"], Path(path).name)
    efs, epath = storage.resolve(experiment)
    folders = ray_resume.checkpoint_folders(efs, epath)
    if not folders:
        return None
    newest = max(folders)[1]
    return newest if not storage.is_uri(experiment) else f"{experiment.split('://')[0]}://{newest}"


def newest_weights(run: str, key: str = "train.init_from") -> tuple[config_lib.Config, dict]:
    """The run's config and the model weights of its newest checkpoint (errors name `key`, as `find`'s)."""
    found = find(run, key)
    if found.checkpoint.endswith(rundir.CHECKPOINT):
        return found.config, rundir.load_checkpoint(Path(found.checkpoint))["model"]
    return found.config, ray_resume.load_state(found.checkpoint)["model"]


def check(cfg: config_lib.Config) -> Parent | None:
    """The parent of a run with train.init_from, checked against it; None without one."""
    if not cfg.train.init_from:
        return None
    parent = find(cfg.train.init_from)
    mismatch = [f"model.{f.name}" for f in dataclasses.fields(cfg.model)
                if getattr(cfg.model, f.name) != getattr(parent.config.model, f.name)]
    mismatch += _other_data(cfg, parent.config)
    if config_lib.experts_of(cfg) != config_lib.experts_of(parent.config):
        mismatch.append("model.experts")
    layouts = config_lib.EXPERT_LAYOUTS
    if layouts.get(cfg.method.name) != layouts.get(parent.config.method.name):
        mismatch.append("method.name")
    if mismatch:
        key = mismatch[0]
        ours, theirs = _value(cfg, key), _value(parent.config, key)
        raise config_lib.ConfigError(
            f"{key}: {ours!r} here, {theirs!r} in the parent run {cfg.train.init_from} (train.init_from); a second "
            f"stage trains the same model on the same training subset (differing: {', '.join(mismatch)})", key)
    return parent


def check_teacher(cfg: config_lib.Config) -> None:
    """The distillation teacher of a method that takes one (method_config.TEACHER_KEYS), if given: a finished or
    interrupted run with weights, trained on the same training subset with images of as many channels (another
    size or normalisation is converted: models/teacher.py), and not itself a student; RIDE's is a RIDE stage-1
    run (its ensemble teaches the student's)."""
    teacher = config_lib.teacher_of(cfg)
    if teacher is None:
        return
    key, run = teacher
    found = find(run, key)
    theirs = found.config.method
    if (theirs_taught := config_lib.teacher_of(found.config)) is not None:
        their_key, their_teacher = theirs_taught
        raise config_lib.ConfigError(f"{key}: {run} is itself a distillation student ({their_key}: {their_teacher}); "
                                     f"a teacher learns from the data alone: name {their_teacher} or another run",
                                     key)
    if cfg.method.name == "ride" and (theirs.name != "ride" or theirs.ride.stage != "experts"):
        stage = f" stage {theirs.section.stage}" if hasattr(theirs.section, "stage") else ""
        raise config_lib.ConfigError(f"{key}: {run} is a {theirs.name}{stage} run; expected a RIDE stage-1 run "
                                     f"(method.ride.stage: experts; the official teacher has 6 experts)", key)
    mismatch = _other_data(cfg, found.config, (*SUBSET_KEYS, "classes"))
    if cfg.data.channels != found.config.data.channels:
        mismatch.append("data.mean")
    if mismatch:
        first = mismatch[0]
        raise config_lib.ConfigError(f"{key}: {first} is {_value(found.config, first)!r} in the teacher run {run}, "
                                     f"{_value(cfg, first)!r} here; the teacher must have learnt the same classes "
                                     f"from the same training subset (differing: {', '.join(mismatch)})", key)


def _other_data(cfg: config_lib.Config, other: config_lib.Config, keys=SUBSET_KEYS) -> list[str]:
    return [f"data.{key}" for key in keys if getattr(cfg.data, key) != getattr(other.data, key)]


def _value(cfg, key: str):
    section, field = key.split(".")
    if key == "model.experts":
        return config_lib.experts_of(cfg)
    return getattr(getattr(cfg, section), field)


def record(run: Path, cfg: config_lib.Config) -> None:
    """parent.json in a fresh run directory of a run with train.init_from: the run and checkpoint it starts from."""
    if cfg.train.init_from:
        parent = find(cfg.train.init_from)
        rundir.atomic_write(run / PARENT_FILE, lambda tmp: tmp.write_text(json.dumps(
            {"init_from": parent.run, "checkpoint": parent.checkpoint, "method": parent.config.method.name,
             "name": parent.config.name}, indent=1) + "\n"))
