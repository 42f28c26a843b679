"""The small interface every long-tail method implements, and the batch it receives.

A method turns one batch into a loss: `step(model, batch, progress, generator) -> StepOutput`.
The loop never asks which method it runs; new methods (Balanced Softmax, LDAM-DRW, ...) are new modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Batch:
    """Two augmented views of a uniform batch and of a class-rebalanced batch, positionally paired.

    The sources fill rx1/rx2/ry where `config.rebalanced_stream(cfg)` asks for the second stream (GLMC, RIDE's
    router stage), and leave them empty for the methods that read x1 (x2) and y only.
    """

    x1: torch.Tensor
    x2: torch.Tensor
    y: torch.Tensor
    rx1: torch.Tensor | None = None
    rx2: torch.Tensor | None = None
    ry: torch.Tensor | None = None

    def to(self, device, memory_format=torch.contiguous_format) -> Batch:
        def move(t):
            if t is None:
                return None
            t = t.to(device, non_blocking=True)
            return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t
        return Batch(*(move(t) for t in (self.x1, self.x2, self.y, self.rx1, self.rx2, self.ry)))

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class StepOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)  # logged per epoch (means)


class Method(Protocol):
    name: str
    uses_all_heads: bool  # every parameter gets a gradient each step
    progress_per_step: bool  # `progress` moves every step (else it is epoch/epochs for a whole epoch)
    logit_scale: float  # evaluation multiplies the inference logits by it (LDAM's s), so a post-hoc tau means
    #                     what it means in the loss; argmax, hence the raw accuracy, does not change

    trainable: tuple[str, ...] | None  # parameter-name prefixes this method trains (None: all; a stage that
    #                                    trains some heads of a parent run's model names them)
    label_smoothing: float  # train.label_smoothing, set by methods.build_method: eps of every class target the
    #                         method's cross-entropies learn (its terms on other targets, e.g. KL, keep theirs)

    def alpha(self, progress: float) -> float: ...

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput: ...

    def after_optimizer_step(self, model) -> None: ...


class OneViewMethod:
    """A loss on the inference head's logits of the uniform batch's first view (`model(batch.x1)`, fc_cb):
    CE and the single-branch long-tail losses. Subclasses set `name` and implement `loss`."""

    name = ""
    uses_all_heads = False  # fc and the projection heads get no gradient (DDP must look for unused ones)
    progress_per_step = False
    logit_scale = 1.0
    trainable = None
    label_smoothing = 0.0

    def alpha(self, progress: float) -> float:
        return 1.0  # the uniform/re-balanced branch weight of GLMC: one branch here

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, progress: float) -> StepOutput:
        """The loss of `logits` against `labels`, smoothed by self.label_smoothing."""

    def step(self, model, batch: Batch, progress: float, generator: torch.Generator) -> StepOutput:
        return self.loss(model(batch.x1).float(), batch.y, progress)

    def after_optimizer_step(self, model) -> None:
        pass
