"""LDAM with deferred re-weighting (Cao et al., NeurIPS 2019; kaidic/LDAM-DRW, reference section 3).

LDAM: per-class margins m_c = max_margin * n_c^-1/4 / max_j n_j^-1/4 come off the target logit only, on
cosine logits scaled by s: loss CE_w(s * (z - m_y onehot(y)), y). The model's inference head is then a
cosine classifier (model.classifier: auto picks it for this method; glmc_ray/models/backbones.py `CosineLinear`), and
evaluation multiplies its cosines by s (`logit_scale`), so post-hoc logit adjustment sees the trained scale.
DRW: from the epoch where progress (epoch / epochs) reaches `drw_start`, the loss weighs class c by the
effective-number weight (1 - beta) / (1 - beta^n_c), normalised to sum C (the official code's
`per_cls_weights`, beta 0.9999); before it the weights are all ones. The loss is PyTorch's weighted mean,
sum_i w_yi l_i / sum_i w_yi, as in the official code (its scale changes when DRW starts; the lr does not).

Better than the official code (reference 3(f)):
- the DRW switch is a fraction of the schedule (drw_start, official 160/200 = 0.8), so a shortened or longer
  schedule keeps the official proportion; the official `betas[epoch // 160]` hard-codes epoch 160 and raises
  IndexError from epoch 320;
- it is a pure function of the epoch, so a run resumed mid-DRW uses the same weights as a straight run;
- device-agnostic tensors and a boolean target mask (the official code hard-codes torch.cuda.FloatTensor and
  indexes torch.where with a uint8 mask);
- a class without training images is an error naming it (n^-1/4 of 0 is inf).
The official warm-up + step lr schedule (5 warm-up epochs, x0.01 from epoch 160, x0.0001 from 180) is the
harness's optim.schedule warmup_step (configs/recipes/*/ldam_drw.yaml).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import OneViewMethod, StepOutput

DRW_TOLERANCE = 1e-9  # progress is epoch/epochs, a float: the switch epoch must not depend on its rounding


def drw_active(progress: float, drw_start: float) -> bool:
    """Whether re-weighting is on at training progress u = epoch/epochs (1.0: never within the schedule)."""
    return drw_start < 1.0 and progress >= drw_start - DRW_TOLERANCE


def drw_first_epoch(epochs: int, drw_start: float) -> int | None:
    """The first 0-based epoch that re-weights (160 for 200 epochs at 0.8), None if none does."""
    return next((e for e in range(epochs) if drw_active(e / epochs, drw_start)), None)


def margin_logits(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """z - offset_y onehot(y): the target logit of each sample lowered by its class's offset (LDAM's margin;
    RIDE's s m_c on logits already scaled)."""
    target = F.one_hot(labels, logits.shape[1]).to(torch.bool)
    return torch.where(target, logits - offsets.to(logits.dtype)[labels, None], logits)


def ldam_logits(cosines: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor, scale: float) -> torch.Tensor:
    """s * (z - m_y onehot(y)): the target logit of each sample lowered by its class margin."""
    return scale * margin_logits(cosines, labels, margins)


def ldam_loss(cosines: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor, scale: float,
              weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE_w(s * (z - m_y onehot(y)), y), reduced as sum_i w_yi l_i / sum_i w_yi (plain mean without weights)."""
    weight = None if weights is None else weights.to(cosines.dtype)
    return F.cross_entropy(ldam_logits(cosines, labels, margins, scale), labels, weight=weight,
                           label_smoothing=label_smoothing)


class LDAMDRW(OneViewMethod):
    name = "ldam_drw"

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.cfg = cfg  # LDAMDRWConfig
        self.logit_scale = cfg.scale
        self.margins = longtail.ldam_margins(class_counts, cfg.max_margin)
        self.drw_weights = longtail.effective_number_weights(class_counts, cfg.drw_beta)

    def class_weights(self, progress: float) -> torch.Tensor | None:
        return self.drw_weights if drw_active(progress, self.cfg.drw_start) else None

    def loss(self, cosines: torch.Tensor, labels: torch.Tensor, progress: float) -> StepOutput:
        weights = self.class_weights(progress)
        weights = None if weights is None else weights.to(cosines.device)
        loss = ldam_loss(cosines, labels, self.margins.to(cosines.device), self.cfg.scale, weights,
                         self.label_smoothing)
        return StepOutput(loss, {"loss_ldam": loss, "drw": float(weights is not None)})
