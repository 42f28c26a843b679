"""DeiT-LT (Rangwani et al., CVPR 2024; seed-systems-reference.md section 2): a DeiT student whose class token
learns the (mixed, smoothed) labels and whose distillation token learns a frozen CNN teacher's predictions:

    L = (1 - alpha) CE_soft(cls, mixed targets) + alpha CE(dist, argmax teacher(mixed batch))

with, from `drw_start`, class-balanced weights (1 - beta) / (1 - beta^n_c), normalised to sum to C, on the
distillation term only, and (CIFAR's official scripts) no more mixing. The teacher sees the student's mixed batch
re-normalised and resized to its own training's (models/teacher.py). The student trains on one view, DeiT's
(RandAugment m9 and random erasing: data/strong_views.py). Mixing is timm's Mixup in batch mode (a
batch mixed with itself reversed; CutMix with probability switch_prob, its lambda corrected to the pasted area),
drawn from the run's keyed generator instead of NumPy's global RNG, so a resumed run replays it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import Batch, StepOutput
from glmc_ray.methods.glmc import (
    cutmix_box,
    cutmix_label_lambda,
    global_mixup,
    local_cutmix,
    sample_mix_lambda,
    smoothed_one_hot,
    soft_cross_entropy,
)
from glmc_ray.methods.ldam_drw import drw_active


def mix(x: torch.Tensor, targets: torch.Tensor, cfg, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch Mixup / CutMix of (x, soft targets) with the batch reversed; cfg: DeiTLTConfig."""
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or float(torch.rand(1, generator=generator))
                                           < cfg.switch_prob)
    if not use_cutmix and cfg.mixup_alpha <= 0:
        return x, targets
    lam = sample_mix_lambda(cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha, generator)
    if use_cutmix:
        height, width = x.shape[-2:]
        box = cutmix_box(height, width, lam, generator, rounding=int)
        x, lam = local_cutmix(x, x.flip(0), box), cutmix_label_lambda(lam, box, height, width, area_corrected=True)
    else:
        x = global_mixup(x, x.flip(0), lam)
    return x, global_mixup(targets, targets.flip(0), lam)


def deit_lt_loss(cls: torch.Tensor, dist: torch.Tensor, targets: torch.Tensor, teacher_labels: torch.Tensor,
                 alpha: float, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, the cls term, the distillation term); `weights`: the DRW class weights of the distillation CE
    (torch's weighted mean: divided by the weights of the batch's teacher labels, as the official's
    CrossEntropyLoss(weight=...))."""
    base = soft_cross_entropy(cls, targets)
    distill = F.cross_entropy(dist.float(), teacher_labels, weight=weights)
    return (1.0 - alpha) * base + alpha * distill, base, distill


class DeiTLT:
    name = "deit_lt"
    uses_all_heads = True  # both tokens' heads and the whole DeiT
    progress_per_step = False
    logit_scale = 1.0
    trainable = None
    label_smoothing = 0.0  # train.label_smoothing (methods.build_method), of the cls token's targets (DeiT: 0.1)

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.cfg = cfg  # DeiTLTConfig
        self.num_classes = len(class_counts)
        self.drw_weights = longtail.effective_number_weights(class_counts, cfg.drw_beta)
        self.teacher = None  # the teacher run's frozen network (training/worker.py load_teacher)

    def alpha(self, progress: float) -> float:
        return 1.0  # GLMC's branch weight: one branch here

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput:
        cfg, drw = self.cfg, drw_active(progress, self.cfg.drw_start)
        # x2: DeiT's view (data.strong_augmentation auto: randaugment_erasing), or a second weak one with none
        x, targets = batch.x2, smoothed_one_hot(batch.y, self.num_classes, self.label_smoothing)
        if cfg.mix_after_drw or not drw:
            x, targets = mix(x, targets, cfg, generator)
        out = model(x, experts=True)
        teacher_labels = self.teacher(x).argmax(dim=1)
        weights = self.drw_weights.to(x.device) if drw else None
        loss, base, distill = deit_lt_loss(out.experts[:, 0], out.experts[:, 1], targets, teacher_labels,
                                           cfg.alpha, weights)
        agree = (teacher_labels == batch.y).float().mean()  # how often the teacher names the true class
        return StepOutput(loss, {"loss_cls": base, "loss_distill": distill, "drw": float(drw),
                                 "teacher_agreement": agree})

    def after_optimizer_step(self, model) -> None:
        pass
