"""Logit-adjusted loss (Menon et al., ICLR 2021; google-research/logit_adjustment, reference section 2).

Training: cross-entropy on z + tau * log pi_c, pi the training label distribution; evaluation reads the raw
logits. (The post-hoc form, argmax z - tau * log pi on a model trained otherwise, is the evaluation's
`posthoc_*` metrics for every method: glmc_ray/core/evaluation.py. For this method the scan over tau on the
validation split should pick a tau near 0, since the adjustment is already learnt.)

Better than the official code: the offset is exactly tau * log pi. The official `log(pi^tau + 1e-12)` bends
it for rare classes once pi^tau nears 1e-12 (ImageNet-LT's rarest classes, pi = 5 / 115,846, from tau of
about 2.5) and hides an empty class behind log(1e-12); here an empty class is an error naming it, before
training. tau = 1 is Balanced Softmax exactly (log pi and log n differ by the constant log N).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import OneViewMethod, StepOutput


def logit_adjusted_loss(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor,
                        tau: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """mean_i CE(z_i + tau * log pi, y_i); tau = 0 is CE."""
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), labels, label_smoothing=label_smoothing)


class LogitAdjusted(OneViewMethod):
    name = "logit_adjusted"

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.tau = cfg.tau  # LogitAdjustedConfig
        self.log_prior = longtail.log_prior(class_counts)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, progress: float) -> StepOutput:
        loss = logit_adjusted_loss(logits, labels, self.log_prior.to(logits.device), self.tau,
                                   self.label_smoothing)
        return StepOutput(loss, {"loss_la": loss})
