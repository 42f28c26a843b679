"""Plain cross-entropy on the uniform stream: the baseline GLMC is compared with, in the same loop."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.methods.base import Batch, StepOutput


class CrossEntropy:
    """Trains the re-balanced head (the one used at inference) with CE, so the model and evaluation are shared."""

    name = "ce"
    uses_rebalanced_stream = False
    uses_all_heads = False  # fc and the projection heads get no gradient (DDP must look for unused ones)

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.num_classes = len(class_counts)

    def alpha(self, progress: float) -> float:
        return 1.0

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput:
        logits = model(batch.x1)
        loss = F.cross_entropy(logits.float(), batch.y)
        return StepOutput(loss, {"loss_ce": loss})

    def after_optimizer_step(self, model) -> None:
        pass
