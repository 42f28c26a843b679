"""Output that cannot be written: a file or a system path as --output, a full disk (a real size-limited tmpfs
where the test may mount one, and an injected ENOSPC), and what each leaves to resume from."""
import errno
import shutil
import subprocess

import pytest

from glmc_ray.runs import rundir
from glmc_ray.train import main
from tests.conftest import REPO

SMOKE = str(REPO / "configs/smoke.yaml")


@pytest.fixture
def small_disk(tmp_path):
    """mount(kib) -> a fresh tmpfs of that size (needs root, as in CI here); unmounted after the test."""
    mounted = []

    def mount(kib: int):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                        f"test_enospc_at_the_best_copy_keeps_a_resumable_run injects the same error")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_an_output_that_is_a_file_or_cannot_be_made_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for output, cause in [(blocker, f"{blocker} is a file, not a folder"),
                          (blocker / "runs", f"{blocker} is a file, not a folder"),
                          ("/proc/glmc-runs", "No such file or directory: /proc/glmc-runs")]:
        assert main(["--config", SMOKE, "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [f"error: --output {output}: cannot make a run directory there ({cause})"]
    assert blocker.read_text() == "not a folder"


def test_a_first_checkpoint_that_does_not_fit_leaves_nothing(small_disk, capsys):
    disk = small_disk(400)  # config, version and events fit; the ~1 MB checkpoint does not
    assert main(["--config", SMOKE, "--output", str(disk / "runs"), "--set", "train.epochs=1"]) == 2
    [line] = _error_lines(capsys)
    assert line.startswith(f"error: cannot write {disk}/runs/smoke-") and \
        line.endswith("/checkpoint.pt: No space left on device; no checkpoint was written (no epoch finished)")
    assert not list(disk.iterdir())  # no run directory (nothing to resume), no --output folder, no .partial


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(small_disk, capsys):
    disk = small_disk(2600)  # epoch 0's checkpoint and best.pt fit, epoch 1's new checkpoint beside them does not
    assert main(["--config", SMOKE, "--output", str(disk), "--set", "train.epochs=2"]) == 2
    [line] = _error_lines(capsys)
    run = next(disk.iterdir())
    assert line == (f"error: cannot write {run}/checkpoint.pt: No space left on device; the checkpoint after "
                    f"epoch 0 is kept; --resume continues from there")
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0]
    assert rundir.load_checkpoint(run / rundir.CHECKPOINT)["epoch"] == 1
    assert not list(run.glob(f".*{rundir.PARTIAL_SUFFIX}"))

    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # the user frees space
    assert main(["--resume", str(run)]) == 0
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]


def test_enospc_at_the_best_copy_keeps_a_resumable_run(tmp_path, capsys, monkeypatch):
    copyfile = shutil.copyfile

    def full_disk(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    assert main(["--config", SMOKE, "--output", str(tmp_path), "--set", "train.epochs=2"]) == 2
    run = next(tmp_path.iterdir())
    [line] = _error_lines(capsys)
    assert line == (f"error: cannot write {run}/best.pt: No space left on device; checkpoint.pt after epoch 0 "
                    f"is intact")
    assert not list(run.glob(f".*{rundir.PARTIAL_SUFFIX}"))

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    assert main(["--resume", str(run)]) == 0  # the checkpoint holds epoch 0: its metrics line is rebuilt
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]
