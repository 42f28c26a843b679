"""Ctrl-C and SIGTERM of a run started as a user starts it (its own process; under Ray Train its own Ray
instance): exit 130 / 143 with one `interrupted at ...; resume with: ...` line and no traceback, every committed
epoch kept, and a resume that continues after the newest committed epoch with each epoch once (core/interrupts.py,
docs/faults.md)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmc_ray.core.interrupts import StopOnSignal
from glmc_ray.runs import rundir
from glmc_ray.train import main
from tests.conftest import REPO

SMOKE = str(REPO / "configs/smoke.yaml")


def _start(tmp_path, *args) -> tuple[subprocess.Popen, object]:
    err = open(tmp_path / "stderr.txt", "w+")
    process = subprocess.Popen([sys.executable, "-m", "glmc_ray.train", "--config", SMOKE, "--output",
                                str(tmp_path / "runs"), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    return process, err


def _read_until(process: subprocess.Popen, pattern: str, timeout: float = 300) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line) or time.monotonic() > deadline:
            return lines
    return lines


def _finish(process, err) -> tuple[int, list[str]]:
    process.stdout.read()
    code = process.wait(timeout=300)
    err.seek(0)
    return code, err.read().splitlines()


def _the_one_line(lines: list[str], exit_code: int, code: int) -> re.Match:
    assert code == exit_code, lines
    assert not any("Traceback" in line or "*** SIGTERM received" in line for line in lines), lines
    ends = [line for line in lines if line.startswith("interrupted at epoch")]
    assert len(ends) == 1, lines
    return re.match(r"interrupted at epoch (\d+) step \d+; the epochs committed before it are kept; resume with: "
                    r"python -m glmc_ray.train --resume (\S+)(.*)$", ends[0])


def test_ctrl_c_of_an_in_process_run_stops_at_a_step_and_the_resume_goes_on_from_the_last_epoch(tmp_path):
    process, err = _start(tmp_path, "--set", "train.epochs=3")
    _read_until(process, r"^epoch 0 \|")
    process.send_signal(signal.SIGINT)
    code, lines = _finish(process, err)
    found = _the_one_line(lines, 130, code)
    assert found and found[1] == "1" and found[3] == "", lines
    run = found[2]
    assert [r["epoch"] for r in rundir.read_metrics(Path(run))] == [0]
    assert main(["--resume", run]) == 0
    assert [r["epoch"] for r in rundir.read_metrics(Path(run))] == [0, 1, 2]


def test_a_second_signal_exits_at_once(capsys):
    """The first SIGTERM only asks (the loop stops at its next step); a second one, while the stop takes its
    time (an evaluation, Ray's teardown), raises SystemExit(143) at once."""
    previous = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of this, the main thread
        assert stop.requested() and stop.exit_code == 143
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert exited.value.code == 143 and "SIGTERM again: exiting now" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == previous  # put back on the way out


def test_sigterm_of_a_two_worker_ray_run_stops_the_workers_and_no_committed_epoch_is_trained_again(
        tmp_path, shared_ray):
    """Ray Train's own handling was an abort during which the workers trained and checkpointed two more epochs
    that the resume then dropped, exit 1; SIGTERM ended in Ray's C++ dump and SIGABRT. (The drivers join the
    session's Ray instance, as on a cluster: ray.init(address=...) puts Ray's SIGTERM handler in place too.)"""
    process, err = _start(tmp_path, "--workers", "2", "--address", shared_ray, "--set", "train.epochs=5")
    _read_until(process, r"epoch 0 \|")
    process.send_signal(signal.SIGTERM)
    code, lines = _finish(process, err)
    found = _the_one_line(lines, 143, code)
    assert found and found[3] == f" --workers 2 --address {shared_ray}", lines
    stopped, run = int(found[1]), Path(found[2])
    assert [r["epoch"] for r in rundir.read_metrics(run)] == list(range(stopped))
    assert not (run / "final.json").exists()
    done = subprocess.run([sys.executable, "-m", "glmc_ray.train", "--resume", str(run), "--workers", "2",
                           "--address", shared_ray],
                          cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"continuing at epoch {stopped}" in done.stdout
    assert [r["epoch"] for r in rundir.read_metrics(run)] == list(range(5))
    assert json.loads((run / "final.json").read_text())["epochs"] == 5
