"""Image files named by split files (`relative/path label` per line, the ImageNet-LT / iNaturalist format) under
an image root, decoded and augmented in DataLoader worker processes."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import default_collate

from glmc_ray.core.config import rebalanced_stream, strong_view, weak_rotation
from glmc_ray.data.batches import DataBundle, EpochPlan, per_sample_weights
from glmc_ray.data.device_augment import STREAM_IDS, DeviceTail, KeyedViews, augment_on_device, view_key
from glmc_ray.data.images import (
    BadImageLog,
    Normalizer,
    TwoViews,
    Unreadable,
    decode,
    decode_tensor,
    test_transform,
)
from glmc_ray.data.strong_views import view_transforms
from glmc_ray.methods.base import Batch


@dataclass(frozen=True)
class SplitLine:
    """One sample of a split file: its 1-based line number, relative path as written, and label."""

    line: int
    path: str
    label: int


def parse_split_lines(path: str | Path) -> list[SplitLine]:
    """The samples of a split file, blank lines left out; a malformed line raises an error naming file and line.

    Images are not looked at (the shard builder lists a missing one and goes on)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{path}:{number}: expected 'relative/path label' with a label >= 0, got {line!r}")
        samples.append(SplitLine(number, parts[0], int(parts[1])))
    if not samples:
        raise ValueError(f"split file {path} holds no samples")
    return samples


def read_split_file(path: str | Path, root: str | Path, check_images: bool = True) -> tuple[list[Path], list[int]]:
    """Parse a split file; a malformed line or a missing image raises an error naming file and line."""
    path, root = Path(path), Path(root)
    paths, labels = [], []
    for sample in parse_split_lines(path):
        image = root / sample.path
        if check_images and not image.is_file():
            raise FileNotFoundError(f"{path}:{sample.line}: image {image} does not exist (data.root = {root})")
        paths.append(image)
        labels.append(sample.label)
    return paths, labels


def class_counts(labels: list[int], path) -> list[int]:
    """Per-class counts; labels must be 0..C-1 with no class missing (the official code assumes it)."""
    counts = torch.bincount(torch.as_tensor(labels)).tolist()
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise ValueError(f"split file {path}: classes {empty[:10]} have no sample (labels must be contiguous)")
    return counts


class ImageListDataset(torch.utils.data.Dataset):
    """Image files (or in-memory uint8 arrays, for the official-style CIFAR baseline) with their labels.

    An item is an index, or (index, view keys) for a `KeyedViews` transform: then each view is (uint8 crop,
    its parameters) for the device tail."""

    def __init__(self, images, labels, transform, channels: int = 3):
        self.images, self.labels, self.transform, self.channels = images, labels, transform, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        index, keys = item if isinstance(item, tuple) else (item, None)
        image = self.images[index]
        if not isinstance(image, Path):
            decoded = Image.fromarray(image)
        else:  # the device tail's crops are cut from torchvision's tensors, the CPU list's from PIL images
            decoded = decode(image, self.channels) if keys is None else decode_tensor(image, self.channels)
        if isinstance(decoded, Unreadable):
            return decoded
        if keys is not None:
            return tuple(self.transform(decoded, key) for key in keys), self.labels[index]
        return self.transform(decoded), self.labels[index]


def collate_readable(samples: list) -> tuple:
    """(default_collate of the readable samples or None, the Unreadable ones)."""
    bad = [s for s in samples if isinstance(s, Unreadable)]
    good = [s for s in samples if not isinstance(s, Unreadable)]
    return (default_collate(good) if good else None), bad


class ReadableBatches:
    """Iterates a DataLoader built with `collate_readable`, logging what was skipped under `split`; images are
    normalised on the device when a `normalizer` is given."""

    def __init__(self, loader, log: BadImageLog, split: str, normalizer: Normalizer | None = None):
        self.loader, self.log, self.split, self.normalizer = loader, log, split, normalizer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, bad in self.loader:
            self.log.add(self.split, bad)
            if batch is None:
                last = f" (the last: {bad[-1].path})" if bad else " (each a known one, not read again)"
                raise ValueError(f"every image of a {self.split} batch was unreadable{last}")
            images, labels = batch
            yield (self.normalizer(images) if self.normalizer else images), labels


class _PlannedBatchSampler(torch.utils.data.Sampler):
    """Feeds a DataLoader the index lists of one stream of the current epoch's plan; with `keyed`, each index
    with the keys of its two views (from its place in the stream's epoch order, not its batch or worker).

    An image found unreadable before (`bad_images.known`) is left out of the list, not read again, and counted
    for this epoch: the re-balanced stream redraws a bad tail image many times. (Draws the DataLoader already
    queued, up to its prefetch depth, are read.)"""

    def __init__(self, plan: EpochPlan, stream: str, paths: list, bad_images: BadImageLog, keyed: bool = False):
        self.plan, self.stream, self.epoch, self.keyed = plan, stream, 0, keyed
        self.paths, self.bad_images = paths, bad_images

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for step in self.plan.steps(self.epoch):
            kept = [(index, position) for index, position in
                    zip(getattr(step, self.stream).tolist(), step.positions.tolist(), strict=True)
                    if not self._known_bad(index)]
            if not self.keyed:
                yield [index for index, _ in kept]
                continue
            stream = STREAM_IDS[self.stream]
            yield [(index, tuple(view_key(self.plan.seed, self.epoch, stream, position, view) for view in (0, 1)))
                   for index, position in kept]

    def _known_bad(self, index: int) -> bool:
        if not self.bad_images.named:  # the common case: nothing unreadable yet (and in-memory images never are)
            return False
        path = str(self.paths[index])
        if not self.bad_images.known(path):
            return False
        self.bad_images.add("train", [Unreadable(path, "found unreadable before; not read again")])
        return True


class LoaderBatches:
    """Per-image decode + augmentation in DataLoader workers (split-file datasets, official-style CIFAR).

    The dataset returns ((view1, view2), label) as uint8; the uniform and rebalanced streams are two loaders
    over the same dataset following the same plan, zipped positionally as in the official code, and
    finished on the device by `finish`: a `Normalizer`, or a `DeviceTail` when each view is (crop, parameters).

    Unreadable images are dropped from their batch (named and counted in `bad_images` under "train"); the
    two streams are then cut to the shorter one, since the method pairs them position by position.
    """

    def __init__(self, dataset, plan: EpochPlan, num_workers: int, finish: Normalizer | DeviceTail,
                 bad_images: BadImageLog, pin_memory: bool = False):
        self.plan, self.finish = plan, finish
        streams = ["uniform"] + (["rebalanced"] if plan.sample_weights is not None else [])
        self.samplers = [_PlannedBatchSampler(plan, s, dataset.images, bad_images, keyed=isinstance(finish, DeviceTail))
                         for s in streams]
        self.loaders = [ReadableBatches(torch.utils.data.DataLoader(
            dataset, batch_sampler=s, num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_readable,
            persistent_workers=num_workers > 0), bad_images, "train") for s in self.samplers]

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for sampler in self.samplers:
            sampler.epoch = epoch
        def n(view, k=None):
            return self.finish(_first_rows(view, k))
        if len(self.loaders) == 1:
            for (x1, x2), y in self.loaders[0]:
                yield Batch(n(x1), n(x2), y)
            return
        for ((x1, x2), y), ((rx1, rx2), ry) in zip(*self.loaders, strict=True):
            k = min(len(y), len(ry))
            yield Batch(n(x1, k), n(x2, k), y[:k], n(rx1, k), n(rx2, k), ry[:k])


def _first_rows(view, k: int | None):
    """The first k rows of a view: a tensor, or a (crops, parameters) pair; all of it when k is None."""
    if k is None:
        return view
    return view[:k] if isinstance(view, torch.Tensor) else [part[:k] for part in view]



def split_path(data, split: str) -> Path:
    return Path(data.root) / split


def training_class_counts(cfg) -> list[int]:
    _, labels = read_split_file(split_path(cfg.data, cfg.data.train_split), cfg.data.root)
    return class_counts(labels, cfg.data.train_split)


def build(cfg, device, rank: int, world_size: int, memory_format, dataset_shard=None) -> DataBundle:
    data = cfg.data
    paths, labels = read_split_file(split_path(data, data.train_split), data.root)
    counts = class_counts(labels, data.train_split)
    weights = per_sample_weights(labels, counts, q) if (q := rebalanced_stream(cfg)) is not None else None
    plan = EpochPlan(len(labels), cfg.train.batch_size, weights, cfg.train.seed, rank, world_size,
                     cfg.data.repeated_augmentation)
    pin = torch.device(device).type == "cuda"
    normalizer = Normalizer(data.mean, data.std, device, memory_format)
    strong, rotation = strong_view(cfg), weak_rotation(cfg)
    if augment_on_device(data, pin, strong, rotation):
        views, finish = KeyedViews(data.augmentation, data.image_size), DeviceTail(normalizer)
    else:
        views = TwoViews(*view_transforms(data.augmentation, data.image_size, strong, data.mean, data.std,
                                          rotation))
        finish = normalizer
    train_set = ImageListDataset(paths, labels, views, data.channels)
    bad_images = BadImageLog(data.max_bad_images)
    train = LoaderBatches(train_set, plan, data.num_workers, finish, bad_images, pin_memory=pin)
    evals = {}
    for name, split in (("val", data.val_split), ("test", data.test_split)):
        if split:
            eval_paths, eval_labels = read_split_file(split_path(data, split), data.root)
            dataset = ImageListDataset(eval_paths, eval_labels, test_transform(data.augmentation, data.image_size),
                                       data.channels)
            share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
            loader = torch.utils.data.DataLoader(share, batch_size=cfg.train.eval_batch_size, pin_memory=pin,
                                                 num_workers=data.num_workers, collate_fn=collate_readable)
            evals[name] = ReadableBatches(loader, bad_images, name, normalizer)
    return DataBundle(train, evals, counts, bad_images)
