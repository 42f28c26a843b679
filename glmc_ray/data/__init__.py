"""Build the training batch source and the evaluation sets for one worker from the data config."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glmc_ray.data import cifar, splitfile
from glmc_ray.data.batches import EpochPlan, InMemoryBatches, LoaderBatches
from glmc_ray.data.synthetic import synthetic_images
from glmc_ray.methods.glmc import class_balanced_weights

CIFAR_CLASSES = {"cifar10": (10, 5000), "cifar100": (100, 500)}


@dataclass
class DataBundle:
    train: InMemoryBatches | LoaderBatches  # .epoch(e) -> Iterator[Batch], len() = steps per epoch
    evals: dict[str, Iterable]  # split name ("val", "test") -> iterable of (x, y) for this rank
    class_counts: list[int]  # training images per class (after any validation hold-out)
    bad_images: splitfile.BadImageLog  # unreadable images skipped this epoch, per split (none in memory)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


class InMemoryEval:
    """A fixed uint8 evaluation set on the device, this rank's share, normalised batch by batch."""

    def __init__(self, images, labels, mean, std, device, batch_size, rank, world_size, memory_format):
        index = torch.arange(rank, len(labels), world_size)
        self.images = torch.as_tensor(images)[index].permute(0, 3, 1, 2).to(device)
        self.labels = torch.as_tensor(labels)[index].to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.batch_size, self.memory_format = batch_size, memory_format

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            x = (self.images[start:start + self.batch_size].float() - self.mean) / self.std
            yield x.contiguous(memory_format=self.memory_format), self.labels[start:start + self.batch_size]


def _arrays(cfg) -> tuple[tuple, tuple, list[int], tuple]:
    """(train images, labels), (test images, labels), class counts, normalisation for in-memory datasets."""
    if cfg.dataset == "synthetic":
        counts = cifar.long_tailed_counts(cfg.synthetic_max_count, cfg.synthetic_classes, cfg.imbalance_factor)
        train = synthetic_images(counts, cfg.image_size, cfg.subset_seed, cfg.subset_seed + 1)
        test = synthetic_images([cfg.synthetic_test_per_class] * len(counts), cfg.image_size, cfg.subset_seed,
                                cfg.subset_seed + 2)
        return train, test, counts, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    num_classes, max_count = CIFAR_CLASSES[cfg.dataset]
    if cfg.download:
        cifar.download_cifar(cfg.root, cfg.dataset)
    images, labels = cifar.load_cifar(cfg.root, cfg.dataset, train=True)
    counts = cifar.long_tailed_counts(max_count, num_classes, cfg.imbalance_factor)
    index = cifar.long_tailed_subset(labels, counts, cfg.subset_protocol, cfg.subset_seed,
                                     cfg.sample_with_replacement)
    test = cifar.load_cifar(cfg.root, cfg.dataset, train=False)
    return (images[index], labels[index]), test, counts, cifar.NORMALIZATION[cfg.dataset]


def _hold_out(images, labels, cfg):
    """Split the training arrays into (train, val) by data.val_fraction (val None when 0)."""
    if cfg.val_fraction <= 0:
        return (images, labels), None
    train_idx, val_idx = cifar.stratified_split(labels, cfg.val_fraction, cfg.val_seed)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def per_sample_weights(labels, counts: list[int], exponent: float) -> torch.Tensor:
    return class_balanced_weights(torch.as_tensor(counts), exponent)[torch.as_tensor(labels)]


def training_class_counts(cfg) -> list[int]:
    """Per-class training counts the run will use (after the validation hold-out), without a device."""
    if cfg.data.dataset in splitfile.NORMALIZATION:
        _, labels = splitfile.read_split_file(Path(cfg.data.root) / cfg.data.train_split, cfg.data.root)
        return splitfile.class_counts(labels, cfg.data.train_split)
    (images, labels), _, counts, _ = _arrays(cfg.data)
    (_, labels), _ = _hold_out(images, labels, cfg.data)
    return np.bincount(labels, minlength=len(counts)).tolist()


def build_data(cfg, device, rank: int = 0, world_size: int = 1,
               memory_format=torch.contiguous_format, rebalanced: bool = True) -> DataBundle:
    """cfg: the full Config. `rebalanced` False skips the second stream (methods that do not use it)."""
    if cfg.data.dataset in splitfile.NORMALIZATION:
        return _build_split_files(cfg, device, rank, world_size, rebalanced)
    (images, labels), (test_images, test_labels), counts, (mean, std) = _arrays(cfg.data)
    (images, labels), val = _hold_out(images, labels, cfg.data)
    counts = np.bincount(labels, minlength=len(counts)).tolist()
    weights = per_sample_weights(labels, counts, cfg.method.resample_exponent) if rebalanced else None
    plan = EpochPlan(len(labels), cfg.train.batch_size, weights, cfg.train.seed, rank, world_size)
    train = InMemoryBatches(images, labels, plan, mean, std, device, memory_format=memory_format)

    def make_eval(arrays):
        return InMemoryEval(*arrays, mean, std, device, cfg.train.eval_batch_size, rank, world_size, memory_format)
    evals = {"val": make_eval(val)} if val is not None else {}
    evals["test"] = make_eval((test_images, test_labels))
    return DataBundle(train, evals, counts, splitfile.BadImageLog(cfg.data.max_bad_images))


def _build_split_files(cfg, device, rank, world_size, rebalanced) -> DataBundle:
    data = cfg.data
    mean, std = splitfile.NORMALIZATION[data.dataset]
    paths, labels = splitfile.read_split_file(Path(data.root) / data.train_split, data.root)
    counts = splitfile.class_counts(labels, data.train_split)
    weights = per_sample_weights(labels, counts, cfg.method.resample_exponent) if rebalanced else None
    plan = EpochPlan(len(labels), cfg.train.batch_size, weights, cfg.train.seed, rank, world_size)
    two_views = splitfile.TwoViews(splitfile.train_transform(mean, std, data.image_size))
    train_set = splitfile.ImageListDataset(paths, labels, two_views)
    pin = torch.device(device).type == "cuda"
    bad_images = splitfile.BadImageLog(data.max_bad_images)
    train = LoaderBatches(train_set, plan, data.num_workers, device, bad_images, pin_memory=pin)
    evals = {}
    for name, split in (("val", data.val_split), ("test", data.test_split)):
        if split:
            eval_paths, eval_labels = splitfile.read_split_file(Path(data.root) / split, data.root)
            dataset = splitfile.ImageListDataset(eval_paths, eval_labels,
                                                 splitfile.test_transform(mean, std, data.image_size))
            shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
            loader = torch.utils.data.DataLoader(shard, batch_size=cfg.train.eval_batch_size, pin_memory=pin,
                                                 num_workers=data.num_workers, collate_fn=splitfile.collate_readable)
            evals[name] = splitfile.ReadableBatches(loader, bad_images, name)
    return DataBundle(train, evals, counts, bad_images)
