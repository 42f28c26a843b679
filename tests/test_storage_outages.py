"""Storage that goes away during a run (docs/faults.md): the S3 endpoint cut behind a proxy while a 2-worker
Ray Train run checkpoints to it. Within `dist.storage_retry_seconds` the run rides it out (each epoch trained
once, the bucket's copy whole); past it the run stops with one `error:` line naming the endpoint and the resume
command, exit 75, and resumes once the storage is back. Each run is started as a user starts it: its own
process and Ray instance, whose workers reach the storage through the proxy only."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmc_ray.core.errors import STORAGE_LOST
from glmc_ray.runs import rundir
from tests.conftest import REPO
from tests.servers import CuttableProxy, make_bucket, s3_keys, s3_server

SMOKE = str(REPO / "configs/smoke.yaml")
BUCKET = "glmc"


@pytest.fixture(scope="module")
def s3_proxy(tmp_path_factory):
    """(the environment a run gets: the proxy as its endpoint, the proxy, the server's own environment)."""
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        make_bucket(env, BUCKET)
        proxy = CuttableProxy(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
        yield {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}, proxy, env
        proxy.cut()


def _start(tmp_path: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmc_ray.train", *args], cwd=REPO, text=True,
                            stdout=open(tmp_path / "stdout.txt", "w"), stderr=open(tmp_path / "stderr.txt", "w"),
                            env={**os.environ, **env, "PYTHONPATH": str(REPO)}, start_new_session=True)


def _committed_copy(process: subprocess.Popen, direct: dict, prefix: str, timeout: float = 300) -> str:
    """The run name once its copy in the bucket holds a metrics line (epoch 0 committed and copied); read
    from the server directly, not through the proxy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        for key in s3_keys(direct, BUCKET, prefix):  # not a checkpoint's own metrics.jsonl, uploaded before it
            if key.count("/") == 2 and key.endswith("/metrics.jsonl"):  # is committed
                return key.split("/")[-2]
        time.sleep(0.5)
    raise AssertionError(f"no metrics.jsonl under s3://{BUCKET}/{prefix} (the run exited with {process.poll()})")


def _run_args(tmp_path: Path, prefix: str, retry_seconds: float) -> list[str]:
    return ["--config", SMOKE, "--workers", "2", "--output", str(tmp_path / "runs"), "--storage",
            f"s3://{BUCKET}/{prefix}", "--set", "train.epochs=3", "--set",
            f"dist.storage_retry_seconds={retry_seconds}"]


def _console(tmp_path: Path) -> list[str]:
    return (tmp_path / "stderr.txt").read_text().splitlines() + (tmp_path / "stdout.txt").read_text().splitlines()


def _bucket_copy_is_the_run(direct: dict, prefix: str, run: Path) -> None:
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1, 2]
    keys = s3_keys(direct, BUCKET, f"{prefix}/{run.name}/")
    assert {f"{prefix}/{run.name}/{name}" for name in ("metrics.jsonl", "final.json", "config.yaml")} <= set(keys)
    assert sorted(k.split("/")[-2] for k in keys if k.endswith("/state.pt"))  # Ray's checkpoints are there


def test_an_s3_outage_within_the_retry_window_is_ridden_out_with_each_epoch_once(tmp_path, s3_proxy):
    env, proxy, direct = s3_proxy
    process = _start(tmp_path, env, *_run_args(tmp_path, "ridden", 120))
    _committed_copy(process, direct, "ridden/")
    proxy.cut()  # epoch 1's checkpoint upload and the run's copy meet the outage
    time.sleep(12)
    proxy.restore()
    assert process.wait(timeout=400) == 0, _console(tmp_path)
    console = _console(tmp_path)
    assert any("unreachable while" in line and "retrying for up to 120 s" in line for line in console), console
    assert any("reachable again after" in line for line in console), console
    assert not any("Traceback" in line or line.startswith("error:") for line in console), console
    (run,) = (tmp_path / "runs").iterdir()
    _bucket_copy_is_the_run(direct, "ridden", run)
    assert json.loads((run / "final.json").read_text())["epochs"] == 3


def test_an_s3_outage_past_the_retry_window_stops_the_run_with_one_line_and_it_resumes(tmp_path, s3_proxy):
    env, proxy, direct = s3_proxy
    process = _start(tmp_path, env, *_run_args(tmp_path, "lost", 4))
    _committed_copy(process, direct, "lost/")
    proxy.cut()
    try:
        code = process.wait(timeout=300)
    finally:
        proxy.restore()
    console = _console(tmp_path)
    assert code == STORAGE_LOST, console
    errors = [line for line in console if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in console), console
    (run,) = (tmp_path / "runs").iterdir()
    endpoint = env["AWS_ENDPOINT_URL"]
    assert f"the storage s3://{BUCKET} at {endpoint} stayed unreachable for" in errors[0], errors
    assert errors[0].endswith(f"resume with: python -m glmc_ray.train --resume {run} --workers 2 "
                              f"--storage s3://{BUCKET}/lost"), errors
    committed = [r["epoch"] for r in rundir.read_metrics(run)]
    assert committed and committed == list(range(len(committed))) and len(committed) < 3

    resumed = subprocess.run([sys.executable, "-m", "glmc_ray.train", "--resume", str(run), "--workers", "2",
                              "--storage", f"s3://{BUCKET}/lost"], cwd=REPO, capture_output=True, text=True,
                             timeout=400, env={**os.environ, **env, "PYTHONPATH": str(REPO)})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"continuing at epoch {len(committed)}" in resumed.stdout
    _bucket_copy_is_the_run(direct, "lost", run)
