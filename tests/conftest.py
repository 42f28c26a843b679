import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glmc_ray.runs import rundir

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_ROOT = SHARED / "data"
REPO = Path(__file__).resolve().parents[1]
# What the console of a run or search that succeeded never shows: Ray's banner and token-auth warning, the
# `(RayTrainWorker pid=...)` prefixes of workers' lines, colour codes (a test's output is a pipe), a traceback
CONSOLE_NOISE = ("Started a local Ray instance", "Token authentication", "pid=", "\x1b[", "Traceback")


def assert_quiet(console: str) -> None:
    for noise in CONSOLE_NOISE:
        assert noise not in console, (noise, console[-3000:])

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s: up to 2 s after a fit's last report before it ends, a
# third of a smoke fit. Read from the driver's environment by every fit (propagated to the controller).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# What the command line does for a Ray instance it starts (distributed/ray_train.py `connect`): nothing drains
# this machine, so Ray Train's preemption watcher would be one more actor process per fit.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# A test is `quick` (pytest -m quick, docs/contributing.md) unless it starts Ray, a server or another Python
# process that trains: by the fixtures it uses (module-scoped autouse ones included) or by its module.
NOT_QUICK_FIXTURES = {"shared_ray", "ray_session", "ray_address", "two_node_cluster", "postgres", "s3", "s3_shards",
                      "s3_proxy"}
# their runs are subprocesses that start their own Ray (or train in-process)
NOT_QUICK_MODULES = {"test_interrupts", "test_local_cluster", "test_ray_console"}


SHARED_RAY = {"modules": set(), "running": False}  # the modules that use shared_ray; whether it is up


def pytest_collection_modifyitems(items):
    SHARED_RAY["modules"] = {item.module.__name__ for item in items if "shared_ray" in item.fixturenames}
    for item in items:
        if not NOT_QUICK_FIXTURES & set(item.fixturenames) and item.module.__name__.split(".")[-1] not in \
                NOT_QUICK_MODULES:
            item.add_marker(pytest.mark.quick)


def stop_ray() -> None:
    """End this process's Ray instance, if any (a module that needs one of its own starts it after this)."""
    import ray

    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # start_local's, for that instance
    SHARED_RAY["running"] = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The shared instance ends before a module that has no use for it: its idle processes slowed in-process
    runs beside it (test_train's resume test took 37 s instead of 12)."""
    if SHARED_RAY["running"] and item.module.__name__ not in SHARED_RAY["modules"]:
        stop_ray()


@pytest.fixture(scope="session")
def _stop_ray_at_the_end():
    yield
    stop_ray()


@pytest.fixture(scope="module")
def shared_ray(_stop_ray_at_the_end) -> str:
    """One local Ray instance (8 logical CPUs: Train workers and Ray Data beside them) for every module that can
    share it, as the command line starts one: started by the first such module, kept for the next (a start
    costs about 8 s), ended by a module that needs its own (stop_ray) or by the session's end. Its address."""
    import ray

    from glmc_ray.distributed import cluster

    if not ray.is_initialized():
        cluster.start_local(8, object_store_memory=256 << 20)
        SHARED_RAY["running"] = True
    return ray.get_runtime_context().gcs_address


@pytest.fixture
def cifar_root():
    if not (CIFAR_ROOT / "cifar-10-batches-py").is_dir():
        pytest.fail(f"real CIFAR-10 expected at {CIFAR_ROOT} (../shared next to the checkout)")
    return CIFAR_ROOT


def write_image_split(root: Path, name: str, counts, rng, shape=(40, 48, 3)) -> None:
    """`counts[c]` JPEGs of class c under root/images/ and `root/splits/<name>.txt` (`relative/path label`);
    `shape` (height, width) makes grayscale images."""
    lines = []
    for label, count in enumerate(counts):
        folder = root / "images" / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"{name}_{i}.JPEG"
            pixels = (rng.random(shape) * 80 + label * 40).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            lines.append(f"{path.relative_to(root)} {label}")
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / f"{name}.txt").write_text("\n".join(lines))  # no trailing newline, like the real files
def git_head() -> str:
    """The commit checked out in this repository (the tests run from a checkout)."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag in a run's TensorBoard event files, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


class Interrupted(Exception):
    """What StopAfter raises: the run stops as a kill would, right after an epoch was reported."""


class StopAfter(rundir.LocalReporter):
    """An in-process reporter that interrupts the run once `epochs` epochs are saved (to test a resume)."""

    def __init__(self, run, cfg, epochs):
        super().__init__(run, cfg)
        self.epochs = epochs

    def report(self, record, checkpoint, is_best, per_class):
        super().report(record, checkpoint, is_best, per_class)
        if record["epoch"] + 1 == self.epochs:
            raise Interrupted


class FixedBatches:
    """A batch source of fixed batches, the same every epoch (the loop's interface: `.epoch(e)` and `len()`)."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, epoch):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def train_on(trainee, cfg, batches) -> dict:
    """One epoch (epoch 0) of the loop's `train_epoch` on `batches`, in this process; its record."""
    from types import SimpleNamespace

    from glmc_ray.training.loop import Dist, train_epoch
    return train_epoch(trainee, SimpleNamespace(train=FixedBatches(batches)), 0, cfg, Dist(), lambda: False)


def resume_matches_straight(tmp_path: Path, config: str, settings: list[str], stop_after: int) -> tuple[dict, Path]:
    """Train `config` + `settings` straight, and again interrupted after `stop_after` epochs then resumed with
    `--resume`: the two end with the same weights, bit for bit. Returns the straight run's final checkpoint and
    the resumed run directory."""
    import torch

    from glmc_ray.core import config as config_lib
    from glmc_ray.train import main
    from glmc_ray.training.worker import run_worker

    assert main(["--config", config, "--output", str(tmp_path / "straight"),
                 *[a for s in settings for a in ("--set", s)]]) == 0
    (straight_run,) = (tmp_path / "straight").iterdir()
    straight = rundir.load_checkpoint(straight_run / "checkpoint.pt")
    cfg = config_lib.load(config, settings)
    run = rundir.new_run_dir(tmp_path / "interrupted", cfg)
    with pytest.raises(Interrupted):
        run_worker(cfg, StopAfter(run, cfg, epochs=stop_after))
    assert main(["--resume", str(run)]) == 0
    resumed = rundir.load_checkpoint(run / "checkpoint.pt")
    assert resumed["epoch"] == straight["epoch"]
    for key, value in straight["model"].items():
        torch.testing.assert_close(value, resumed["model"][key], rtol=0, atol=0, equal_nan=True, msg=key)
    return straight, run
