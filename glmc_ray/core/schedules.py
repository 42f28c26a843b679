"""Learning-rate schedules as pure functions of the epoch (the factor applied to the base lr)."""
from __future__ import annotations

import math


def lr_factor(epoch: int, epochs: int, schedule: str, warmup_epochs: int = 0) -> float:
    """cosine: per-epoch cosine to 0 (official CIFAR). warmup_cosine: linear warmup over `warmup_epochs`,
    then cosine over the rest. official_paco: the official ImageNet-LT/iNat schedule with its off-by-one
    (epoch 0 at the full lr, 1.1x lr at epoch warmup+1; reference D9), for exact replication only."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "warmup_cosine":
        if epoch < warmup_epochs:
            return (epoch + 1) / warmup_epochs
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))
    if schedule == "official_paco":
        if epoch == 0:
            return 1.0
        k = epoch - 1  # the official code sets epoch e's lr at the end of epoch e-1, from e-1
        if k <= warmup_epochs:
            return (k + 1) / warmup_epochs
        return 0.5 * (1 + math.cos(math.pi * (k - warmup_epochs + 1) / (epochs - warmup_epochs + 1)))
    raise ValueError(f"unknown schedule {schedule!r}; expected cosine, warmup_cosine or official_paco")
