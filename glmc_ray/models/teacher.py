"""A distillation teacher: another run's network, frozen, that sees the student's batch as its own training saw
images. The student's batch is normalised with the student's mean and std and has the student's image size; the
teacher gets it re-normalised to its own mean and std and resized to its own image size (bilinear; the affine
re-normalisation commutes with it). DeiT-LT's official code feeds ImageNet-normalised tensors to a CIFAR teacher
trained on CIFAR's statistics; here the teacher's own statistics are used.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def teacher_input(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x * scale + shift per channel (from the student's normalisation to the teacher's), resized to `size`."""
    x = x * scale.view(1, -1, 1, 1).to(x) + shift.view(1, -1, 1, 1).to(x)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def renormalisation(student: tuple, teacher: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ((x std_s + mean_s) - mean_t) / std_t = x scale + shift; each argument is (mean, std)."""
    (mean_s, std_s), (mean_t, std_t) = [(torch.tensor(m, dtype=torch.float32), torch.tensor(s, dtype=torch.float32))
                                        for m, s in (student, teacher)]
    return std_s / std_t, (mean_s - mean_t) / std_t


class Teacher(nn.Module):
    """The frozen network, in eval mode for good; forward(x) is its logits on the converted batch."""

    def __init__(self, network: nn.Module, scale: torch.Tensor, shift: torch.Tensor, size: tuple[int, int]):
        super().__init__()
        self.network = network.requires_grad_(False).eval()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.size = tuple(size)

    def train(self, mode: bool = True):
        return self  # no caller switches a teacher back to training (its BatchNorm statistics stay its own)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(teacher_input(x, self.scale, self.shift, self.size))
