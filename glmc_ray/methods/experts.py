"""What the multi-expert methods (RIDE, MDCS, SHIKE) share: they read every expert's logits, explicitly returned
by the model (`model(x, experts=True)` -> glmc_ray.models.experts.ExpertLogits), and have no GLMC branch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ExpertMethod:
    """Constructed as `Method(section, class_counts, run)`: `run` is the whole Config (train.epochs for ramps
    counted in epochs, model.expert_scale for margins in the logits' scale)."""

    name = ""
    uses_all_heads = True
    progress_per_step = False
    logit_scale = 1.0  # the experts' heads are scaled in the model (model.expert_scale)
    trainable: tuple[str, ...] | None = None  # parameter-name prefixes a stage trains (None: all)
    label_smoothing = 0.0  # of each expert's cross-entropy (train.label_smoothing; methods.build_method)

    def alpha(self, progress: float) -> float:
        return 1.0

    def after_optimizer_step(self, model) -> None:
        pass


def kl_to(teacher_probs: torch.Tensor, student_logits: torch.Tensor, per_element: bool = False) -> torch.Tensor:
    """KL(teacher || softmax(student)) summed over classes and averaged over the batch (kl_div's 'batchmean');
    per_element: also divided by C (kl_div's 'mean', which SHIKE's official code uses and a future PyTorch
    release will change to mean 'batchmean')."""
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), teacher_probs, reduction="batchmean")
    return kl / student_logits.shape[1] if per_element else kl
