"""A Ray Train run started as a user starts it, in its own process with its own Ray instance: the console
shows our epoch lines, not Ray Train's per-rank report dumps, and the run directory holds the code version and
the TensorBoard events (written by the controller). The run is also the suite's plain 2-worker GLMC smoke run:
what it leaves is checked here (one fit carries both)."""
import collections
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, assert_quiet, git_head, tensorboard_scalars


def test_two_workers_print_each_epoch_once_and_record_version_and_events(tmp_path):
    command = [sys.executable, "-m", "glmc_ray.train", "--config", str(REPO / "configs/smoke.yaml"),
               "--workers", "2", "--output", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=400)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console
    assert collections.Counter(re.findall(r"epoch (\d+) \|", console)) == {"0": 1, "1": 1, "2": 1}, console
    assert "TrainingReport(" not in console and "PreemptionWatcher" not in console, console
    # our lines only, as written: no Ray banner or token-auth warning, no `(RayTrainWorker pid=...)` prefix, no
    # colour codes (the output is a pipe here), no traceback; each epoch line with its time and the ETA
    assert_quiet(console)
    epochs = [line for line in console.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 and all(re.search(r" \| \d+\.\d s \| ETA \d:\d\d:\d\d$", e) for e in epochs), epochs
    assert epochs[-1].endswith("ETA 0:00:00")

    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    version = json.loads((run / "version.json").read_text())
    assert version["git_commit"] == git_head() and "--workers 2" in version["command"]
    final = json.loads((run / "final.json").read_text())
    assert final["version"] == version and final["workers"]["count"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert tensorboard_scalars(run, "test/top1") == {r["epoch"]: pytest.approx(r["test_top1"]) for r in records}
    assert len(tensorboard_scalars(run, "test_per_class/9")) == 3 and "test_per_class" not in records[-1]

    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["test_top1"] > 0 and "checkpoint_score" not in records[-1]
    assert len(final["last"]["test"]["per_class"]) == 10
    assert (run / "per_class.png").exists()
    checkpoints = sorted(p.name for p in run.glob("checkpoint_epoch*"))
    assert "checkpoint_epoch0002" in checkpoints and len(checkpoints) <= 3  # best 2 by validation + latest
