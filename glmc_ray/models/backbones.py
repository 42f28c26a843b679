"""Backbones with the GLMC heads (reference section 2).

`forward(x)` returns the re-balanced head's logits (inference); `forward(x, all_heads=True)` returns
(fc logits, fc_cb logits, projection z, prediction p) for training. Heads are single Linear layers, as
in the official code; with `classifier="cosine"` fc_cb is a `CosineLinear` (LDAM's NormedLinear).
ResNet-50 / ResNeXt-50 come from torchvision, the DeiTs from timm (glmc_ray/models/transformers.py); only the
CIFAR ResNet-32 is ours (torchvision has none).
The APA paper's options (`model.activation: aglu`, `model.se`: glmc_ray/models/activations.py) give every
activation site its own module; torchvision's Bottleneck calls one `self.relu` three times, so with them its
blocks are `ActivatedBottleneck`s (the same layers, one activation per site, SE before the residual sum).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck

from glmc_ray.models.activations import SqueezeExcite, activation
from glmc_ray.models.transformers import TIMM_MODELS, transformer_backbone


class BasicBlockA(nn.Module):
    """CIFAR basic block with the parameter-free "option A" shortcut (subsample + zero-pad channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm=nn.BatchNorm2d, act=nn.ReLU, se=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.act1 = act()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.se = se(planes) if se is not None else nn.Identity()
        self.act2 = act()
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def shortcut(self, x):
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.se(self.bn2(self.conv2(out))) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32x32 inputs; widths width/2width/4width (width 16 = He et al., 64 = GLMC's x4)."""

    def __init__(self, blocks_per_stage: int = 5, width: int = 16, norm=nn.BatchNorm2d, in_channels: int = 3,
                 act=nn.ReLU, se=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm(width), act())
        layers, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlockA(in_planes, planes, stride, norm, act, se))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.out_dim = in_planes

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


class CosineLinear(nn.Module):
    """Cosine classifier (LDAM-DRW's NormedLinear): cos(x, w_c) for each class vector w_c, in [-1, 1], no bias.

    `weight` is [classes, features] like nn.Linear's (the official stores the transpose); each row starts as
    a random unit vector, the official `uniform(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.empty(out_features, in_features).uniform_(-1, 1), dim=1))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


def classifier_head(kind: str, in_features: int, out_features: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "cosine":
        return CosineLinear(in_features, out_features)
    raise ValueError(f"model.classifier: unknown head {kind!r}; expected linear or cosine")


class GLMCNet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, projection_dim: int,
                 classifier: str = "linear"):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)
        self.fc_cb = classifier_head(classifier, feature_dim, num_classes)
        self.projection_head = nn.Linear(feature_dim, projection_dim)
        self.prediction_head = nn.Linear(projection_dim, projection_dim)
        # MaxNorm radii of fc_cb rows; NaN until MaxNorm first runs, then checkpointed with the weights.
        self.register_buffer("maxnorm_radii", torch.full((num_classes,), float("nan")))

    def forward(self, x, all_heads: bool = False):
        features = self.backbone(x)
        if not all_heads:
            return self.fc_cb(features)
        z = self.projection_head(features)
        return self.fc(features), self.fc_cb(features), z, self.prediction_head(z)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def norm_layer(kind: str):
    """BatchNorm (the paper's) or GroupNorm, whose output does not depend on how the batch is split."""
    return {"batch": nn.BatchNorm2d, "group": _group_norm}[kind]


class ActivatedBottleneck(Bottleneck):
    """torchvision's Bottleneck with its own module at each of its three activation sites and an optional SE
    block before the residual sum (the official SEBottleneck's place)."""

    act, se = nn.ReLU, None  # set per model by `_activated_block`

    def __init__(self, inplanes, planes, *args, **kwargs):
        super().__init__(inplanes, planes, *args, **kwargs)
        del self.relu
        self.act1, self.act2, self.act3 = self.act(), self.act(), self.act()
        channels = planes * self.expansion
        self.se_block = self.se(channels) if self.se is not None else nn.Identity()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.se_block(self.bn3(self.conv3(out)))
        return self.act3(out + identity)


def _activated_block(act, se) -> type:
    return type("ActivatedBottleneck", (ActivatedBottleneck,), {"act": staticmethod(act), "se": staticmethod(se)})


# torchvision's builders' block layout and grouping, for building them with ActivatedBottleneck
TORCHVISION_LAYOUTS = {"resnet50": {"layers": [3, 4, 6, 3]},
                       "resnext50_32x4d": {"layers": [3, 4, 6, 3], "groups": 32, "width_per_group": 4}}
SE_REDUCTION = {"resnet32": 4}  # the official SE reductions: 4 in the CIFAR SE-ResNet-32, 16 in SE-ResNe(X)t-50


def torchvision_backbone(arch: str, norm, in_channels: int, act=None, se=None) -> tuple[nn.Module, int]:
    if act is None and se is None:
        net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm)  # from scratch, as in the paper
    else:
        net = torchvision.models.resnet.ResNet(_activated_block(act or nn.ReLU, se), norm_layer=norm,
                                               **TORCHVISION_LAYOUTS[arch])
        net.relu = (act or nn.ReLU)()  # the stem's
    if in_channels != 3:
        stem = net.conv1
        net.conv1 = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                              bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_model(cfg, num_classes: int, in_channels: int = 3, default_classifier: str = "linear") -> GLMCNet:
    """cfg: ModelConfig; in_channels: 3 for RGB, 1 for grayscale data; default_classifier: the head that
    model.classifier: auto means (the method's, config.default_classifier)."""
    classifier = default_classifier if cfg.classifier == "auto" else cfg.classifier
    act, se = _apa_options(cfg)
    if cfg.arch == "resnet32":
        backbone = CifarResNet(blocks_per_stage=5, width=cfg.width, norm=norm_layer(cfg.norm), in_channels=in_channels,
                               act=act or nn.ReLU, se=se)
        model = GLMCNet(backbone, backbone.out_dim, num_classes, cfg.projection_dim, classifier)
        for module in model.modules():  # official: kaiming_normal_ on every conv and linear weight
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
        return model
    if cfg.arch in TIMM_MODELS:
        backbone, feature_dim = transformer_backbone(cfg.arch, in_channels, cfg.drop_path)
    else:
        backbone, feature_dim = torchvision_backbone(cfg.arch, norm_layer(cfg.norm), in_channels, act, se)
    return GLMCNet(backbone, feature_dim, num_classes, cfg.projection_dim, classifier)


def _apa_options(cfg):
    """(activation factory or None for torchvision's own ReLU, SE factory or None) of model.activation, model.se."""
    act = None if cfg.activation == "relu" else functools.partial(activation, cfg.activation, cfg.aglu_gradient)
    if cfg.se == "none":
        return act, None
    reduction = SE_REDUCTION.get(cfg.arch, 16)
    return act, functools.partial(SqueezeExcite, reduction=reduction, gate=cfg.se)
