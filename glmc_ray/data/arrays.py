"""In-memory uint8 arrays (CIFAR-10/100-LT, synthetic): the whole training set lives on the training device and
is cropped, flipped and normalised there in batches, with no decode workers. Every random choice of a view is
drawn per place in the epoch's order (`EpochDraws`), as the files and shards sources key theirs
(device_augment.view_key): a view does not depend on the batch size or the number of workers."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from glmc_ray.core.config import rebalanced_stream, strong_view, weak_rotation
from glmc_ray.data import cifar
from glmc_ray.data.batches import DataBundle, EpochPlan, per_sample_weights
from glmc_ray.data.device_augment import STREAM_IDS, view_key
from glmc_ray.data.images import BadImageLog, Normalizer
from glmc_ray.data.strong_views import DeviceStrongViews
from glmc_ray.data.synthetic import synthetic_images
from glmc_ray.methods.base import Batch

CIFAR_CLASSES = {"cifar10": (10, 5000), "cifar100": (100, 500)}
SYNTHETIC_NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@dataclass(frozen=True)
class EpochDraws:
    """Every random choice of one stream's in-memory views in one epoch, a row per place in the epoch's order:
    an image's views depend on the seed, the epoch, the stream and its place only, not on the batch size, the
    number of workers or a resume. All are drawn, in one order, whichever views a run makes (x1 is the same
    with or without a strong x2 or a rotation)."""

    offsets: torch.Tensor  # (3, N, 2) crop offsets (top, left) in [0, 2 padding]: x1, x2, the strong x2
    flips: torch.Tensor  # (3, N) horizontal flips, the same three views
    turns: torch.Tensor  # (N,) float64 in [-1, 1): x1's rotation angle over its degrees (config.weak_rotation)
    keys: torch.Tensor  # (N,) int64: the strong view's per-image key (strong_views.DeviceStrongViews)
    centres: torch.Tensor  # (N, 2): the strong view's Cutout centres

    @classmethod
    def draw(cls, seed: int, epoch: int, stream: str, places: int, padding: int, size: int) -> EpochDraws:
        g = torch.Generator().manual_seed(view_key(seed, epoch, STREAM_IDS[stream], "in_memory", 0))
        return cls(torch.randint(2 * padding + 1, (3, places, 2), generator=g),
                   torch.rand((3, places), generator=g) < 0.5,
                   torch.rand(places, generator=g, dtype=torch.float64) * 2 - 1,
                   torch.randint(2 ** 62, (places,), generator=g),
                   torch.randint(size, (places, 2), generator=g))


def random_rotation(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RandomRotation of uint8 (B, C, H, W) crops as the official CIFAR lists apply it (nearest neighbour, about
    the centre, the uncovered corners black), with torchvision's kernel, each image at its own angle (degrees)."""
    return torch.stack([TF.rotate(image, angle, interpolation=InterpolationMode.NEAREST, fill=0)
                        for image, angle in zip(images, angles.tolist(), strict=True)])


def random_crop_flip(padded: torch.Tensor, index: torch.Tensor, size: int, offsets: torch.Tensor,
                     flips: torch.Tensor) -> torch.Tensor:
    """Batched RandomCrop(size, padding) + RandomHorizontalFlip as one gather on the device.

    padded: (N, C, size+2p, size+2p) uint8; offsets: (B, 2) top/left in [0, 2p]; flips: (B,) bool.
    """
    ar = torch.arange(size, device=padded.device)
    rows = offsets[:, 0:1] + ar
    cols = offsets[:, 1:2] + ar
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    out = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, size, size, C)
    return out.permute(0, 3, 1, 2)


class InMemoryBatches:
    """The CIFAR fast path: the whole uint8 training set on the device, augmentation batched there."""

    def __init__(self, images, labels, plan: EpochPlan, normalizer: Normalizer, device, padding: int = 4,
                 strong: DeviceStrongViews | None = None, rotation: float = 0.0):
        images = torch.as_tensor(images).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        self.size = images.shape[-1]
        self.padding = padding
        self.padded = F.pad(images, (padding,) * 4).to(device)
        self.labels = torch.as_tensor(labels).to(device)
        self.plan, self.normalizer, self.device = plan, normalizer, device
        self.strong = strong  # data.strong_augmentation: x2 (and rx2) become the strong view
        self.rotation = rotation  # degrees of x1's (and rx1's) random rotation (config.weak_rotation)

    def __len__(self) -> int:
        return len(self.plan)

    def _crops(self, index: torch.Tensor, draws: EpochDraws, view: int, places: torch.Tensor) -> torch.Tensor:
        return random_crop_flip(self.padded, index, self.size, draws.offsets[view, places].to(self.device),
                                draws.flips[view, places].to(self.device))

    def _views(self, index: torch.Tensor, draws: EpochDraws, places: torch.Tensor):
        """(x1, x2) of the images `index` at the epoch's `places`: two independent crops and flips
        (TwoCropTransform), x1 rotated where the method's weak view is, x2 the strong view where there is one."""
        first = self._crops(index, draws, 0, places)
        if self.rotation:
            first = random_rotation(first, draws.turns[places] * self.rotation)
        if self.strong is None:
            return self.normalizer(first), self.normalizer(self._crops(index, draws, 1, places))
        strong = self.strong(self._crops(index, draws, 2, places), draws.keys[places], draws.centres[places])
        return self.normalizer(first), self.normalizer(strong)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        streams = STREAM_IDS if self.plan.sample_weights is not None else ("uniform",)  # no re-balanced stream
        draws = {stream: EpochDraws.draw(self.plan.seed, epoch, stream, self.plan.num_samples, self.padding,
                                         self.size) for stream in streams}
        for step in self.plan.steps(epoch):
            uniform = step.uniform.to(self.device)
            batch = Batch(*self._views(uniform, draws["uniform"], step.positions), self.labels[uniform])
            if step.rebalanced is not None:
                rebalanced = step.rebalanced.to(self.device)
                batch.rx1, batch.rx2 = self._views(rebalanced, draws["rebalanced"], step.positions)
                batch.ry = self.labels[rebalanced]
            yield batch


class InMemoryEval:
    """A fixed uint8 evaluation set on the device, this rank's share, normalised batch by batch."""

    def __init__(self, images, labels, normalizer: Normalizer, device, batch_size: int, rank: int, world_size: int):
        index = torch.arange(rank, len(labels), world_size)
        self.images = torch.as_tensor(images)[index].permute(0, 3, 1, 2).to(device)
        self.labels = torch.as_tensor(labels)[index].to(device)
        self.normalizer, self.batch_size = normalizer, batch_size

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            yield self.normalizer(self.images[start:stop]), self.labels[start:stop]


def load_arrays(data) -> tuple[tuple, tuple, list[int], tuple]:
    """(train images, labels), (test images, labels), class counts, normalisation (data.mean/std when given)."""
    if data.source == "synthetic":
        counts = cifar.long_tailed_counts(data.synthetic_max_count, data.synthetic_classes, data.imbalance_factor)
        train = synthetic_images(counts, data.image_size, data.subset_seed, data.subset_seed + 1)
        test = synthetic_images([data.synthetic_test_per_class] * len(counts), data.image_size, data.subset_seed,
                                data.subset_seed + 2)
    else:
        num_classes, max_count = CIFAR_CLASSES[data.source]
        if data.download:
            cifar.download_cifar(data.root, data.source)
        images, labels = cifar.load_cifar(data.root, data.source, train=True)
        counts = cifar.long_tailed_counts(max_count, num_classes, data.imbalance_factor)
        index = cifar.long_tailed_subset(labels, counts, data.subset_protocol, data.subset_seed,
                                         data.sample_with_replacement)
        train, test = (images[index], labels[index]), cifar.load_cifar(data.root, data.source, train=False)
    return train, test, counts, normalization(data)


def normalization(data) -> tuple:
    """(mean, std): data.mean/std when given, else the dataset's own (CIFAR's published, the synthetic data's)."""
    if data.mean:
        return data.mean, data.std
    return SYNTHETIC_NORMALIZATION if data.source == "synthetic" else cifar.NORMALIZATION[data.source]


def hold_out(images, labels, data):
    """Split the training arrays into (train, val) by data.val_fraction (val None when 0)."""
    if data.val_fraction <= 0:
        return (images, labels), None
    train_idx, val_idx = cifar.stratified_split(labels, data.val_fraction, data.val_seed)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def class_names(cfg) -> list[str] | None:
    return None if cfg.data.source == "synthetic" else cifar.cifar_class_names(cfg.data.root, cfg.data.source)


def training_class_counts(cfg) -> list[int]:
    (images, labels), _, counts, _ = load_arrays(cfg.data)
    (_, labels), _ = hold_out(images, labels, cfg.data)
    return np.bincount(labels, minlength=len(counts)).tolist()


def build(cfg, device, rank: int, world_size: int, memory_format, dataset_shard=None) -> DataBundle:
    (images, labels), test, counts, (mean, std) = load_arrays(cfg.data)
    (images, labels), val = hold_out(images, labels, cfg.data)
    counts = np.bincount(labels, minlength=len(counts)).tolist()
    weights = per_sample_weights(labels, counts, q) if (q := rebalanced_stream(cfg)) is not None else None
    plan = EpochPlan(len(labels), cfg.train.batch_size, weights, cfg.train.seed, rank, world_size,
                     cfg.data.repeated_augmentation)
    normalizer = Normalizer(mean, std, device, memory_format)
    strong = None if strong_view(cfg) == "none" else DeviceStrongViews(strong_view(cfg), mean, std)
    train = InMemoryBatches(images, labels, plan, normalizer, device, strong=strong, rotation=weak_rotation(cfg))

    def make_eval(arrays):
        return InMemoryEval(*arrays, normalizer, device, cfg.train.eval_batch_size, rank, world_size)
    evals = {"val": make_eval(val)} if val is not None else {}
    evals["test"] = make_eval(test)
    return DataBundle(train, evals, counts, BadImageLog(cfg.data.max_bad_images))
