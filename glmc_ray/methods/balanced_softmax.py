"""Balanced Softmax (Ren et al., NeurIPS 2020; jiawei-ren/BalancedMetaSoftmax-Classification, reference section 1).

Training: cross-entropy on z + log n_c, i.e. the softmax of the training label distribution; evaluation reads
the raw logits (the official code does not adjust at test time either, its issue #13).

Better than the official code: the offset is log pi_c = log(n_c / N) (softmax ignores the constant log N) and a
class without training images is an error naming the class before training; the official `log n` of an empty
class is -inf, so the loss turns NaN once such a class is the label (reference 1(f)). The counts are the
training split's, after any validation hold-out, not a file written by the dataset class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import OneViewMethod, StepOutput


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor,
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """mean_i CE(z_i + log pi, y_i); its gradient in z is softmax(z + log pi) - onehot(y) (- the smoothed one-hot)."""
    return F.cross_entropy(logits + log_prior.to(logits.dtype), labels, label_smoothing=label_smoothing)


class BalancedSoftmax(OneViewMethod):
    name = "balanced_softmax"

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.log_prior = longtail.log_prior(class_counts)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, progress: float) -> StepOutput:
        loss = balanced_softmax_loss(logits, labels, self.log_prior.to(logits.device), self.label_smoothing)
        return StepOutput(loss, {"loss_bs": loss})
