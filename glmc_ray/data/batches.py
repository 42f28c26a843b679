"""What every data source hands the loop (`DataBundle`), and the epoch plan the in-memory and file sources share.

Those sources follow one `EpochPlan`: the global batch's uniform indices (a fresh permutation each epoch)
and its class-rebalanced indices (drawn with probability ∝ n_c^-q per sample, like the official
WeightedRandomSampler) come from a generator seeded by (seed, epoch) that all ranks share; rank r keeps
positions r, r+W, ... of each global batch. So an epoch covers every training image exactly once across
workers, and the global batch does not depend on the number of workers.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from glmc_ray.core.longtail import class_balanced_weights
from glmc_ray.data.images import BadImageLog
from glmc_ray.methods.base import Batch


class BatchSource(Protocol):
    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...  # steps per epoch, the same on every rank


@dataclass
class DataBundle:
    train: BatchSource
    evals: dict[str, Iterable]  # split name ("val", "test") -> iterable of (normalised x, y) for this rank
    class_counts: list[int]  # training images per class (after any validation hold-out)
    bad_images: BadImageLog  # unreadable images skipped this epoch, per split (none in memory)
    class_names: list[str] | None = None  # in label order, where the data names its classes (data.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)


def per_sample_weights(labels, counts: list[int], exponent: float) -> torch.Tensor:
    return class_balanced_weights(torch.as_tensor(counts), exponent)[torch.as_tensor(labels)]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


@dataclass
class StepPlan:
    uniform: torch.Tensor  # this rank's share of the global batch
    rebalanced: torch.Tensor | None
    global_size: int
    seed: int  # for per-sample randomness drawn over the global batch (augmentation)
    positions: torch.Tensor  # the share's places in the epoch's order (draw numbers, for the rebalanced stream)


@dataclass
class EpochPlan:
    num_samples: int
    global_batch: int
    sample_weights: torch.Tensor | None  # per-sample re-sampling weight, None: no rebalanced stream
    seed: int
    rank: int = 0
    world_size: int = 1
    # DeiT's repeated augmentation (timm's RASampler): each drawn image this many times in a row, the copies on
    # consecutive places (other workers, other views), the epoch as long as one pass
    repeats: int = 1

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
        if self.repeats > 1:
            perm = perm.repeat_interleave(self.repeats)[:self.num_samples]
        share = slice(self.rank, None, self.world_size)
        for start, stop in self._bounds():
            size = stop - start
            rebalanced = None
            if self.sample_weights is not None:
                rebalanced = torch.multinomial(self.sample_weights, size, replacement=True, generator=g)[share]
            step_seed = int(torch.randint(2**62, (1,), generator=g))
            yield StepPlan(perm[start:stop][share], rebalanced, size, step_seed, torch.arange(start, stop)[share])
