"""Vision transformers from timm, as backbones under the same heads as the CNNs (glmc_ray/models/backbones.py).

timm's `VisionTransformerDistilled` (DeiT with a class and a distillation token) built with `num_classes=0`
returns the average of the two tokens' final features, which is what a single-head method's classifier reads
(the average of both tokens, as DeiT predicts with the average of its two heads). The published DeiTs take
224 px; smaller inputs (CIFAR's 32 px) are resized to it on the device, as DeiT-LT's RandomResizedCrop(224) of
CIFAR images does. `deit_micro_distilled_patch4_32` is the same class at 32 px, patch 4, 2 blocks of width 64:
a model that trains on two CPU cores.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

# model.arch -> (timm's registered model, keyword overrides of its defaults)
TIMM_MODELS = {
    "deit_tiny_distilled_patch16_224": ("deit_tiny_distilled_patch16_224", {}),
    "deit_small_distilled_patch16_224": ("deit_small_distilled_patch16_224", {}),
    "deit_base_distilled_patch16_224": ("deit_base_distilled_patch16_224", {}),
    "deit_micro_distilled_patch4_32": ("deit_tiny_distilled_patch16_224",
                                       {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}),
}


class TransformerBackbone(nn.Module):
    """A timm ViT without its heads: images in, one feature vector per image out."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.image_size = tuple(vit.patch_embed.img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.vit(x)


def transformer_backbone(arch: str, in_channels: int, drop_path: float) -> tuple[TransformerBackbone, int]:
    """(backbone, feature width) of `arch` (a TIMM_MODELS key), from scratch."""
    name, overrides = TIMM_MODELS[arch]
    vit = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, drop_path_rate=drop_path,
                            **overrides)
    return TransformerBackbone(vit), vit.num_features
