"""The data source named by `data.source`, one module each, behind the same three functions:

  build(cfg, device, rank, world_size, memory_format, dataset_shard) -> DataBundle
  training_class_counts(cfg) -> per-class training counts, without a device
and, for a source that streams through Ray Data (shards),
  ray_datasets(cfg, gpu) -> the Datasets a Ray Train run splits across its workers
  ray_cpus(cfg) -> the logical CPUs those streams need at the least

The loop, the methods and the Ray Train code only see a `DataBundle` and its `.train.epoch(e)` / `len()`. Which
streams and views a source makes follows from the config: a class-rebalanced second stream where
`config.rebalanced_stream(cfg)` gives its exponent, a strong view where `config.strong_view(cfg)` names one.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from glmc_ray.core.config import IN_MEMORY_SOURCES, ConfigError
from glmc_ray.data.batches import DataBundle


def source_module(cfg):
    """glmc_ray.data.arrays (CIFAR, synthetic), .files (split files) or .shards (Parquet through Ray Data).

    Imported on use: only the shards source needs Ray Data."""
    name = "arrays" if cfg.data.source in IN_MEMORY_SOURCES else cfg.data.source
    return importlib.import_module(f"glmc_ray.data.{name}")


def build_data(cfg, device, rank: int = 0, world_size: int = 1, memory_format=torch.contiguous_format,
               dataset_shard=None) -> DataBundle:
    """cfg: the full Config. `dataset_shard`: Ray Train's `get_dataset_shard` inside a Ray Train worker."""
    bundle = source_module(cfg).build(cfg, device, rank, world_size, memory_format, dataset_shard)
    bundle.class_names = class_names(cfg)
    if bundle.class_names is not None and len(bundle.class_names) != bundle.num_classes:
        raise ConfigError(f"data.class_names: {cfg.data.class_names} names {len(bundle.class_names)} classes, the "
                          f"training split has {bundle.num_classes}; expected one name per line, in label order",
                          "data.class_names")
    return bundle


def class_names(cfg) -> list[str] | None:
    """The classes' names in label order: data.class_names (a text file, one name per line), else what the
    dataset itself names (CIFAR's meta file); None where nothing names them (they are numbered then)."""
    if cfg.data.class_names:
        path = Path(cfg.data.class_names)
        if not path.is_file():
            raise ConfigError(f"data.class_names: {path} does not exist; expected a text file with one class name "
                              f"per line, in label order", "data.class_names")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    module = source_module(cfg)
    return module.class_names(cfg) if hasattr(module, "class_names") else None


def training_class_counts(cfg) -> list[int]:
    """Per-class training counts; a number of classes other than data.classes (where set) is a ConfigError."""
    counts = source_module(cfg).training_class_counts(cfg)
    if cfg.data.classes and len(counts) != cfg.data.classes:
        where = f"data.root={cfg.data.root}, data.train_split={cfg.data.train_split}"
        if cfg.data.source in IN_MEMORY_SOURCES:
            where = f"data.source={cfg.data.source}"
        raise ConfigError(f"data.classes: {cfg.data.classes}, the recipe's dataset, but the training split "
                          f"({where}) has {len(counts)} classes: a recipe for another dataset, or another "
                          f"dataset's data (data.classes=0 accepts any number)", "data.classes")
    return counts


def normalization(cfg) -> tuple:
    """(mean, std) per channel that the source normalises images with: data.mean/std, else an in-memory
    dataset's own (a distillation teacher converts the student's batch to its own: models/teacher.py)."""
    module = source_module(cfg)
    return module.normalization(cfg.data) if hasattr(module, "normalization") else (cfg.data.mean, cfg.data.std)


def ray_datasets(cfg, gpu: bool = False) -> dict:
    """Ray Datasets (or callables making them) keyed by the names `build` reads with `dataset_shard`; `gpu`:
    the workers that read them train on GPUs."""
    module = source_module(cfg)
    return module.ray_datasets(cfg, gpu) if hasattr(module, "ray_datasets") else {}


def ray_cpus(cfg) -> float:
    """0 for sources without Ray Data. A Ray instance started here adds these logical CPUs: Ray Data waits
    forever for CPUs that Train workers hold (ray-project/ray#44687)."""
    module = source_module(cfg)
    return module.ray_cpus(cfg) if hasattr(module, "ray_cpus") else 0.0
