"""CIFAR-10/100 from the standard python-pickle layouts, and the long-tailed subset protocols.

Pickles are read directly: torchvision's CIFAR classes md5-check the archive files, and a pixel-identical
copy that was re-pickled fails that check.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from filelock import FileLock
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}  # the class names
DOWNLOADERS = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
NORMALIZATION = {  # official get_transform values; CIFAR-100 uses CIFAR-10-like stats (reference D17)
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}


def download_cifar(root: str | Path, dataset: str) -> None:
    """Fill `root` with the official archive through torchvision's downloader, only when the layout is absent.

    An existing layout is never re-checked against torchvision's md5 (a re-pickled copy would fail it).
    """
    downloader, layout = DOWNLOADERS[dataset], Path(root) / LAYOUTS[dataset][0]
    if layout.is_dir():  # checked before locking: the root may be read-only
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    with FileLock(Path(root) / f".{dataset}.download.lock"):  # Ray workers on one node download once
        if not layout.is_dir():
            download_and_extract_archive(downloader.url, str(root), filename=downloader.filename,
                                         md5=downloader.tgz_md5)


def load_cifar(root: str | Path, dataset: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 32, 32, 3) and labels as int64, in file order."""
    folder, train_files, test_files, label_key = LAYOUTS[dataset]
    base = Path(root) / folder
    if not str(root):  # Path("") is the working directory: say that nothing was given instead
        raise FileNotFoundError(f"data.root is empty; expected the folder that holds {folder}/ "
                                f"(--data-root DIR or --set data.root=DIR)")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (data.root / --data-root; "
                                f"data.download=true fetches {dataset} there)")
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: data.root must contain {folder}/ "
                                f"(the python-pickle layout: {', '.join(train_files + test_files)}); "
                                f"data.download=true fetches it")
    images, labels = [], []
    for name in train_files if train else test_files:
        path = base / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the {dataset} layout")
        entry = _read_pickle(path)
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{path}: expected a dict with keys 'data' and {label_key!r}, found {found}")
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        except ValueError as err:
            raise ValueError(f"{path}: 'data' is not N x 3072 uint8 pixels ({err})") from None
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
        if len(labels[-1]) != len(images[-1]):
            raise ValueError(f"{path}: {len(images[-1])} images but {len(labels[-1])} labels")
    return np.concatenate(images).transpose(0, 2, 3, 1).copy(), np.concatenate(labels)


def cifar_class_names(root: str | Path, dataset: str) -> list[str] | None:
    """The class names of the layout's meta file, in label order; None where the file is missing."""
    name, key = META[dataset]
    path = Path(root) / LAYOUTS[dataset][0] / name
    return list(_read_pickle(path)[key]) if path.is_file() else None


def _read_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err}); "
                         f"the file is truncated or corrupt: replace it from the official archive") from None


def long_tailed_counts(max_count: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """n_c = int(n_max * (1/IF)^(c/(C-1))): the formula of LDAM-DRW and GLMC (class 0 is the head)."""
    if imbalance_factor < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    ratio = 1.0 / imbalance_factor
    counts = [int(max_count * ratio ** (c / (num_classes - 1))) for c in range(num_classes)]
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise ValueError(f"imbalance factor {imbalance_factor} leaves classes {empty} empty "
                         f"(largest class {max_count}); use a smaller factor")
    return counts


def long_tailed_subset(labels: np.ndarray, counts: list[int], protocol: str, seed: int,
                       with_replacement: bool = False) -> np.ndarray:
    """Indices of the long-tailed subset, sorted by class.

    glmc: RandomState(seed).choice(pool, n_c, replace=False) per class in class order (official, seed 3407).
    ldam: RandomState(seed).shuffle(pool), first n_c (LDAM-DRW `imbalance_cifar.py`, seed 0).
    """
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n in enumerate(counts):
        pool = np.flatnonzero(labels == c)
        if len(pool) < n and not with_replacement:
            raise ValueError(f"class {c} has {len(pool)} images, fewer than the {n} requested")
        if protocol == "glmc":
            chosen.append(pool[rng.choice(len(pool), n, replace=with_replacement)])
        elif protocol == "ldam":
            rng.shuffle(pool)
            chosen.append(pool[:n])
        else:
            raise ValueError(f"unknown subset protocol {protocol!r}; expected glmc or ldam")
    return np.concatenate(chosen)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out round(fraction * n_c) of each class (at least 1 while the class keeps one for training)."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(int(round(fraction * len(pool))), 1), len(pool) - 1) if fraction > 0 else 0
        val.append(pool[:n_val])
        train.append(pool[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
