"""The strong view (`data.strong_augmentation`): x2 of a batch as MDCS trains it, x1 staying the weak view.

    autoaugment_cutout   the preset's crop and flip, torchvision's AutoAugment with the CIFAR-10 policy (the
                         official `CIFAR10Policy`), then Cutout: one side/2 square (16 px at 32) at a uniformly
                         drawn centre, clipped at the border (MDCS's and SHIKE's CIFAR strong view)
    randaugment_cutout   RandomResizedCrop(scale 0.08-1), flip, ColorJitter(0.4, 0.4, 0.4, 0), torchvision's
                         RandAugment(2 ops, magnitude 10), Cutout (MDCS's ImageNet-LT view uses timm's
                         rand-n2-m10-mstd0.5: torchvision has no magnitude noise)

The official Cutout zeroes the normalised tensor, i.e. paints the dataset's mean colour; here the hole is painted
with the mean colour (rounded to a pixel level) before normalisation, one implementation for every path.
In memory (CIFAR on the training device) the policy runs per image on the device, each image's ops drawn from
a key of its own (a draw of the step's generator), so the views depend on the seed, epoch and position in the
global batch only: not on the number of workers, and the same after a resume. In DataLoader workers and Ray
Data decode actors the policy runs on PIL images with torch's generator, like every other transform there.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T
from torchvision.transforms import v2

from glmc_ray.data.images import train_transform

STRONG = ("none", "autoaugment_cutout", "randaugment_cutout")


def policy(strong: str):
    """The strong preset's automatic-augmentation step (PIL images and uint8 tensors alike)."""
    if strong == "autoaugment_cutout":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return v2.RandAugment(num_ops=2, magnitude=10)


def cutout(images: torch.Tensor, centres: torch.Tensor, side: int, fill: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) with a side x side square around each (row, col) centre set to `fill` (C values),
    clipped at the border."""
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    top, left = (centres[:, 0] - side // 2)[:, None], (centres[:, 1] - side // 2)[:, None]
    inside_rows = (rows >= top) & (rows < top + side)  # (B, H)
    inside_cols = (cols >= left) & (cols < left + side)  # (B, W)
    hole = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(hole, fill.to(images.device, images.dtype).view(1, -1, 1, 1), images)


def mean_fill(mean) -> torch.Tensor:
    """The hole's colour: the normalisation mean as uint8 levels (what zero means after normalising)."""
    return torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8)


class Cutout:
    """Cutout of one uint8 (C, H, W) tensor, its centre drawn from torch's generator (a transform for decode
    workers, which seed it)."""

    def __init__(self, side: int, fill: torch.Tensor):
        self.side, self.fill = side, fill

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        centre = torch.stack([torch.randint(image.shape[-2], ()), torch.randint(image.shape[-1], ())])
        return cutout(image[None], centre[None], self.side, self.fill)[0]


def strong_transform(strong: str, augmentation: str, size: int, mean) -> T.Compose:
    """PIL image -> uint8 (C, size, size) strong view, for decode workers and actors."""
    if strong == "randaugment_cutout":
        steps = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                 T.ColorJitter(0.4, 0.4, 0.4, 0.0)]
    elif augmentation == "simclr":
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    return T.Compose([*steps, policy(strong), T.PILToTensor(), Cutout(size // 2, mean_fill(mean))])


def view_transforms(augmentation: str, size: int, strong: str, mean) -> tuple:
    """The two views' transforms in decode workers: the preset twice (TwoCropTransform), or the preset's (weak)
    and the strong one (data.strong_augmentation)."""
    weak = train_transform(augmentation, size)
    return (weak, weak) if strong == "none" else (weak, strong_transform(strong, augmentation, size, mean))


class DeviceStrongViews:
    """The in-memory path's strong view: the policy per image on the training device, each from its own key,
    then Cutout, from uint8 crops of the whole global batch's share."""

    def __init__(self, strong: str, mean):
        self.policy, self.fill = policy(strong), mean_fill(mean)

    def __call__(self, crops: torch.Tensor, keys: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """crops: (B, C, H, W) uint8; keys: (B,) int64 seeds; centres: (B, 2) Cutout centres."""
        views = []
        for crop, key in zip(crops, keys.tolist(), strict=True):
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
                torch.manual_seed(key)
                views.append(self.policy(crop))
        return cutout(torch.stack(views), centres.to(crops.device), crops.shape[-1] // 2, self.fill)
