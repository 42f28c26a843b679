"""The in-process training loop end to end: run directory, resume equivalence, bad input, real CIFAR-10."""
import json
import os
import stat
import time

import pytest
import torch

from glmc_ray.core import config as config_lib
from glmc_ray.runs import rundir
from glmc_ray.runs.tensorboard_events import EpochEvents
from glmc_ray.train import main
from glmc_ray.training.worker import run_worker
from tests.conftest import REPO, Interrupted, StopAfter, git_head, tensorboard_scalars

SMOKE = str(REPO / "configs/smoke.yaml")


def _only_run(output):
    runs = [p for p in output.iterdir() if p.is_dir()]
    assert len(runs) == 1
    return runs[0]


def test_smoke_run_leaves_a_readable_run_directory(tmp_path, capsys):
    assert main(["--config", SMOKE, "--output", str(tmp_path)]) == 0
    run = _only_run(tmp_path)
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out and f"done: {run}" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["val_balanced_top1"], -r["epoch"]))
    assert f"best on validation (best.pt): epoch {best['epoch']}, val balanced top-1 " \
           f"{best['val_balanced_top1']:.2f}, test top-1 {best['test_top1']:.2f}" in out
    assert "best on test" not in out
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for key in ("lr", "loss", "loss_balanced", "loss_rebalanced", "loss_consistency", "alpha", "test_top1",
                "test_top5", "test_many", "test_medium", "test_few", "val_balanced_top1", "images_per_s",
                "posthoc_tau", "test_posthoc_top1", "test_posthoc_few", "val_posthoc_balanced_top1"):
        assert key in records[-1], key
    assert records[0]["alpha"] == 1.0 and records[2]["alpha"] == pytest.approx(1 - (2 / 3) ** 2)
    final = json.loads((run / "final.json").read_text())
    assert len(final["last"]["test"]["per_class"]) == 10 and final["best_on_val"]["epoch"] is not None
    assert len(final["last"]["test_posthoc"]["per_class"]) == 10 and final["last"]["posthoc"]["chosen_on"] == "val"
    assert final["last"]["test"]["top1"] > 15  # 10 classes: above chance after 3 epochs
    assert (run / "per_class.png").stat().st_size > 10_000 and (run / "best.pt").exists()
    assert config_lib.load(run / "config.yaml") == config_lib.load(SMOKE)
    version = json.loads((run / "version.json").read_text())
    assert version["git_commit"] == git_head() and final["version"] == version
    top1 = tensorboard_scalars(run, "test/top1")
    assert top1 == {r["epoch"]: pytest.approx(r["test_top1"]) for r in records}
    per_class = [tensorboard_scalars(run, f"test_per_class/{c}")[2] for c in range(10)]
    assert per_class == pytest.approx(final["last"]["test"]["per_class"])
    assert "test_per_class" not in records[-1]  # metrics.jsonl stays one short line per epoch

    # a finished run says so; training on with another schedule is a new run from its weights
    assert main(["--resume", str(run)]) == 0
    assert f"{run} has finished all its 3 epochs (final.json): nothing to resume" in capsys.readouterr().out
    assert main(["--resume", str(run), "--set", "train.epochs=4"]) == 2
    extend = capsys.readouterr().err.split("start a new run from it: ")[1].strip()
    assert extend == f"python -m glmc_ray.train --config {run}/config.yaml --set train.init_from={run} " \
                     f"--set train.epochs=N"
    assert main([*extend.replace("=N", "=1").split()[3:], "--output", str(tmp_path / "more")]) == 0
    (child,) = (tmp_path / "more").iterdir()
    assert json.loads((child / "parent.json").read_text())["init_from"] == str(run)


def test_tensorboard_holds_every_committed_epoch_after_a_stop_before_its_events(tmp_path, monkeypatch):
    """A stop after epoch 0's checkpoint and metrics line, before its TensorBoard events (the writer's first
    write): the resumed run writes epoch 0's points, then its own."""
    cfg = config_lib.load(SMOKE, ["train.epochs=2", "data.val_fraction=0.0"])
    run = rundir.new_run_dir(tmp_path, cfg)
    reporter = rundir.LocalReporter(run, cfg)

    def stopped(record, per_class=None):
        raise Interrupted

    monkeypatch.setattr(reporter.events, "write", stopped)
    with pytest.raises(Interrupted):
        run_worker(cfg, reporter)
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0] and not list(run.glob("events.out.tfevents.*"))
    assert main(["--resume", str(run)]) == 0
    records = rundir.read_metrics(run)
    assert tensorboard_scalars(run, "test/top1") == {r["epoch"]: pytest.approx(r["test_top1"]) for r in records}
    assert sorted(tensorboard_scalars(run, "train/loss")) == [0, 1]


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, capsys):
    """Under the paper protocol (the whole subset trains: smoke.yaml's val_fraction is dropped), which reports the
    best epoch on test beside the last, after a resume as straight."""
    overrides = ["train.epochs=2", "data.protocol=paper"]
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["--config", SMOKE, "--output", str(tmp_path / "straight"), *sets]) == 0
    straight = rundir.load_checkpoint(_only_run(tmp_path / "straight") / "checkpoint.pt")

    cfg = config_lib.load(SMOKE, overrides)
    run = rundir.new_run_dir(tmp_path / "interrupted", cfg)
    with pytest.raises(Interrupted):
        run_worker(cfg, StopAfter(run, cfg, epochs=1))
    with open(run / "metrics.jsonl", "a") as f:  # a line written after the checkpoint, then a cut-off one
        f.write(json.dumps({"epoch": 1, "loss": 0.0}) + "\n" + '{"epoch": 2, "lo')
    leftover = run / ".checkpoint.pt.x1y2.partial"  # what a kill during a checkpoint write leaves
    leftover.write_bytes(b"half a checkpoint")
    crashed = EpochEvents(run, lambda: [])  # and its TensorBoard point
    crashed.write({"epoch": 1, "test_top1": -1.0})
    crashed.close()
    time.sleep(1)  # event files are read in name order, which starts with the second they were opened
    assert main(["--resume", str(run)]) == 0
    assert not leftover.exists()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pt", "metrics.jsonl", "final.json"):  # as readable as a plain open() makes them
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name
    resumed = rundir.load_checkpoint(run / "checkpoint.pt")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        torch.testing.assert_close(value, resumed["model"][key], rtol=0, atol=0, equal_nan=True, msg=key)
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert tensorboard_scalars(run, "test/top1") == {r["epoch"]: pytest.approx(r["test_top1"]) for r in records}
    version = json.loads((run / "version.json").read_text())
    assert [v["git_commit"] for v in version["resumed"]] == [git_head()]

    assert config_lib.load(run / "config.yaml").data.val_fraction == 0 and not (run / "best.pt").exists()
    best = max(records, key=lambda r: (r["test_top1"], -r["epoch"]))
    final = json.loads((run / "final.json").read_text())
    assert final["best_on_test"]["epoch"] == best["epoch"] and final["best_on_val"]["epoch"] is None
    assert final["best_on_test"]["test_top1"] == pytest.approx(best["test_top1"])
    assert f"best on test, as the published figures were chosen (upper-biased): epoch {best['epoch']}, test " \
           f"top-1 {best['test_top1']:.2f}" in capsys.readouterr().out


def test_resume_rejects_new_settings_and_missing_checkpoint(tmp_path, capsys):
    cfg = config_lib.load(SMOKE)
    run = rundir.new_run_dir(tmp_path, cfg)
    assert main(["--resume", str(run), "--set", "optim.lr=1"]) == 2
    assert "--resume continues the run with its saved config.yaml" in capsys.readouterr().err
    assert main(["--resume", str(run)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_bf16_autocast_and_channels_last_path_runs_on_cpu(tmp_path):
    assert main(["--config", SMOKE, "--output", str(tmp_path), "--set", "train.epochs=1", "--set", "train.amp=bf16",
                 "--set", "data.synthetic_max_count=64", "--set", "model.width=4",
                 "--set", "train.memory_format=channels_last", "--set", "method.glmc.maxnorm_threshold=0.1"]) == 0
    state = rundir.load_checkpoint(_only_run(tmp_path) / "checkpoint.pt")
    radii = state["model"]["maxnorm_radii"]
    assert not torch.isnan(radii).any()
    assert torch.all(state["model"]["fc_cb.weight"].norm(dim=1) <= radii + 1e-4)


def test_one_epoch_on_real_cifar10_lt(tmp_path, cifar_root):
    """Real data, small width: per-step alpha so both heads train within the single epoch; the paper protocol
    (the whole subset: one epoch on 10 % fewer images fell to chance here; the held-out split is the smoke
    run's and the dry run's, tests/test_config.py)."""
    assert main(["--config", str(REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml"), "--data-root", str(cifar_root),
                 "--output", str(tmp_path), "--set", "model.width=4", "--set", "train.epochs=1",
                 "--set", "train.batch_size=128", "--set", "optim.lr=0.05",
                 "--set", "method.glmc.cumulative_per_step=true", "--set", "train.progress_every=0",
                 "--set", "data.protocol=paper"]) == 0
    final = json.loads((_only_run(tmp_path) / "final.json").read_text())
    test = final["last"]["test"]
    assert sum(final["class_counts"]) == 12406 and final["best_on_test"]["test_top1"] == test["top1"]
    assert test["top1"] > 15 and test["many"] is not None and test["few"] is None
    # CIFAR names its classes (batches.meta): final.json, the TensorBoard tags and the plot use the names
    assert final["class_names"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                    "truck"]
    assert tensorboard_scalars(_only_run(tmp_path), "test_per_class/3_cat") == {0: pytest.approx(test["per_class"][3])}


def test_a_class_names_file_names_split_file_classes_and_a_wrong_count_is_refused(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class number {c}\n" for c in range(10)))
    settings = ["--set", "train.epochs=1", "--output", str(tmp_path / "runs"), "--set", f"data.class_names={names}"]
    assert main(["--config", SMOKE, *settings]) == 0
    run = _only_run(tmp_path / "runs")
    assert json.loads((run / "final.json").read_text())["class_names"][9] == "class number 9"
    assert len(tensorboard_scalars(run, "test_per_class/9_class_number_9")) == 1
    names.write_text("cat\ndog\n")
    assert main(["--config", SMOKE, *settings]) == 2
    assert f"data.class_names: {names} names 2 classes, the training split has 10" in capsys.readouterr().err


def test_fit_evaluates_a_finished_run_without_training(tmp_path):
    cfg = config_lib.load(SMOKE, ["train.epochs=1"])
    run = rundir.new_run_dir(tmp_path, cfg)
    run_worker(cfg, rundir.LocalReporter(run, cfg))
    state = rundir.load_checkpoint(run / "checkpoint.pt")
    final = run_worker(cfg, rundir.LocalReporter(run, cfg), state=state)
    assert final["last"]["test"]["top1"] == json.loads((run / "final.json").read_text())["last"]["test"]["top1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["--config", SMOKE, "--output", str(tmp_path), "--set", "train.device=cuda"]) == 2
    assert "train.device: 'cuda' requested, but this worker has no CUDA device" in capsys.readouterr().err
