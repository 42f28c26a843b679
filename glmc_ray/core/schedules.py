"""Learning-rate schedules: the factor applied to optim.lr in each epoch, as a pure function of the epoch.

Each official code sets its lr once per epoch from a closed formula of the epoch (LDAM-DRW's
`adjust_learning_rate`, RIDE's and MDCS's `CustomLR` lambdas, SHIKE's `CosineAnnealingLRWarmup.get_lr`), so the
schedules are written the same way and run through torch's `LambdaLR`: a resume restores one integer (the epoch)
and recomputes the factor, exactly. Chaining torch's `LinearLR`, `MultiStepLR` and `CosineAnnealingLR` in
`SequentialLR` was considered: their chainable forms update the lr recursively (rounding drifts from the
formula), and `SequentialLR` did not restore the active sub-scheduler on resume (pytorch#162591, #119168).

    cosine               per-epoch cosine to 0 (GLMC's CIFAR schedule)
    warmup_cosine        linear warm-up (e+1)/W over W epochs, then cosine to 0 over the rest
    official_paco        GLMC's ImageNet-LT/iNat schedule with its off-by-one (epoch 0 at the full lr, 1.1x at
                         epoch W+1; glmc-reference D9), for exact replication only
    warmup_step          linear warm-up (e+1)/W, then x gamma at each milestone epoch (LDAM-DRW, RIDE, MDCS, CB,
                         logit adjustment): gamma^k from the epoch of the k-th milestone on
    balms_warmup_cosine  BALMS's CosineAnnealingLRWarmup (SHIKE's both stages): a line through 1 at epoch 1 and
                         warmup_peak at epoch W-1 for e < W (0.5, 1, ..., 2.5 of a 0.05 lr for SHIKE's peak of
                         3), then warmup_peak x cosine to 0 at the end of the schedule
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "warmup_cosine", "official_paco", "warmup_step", "balms_warmup_cosine")
WARMUP_SCHEDULES = ("warmup_cosine", "official_paco", "warmup_step", "balms_warmup_cosine")


def lr_factor(epoch: int, epochs: int, optim) -> float:
    """The factor of optim.lr in 0-based `epoch` of an `epochs`-long run (`optim`: core.config.OptimConfig)."""
    schedule, warmup = optim.schedule, optim.warmup_epochs
    if schedule == "cosine":
        return _half_cosine(epoch, epochs)
    if schedule == "warmup_cosine":
        return (epoch + 1) / warmup if epoch < warmup else _half_cosine(epoch - warmup, epochs - warmup)
    if schedule == "official_paco":
        if epoch == 0:
            return 1.0
        k = epoch - 1  # the official code sets epoch e's lr at the end of epoch e-1, from e-1
        return (k + 1) / warmup if k <= warmup else _half_cosine(k - warmup + 1, epochs - warmup + 1)
    if schedule == "warmup_step":
        factor = optim.gamma ** sum(epoch >= milestone for milestone in optim.milestones)
        return factor * (epoch + 1) / warmup if epoch < warmup else factor
    if schedule == "balms_warmup_cosine":
        if epoch < warmup:
            return 1 + (optim.warmup_peak - 1) * (epoch - 1) / (warmup - 1)
        return optim.warmup_peak * _half_cosine(epoch - warmup, epochs - warmup)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def _half_cosine(step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / steps))


def lr_scheduler(optimizer: torch.optim.Optimizer, optim, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over lr_factor, stepped once per epoch by the loop (its state: the epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, epochs, optim))


def scaled_milestones(milestones: list[int], epochs: int, new_epochs: int) -> list[int]:
    """The milestones of an `epochs`-long schedule in a `new_epochs`-long one (a search's shortened trials): each
    at the same fraction, rounded down, as DRW's start keeps its fraction (160 of 200 -> 8 of 10)."""
    return [milestone * new_epochs // epochs for milestone in milestones]
