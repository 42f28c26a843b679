"""In-memory uint8 arrays (CIFAR-10/100-LT, synthetic): the whole training set lives on the training device and
is cropped, flipped and normalised there in batches, with no decode workers."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from glmc_ray.core.config import rebalanced_stream, strong_view, weak_rotation
from glmc_ray.data import cifar
from glmc_ray.data.batches import DataBundle, EpochPlan, per_sample_weights
from glmc_ray.data.images import BadImageLog, Normalizer
from glmc_ray.data.strong_views import DeviceStrongViews
from glmc_ray.data.synthetic import synthetic_images
from glmc_ray.methods.base import Batch

CIFAR_CLASSES = {"cifar10": (10, 5000), "cifar100": (100, 500)}
SYNTHETIC_NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
STRONG_SEED = 7_919  # the strong views' generator: the step's seed plus this (x2) or twice it (rx2)
ROTATION_SEED = 104_729  # the weak view's rotation angles: the step's seed plus this (x1) or twice it (rx1)


def random_rotation(images: torch.Tensor, degrees: float, seed: int, global_size: int, share) -> torch.Tensor:
    """RandomRotation(degrees) of uint8 (B, C, H, W) crops as the official CIFAR lists apply it (nearest
    neighbour, about the centre, the uncovered corners black), with torchvision's kernel, each image at its own
    angle in [-degrees, degrees] drawn for the whole global batch from `seed` (this rank's `share` of them)."""
    generator = torch.Generator().manual_seed(seed)
    angles = ((torch.rand(global_size, generator=generator, dtype=torch.float64) * 2 - 1) * degrees)[share]
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

    def _views(self, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        return self.normalizer(random_crop_flip(self.padded, index, self.size, offsets, flips))

    def _augmented_pair(self, index, g, global_size, share, rotation_seed: int):
        """Two independent augmentations of the same images (TwoCropTransform), the first rotated where the
        method's weak view is (its angles from a generator of their own: the crops are the same either way)."""
        offsets = torch.randint(2 * self.padding + 1, (2, global_size, 2), generator=g)[:, share].to(self.device)
        flips = (torch.rand((2, global_size), generator=g) < 0.5)[:, share].to(self.device)
        first = random_crop_flip(self.padded, index, self.size, offsets[0], flips[0])
        if self.rotation:
            first = random_rotation(first, self.rotation, rotation_seed, global_size, share)
        return self.normalizer(first), self._views(index, offsets[1], flips[1])

    def _strong_view(self, index, seed: int, global_size, share) -> torch.Tensor:
        """The strong view, from a generator of its own: x1 is the same with or without it."""
        g = torch.Generator().manual_seed(seed)
        offsets = torch.randint(2 * self.padding + 1, (global_size, 2), generator=g)[share].to(self.device)
        flips = (torch.rand(global_size, generator=g) < 0.5)[share].to(self.device)
        keys = torch.randint(2 ** 62, (global_size,), generator=g)[share]
        centres = torch.randint(self.size, (global_size, 2), generator=g)[share]
        crops = random_crop_flip(self.padded, index, self.size, offsets, flips)
        return self.normalizer(self.strong(crops, keys, centres))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        share = slice(self.plan.rank, None, self.plan.world_size)
        for step in self.plan.steps(epoch):
            g = torch.Generator().manual_seed(step.seed)
            uniform = step.uniform.to(self.device)
            x1, x2 = self._augmented_pair(uniform, g, step.global_size, share, step.seed + ROTATION_SEED)
            if self.strong is not None:
                x2 = self._strong_view(uniform, step.seed + STRONG_SEED, step.global_size, share)
            batch = Batch(x1, x2, self.labels[uniform])
            if step.rebalanced is not None:
                rebalanced = step.rebalanced.to(self.device)
                batch.rx1, batch.rx2 = self._augmented_pair(rebalanced, g, step.global_size, share,
                                                            step.seed + 2 * ROTATION_SEED)
                if self.strong is not None:
                    batch.rx2 = self._strong_view(rebalanced, step.seed + 2 * STRONG_SEED, step.global_size, share)
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
