"""Vision transformers from timm, as backbones under the same heads as the CNNs (glmc_ray/models/backbones.py).

timm's `VisionTransformerDistilled` (DeiT with a class and a distillation token) built with `num_classes=0`
returns the average of the two tokens' final features, which is what a single-head method's classifier reads
(the average of both tokens, as DeiT predicts with the average of its two heads). The published DeiTs take
224 px; smaller inputs (CIFAR's 32 px) are resized to it on the device, as DeiT-LT's RandomResizedCrop(224) of
CIFAR images does. `deit_micro_distilled_patch4_32` is the same class at 32 px, patch 4, 2 blocks of width 64:
a model that trains on two CPU cores. DeiT-LT's student keeps both heads (`DistilledDeiT`).
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from glmc_ray.models.outputs import ExpertLogits

# model.arch -> (timm's registered model, keyword overrides of its defaults)
TIMM_MODELS = {
    "deit_tiny_distilled_patch16_224": ("deit_tiny_distilled_patch16_224", {}),
    "deit_small_distilled_patch16_224": ("deit_small_distilled_patch16_224", {}),
    "deit_base_distilled_patch16_224": ("deit_base_distilled_patch16_224", {}),
    "deit_micro_distilled_patch4_32": ("deit_tiny_distilled_patch16_224",
                                       {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}),
}


def create(arch: str, num_classes: int, in_channels: int, drop_path: float) -> nn.Module:
    """timm's model for `arch` (a TIMM_MODELS key), from scratch; num_classes 0: without heads."""
    name, overrides = TIMM_MODELS[arch]
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                             drop_path_rate=drop_path, **overrides)


def fit(x: torch.Tensor, vit: nn.Module) -> torch.Tensor:
    """The batch at the model's image size (CIFAR's 32 px upsampled for a 224 px DeiT)."""
    size = tuple(vit.patch_embed.img_size)
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TransformerBackbone(nn.Module):
    """A timm ViT without its heads: images in, one feature vector per image out."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(fit(x, self.vit))


class DistilledDeiT(nn.Module):
    """DeiT-LT's student: timm's distilled DeiT with both heads, the class token's (`vit.head`) and the
    distillation token's (`vit.head_dist`). forward(x) is their average (DeiT's prediction, the published figure);
    forward(x, experts=True) gives the two heads as the experts of `ExpertLogits`, which evaluation scores one by
    one under `expert_names`."""

    num_experts = 2
    expert_names = ("cls", "dist")

    def __init__(self, arch: str, num_classes: int, in_channels: int, drop_path: float):
        super().__init__()
        self.vit = create(arch, num_classes, in_channels, drop_path)

    def forward(self, x: torch.Tensor, experts: bool = False):
        tokens = self.vit.forward_features(fit(x, self.vit))
        cls, dist = self.vit.head(tokens[:, 0]), self.vit.head_dist(tokens[:, 1])
        mean = (cls + dist) / 2
        return ExpertLogits(mean, torch.stack([cls, dist], dim=1), None, None, None) if experts else mean


def transformer_backbone(arch: str, in_channels: int, drop_path: float) -> tuple[TransformerBackbone, int]:
    """(backbone, feature width) of `arch` (a TIMM_MODELS key), from scratch."""
    vit = create(arch, 0, in_channels, drop_path)
    return TransformerBackbone(vit), vit.num_features
