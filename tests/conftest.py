import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_ROOT = SHARED / "data"
REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def cifar_root():
    if not (CIFAR_ROOT / "cifar-10-batches-py").is_dir():
        pytest.fail(f"real CIFAR-10 expected at {CIFAR_ROOT} (../shared next to the checkout)")
    return CIFAR_ROOT
