"""Synthetic long-tailed images made in memory (for smoke runs and tests: no files needed).

Each class is a fixed random low-frequency colour pattern plus per-image noise, so a small network can
learn it in a few epochs and accuracy is a meaningful signal, not a constant.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def synthetic_images(counts: list[int], size: int, seed: int, noise_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, size, size, 3) with labels sorted by class; `seed` fixes the class patterns."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(torch.rand(len(counts), 3, 4, 4, generator=g), size=size, mode="bilinear",
                               align_corners=False)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))
    noise = 0.35 * torch.randn(len(labels), 3, size, size, generator=g.manual_seed(noise_seed))
    images = (prototypes[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy()
