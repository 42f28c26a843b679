"""GLMC (Du et al., CVPR 2023): the method's math as pure tensor functions, and the method object.

Official behaviour (reference section 3) is the default; the fixes are explicit options:
`mix_beta` is really used (the official `--beta` is dead; its effective value is 1.0) and
`area_corrected_cutmix` labels the CutMix branch with the pasted area instead of lambda.

`rebalanced_loss: balanced_softmax_unofficial` is NOT the official GLMC + BS: the README's GLMC + BS row
(ImageNet-LT) has no code in any commit, so it cannot be recovered (methods-reference section 1(e)). This
option is one plausible reading: Balanced Softmax replaces the class-weighted soft-label CE on the
re-balanced head, i.e. the head's logits get log pi_c added and the mixed targets are not class-weighted
(label_weight_exponent is then unused).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import Batch, StepOutput


def cumulative_alpha(progress: float, shape: str = "power", exponent: float = 2.0) -> float:
    """Weight of the conventional (uniform) branch at training progress u = t/T in [0, 1].

    power: 1 - u^p (official: p=2, u = epoch/epochs per epoch, so it never reaches 0); cosine; linear.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if shape == "power":
        return 1.0 - progress**exponent
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown cumulative shape {shape!r}; expected power, cosine or linear")


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator,
               rounding=math.ceil) -> tuple[int, int, int, int]:
    """The official `rand_bbox`: side sqrt(1-lam) (ceil; timm's rounds down: `rounding=int`), uniform integer
    centre, halves floored, clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = rounding(height * cut), rounding(width * cut)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y1, y2, x1, x2


def sample_mix_lambda(beta: float, generator: torch.Generator) -> float:
    """lambda ~ Beta(beta, beta), drawn from `generator` so every rank draws the same value."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(beta, beta))


def maxnorm_radii(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """LTWB MaxNorm thresholds: min + fraction * (max - min) of the current per-class row norms."""
    norms = weight.detach().norm(dim=1)
    return (norms.min() + fraction * (norms.max() - norms.min())).expand_as(norms).clone()  # no host read


@torch.no_grad()
def maxnorm_project_(weight: torch.Tensor, radii: torch.Tensor) -> None:
    """Projected gradient step: rows whose L2 norm exceeds their radius are scaled back onto the ball."""
    norms = weight.norm(dim=1, keepdim=True)
    scale = torch.clamp(radii.unsqueeze(1) / norms.clamp_min(1e-12), max=1.0)
    weight.mul_(scale)


def global_mixup(x: torch.Tensor, x_rebalanced: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * x + (1.0 - lam) * x_rebalanced


def local_cutmix(x: torch.Tensor, x_rebalanced: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Paste the box of the re-balanced batch into a copy of the uniform batch (one box for the whole batch)."""
    y1, y2, x1, x2 = box
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x_rebalanced[:, :, y1:y2, x1:x2]
    return mixed


def cutmix_label_lambda(lam: float, box: tuple[int, int, int, int], height: int, width: int,
                        area_corrected: bool) -> float:
    """Share of the uniform label in the CutMix target: lam (official) or 1 - pasted area (standard CutMix)."""
    if not area_corrected:
        return lam
    y1, y2, x1, x2 = box
    return 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label smoothing as torch's cross_entropy and timm: 1 - eps + eps / C on the label, eps / C elsewhere."""
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def mixed_targets(y: torch.Tensor, y_rebalanced: torch.Tensor, lam: float, num_classes: int,
                  class_weights: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
    """lam * s(y) + (1-lam) * s(y_r), s the (smoothed) one-hot, optionally multiplied by per-class weights (not
    renormalised; with smoothing each class's share is weighted by its own weight, as torch's weighted CE)."""
    one_hot = smoothed_one_hot(y, num_classes, smoothing)
    one_hot_r = smoothed_one_hot(y_rebalanced, num_classes, smoothing)
    if class_weights is not None:
        one_hot, one_hot_r = one_hot * class_weights, one_hot_r * class_weights
    return lam * one_hot + (1.0 - lam) * one_hot_r


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_i [ -sum_k t_ik log softmax(logits_i)_k ]."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def negative_cosine(prediction: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """SimSiam D(p, z) = -mean cos(p, sg(z)); the gradient never flows into z."""
    return -F.cosine_similarity(prediction.float(), projection.detach().float(), dim=1).mean()


def symmetric_consistency(p_global, z_global, p_local, z_local) -> torch.Tensor:
    return negative_cosine(p_global, z_local) + negative_cosine(p_local, z_global)


class GLMC:
    """Global and Local Mixture Consistency cumulative learning, one step on a uniform + re-balanced pair."""

    name = "glmc"
    uses_all_heads = True  # every head gets a gradient each step (DDP needs no unused-parameter search)
    logit_scale = 1.0
    trainable = None
    label_smoothing = 0.0  # train.label_smoothing (methods.build_method), of both branches' mixed targets

    def __init__(self, cfg, class_counts: torch.Tensor):
        self.cfg = cfg  # GLMCConfig
        self.num_classes = len(class_counts)
        self.progress_per_step = cfg.cumulative_per_step  # alpha per iteration instead of per epoch (official)
        self.label_weights = longtail.class_balanced_weights(class_counts, cfg.label_weight_exponent)
        self.log_prior = longtail.log_prior(class_counts)

    def rebalanced_branch_loss(self, logits: torch.Tensor, batch: Batch, lam: float) -> torch.Tensor:
        """The re-balanced head's loss on one mixed batch: class-weighted soft CE (official), or soft CE on
        logits + log pi (balanced_softmax_unofficial)."""
        if self.cfg.rebalanced_loss == "balanced_softmax_unofficial":
            targets = mixed_targets(batch.y, batch.ry, lam, self.num_classes, smoothing=self.label_smoothing)
            return soft_cross_entropy(logits.float() + self.log_prior.to(logits.device).float(), targets)
        weights = self.label_weights.to(batch.y.device)
        return soft_cross_entropy(logits, mixed_targets(batch.y, batch.ry, lam, self.num_classes, weights,
                                                        self.label_smoothing))

    def alpha(self, progress: float) -> float:
        return cumulative_alpha(progress, self.cfg.cumulative_shape, self.cfg.cumulative_exponent)

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput:
        """`generator` is shared by all ranks, so lambda and the box are the same for the whole global batch."""
        cfg = self.cfg
        lam = sample_mix_lambda(cfg.mix_beta, generator)
        height, width = batch.x2.shape[-2:]
        box = cutmix_box(height, width, lam, generator)
        lam_local = cutmix_label_lambda(lam, box, height, width, cfg.area_corrected_cutmix)
        x_global = global_mixup(batch.x1, batch.rx1, lam)
        x_local = local_cutmix(batch.x2, batch.rx2, box)
        logits_g, logits_cb_g, z_g, p_g = model(x_global, all_heads=True)
        logits_l, logits_cb_l, z_l, p_l = model(x_local, all_heads=True)
        t_g = mixed_targets(batch.y, batch.ry, lam, self.num_classes, smoothing=self.label_smoothing)
        t_l = mixed_targets(batch.y, batch.ry, lam_local, self.num_classes, smoothing=self.label_smoothing)
        loss_balanced = soft_cross_entropy(logits_g, t_g) + soft_cross_entropy(logits_l, t_l)
        loss_rebalanced = (self.rebalanced_branch_loss(logits_cb_g, batch, lam)
                           + self.rebalanced_branch_loss(logits_cb_l, batch, lam_local))
        loss_consistency = symmetric_consistency(p_g, z_g, p_l, z_l)
        alpha = self.alpha(progress)
        loss = alpha * loss_balanced + (1 - alpha) * loss_rebalanced + cfg.consistency_weight * loss_consistency
        return StepOutput(loss, {"loss_balanced": loss_balanced, "loss_rebalanced": loss_rebalanced,
                                 "loss_consistency": loss_consistency, "alpha": alpha, "mix_lambda": lam})

    def after_optimizer_step(self, model) -> None:
        """MaxNorm on the re-balanced head; radii are fixed at the first step and live in the model's state."""
        if self.cfg.maxnorm_threshold <= 0:
            return
        head = model.fc_cb
        if torch.isnan(model.maxnorm_radii).any():
            model.maxnorm_radii.copy_(maxnorm_radii(head.weight, self.cfg.maxnorm_threshold))
        maxnorm_project_(head.weight, model.maxnorm_radii)
