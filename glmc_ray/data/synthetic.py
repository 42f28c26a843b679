"""Synthetic long-tailed images: made in memory (smoke runs and tests: no files needed), or written as a
mini ImageNet-LT image tree with its split file (the shard builder's tests and benchmarks).

Each class is a fixed random low-frequency colour pattern plus per-image noise, so a small network can
learn it in a few epochs and accuracy is a meaningful signal, not a constant.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def synthetic_images(counts: list[int], size: int, seed: int, noise_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, size, size, 3) with labels sorted by class; `seed` fixes the class patterns."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(torch.rand(len(counts), 3, 4, 4, generator=g), size=size, mode="bilinear",
                               align_corners=False)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))
    noise = 0.35 * torch.randn(len(labels), 3, size, size, generator=g.manual_seed(noise_seed))
    images = (prototypes[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy(), labels.numpy()


# How a file of the image tree is written: most are RGB JPEGs; real ImageNet also holds grayscale and CMYK
# JPEGs and a few PNGs named .JPEG, and a download can leave a truncated file
RGB, GRAY, CMYK, PNG_AS_JPEG, TRUNCATED = "rgb", "gray", "cmyk", "png", "truncated"


def write_image_tree(root: str | Path, counts: list[int], seed: int = 0, corrupt: int = 1,
                     test_per_class: int = 0, sides: tuple[int, int] = (64, 500), mixed: bool = True) -> Path:
    """A mini ImageNet-LT on disk under `root`: `train/<wnid>/<wnid>_<k>.JPEG` and the split file
    `ImageNet_LT_train.txt` (`relative/path label`, class c has counts[c] lines); with `test_per_class`,
    also `val/<wnid>/ILSVRC2012_val_<n>.JPEG` and `ImageNet_LT_test.txt` (no corrupt file there).

    Sides are drawn from `sides` (inclusive) and never square; files are RGB, grayscale, CMYK, one PNG named
    .JPEG, and `corrupt` truncated JPEGs (listed in the split file). `mixed=False` keeps one grayscale and one
    CMYK file instead of one in ten each: real ImageNet is ~98 % RGB, and a CMYK JPEG decodes ~8x slower, so
    benchmarks want it rare. Each class is a colour field plus noise, so a small network can learn it (at
    quality 90 the noise costs ~0.7 bytes a pixel, ImageNet's rate: 300-500 px sides give ~110 KB files).
    Returns the train split file."""
    root, rng = Path(root), np.random.default_rng(seed)
    wnids = [f"n{number:08d}" for number in sorted(rng.choice(14_000_000, size=len(counts), replace=False) + 10**6)]
    prototypes = rng.integers(0, 256, size=(len(counts), 4, 4, 3), dtype=np.uint8)
    train = [(label, f"train/{wnids[label]}/{wnids[label]}_{k}.JPEG")
             for label, count in enumerate(counts) for k in range(1, count + 1)]
    if corrupt > len(train):
        raise ValueError(f"corrupt={corrupt} but the tree has only {len(train)} training images")
    split = _write_split(root, "ImageNet_LT_train.txt", train, _file_kinds(len(train), corrupt, mixed, rng),
                         prototypes, sides, rng)
    if test_per_class:
        test = [(label, f"val/{wnids[label]}/ILSVRC2012_val_{label * test_per_class + k:08d}.JPEG")
                for label in range(len(counts)) for k in range(1, test_per_class + 1)]
        _write_split(root, "ImageNet_LT_test.txt", test, _file_kinds(len(test), 0, mixed, rng), prototypes, sides,
                     rng)
    return split


def _file_kinds(total: int, corrupt: int, mixed: bool, rng: np.random.Generator) -> list[str]:
    """A kind for each of `total` files, at random places: `corrupt` truncated, then one PNG, one grayscale
    and one CMYK for sure (when there is room), then, if `mixed`, about one in ten of the rest grayscale and
    one in ten CMYK."""
    kinds = [RGB] * total
    order = rng.permutation(total)
    sure = [TRUNCATED] * corrupt + [PNG_AS_JPEG, GRAY, CMYK]
    for place, kind in zip(order, sure, strict=False):
        kinds[place] = kind
    for rank, place in enumerate(order[len(sure):] if mixed else []):
        kinds[place] = {0: GRAY, 5: CMYK}.get(rank % 10, RGB)
    return kinds


def _write_split(root: Path, name: str, samples: list[tuple[int, str]], kinds: list[str], prototypes: np.ndarray,
                 sides: tuple[int, int], rng: np.random.Generator) -> Path:
    for (label, relative), kind in zip(samples, kinds, strict=True):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_image(path, _class_image(prototypes[label], sides, rng), kind)
    split = root / name
    split.write_text("\n".join(f"{relative} {label}" for label, relative in samples))  # no final newline, as real
    return split


def _class_image(prototype: np.ndarray, sides: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The class's 4x4 colour field stretched over a random non-square size, plus uniform noise."""
    shortest, longest = sides
    width, height = rng.integers(shortest, longest + 1, size=2)
    if width == height:
        height += 1 if height < longest else -1
    field = np.asarray(Image.fromarray(prototype).resize((int(width), int(height)), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-60, 61, size=field.shape, dtype=np.int16)
    return Image.fromarray((field + noise).clip(0, 255).astype(np.uint8))


def _write_image(path: Path, image: Image.Image, kind: str) -> None:
    if kind == PNG_AS_JPEG:
        image.save(path, format="PNG")
    elif kind == TRUNCATED:
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=90)
        path.write_bytes(encoded.getvalue()[:encoded.tell() // 2])  # header and half the scan: cut off
    else:
        converted = {RGB: image, GRAY: image.convert("L"), CMYK: image.convert("CMYK")}[kind]
        converted.save(path, format="JPEG", quality=90)
