"""Faults under real Ray Train: a driver killed between Ray's checkpoint commit and the metrics line, and
failures that a restart cannot fix (they end the run at once instead of being retried)."""
import os
import signal
import subprocess
import sys

import pytest
import ray
from ray.train import Result
from ray.util.state import list_actors

from glmc_ray import rundir
from glmc_ray.train import main
from tests.conftest import REPO, tensorboard_scalars

SMOKE = str(REPO / "configs/smoke.yaml")

# Runs as the driver in a subprocess. The callback runs in Ray's TrainController, where Ray calls it after
# the checkpoint manager has committed epoch 2: the driver and the controller die before the metrics line.
KILLED_DRIVER = '''
import os, signal, sys
from ray.train import UserCallback
from glmc_ray import ray_train
from glmc_ray.train import main

class KillDriverAfterCommit(UserCallback):
    def __init__(self, inner, epoch, driver_pid):
        self.inner, self.epoch, self.driver_pid = inner, epoch, driver_pid

    def after_report(self, run_context, metrics, checkpoint):
        if metrics[0]["epoch"] == self.epoch:
            os.kill(self.driver_pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        self.inner.after_report(run_context, metrics, checkpoint)

metrics_callback = ray_train.metrics_callback
ray_train.metrics_callback = lambda run: KillDriverAfterCommit(metrics_callback(run), 2, os.getpid())
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module", autouse=True)
def ray_address():
    ray.init(num_cpus=4, object_store_memory=256 << 20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _train_workers():
    return list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)


def _checkpoint_folders(run):
    return {p.name for p in run.glob("checkpoint_*") if p.is_dir()}


def test_a_driver_killed_after_the_commit_loses_no_epoch_and_leaves_no_orphan(tmp_path, ray_address):
    args = ["--config", SMOKE, "--workers", "2", "--output", str(tmp_path), "--address", ray_address,
            "--set", "train.epochs=5"]
    killed = subprocess.run([sys.executable, "-c", KILLED_DRIVER, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = next(tmp_path.iterdir())
    committed = Result.from_path(str(run)).checkpoint
    assert committed.path.endswith("checkpoint_epoch0002")  # Ray committed epoch 2 ...
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]  # ... but its line was never written
    (run / "checkpoint_epoch0099").mkdir()  # a folder Ray's snapshot does not track (a clean-up cut short)

    assert main(["--resume", str(run), "--workers", "2"]) == 0
    records = rundir.read_metrics(run)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert tensorboard_scalars(run, "test/top1") == {r["epoch"]: pytest.approx(r["test_top1"]) for r in records}
    result = Result.from_path(str(run))
    tracked = {os.path.basename(c.path) for c, _ in result.best_checkpoints}
    assert _checkpoint_folders(run) == tracked and "checkpoint_epoch0004" in tracked


@pytest.mark.parametrize("args,code,message", [
    (["--config", SMOKE, "--set", "optim.lr=1e30"], 1, "error: non-finite loss"),
    (["--config", str(REPO / "configs/cifar10_lt.yaml"), "--data-root", "/nonexistent/cifar"], 2,
     "error: data root /nonexistent/cifar does not exist"),
])
def test_failures_a_restart_cannot_fix_are_not_retried(tmp_path, capsys, args, code, message):
    before = {a.actor_id for a in _train_workers()}
    assert main([*args, "--workers", "2", "--output", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert message in err and "WorkerGroupError" not in err
    assert len([a for a in _train_workers() if a.actor_id not in before]) == 2  # one worker group, no restart
    assert not list(tmp_path.iterdir())  # no half-made run directory
