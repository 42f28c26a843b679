"""Faults under real Ray Train: a driver killed between Ray's checkpoint commit and the metrics line, and
failures that a restart cannot fix (they end the run at once instead of being retried)."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from ray.train import Result
from ray.util.state import list_actors

from glmc_ray.runs import rundir
from glmc_ray.runs.ray_resume import SNAPSHOT
from glmc_ray.train import main
from tests.conftest import REPO, tensorboard_scalars

SMOKE = str(REPO / "configs/smoke.yaml")

# Runs as the driver in a subprocess. The callback runs in Ray's TrainController. "after_commit": it kills the
# driver and the controller after Ray's checkpoint manager has committed epoch 2, before the metrics line.
# "in_snapshot_write": it makes Ray's own rewrite of checkpoint_manager_snapshot.json for epoch 2 die after
# Ray opened (and so truncated) the file, before it wrote a byte.
KILLED_DRIVER = '''
import os, signal, sys
from ray.train import UserCallback
from glmc_ray.distributed import ray_train
from glmc_ray.train import main

def kill(driver_pid):
    os.kill(driver_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

def kill_inside_snapshot_write(driver_pid):
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    write = CheckpointManager._write_state_to_storage

    def dying_write(self):
        if any(r.checkpoint.path.endswith("checkpoint_epoch0002") for r in self._checkpoint_results):
            storage = self._storage_context
            with storage.storage_filesystem.open_output_stream(storage.checkpoint_manager_snapshot_path):
                kill(driver_pid)
        write(self)
    CheckpointManager._write_state_to_storage = dying_write

class KillDriver(UserCallback):
    def __init__(self, inner, mode, driver_pid):
        self.inner, self.mode, self.driver_pid = inner, mode, driver_pid

    def after_report(self, run_context, metrics, checkpoint):
        epoch = metrics[0]["epoch"]
        if self.mode == "after_commit" and epoch == 2:
            kill(self.driver_pid)
        if self.mode == "in_snapshot_write" and epoch == 0:
            kill_inside_snapshot_write(self.driver_pid)
        self.inner.after_report(run_context, metrics, checkpoint)

metrics_callback = ray_train.metrics_callback
ray_train.metrics_callback = lambda *args: KillDriver(metrics_callback(*args), sys.argv[1], os.getpid())
sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture(scope="module", autouse=True)
def ray_address(shared_ray):
    return shared_ray


def _train_workers():
    return list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)


def _checkpoint_folders(run):
    return {p.name for p in run.glob("checkpoint_*") if p.is_dir()}


def _killed_run(tmp_path, ray_address, mode):
    """A 5-epoch 2-worker run whose driver (and Ray's controller) is killed at epoch 2 as `mode` says."""
    args = ["--config", SMOKE, "--workers", "2", "--output", str(tmp_path), "--address", ray_address,
            "--set", "train.epochs=5"]
    killed = subprocess.run([sys.executable, "-c", KILLED_DRIVER, mode, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return next(tmp_path.iterdir())


def _assert_each_epoch_once_and_only_tracked_folders(run, epochs):
    records = rundir.read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(epochs))
    assert tensorboard_scalars(run, "test/top1") == {r["epoch"]: pytest.approx(r["test_top1"]) for r in records}
    result = Result.from_path(str(run))
    tracked = {os.path.basename(c.path) for c, _ in result.best_checkpoints}
    assert _checkpoint_folders(run) == tracked and f"checkpoint_epoch{epochs - 1:04d}" in tracked


def test_a_driver_killed_after_the_commit_loses_no_epoch_and_leaves_no_orphan(tmp_path, ray_address):
    run = _killed_run(tmp_path, ray_address, "after_commit")
    committed = Result.from_path(str(run)).checkpoint
    assert committed.path.endswith("checkpoint_epoch0002")  # Ray committed epoch 2 ...
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]  # ... but its line was never written
    (run / "checkpoint_epoch0099").mkdir()  # a folder Ray's snapshot does not track (a clean-up cut short)

    assert main(["--resume", str(run), "--workers", "2"]) == 0
    _assert_each_epoch_once_and_only_tracked_folders(run, 5)


def test_a_driver_killed_inside_rays_snapshot_write_resumes_from_the_newest_intact_checkpoint(
        tmp_path, ray_address, capsys):
    run = _killed_run(tmp_path, ray_address, "in_snapshot_write")
    snapshot = run / SNAPSHOT
    assert snapshot.stat().st_size == 0 and (run / "checkpoint_epoch0002" / "state.pt").is_file()
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]
    # the workers run ahead of the controller: epoch 3's folder may be complete though Ray never committed it
    histories = {folder.name: rundir.read_metrics(folder) for folder in run.glob("checkpoint_epoch*")}

    assert main(["--resume", str(run), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert f"resume: Ray's run snapshot {snapshot} is empty" in err
    chosen, epoch = re.search(r"continuing from the newest intact checkpoint \S+/(checkpoint_epoch(\d{4})) "
                              r"\(epoch (\d+)\)", err).group(1, 3)
    assert int(epoch) >= 3 and len(histories[chosen]) == int(epoch)  # epoch 2's folder, or a newer complete one
    _assert_each_epoch_once_and_only_tracked_folders(run, 5)
    assert rundir.read_metrics(run)[:int(epoch)] == histories[chosen]  # its epochs were not trained again
    assert [p.stat().st_size for p in run.glob(f"{SNAPSHOT}.unusable-*")] == [0]  # kept aside, not lost


def test_a_resume_continues_whatever_state_the_snapshot_is_in(tmp_path, capsys):
    """A snapshot pointing at a folder that is gone, cut off, missing: each resume continues from the newest
    checkpoint folder that loads, each epoch once."""
    assert main(["--config", SMOKE, "--workers", "2", "--output", str(tmp_path), "--set", "train.epochs=3"]) == 0
    run = next(tmp_path.iterdir())
    snapshot = run / SNAPSHOT
    capsys.readouterr()

    # each resume below is of a run whose driver died after its last checkpoint, before final.json (a finished
    # run would only say so)
    (run / "final.json").unlink()
    shutil.rmtree(run / "checkpoint_epoch0002")  # the snapshot's latest is gone: epoch 2 is trained again
    assert main(["--resume", str(run), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "cannot be used (CheckpointManagerInitializationError" in err and "checkpoint_epoch0001 (epoch 2)" in err
    _assert_each_epoch_once_and_only_tracked_folders(run, 3)

    snapshot.write_text(snapshot.read_text()[:40])
    (run / "final.json").unlink()
    assert main(["--resume", str(run), "--workers", "2"]) == 0
    assert "is cut off or corrupt" in capsys.readouterr().err and not snapshot.exists()
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1, 2]

    (run / "final.json").unlink()
    assert main(["--resume", str(run), "--workers", "2"]) == 0  # now missing, beside its checkpoint folders
    err = capsys.readouterr().err
    assert f"{snapshot} is missing" in err and "checkpoint_epoch0002 (epoch 3)" in err
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1, 2]

    (run / "final.json").unlink()
    assert main(["--resume", str(run)]) == 2  # without Ray options: said so, not "the run finished no epoch"
    assert f"error: {run} was trained under Ray Train (3 epochs in metrics.jsonl) (it was started by: " in \
        capsys.readouterr().err


@pytest.mark.parametrize("args,code,message", [
    (["--config", SMOKE, "--set", "optim.lr=1e30"], 1, "error: non-finite loss"),
    # data.classes=0: the recipe's class count is not checked in the driver, so the workers meet the missing root
    (["--config", str(REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml"), "--data-root", "/nonexistent/cifar",
      "--set", "data.classes=0"], 2, "error: data root /nonexistent/cifar does not exist"),
])
def test_failures_a_restart_cannot_fix_are_not_retried(tmp_path, capsys, args, code, message):
    before = {a.actor_id for a in _train_workers()}
    assert main([*args, "--workers", "2", "--output", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert message in err and "WorkerGroupError" not in err
    assert len([a for a in _train_workers() if a.actor_id not in before]) == 2  # one worker group, no restart
    assert not list(tmp_path.iterdir())  # no half-made run directory
