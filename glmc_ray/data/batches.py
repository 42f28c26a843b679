"""Batch sources: the iterators the training loop consumes.

Every source follows one `EpochPlan`: the global batch's uniform indices (a fresh permutation each epoch)
and its class-rebalanced indices (drawn with probability ∝ n_c^-q per sample, like the official
WeightedRandomSampler) come from a generator seeded by (seed, epoch) that all ranks share; rank r keeps
positions r, r+W, ... of each global batch. So an epoch covers every training image exactly once across
workers, and the global batch does not depend on the number of workers.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmc_ray.data.splitfile import BadImageLog, ReadableBatches, collate_readable
from glmc_ray.methods.base import Batch


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


@dataclass
class StepPlan:
    uniform: torch.Tensor  # this rank's share of the global batch
    rebalanced: torch.Tensor | None
    global_size: int
    seed: int  # for per-sample randomness drawn over the global batch (augmentation)


@dataclass
class EpochPlan:
    num_samples: int
    global_batch: int
    sample_weights: torch.Tensor | None  # per-sample re-sampling weight, None: no rebalanced stream
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.num_samples < self.world_size:
            raise ValueError(f"{self.num_samples} training images cannot be shared by {self.world_size} workers")

    def __len__(self) -> int:
        return len(self._bounds())

    def _bounds(self) -> list[tuple[int, int]]:
        starts = list(range(0, self.num_samples, self.global_batch))
        bounds = [(s, min(s + self.global_batch, self.num_samples)) for s in starts]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < self.world_size:
            bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]  # a tail smaller than the world joins the last batch
        return bounds

    def steps(self, epoch: int) -> Iterator[StepPlan]:
        g = epoch_generator(self.seed, epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        share = slice(self.rank, None, self.world_size)
        for start, stop in self._bounds():
            size = stop - start
            rebalanced = None
            if self.sample_weights is not None:
                rebalanced = torch.multinomial(self.sample_weights, size, replacement=True, generator=g)[share]
            step_seed = int(torch.randint(2**62, (1,), generator=g))
            yield StepPlan(perm[start:stop][share], rebalanced, size, step_seed)


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

    def __init__(self, images, labels, plan: EpochPlan, mean, std, device, padding: int = 4,
                 memory_format=torch.contiguous_format):
        images = torch.as_tensor(images).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
        self.size = images.shape[-1]
        self.padding = padding
        self.padded = F.pad(images, (padding,) * 4).to(device)
        self.labels = torch.as_tensor(labels).to(device)
        self.plan = plan
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.device = device
        self.memory_format = memory_format

    def __len__(self) -> int:
        return len(self.plan)

    def _views(self, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        x = random_crop_flip(self.padded, index, self.size, offsets, flips).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def _augmented_pair(self, index, g, global_size, share):
        """Two independent augmentations of the same images (TwoCropTransform)."""
        offsets = torch.randint(2 * self.padding + 1, (2, global_size, 2), generator=g)[:, share].to(self.device)
        flips = (torch.rand((2, global_size), generator=g) < 0.5)[:, share].to(self.device)
        return self._views(index, offsets[0], flips[0]), self._views(index, offsets[1], flips[1])

    def epoch(self, epoch: int) -> Iterator[Batch]:
        share = slice(self.plan.rank, None, self.plan.world_size)
        for step in self.plan.steps(epoch):
            g = torch.Generator().manual_seed(step.seed)
            uniform = step.uniform.to(self.device)
            x1, x2 = self._augmented_pair(uniform, g, step.global_size, share)
            batch = Batch(x1, x2, self.labels[uniform])
            if step.rebalanced is not None:
                rebalanced = step.rebalanced.to(self.device)
                batch.rx1, batch.rx2 = self._augmented_pair(rebalanced, g, step.global_size, share)
                batch.ry = self.labels[rebalanced]
            yield batch


class _PlannedBatchSampler(torch.utils.data.Sampler):
    """Feeds a DataLoader the index lists of one stream of the current epoch's plan."""

    def __init__(self, plan: EpochPlan, stream: str):
        self.plan, self.stream, self.epoch = plan, stream, 0

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for step in self.plan.steps(self.epoch):
            yield getattr(step, self.stream).tolist()


class LoaderBatches:
    """Per-image decode + augmentation in DataLoader workers (split-file datasets, official-style CIFAR).

    The dataset returns ((view1, view2), label); the uniform and rebalanced streams are two loaders over
    the same dataset following the same plan, zipped positionally as in the official code.

    Unreadable images are dropped from their batch (named and counted in `bad_images` under "train"); the
    two streams are then cut to the shorter one, since the method pairs them position by position.
    """

    def __init__(self, dataset, plan: EpochPlan, num_workers: int, device, bad_images: BadImageLog,
                 pin_memory: bool = False):
        self.plan = plan
        self.device = device
        streams = ["uniform"] + (["rebalanced"] if plan.sample_weights is not None else [])
        self.samplers = [_PlannedBatchSampler(plan, s) for s in streams]
        self.loaders = [ReadableBatches(torch.utils.data.DataLoader(
            dataset, batch_sampler=s, num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_readable,
            persistent_workers=num_workers > 0), bad_images, "train") for s in self.samplers]

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for sampler in self.samplers:
            sampler.epoch = epoch
        if len(self.loaders) == 1:
            for (x1, x2), y in self.loaders[0]:
                yield Batch(x1, x2, y)
            return
        for ((x1, x2), y), ((rx1, rx2), ry) in zip(*self.loaders, strict=True):
            n = min(len(y), len(ry))
            yield Batch(x1[:n], x2[:n], y[:n], rx1[:n], rx2[:n], ry[:n])
