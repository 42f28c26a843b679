"""What a model with several heads returns when asked for all of them (`forward(x, experts=True)`): the
multi-expert networks (models/experts.py) and DeiT-LT's two-token student (models/transformers.py)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertLogits(NamedTuple):
    mean: torch.Tensor  # [B, C], the ensemble's prediction (with a router: the mean of the experts it used)
    experts: torch.Tensor  # [B, E, C]
    features: torch.Tensor | None  # [B, E, D], each expert's pooled feature (None: DeiT-LT's two tokens)
    routes: torch.Tensor | None = None  # [B, E-1] router logits: "add expert e+1" (RIDE's expert assignment)
    used: torch.Tensor | None = None  # [B] experts each sample used
