"""What every image source shares: decoding, the augmentation presets, device-side normalisation, and the
log of unreadable images.

Augmentations end in uint8 tensors: normalisation happens on the training device (`Normalizer`), so decode
workers, Ray's object store and host-to-device copies move a quarter of the bytes float32 would.
"""
from __future__ import annotations

import io
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import functional as TF

# What PIL raises for a missing, zero-length, truncated or corrupt file (UnidentifiedImageError is an OSError)
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Unreadable:
    """Stands in a batch for an image that could not be decoded, so a decode worker does not die."""

    path: str
    reason: str


def decode(source: Path | bytes, channels: int, name: str = "") -> Image.Image | Unreadable:
    """A file or encoded bytes as an RGB (3 channels) or L (1) image, decoded now: a truncated file fails
    here, not in the middle of an augmentation."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            return opened.convert("L" if channels == 1 else "RGB")
    except UNREADABLE_IMAGE_ERRORS as err:
        return Unreadable(name or str(source), f"{type(err).__name__}: {err}")


def decode_tensor(source: Path | bytes, channels: int, name: str = "") -> torch.Tensor | Unreadable:
    """A file or encoded bytes as uint8 (C, H, W), decoded by torchvision (libjpeg-turbo, libpng, ...): the
    path of the device tail, which crops tensors (~1.8x less CPU per row than PIL decode and crop, per
    ../shared/docs/augment-on-device.md). What torchvision does not read (another format, a damaged file)
    goes through PIL, which decodes it or says why not."""
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (OSError, RuntimeError, ValueError):  # OSError: unreadable file; ValueError: empty
        image = decode(source, channels, name)
        return image if isinstance(image, Unreadable) else TF.pil_to_tensor(image)


class PILGaussianBlur:
    """The official blur (MoCo's `moco.loader.GaussianBlur`, which GLMC imports): PIL's
    `ImageFilter.GaussianBlur(radius=sigma)`, sigma ~ U(lo, hi) per image.

    Not torchvision's `GaussianBlur(23, sigma)`: that is a full 23x23 kernel on the image, a slightly different
    filter (PIL approximates the Gaussian by three box passes) and 2.6x the CPU cost of the whole list
    (../shared/docs/augment-on-device.md). sigma is drawn from torch's generator, like torchvision's transforms,
    so the seeding of decode workers covers it."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def train_transform(augmentation: str, size: int, rotation: float = 0.0) -> T.Compose:
    """PIL image -> uint8 (C, size, size) tensor.

    simclr: the official (post-2023-05-28) ImageNet-LT list, with the official PIL blur (PILGaussianBlur).
    crop_flip: the CIFAR recipe (pad by a side/8, random crop, flip) for small images, brought to `size` first,
    then a random rotation of up to `rotation` degrees where given.
    """
    if augmentation == "simclr":
        steps = [T.RandomResizedCrop(size), T.ColorJitter(0.4, 0.4, 0.4, 0.0), T.RandomGrayscale(p=0.2),
                 T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
        if rotation:  # RIDE's and MDCS's weak view (config.weak_rotation): PIL's nearest, black corners
            steps.append(T.RandomRotation(rotation))
    return T.Compose([*steps, T.PILToTensor()])


def test_transform(augmentation: str, size: int) -> T.Compose:
    """Resize (by 256/224 for the ImageNet recipe) and centre-crop, as uint8."""
    resize = int(size * 256 / 224) if augmentation == "simclr" else size
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.PILToTensor()])


class TwoViews:
    """Two independent draws of the same stochastic pipeline (the official TwoCropTransform), or of two
    pipelines (a weak and a strong view)."""

    def __init__(self, transform, second=None):
        self.transform, self.second = transform, second or transform

    def __call__(self, image):
        return self.transform(image), self.second(image)


class Normalizer:
    """uint8 (B, C, H, W) on any device -> normalised float on the training device, in its memory format."""

    def __init__(self, mean, std, device, memory_format=torch.contiguous_format):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.device, self.memory_format = device, memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images.to(self.device, non_blocking=True).float())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels on the 0-255 scale, already on the device."""
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


class BadImageLog:
    """Unreadable images met this epoch, per split: each counted once however often it is drawn (the
    re-balanced stream redraws a tail image many times an epoch) and named once on stderr; more than `limit`
    distinct ones in one split and epoch stop the run (a broken dataset should not train on silently).
    `known(path)`: whether an image was found unreadable before, so a source can skip it without reading it."""

    def __init__(self, limit: int):
        self.limit, self.met, self.named = limit, defaultdict(set), set()

    def add(self, split: str, bad: list[Unreadable]) -> None:
        for item in bad:
            self.met[split].add(item.path)
            if item.path not in self.named:
                self.named.add(item.path)
                print(f"warning: skipped unreadable image {item.path} ({item.reason})", file=sys.stderr, flush=True)
            if len(self.met[split]) > self.limit:
                raise ValueError(f"{len(self.met[split])} unreadable images in the {split} split this epoch, more "
                                 f"than data.max_bad_images={self.limit}; the last: {item.path} ({item.reason})")

    def known(self, path: str) -> bool:
        return path in self.named

    def take(self, split: str) -> int:
        """This epoch's count of distinct unreadable images in `split`, which starts again from zero."""
        return len(self.met.pop(split, ()))
