"""RIDE stage 1 (Wang et al., ICLR 2021; frank-xwang/RIDE-LongTailRecognition, reference section 5).

Each expert e has its own LDAM-DRW loss on its own logits (already scaled by s in the model), plus a
distribution-aware diversity term against the ensemble mean zbar (computed without gradient):
    L = sum_e [ CE_w(z_e - s m_y onehot(y), y) + lambda * Tbar^2 * KL(softmax(zbar / T) || softmax(z_e / T)) ]
with KL averaged over the batch ('batchmean'). lambda < 0 (official -0.45 CIFAR, -0.2 ImageNet-LT): the loss falls
as an expert moves away from the ensemble. Before DRW, T is the scalar diversity_temperature and w is none; from
the DRW epoch on, w is the effective-number weights and T is per class, T_c = T v_c / max v with
v_c = C pi_c r + 1 - r (r = reweight_factor), Tbar = mean T_c.

Fixed or made explicit against the official code (reference 5(f)):
- with lambda = 0 the official base loss reads the ensemble mean for every expert (its issue #7: E identical
  "collaborative" terms); here each expert always has its own loss (the issue's better 48.7 setting);
- the official distillation variant multiplies both terms by E (the full loss called inside its own expert loop);
  here, with method.ride.teacher (a finished RIDE run, officially 6 experts, frozen and in eval mode), the loss
  gains distill_weight * T_d^2 * KL(softmax(teacher / T_d) || softmax(zbar / T_d)) once, on the ensemble mean;
- the DRW switch is a fraction of the schedule (drw_start), a pure function of the epoch, as in ldam_drw;
- no hard-coded .cuda(); the margins are subtracted in the logits' own scale (s m), as the official with NormedLinear.
Stage 2 ("router", RIDE's expert assignment): a second run from a stage-1 run (train.init_from) trains only
the router (glmc_ray/models/experts.py `ExpertRouter`), every BatchNorm frozen, with BCE(pos_weight 100) on the
targets of `router_targets`; evaluation then averages, per sample, the experts the router adds and reports how
many it used (`experts_used`). It trains on the class-balanced stream (Batch.rx1, ry), as the official
BalancedSampler.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.methods.base import Batch, StepOutput
from glmc_ray.methods.experts import ExpertMethod, kl_to
from glmc_ray.methods.ldam_drw import drw_active, margin_logits
from glmc_ray.models.experts import running_means


def diversity_temperatures(class_counts, reweight_factor: float) -> torch.Tensor:
    """T_c = v_c / max v, v_c = C pi_c r + 1 - r: after DRW, frequent classes get a softer ensemble target."""
    counts = longtail.positive_counts(class_counts, "RIDE's diversity temperatures")
    v = len(counts) * counts / counts.sum() * reweight_factor + 1 - reweight_factor
    return (v / v.max()).float()


def ride_loss(expert_logits: torch.Tensor, labels: torch.Tensor, margin_offsets: torch.Tensor,
              weights: torch.Tensor | None, temperature: torch.Tensor | float,
              diversity_factor: float,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, summed base terms, summed diversity terms) of [B, E, C] scaled expert logits.

    margin_offsets: s * m_c; temperature: a float or per-class [C]; label_smoothing: of the base terms."""
    logits = expert_logits.float()
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    t_bar = t.mean()  # a tensor: no read back to the host each step
    target = F.softmax(logits.detach().mean(dim=1) / t, dim=1)
    weights = None if weights is None else weights.to(logits.dtype)
    base = diversity = logits.new_zeros(())
    for z in logits.unbind(dim=1):
        base = base + F.cross_entropy(margin_logits(z, labels, margin_offsets), labels, weight=weights,
                                      label_smoothing=label_smoothing)
        if diversity_factor:
            diversity = diversity + diversity_factor * t_bar ** 2 * kl_to(target, z / t)
    return base + diversity, base, diversity


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), 'batchmean': the teacher's ensemble teaches ours."""
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return temperature ** 2 * kl_to(target, student_logits.float() / temperature)


def router_targets(expert_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, E-1] targets of the routers: router e says "add expert e+1" where the ensemble of experts 0..e is
    wrong and some larger ensemble 0..j (j > e) is right."""
    correct = running_means(expert_logits).argmax(dim=2) == labels[:, None]  # [B, E]
    later = correct.flip(1).cummax(dim=1).values.flip(1)[:, 1:]  # any(correct[:, e+1:]) for e < E-1
    return (~correct[:, :-1] & later).float()


def router_loss(routes: torch.Tensor, targets: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """BCE-with-logits of the routers, positives weighted by pos_weight, averaged over samples and routers."""
    weight = torch.tensor(pos_weight, dtype=routes.dtype, device=routes.device)
    return F.binary_cross_entropy_with_logits(routes, targets.to(routes.dtype), pos_weight=weight)


class RIDE(ExpertMethod):
    name = "ride"

    def __init__(self, cfg, class_counts: torch.Tensor, run):
        self.cfg = cfg  # RIDEConfig
        # s m_c: the official subtracts the margins from logits already multiplied by s (model.expert_scale)
        self.margin_offsets = (run.model.expert_scale * longtail.ldam_margins(class_counts, cfg.max_margin)).float()
        self.drw_weights = longtail.effective_number_weights(class_counts, cfg.drw_beta)
        self.drw_temperatures = diversity_temperatures(class_counts, cfg.reweight_factor)
        self.trainable = ("router",) if cfg.stage == "router" else None
        self.teacher = None  # with method.ride.teacher: the teacher run's frozen network (worker.load_teacher)

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput:
        if self.cfg.stage == "router":  # on the class-balanced stream (config.rebalanced_stream), as the official
            out = model(batch.rx1, experts=True)
            targets = router_targets(out.experts.detach().float(), batch.ry)
            loss = router_loss(out.routes.float(), targets, self.cfg.router_pos_weight)
            return StepOutput(loss, {"loss_router": loss, "experts_used": out.used.float().mean(),
                                     "router_positives": targets.mean()})
        out = model(batch.x1, experts=True)
        device, drw = batch.y.device, drw_active(progress, self.cfg.drw_start)
        weights = self.drw_weights.to(device) if drw else None
        # the official scales the per-class temperatures by the base one too (base_diversity_temperature)
        temperature = self.cfg.diversity_temperature * (self.drw_temperatures.to(device) if drw else 1.0)
        loss, base, diversity = ride_loss(out.experts, batch.y, self.margin_offsets.to(device), weights,
                                          temperature, self.cfg.diversity_factor, self.label_smoothing)
        terms = {"loss_base": base, "loss_diversity": diversity, "drw": float(drw)}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(batch.x1)
            terms["loss_distill"] = distill_loss(out.mean, teacher_logits, self.cfg.distill_temperature)
            loss = loss + self.cfg.distill_weight * terms["loss_distill"]
        return StepOutput(loss, terms)
