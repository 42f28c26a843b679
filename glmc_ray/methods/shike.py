"""SHIKE (Jin et al., CVPR 2023; Keke921/SHIKE, no licence: written from the math, reference section 7).

Stage 1 ("mixture"), per expert e of [B, E, C] scaled logits z (s = model.expert_scale):
    CE(z_e, y)
  + transfer_weight * KL(softmax(r) || softmax(z_e with its target logit set to -s))   (decoupled knowledge
    transfer; 'mean' over B*C as the official): the teacher r holds, for the hardest negative h (the argmax of
    the mean logits over the non-targets), the mean logit; for the other non-targets the largest logit of any
    expert; 0 at the target (the official sets it to 0 rather than masking it). Not detached, as the official.
  + mutual_weight * sum_{j != e} KL(softmax(z_j) || softmax(z_e)) ('mean', not detached, as the official).
Both stages train on one view: the strong one (x2, data.strong_augmentation: auto gives the official AutoAugment +
Cutout) or, with data.strong_augmentation none, the weak one (x1).
Stage 2 ("retrain"): a second run from a stage-1 run (train.init_from) with the same model; only the re-trained
heads train, with Balanced Softmax per expert, sum_e CE(z^rt_e + log pi, y), and predict.

Better than the official code (reference 7(f)): stage 2 is its own run, so DDP sees a fixed set of trainable
parameters; the frozen parameters are left out of the optimiser (the official re-creates SGD over all of them,
whose weight decay and momentum still move the "frozen" weights) and every BatchNorm stays in eval mode (the
official keeps updating their statistics); no Tk imports; labels are integers, not float64 one-hot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc_ray.core import longtail
from glmc_ray.core.config import strong_view
from glmc_ray.methods.balanced_softmax import balanced_softmax_loss
from glmc_ray.methods.base import Batch, StepOutput
from glmc_ray.methods.experts import ExpertMethod, kl_to


def transfer_teacher(expert_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """r [B, C]: the mean logit at the hardest negative, the experts' largest logit at the other non-targets,
    0 at the target."""
    target = F.one_hot(labels, expert_logits.shape[2]).to(torch.bool)
    mean = expert_logits.mean(dim=1)
    hardest = mean.masked_fill(target, float("-inf")).argmax(dim=1, keepdim=True)
    teacher = expert_logits.max(dim=1).values.scatter(1, hardest, mean.gather(1, hardest))
    return teacher.masked_fill(target, 0.0)


def shike_loss(expert_logits: torch.Tensor, labels: torch.Tensor, scale: float, transfer_weight: float,
               mutual_weight: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, summed CE, summed transfer KL, summed mutual KL) of [B, E, C] scaled expert logits; label_smoothing:
    of the CE terms."""
    z = expert_logits.float()
    target = F.one_hot(labels, z.shape[2]).to(torch.bool)
    teacher = F.softmax(transfer_teacher(z, labels), dim=1)
    probs = F.softmax(z, dim=2)
    ce = transfer = mutual = z.new_zeros(())
    for e in range(z.shape[1]):
        ce = ce + F.cross_entropy(z[:, e], labels, label_smoothing=label_smoothing)
        transfer = transfer + kl_to(teacher, z[:, e].masked_fill(target, -scale), per_element=True)
        for j in range(z.shape[1]):
            if j != e:
                mutual = mutual + kl_to(probs[:, j], z[:, e], per_element=True)
    return ce + transfer_weight * transfer + mutual_weight * mutual, ce, transfer, mutual


class SHIKE(ExpertMethod):
    name = "shike"
    uses_all_heads = False  # stage 1 leaves the re-trained heads without gradient

    def __init__(self, cfg, class_counts: torch.Tensor, run):
        self.cfg, self.scale = cfg, run.model.expert_scale  # SHIKEConfig
        self.strong = strong_view(run) != "none"  # the official trains on one AutoAugment + Cutout view: x2
        self.log_prior = longtail.log_prior(class_counts)
        self.trainable = ("retrained_heads",) if cfg.stage == "retrain" else None

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput:
        z = model(batch.x2 if self.strong else batch.x1, experts=True).experts.float()
        if self.cfg.stage == "retrain":
            log_prior = self.log_prior.to(z.device)
            loss = sum(balanced_softmax_loss(z[:, e], batch.y, log_prior, self.label_smoothing)
                       for e in range(z.shape[1]))
            return StepOutput(loss, {"loss_bs": loss})
        loss, ce, transfer, mutual = shike_loss(z, batch.y, self.scale, self.cfg.transfer_weight,
                                                self.cfg.mutual_weight, self.label_smoothing)
        return StepOutput(loss, {"loss_ce": ce, "loss_transfer": transfer, "loss_mutual": mutual})
