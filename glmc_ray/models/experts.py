"""Multi-expert backbones of RIDE, MDCS and SHIKE (methods-reference.md 5(b), 6(b), 7(b)).

A trunk shared by every expert, then E expert branches, each ending in its own cosine head whose output is
multiplied by `scale` (the official NormedLinear x 30). `forward(x)` returns the mean of the expert logits
(inference); `forward(x, experts=True)` returns `ExpertLogits` (the mean, every expert's logits and pooled
features) explicitly. The official codes pass the expert logits in a module attribute, which DDP and
torch.compile do not see.

Layouts:
- ride (RIDE, MDCS): shared stem and stage 1; per expert stages 2 and 3. `reduced` (RIDE's reduce_dimension)
  makes the expert stages 3/4 as wide (24/48 at width 16). ResNe(X)t-50: shared conv1, layer1, layer2; per
  expert layer3, layer4 (planes 192/384 reduced, else torchvision's 256/512).
- shike (SHIKE, CIFAR ResNet-32 only): shared stem, stages 1 and 2; per expert stage 3 at full width times a
  shallow expert (depth-wise knowledge fusion): strided 3x3 conv + BN layers from stage 1's output (even
  experts) or stage 2's (odd experts) down to stage 3's shape, the last without ReLU. A second set of heads,
  `retrained_heads`, is what SHIKE's stage 2 trains; a model built with `use_retrained_heads` predicts with it.
  Blocks use the option-A shortcut of every other method here (the official SHIKE's default is option B):
  one backbone family for the whole comparison.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from glmc_ray.models.backbones import BasicBlockA, CosineLinear, norm_layer, torchvision_backbone
from glmc_ray.models.outputs import ExpertLogits


def running_means(logits: torch.Tensor) -> torch.Tensor:
    """[B, E, C] -> [B, E, C]: at e, the mean logits of experts 0..e (the ensemble RIDE's router grows)."""
    return logits.cumsum(dim=1) / torch.arange(1, logits.shape[1] + 1, device=logits.device)[:, None]


class ExpertRouter(nn.Module):
    """RIDE's expert assignment (stage 2): router e < E-1 decides from expert e's normalised pooled feature
    (Linear to `hidden` + ReLU) and the top-k values of the mean logits of experts 0..e, through one Linear
    shared by all routers, whether the sample goes on to expert e+1."""

    def __init__(self, experts: int, feature_dim: int, num_classes: int, hidden: int = 16, top_k: int = 30):
        super().__init__()
        self.top_k = min(top_k, num_classes)
        self.features = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(experts - 1))
        self.decide = nn.Linear(hidden + self.top_k, 1)

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B, E-1] logits of "add the next expert", from [B, E, D] features and [B, E, C] expert logits."""
        running = running_means(logits)
        routes = []
        for e, project in enumerate(self.features):
            seen = running[:, e].topk(self.top_k, dim=1).values
            routes.append(self.decide(torch.cat([F.relu(project(F.normalize(features[:, e], dim=1))), seen], 1)))
        return torch.cat(routes, dim=1)


def routed_mean(logits: torch.Tensor, routes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of the experts each sample uses, experts used): expert e+1 is added while router e says yes
    (sigmoid > 0.5) and every router before it did."""
    go_on = torch.cumprod((routes > 0).to(logits.dtype), dim=1)  # sigmoid(r) > 0.5 <=> r > 0
    mask = torch.cat([torch.ones_like(go_on[:, :1]), go_on], dim=1)  # expert 0 always
    used = mask.sum(dim=1)
    return (logits * mask[:, :, None]).sum(dim=1) / used[:, None], used


def cifar_stage(in_planes: int, planes: int, blocks: int, stride: int, norm, act) -> nn.Sequential:
    return nn.Sequential(*[BasicBlockA(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, norm, act)
                           for i in range(blocks)])


class CifarTrunk(nn.Module):
    """Stem and the first `stages` stages of the CIFAR ResNet; returns each stage's output (the taps)."""

    def __init__(self, width: int, stages: int, norm, in_channels: int, act=nn.ReLU, blocks: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), norm(width), act())
        planes = [width * 2 ** s for s in range(stages)]
        self.stages = nn.ModuleList(cifar_stage(p // 2 if s else width, p, blocks, 2 if s else 1, norm, act)
                                    for s, p in enumerate(planes))

    def forward(self, x) -> list[torch.Tensor]:
        taps, out = [], self.stem(x)
        for stage in self.stages:
            out = stage(out)
            taps.append(out)
        return taps


class PooledBranch(nn.Module):
    """An expert's own late stages on the trunk's last tap, average-pooled."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layers(taps[-1]), 1).flatten(1)


def strided_conv(in_planes: int, planes: int, norm, relu: bool) -> nn.Sequential:
    layers = [nn.Conv2d(in_planes, planes, 3, 2, 1, bias=False), norm(planes)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class ShallowExpert(nn.Module):
    """SHIKE's DKF: strided convs from an earlier tap (width w * 2^tap) to the last stage's width, halving the
    side each time; a ReLU after each but the second, as the official `use_relu=(k != 1)` (networks.py): the
    two-conv experts end without one, the one-conv expert (from stage 2) ends with one."""

    def __init__(self, width: int, tap: int, last_stage: int, norm):
        super().__init__()
        self.tap = tap
        steps = last_stage - tap
        self.convs = nn.Sequential(*[strided_conv(width * 2 ** (tap + k), width * 2 ** (tap + k + 1), norm,
                                                  relu=k != 1) for k in range(steps)])

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return self.convs(taps[self.tap])


class FusedBranch(nn.Module):
    """SHIKE's expert: its own last stage on the trunk's last tap, times its shallow expert, average-pooled."""

    def __init__(self, stage: nn.Module, shallow: ShallowExpert):
        super().__init__()
        self.stage, self.shallow = stage, shallow

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.stage(taps[-1]) * self.shallow(taps), 1).flatten(1)


class ExpertNet(nn.Module):
    def __init__(self, trunk: nn.Module, branches: list[nn.Module], feature_dim: int, num_classes: int,
                 scale: float, retrained_heads: bool = False, use_retrained_heads: bool = False):
        super().__init__()
        self.trunk, self.branches, self.scale = trunk, nn.ModuleList(branches), scale
        self.heads = nn.ModuleList(CosineLinear(feature_dim, num_classes) for _ in branches)
        self.retrained_heads = nn.ModuleList(CosineLinear(feature_dim, num_classes) for _ in branches) \
            if retrained_heads else None
        self.use_retrained_heads = use_retrained_heads
        self.router: ExpertRouter | None = None  # `add_router`: RIDE's second stage
        self.frozen_norms: list[nn.Module] = []  # kept in eval mode by `train()` (a stage that freezes them)

    @property
    def num_experts(self) -> int:
        return len(self.branches)

    def forward(self, x, experts: bool = False):
        taps = self.trunk(x)
        features = [branch(taps) for branch in self.branches]
        heads = self.retrained_heads if self.use_retrained_heads else self.heads
        logits = torch.stack([self.scale * head(f) for head, f in zip(heads, features, strict=True)], dim=1)
        features = torch.stack(features, dim=1)
        routes = used = None
        if self.router is None:
            mean = logits.mean(dim=1)
        else:
            routes = self.router(features, logits)
            mean, used = routed_mean(logits, routes)
        return ExpertLogits(mean, logits, features, routes, used) if experts else mean

    def add_router(self, hidden: int, top_k: int) -> None:
        self.router = ExpertRouter(self.num_experts, self.heads[0].weight.shape[1], self.heads[0].weight.shape[0],
                                   hidden, top_k)

    def train(self, mode: bool = True):
        super().train(mode)
        for norm in self.frozen_norms:
            norm.eval()  # frozen statistics: a stage that trains only some heads must not move them
        return self


class ExpertPlan(NamedTuple):
    count: int  # E
    layout: str  # ride | shike
    use_retrained_heads: bool = False  # SHIKE's stage 2 predicts with its re-trained heads
    router: tuple[int, int] | None = None  # (hidden, top_k) of RIDE's expert-assignment router


def build_expert_model(cfg, num_classes: int, in_channels: int, plan: ExpertPlan) -> ExpertNet:
    """cfg: ModelConfig (arch, width, norm, expert_width, expert_scale)."""
    norm = norm_layer(cfg.norm)
    if cfg.arch == "resnet32":
        model = cifar_experts(cfg, plan.layout, plan.count, num_classes, norm, in_channels, plan.use_retrained_heads)
    else:
        model = torchvision_experts(cfg, torchvision_backbone(cfg.arch, norm, in_channels)[0], plan.count,
                                    num_classes)
    if plan.router is not None:
        model.add_router(*plan.router)
    return model


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():  # the CIFAR ResNet's init (LDAM / RIDE): kaiming_normal_ on convs and linears
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)


def cifar_experts(cfg, layout: str, experts: int, num_classes: int, norm, in_channels: int,
                  use_retrained_heads: bool) -> ExpertNet:
    w = cfg.width
    if layout == "ride":
        trunk = CifarTrunk(w, 1, norm, in_channels)
        p2, p3 = (3 * w // 2, 3 * w) if cfg.expert_width == "reduced" else (2 * w, 4 * w)
        branches = [PooledBranch(nn.Sequential(cifar_stage(w, p2, 5, 2, norm, nn.ReLU),
                                               cifar_stage(p2, p3, 5, 2, norm, nn.ReLU))) for _ in range(experts)]
        model = ExpertNet(trunk, branches, p3, num_classes, cfg.expert_scale)
    else:
        trunk = CifarTrunk(w, 2, norm, in_channels)
        branches = [FusedBranch(cifar_stage(2 * w, 4 * w, 5, 2, norm, nn.ReLU), ShallowExpert(w, e % 2, 2, norm))
                    for e in range(experts)]
        model = ExpertNet(trunk, branches, 4 * w, num_classes, cfg.expert_scale, retrained_heads=True,
                          use_retrained_heads=use_retrained_heads)
    _kaiming(model)
    return model


class TorchvisionTrunk(nn.Module):
    """torchvision ResNe(X)t's stem, layer1 and layer2 (RIDE's shared part on ImageNet)."""

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2 = net.layer1, net.layer2

    def forward(self, x) -> list[torch.Tensor]:
        return [self.layer2(self.layer1(self.stem(x)))]


def torchvision_experts(cfg, net: torchvision.models.ResNet, experts: int, num_classes: int) -> ExpertNet:
    """RIDE's ResNeXt-50: torchvision's layer3/layer4 per expert, rebuilt at planes 192/384 when reduced."""
    block = type(net.layer1[0])
    planes = (192, 384) if cfg.expert_width == "reduced" else (256, 512)
    branches = []
    for _ in range(experts):
        net.inplanes = 128 * block.expansion  # layer2's output channels: torchvision's _make_layer reads it
        layers = nn.Sequential(net._make_layer(block, planes[0], 6, stride=2),
                               net._make_layer(block, planes[1], 3, stride=2))
        for m in layers.modules():  # torchvision's init, which its constructor applied to the layers it built
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        branches.append(PooledBranch(layers))
    return ExpertNet(TorchvisionTrunk(net), branches, planes[1] * block.expansion, num_classes, cfg.expert_scale)


def freeze_except(model: ExpertNet, trainable: tuple[str, ...]) -> list[str]:
    """Leave gradients only to parameters whose names start with one of `trainable`, and keep every BatchNorm
    outside them in eval mode (frozen statistics); returns the names of the parameters that still train."""
    keep = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(trainable))
        if parameter.requires_grad:
            keep.append(name)
    model.frozen_norms = [m for name, m in model.named_modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith(trainable)]
    model.train(model.training)
    return keep
