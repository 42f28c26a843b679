"""APA and AGLU (Alexandridis et al., ECCV 2024), the adaptive parametric activation of the APA paper, as a
model option (`model.activation: aglu`, `model.se: apa`); seed-systems-reference.md section 1.

    APA(z; λ, κ) = (λ e^(−κz) + 1)^(−1/λ)      a gate in (0, 1): λ = κ = 1 is the sigmoid, λ → 0 the Gumbel CDF
    AGLU(z; λ, κ) = z · APA(z; λ, κ)            an activation: λ = κ = 1 is SiLU

Computed as the official `Unified.forward` does, exp(−softplus(log λ − κz) / λ), which is stable for large |z|.
λ and κ are two learnable scalars per call site (one module per place a ReLU was), trained without weight
decay (`no_decay`). The official code floors λ differently in its two modules (APA: clamp at 1e-4; AGLU:
ReLU(λ) + 1e-8); both are kept.

The official AGLU backward (`UniRect_static`) leaves a term out of ∂/∂λ: it uses −(z/λ)·p/(λ + e^(κz)) where
differentiating the forward gives that plus (z·p/λ²)·log(1 + λe^(−κz)). `gradient="exact"` (the default) is
autograd's; `gradient="official"` reproduces the official λ gradient, for matching its training runs. The z
and κ gradients are the same in both.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

APA_LAMBDA_FLOOR = 1e-4  # official Unified: lambda.clamp(min=1e-4)
AGLU_LAMBDA_FLOOR = 1e-8  # official UniRect: relu(lambda) + 1e-8
GRADIENTS = ("exact", "official")


def apa(z: torch.Tensor, lam: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """APA(z; λ, κ) for λ > 0 (the caller floors it)."""
    return torch.exp(-F.softplus(torch.log(lam) - kappa * z) / lam)


def aglu(z: torch.Tensor, lam: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    return z * apa(z, lam, kappa)


class _OfficialAGLU(torch.autograd.Function):
    """AGLU with the official hand-written backward (its λ gradient lacks the log term, see the module doc)."""

    @staticmethod
    def forward(ctx, z, lam, kappa):
        gate = apa(z, lam, kappa)
        ctx.save_for_backward(z, lam, kappa, gate)
        return z * gate

    @staticmethod
    def backward(ctx, grad):
        z, lam, kappa, gate = ctx.saved_tensors
        # d gate / d(kappa z) = gate * e^(-kappa z) / (lam e^(-kappa z) + 1) = gate / (e^(kappa z) + lam)
        dgate_du = gate * torch.sigmoid(torch.log(lam) - kappa * z) / lam
        grad_z = grad * (gate + z * kappa * dgate_du)
        grad_kappa = (grad * z * z * dgate_du).sum()
        grad_lam = (grad * -(z / lam) * gate / (lam + torch.exp(kappa * z))).sum()  # the official formula
        return grad_z, grad_lam.reshape(lam.shape), grad_kappa.reshape(kappa.shape)


class AGLU(nn.Module):
    """z · APA(z; λ, κ), one (λ, κ) pair per module; the official UniRect initialisation U(0,1), U(0.8,1.2)."""

    def __init__(self, gradient: str = "exact"):
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"AGLU gradient {gradient!r}; expected one of {GRADIENTS}")
        self.gradient = gradient
        self.lam = nn.Parameter(torch.empty(1).uniform_(0.0, 1.0))
        self.kappa = nn.Parameter(torch.empty(1).uniform_(0.8, 1.2))

    def forward(self, z):
        lam = F.relu(self.lam) + AGLU_LAMBDA_FLOOR
        if self.gradient == "official":
            return _OfficialAGLU.apply(z, lam, self.kappa)
        return aglu(z, lam, self.kappa)


class APA(nn.Module):
    """The APA gate (the SE block's sigmoid in the APA recipes); official SE-gate init U(0,1), U(-1,0)."""

    def __init__(self):
        super().__init__()
        self.lam = nn.Parameter(torch.empty(1).uniform_(0.0, 1.0))
        self.kappa = nn.Parameter(torch.empty(1).uniform_(-1.0, 0.0))

    def forward(self, z):
        return apa(z, self.lam.clamp(min=APA_LAMBDA_FLOOR), self.kappa)


def activation(kind: str, gradient: str = "exact") -> nn.Module:
    """A fresh module for one call site: relu | aglu."""
    if kind == "relu":
        return nn.ReLU(inplace=False)
    if kind == "aglu":
        return AGLU(gradient)
    raise ValueError(f"model.activation: unknown activation {kind!r}; expected relu or aglu")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation on a block's residual branch (the APA recipes' SE-ResNets). With the APA gate the
    official `SE_Block(use_gumbel=True)` also normalises the squeezed vector (LayerNorm) and drops 10 % of the
    excitation (Dropout 0.1); with the sigmoid gate it is the plain SE block. The excitation's hidden activation
    is ReLU also when the blocks use AGLU, as in the official SE class (resnet_cifar.py)."""

    def __init__(self, channels: int, reduction: int, gate: str):
        super().__init__()
        hidden = max(1, channels // reduction)
        gumbel = gate == "apa"
        self.norm = nn.LayerNorm(channels) if gumbel else nn.Identity()
        self.excite = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(),
                                    nn.Linear(hidden, channels, bias=False),
                                    nn.Dropout(0.1) if gumbel else nn.Identity())
        self.gate = APA() if gumbel else nn.Sigmoid()

    def forward(self, x):
        squeezed = self.norm(x.mean(dim=(2, 3)))
        return x * self.gate(self.excite(squeezed))[:, :, None, None]


def no_decay(model: nn.Module) -> list[nn.Parameter]:
    """The APA and AGLU scalars (trained without weight decay, as the official recipes do)."""
    return [p for m in model.modules() if isinstance(m, (AGLU, APA)) for p in (m.lam, m.kappa)]
