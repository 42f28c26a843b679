"""Plain cross-entropy on the uniform stream: the baseline the long-tail methods are compared with, in the same loop."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.methods.base import OneViewMethod, StepOutput


class CrossEntropy(OneViewMethod):
    """Trains the re-balanced head (the one used at inference) with CE, so the model and evaluation are shared."""

    name = "ce"

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.num_classes = len(class_counts)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, progress: float) -> StepOutput:
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return StepOutput(loss, {"loss_ce": loss})
