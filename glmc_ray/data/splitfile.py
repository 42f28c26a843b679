"""ImageNet-LT / iNaturalist-2018 from split files (`relative/path label` per line) and an image root."""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

# What PIL raises for a missing, zero-length, truncated or corrupt file (UnidentifiedImageError is an OSError)
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

NORMALIZATION = {
    "imagenet_lt": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inat2018": ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192)),
}


@dataclass(frozen=True)
class SplitLine:
    """One sample of a split file: its 1-based line number, relative path as written, and label."""

    line: int
    path: str
    label: int


def parse_split_lines(path: str | Path) -> list[SplitLine]:
    """The samples of a split file, blank lines left out; a malformed line raises an error naming file and line.

    Images are not looked at (the shard builder lists a missing one and goes on)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{path}:{number}: expected 'relative/path label' with a label >= 0, got {line!r}")
        samples.append(SplitLine(number, parts[0], int(parts[1])))
    if not samples:
        raise ValueError(f"split file {path} holds no samples")
    return samples


def read_split_file(path: str | Path, root: str | Path, check_images: bool = True) -> tuple[list[Path], list[int]]:
    """Parse a split file; a malformed line or a missing image raises an error naming file and line."""
    path, root = Path(path), Path(root)
    paths, labels = [], []
    for sample in parse_split_lines(path):
        image = root / sample.path
        if check_images and not image.is_file():
            raise FileNotFoundError(f"{path}:{sample.line}: image {image} does not exist (data.root = {root})")
        paths.append(image)
        labels.append(sample.label)
    return paths, labels


def class_counts(labels: list[int], path) -> list[int]:
    """Per-class counts; labels must be 0..C-1 with no class missing (the official code assumes it)."""
    counts = torch.bincount(torch.as_tensor(labels)).tolist()
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise ValueError(f"split file {path}: classes {empty[:10]} have no sample (labels must be contiguous)")
    return counts


def train_transform(mean, std, size: int = 224):
    """The official (post-2023-05-28) SimCLR-style list; GaussianBlur uses torchvision's kernel, sigma 0.1-2."""
    return T.Compose([
        T.RandomResizedCrop(size),
        T.ColorJitter(0.4, 0.4, 0.4, 0.0),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def test_transform(mean, std, size: int = 224):
    return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


class TwoViews:
    """Two independent draws of the same stochastic pipeline (the official TwoCropTransform)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


@dataclass
class Unreadable:
    """Stands in a batch for an image that could not be decoded, so the DataLoader worker does not die."""

    path: str
    reason: str


class ImageListDataset(torch.utils.data.Dataset):
    """Images read with PIL as RGB; used for split files and for the official-style CIFAR baseline."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if not isinstance(image, Path):
            return self.transform(Image.fromarray(image)), self.labels[index]
        try:
            with Image.open(image) as opened:
                decoded = opened.convert("RGB")  # decodes now: a truncated file fails here, not later
        except UNREADABLE_IMAGE_ERRORS as err:
            return Unreadable(str(image), f"{type(err).__name__}: {err}")
        return self.transform(decoded), self.labels[index]


def collate_readable(samples: list) -> tuple:
    """(default_collate of the readable samples or None, the Unreadable ones)."""
    bad = [s for s in samples if isinstance(s, Unreadable)]
    good = [s for s in samples if not isinstance(s, Unreadable)]
    return (default_collate(good) if good else None), bad


class BadImageLog:
    """Unreadable images met this epoch, per split: each is named once on stderr and counted; more than
    `limit` in one split and epoch stop the run (a broken dataset should not train on silently)."""

    def __init__(self, limit: int):
        self.limit, self.counts, self.named = limit, Counter(), set()

    def add(self, split: str, bad: list[Unreadable]) -> None:
        for item in bad:
            self.counts[split] += 1
            if item.path not in self.named:
                self.named.add(item.path)
                print(f"warning: skipped unreadable image {item.path} ({item.reason})", file=sys.stderr, flush=True)
            if self.counts[split] > self.limit:
                raise ValueError(f"{self.counts[split]} unreadable images in the {split} split this epoch, more than "
                                 f"data.max_bad_images={self.limit}; the last: {item.path} ({item.reason})")

    def take(self, split: str) -> int:
        """This epoch's count for `split`, which starts again from zero."""
        return self.counts.pop(split, 0)


class ReadableBatches:
    """Iterates a DataLoader built with `collate_readable`, logging what was skipped under `split`."""

    def __init__(self, loader, log: BadImageLog, split: str):
        self.loader, self.log, self.split = loader, log, split

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, bad in self.loader:
            self.log.add(self.split, bad)
            if batch is None:
                raise ValueError(f"every image of a {self.split} batch was unreadable (the last: {bad[-1].path})")
            yield batch
