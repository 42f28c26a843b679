"""The strong view (`data.strong_augmentation`): x2 of a batch as MDCS trains it, x1 staying the weak view.

    autoaugment_cutout   the preset's crop and flip, torchvision's AutoAugment with the CIFAR-10 policy (the
                         official `CIFAR10Policy`, grey 128 where it shears, translates or rotates), then Cutout:
                         one side/2 square (16 px at 32) at a uniformly drawn centre, clipped at the border
                         (MDCS's and SHIKE's CIFAR strong view)
    randaugment_cutout   the preset's crop (RandomResizedCrop, scale 0.08-1, for simclr), flip, ColorJitter(0.4,
                         0.4, 0.4, 0), torchvision's RandAugment(2 ops, magnitude 10, the mean colour where it
                         moves pixels), Cutout. MDCS's ImageNet-LT view uses timm's rand-n2-m10-mstd0.5 (torchvision
                         has no magnitude noise) and has no Cutout
    randaugment_erasing  DeiT's view (DeiT-LT trains on it): the preset's crop, flip, torchvision's RandAugment
                         (2 ops, magnitude 9, the mean colour where it moves pixels), then random erasing with
                         probability 0.25 (timm's RandomErasing in its pixel mode: one rectangle of 2-33 % of the
                         image, aspect 0.3-3.3, filled with noise that is N(0, 1) once normalised). timm's
                         rand-m9-mstd0.5-inc1 adds magnitude noise and magnitude-increasing ops, which
                         torchvision's RandAugment has not

Cutout paints the dataset's mean colour (zero once normalised, rounded to a pixel level here, before
normalisation: one implementation for every path); random erasing paints mean + std * N(0, 1) as pixel levels
(clipped to 0-255) for the same reason. MDCS's code cuts before `Normalize` (a black hole); the
original Cutout code cuts after it (the mean colour).
In memory (CIFAR on the training device) the policy runs per image on the device, each image's ops drawn from
a key of its own (arrays.EpochDraws: drawn for each place in the epoch's order), so the views depend on the
seed, epoch and the image's place in the epoch only: not on the batch size or the number of workers, and the
same after a resume. In DataLoader workers and Ray
Data decode actors the policy runs on PIL images with torch's generator, like every other transform there.
"""
from __future__ import annotations

import math

import torch
from torchvision import transforms as T
from torchvision.transforms import v2

from glmc_ray.data.images import train_transform


def policy(strong: str, mean):
    """The strong preset's steps after the crop and flip, before Cutout (PIL images and uint8 tensors alike).
    Pixels that shears, translations and rotations uncover get the official fills: CIFAR10Policy's grey 128,
    timm's mean colour (img_mean)."""
    if strong == "autoaugment_cutout":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128)
    if strong == "randaugment_erasing":
        return v2.RandAugment(num_ops=2, magnitude=9, fill=mean_fill(mean).tolist())
    return v2.Compose([v2.ColorJitter(0.4, 0.4, 0.4, 0.0),
                       v2.RandAugment(num_ops=2, magnitude=10, fill=mean_fill(mean).tolist())])


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


ERASING = {"probability": 0.25, "area": (0.02, 1 / 3), "aspect": (0.3, 1 / 0.3), "attempts": 10}  # timm's


def random_erasing(image: torch.Tensor, generator: torch.Generator, mean, std) -> torch.Tensor:
    """timm's RandomErasing (pixel mode, one rectangle) of one uint8 (C, H, W) image, drawn from `generator`:
    with probability 0.25, a rectangle of a uniform share of the area and a log-uniform aspect, at a uniform
    place (up to 10 tries to fit), painted with per-pixel noise that is N(0, 1) once normalised."""
    def uniform(low, high):
        return low + (high - low) * float(torch.rand((), generator=generator))

    if float(torch.rand((), generator=generator)) > ERASING["probability"]:
        return image
    height, width = image.shape[-2:]
    low, high = (math.log(a) for a in ERASING["aspect"])
    for _ in range(ERASING["attempts"]):
        area, aspect = uniform(*ERASING["area"]) * height * width, math.exp(uniform(low, high))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h < height and w < width:
            top = int(torch.randint(height - h + 1, (), generator=generator))
            left = int(torch.randint(width - w + 1, (), generator=generator))
            noise = torch.randn((image.shape[0], h, w), generator=generator)
            levels = 255 * (torch.tensor(mean).view(-1, 1, 1) + torch.tensor(std).view(-1, 1, 1) * noise)
            image = image.clone()
            image[:, top:top + h, left:left + w] = levels.round().clamp(0, 255).to(image.device, image.dtype)
            return image
    return image


class RandomErasing:
    """random_erasing of one uint8 (C, H, W) tensor from torch's generator (a transform for decode workers,
    which seed it)."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random_erasing(image, torch.default_generator, self.mean, self.std)


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


def strong_transform(strong: str, augmentation: str, size: int, mean, std) -> T.Compose:
    """PIL image -> uint8 (C, size, size) strong view, for decode workers and actors: the preset's crop, as
    train_transform draws it, then the flip, the policy and Cutout (or random erasing)."""
    if augmentation == "simclr":
        crop = [T.RandomResizedCrop(size)]  # scale (0.08, 1)
    else:
        crop = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=size // 8)]
    last = RandomErasing(mean, std) if strong == "randaugment_erasing" else Cutout(size // 2, mean_fill(mean))
    return T.Compose([*crop, T.RandomHorizontalFlip(), policy(strong, mean), T.PILToTensor(), last])


def view_transforms(augmentation: str, size: int, strong: str, mean, std, rotation: float = 0.0) -> tuple:
    """The two views' transforms in decode workers: the preset twice (TwoCropTransform), or the preset's (weak)
    and the strong one (data.strong_augmentation); the first rotated by up to `rotation` degrees where given
    (config.weak_rotation)."""
    weak = train_transform(augmentation, size, rotation)
    if strong != "none":
        return weak, strong_transform(strong, augmentation, size, mean, std)
    return weak, (train_transform(augmentation, size) if rotation else weak)


class DeviceStrongViews:
    """The in-memory path's strong view: the policy per image on the training device, each from its own key,
    then Cutout (or random erasing, from the same key), from uint8 crops of the whole global batch's share."""

    def __init__(self, strong: str, mean, std):
        self.policy, self.fill = policy(strong, mean), mean_fill(mean)
        self.erasing = RandomErasing(mean, std) if strong == "randaugment_erasing" else None

    def __call__(self, crops: torch.Tensor, keys: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """crops: (B, C, H, W) uint8; keys: (B,) int64 seeds; centres: (B, 2) Cutout centres."""
        views = []
        for crop, key in zip(crops, keys.tolist(), strict=True):
            # torchvision draws from the global CPU generator, the only one keyed: torch.manual_seed would
            # reseed every GPU's generator too (dropout's), once per image
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(key)
                view = self.policy(crop)
                views.append(self.erasing(view) if self.erasing else view)
        if self.erasing:
            return torch.stack(views)
        return cutout(torch.stack(views), centres.to(crops.device), crops.shape[-1] // 2, self.fill)
