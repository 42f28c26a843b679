"""Class-balanced loss (Cui et al., CVPR 2019; richardaecn/class-balanced-loss, reference section 4).

Each sample is weighted by its class's effective-number weight w_c = (1 - beta) / (1 - beta^n_c), normalised
to sum C (beta 0: all ones, plain CE; beta -> 1: w proportional to 1/n_c). The loss is softmax cross-entropy,
optionally focal: l_i = -(1 - p_yi)^gamma log p_yi (gamma 0: CE). Reduction: the batch mean of w_yi * l_i,
the official TF `softmax_cross_entropy` reduction (SUM_BY_NONZERO_WEIGHTS: every weight is positive, so it
divides by the batch size), not PyTorch's sum w l / sum w; the reference asks to choose one and say so.

Choices and fixes against the official code: the focal term is the softmax (multi-class) focal loss, so that
gamma 0 is this loss's softmax CE exactly; the official `focal` is a sigmoid focal loss that also needs its
final bias initialised to -log(C-1) without weight decay (not implemented here). The effective number is
computed as expm1 ratios, exact for beta near 1, and an empty class is an error naming it (1 - beta^0 = 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import OneViewMethod, StepOutput


def class_balanced_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                        focal_gamma: float = 0.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """mean_i w_yi * (1 - p_yi)^gamma * CE(p_i, s(y_i)), p = softmax(logits), s(y) the label-smoothed one-hot
    (CE(p, s(y)) = -log p_y without smoothing): the sample's class weight and focal factor scale its whole CE."""
    log_probs = F.log_softmax(logits, dim=1)
    log_p = log_probs.gather(1, labels[:, None]).squeeze(1)
    per_sample = (1 - label_smoothing) * -log_p - label_smoothing * log_probs.mean(dim=1)
    if focal_gamma:
        per_sample = per_sample * (-torch.expm1(log_p)).clamp_min(0).pow(focal_gamma)
    return (weights.to(logits.dtype)[labels] * per_sample).mean()


class ClassBalanced(OneViewMethod):
    name = "class_balanced"

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.cfg = cfg  # ClassBalancedConfig
        self.weights = longtail.effective_number_weights(class_counts, cfg.beta)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, progress: float) -> StepOutput:
        loss = class_balanced_loss(logits, labels, self.weights.to(logits.device), self.cfg.focal_gamma,
                                   self.label_smoothing)
        return StepOutput(loss, {"loss_cb": loss})
