"""MDCS (Zhao et al., ICCV 2023; fistyee/MDCS, no licence: written from the math, reference section 6).

Expert k trains on prior-shifted logits a_k = z_k + q_k log n (q = -0.5, 1, 2.5: head-, balanced-,
tail-leaning experts; q_k = 1 is Balanced Softmax) on the weak view x1 and the strong view x2 of the same images,
passed through the model as one batch [x1; x2] as the official code does (BatchNorm sees both):
    DL = sum_k CE(a_k, y) over the 2B rows
    CS = sum_k KL(softmax(a_k[weak]) || softmax(a_k[strong])), the weak side detached, over the rows where
         expert k is right on the weak view (argmax a_k[weak] == y), averaged over those rows ('batchmean')
    L  = DL + w * min((epoch + 1) / (ramp * epochs), 1) * CS  (official w 0.6, 20 of 400 epochs, 1-based epochs)
Evaluation averages the raw z_k (the model's mean); since mean(q) = 1 it behaves like Balanced Softmax.

Against the official code: the shift is q log n exactly (official log(n^q + 1e-9), the same for n >= 1 up to
float rounding); q has one value per expert (the official hard-codes 3 experts); the ramp is a fraction of the
schedule, so a shortened run keeps its proportion; an expert with no row right on the weak view adds 0 without
a host read (official: a Python `if` per expert); the unused centre buffers, linear heads, MLP, DRW weights
and diversity factor of the official loss are not built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import Batch, StepOutput
from glmc_ray.methods.experts import ExpertMethod


def consistency_ramp(epoch: int, epochs: int, ramp: float) -> float:
    """min((epoch + 1) / (ramp * epochs), 1) for a 0-based epoch: 1/20 in the first of 400 epochs at 0.05."""
    return min((epoch + 1) / (ramp * epochs), 1.0)


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) summed over the rows in `mask`, divided by their number (0 if none)."""
    teacher = F.softmax(teacher_logits.detach(), dim=1)
    rows = F.kl_div(F.log_softmax(student_logits, dim=1), teacher, reduction="none").sum(dim=1)
    return (rows * mask).sum() / mask.sum().clamp_min(1)


def mdcs_loss(expert_logits: torch.Tensor, labels: torch.Tensor, shifts: torch.Tensor,
              consistency_weight: float,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, DL, CS, rows used by CS / B) for [2B, E, C] logits of [weak; strong] and [E, C] shifts q_k log n;
    label_smoothing: of DL's cross-entropies."""
    batch = len(labels)
    shifted = expert_logits.float() + shifts.to(expert_logits.device, torch.float32)
    both = torch.cat([labels, labels])
    diversity = consistency = shifted.new_zeros(())
    confident = shifted.new_zeros(())
    for k in range(shifted.shape[1]):
        weak, strong = shifted[:batch, k], shifted[batch:, k]
        diversity = diversity + F.cross_entropy(shifted[:, k], both, label_smoothing=label_smoothing)
        mask = (weak.argmax(dim=1) == labels).float()
        consistency = consistency + masked_kl(weak, strong, mask)
        confident = confident + mask.mean()
    return diversity + consistency_weight * consistency, diversity, consistency, confident / shifted.shape[1]


class MDCS(ExpertMethod):
    name = "mdcs"

    def __init__(self, cfg, class_counts: torch.Tensor, run):
        self.cfg, self.epochs = cfg, run.train.epochs  # MDCSConfig
        log_counts = longtail.positive_counts(class_counts, "MDCS's prior shifts q log n").log()
        self.shifts = torch.tensor(cfg.prior_exponents, dtype=torch.float64)[:, None] * log_counts

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput:
        out = model(torch.cat([batch.x1, batch.x2]), experts=True)
        weight = self.cfg.consistency_weight * consistency_ramp(round(progress * self.epochs), self.epochs,
                                                                self.cfg.consistency_ramp)
        loss, diversity, consistency, confident = mdcs_loss(out.experts, batch.y, self.shifts, weight,
                                                            self.label_smoothing)
        return StepOutput(loss, {"loss_diversity": diversity, "loss_consistency": consistency,
                                 "consistency_rows": confident, "consistency_weight": weight})
