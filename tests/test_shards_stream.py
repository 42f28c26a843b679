"""Parquet shards streamed by real Ray Data into the loop: a mini ImageNet-LT in its on-disk format (JPEG tree, split
file, one corrupt image) built into shards, then both GLMC streams checked and trained on, in-process and on a
2-worker TorchTrainer, including a resume after the driver is killed, and a shard damaged after the build."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import ray.data  # noqa: F401  its console log handler takes sys.stderr now: not a test's capsys, closed after it
import torch

from glmc_ray import shards
from glmc_ray.core import config as config_lib
from glmc_ray.data import build_data, shard_format
from glmc_ray.data import shards as shard_source
from glmc_ray.data.cifar import long_tailed_counts
from glmc_ray.data.synthetic import write_image_tree
from glmc_ray.train import main
from tests.conftest import REPO, assert_quiet
from tests.test_shards_build import corrupt_a_page

COUNTS = long_tailed_counts(60, 20, 30)  # 20 classes, 60 down to 2 images
CHI2_DF19_P999 = 43.82  # the 0.999 quantile of chi-square with 19 degrees of freedom


def _chi_square(observed, expected) -> float:
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_lt")
    train_split = write_image_tree(root / "images", COUNTS, seed=0, corrupt=1, test_per_class=3)
    for split, out in ((train_split, "train"), (root / "images/ImageNet_LT_test.txt", "test")):
        assert shards.main(["build", "--split", str(split), "--image-root", str(root / "images"),
                            "--out", str(root / "shards" / out), "--rows-per-shard", "48", "--workers", "2"]) == 0
    return root / "shards"


@pytest.fixture(scope="module", autouse=True)
def ray_session(shared_ray):  # 8 logical CPUs: an over-commit of 2 cores for Train and Data
    return shared_ray


def _cfg(shard_root, *extra):
    sets = [f"data.root={shard_root}", "data.train_split=train", "data.test_split=test", "data.source=shards",
            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.image_size=32", "data.decode_cpus=0.25",
            "data.shuffle_buffer=64", "train.batch_size=32", "train.eval_batch_size=64", "train.epochs=2",
            "model.width=4", "model.projection_dim=16", "method.glmc.resample_exponent=1.0", *extra]
    return config_lib.load(None, sets)


def test_poisson_resampling_matches_the_official_weighted_sampler():
    """Class c's share of the re-balanced stream is n_c^(1-q) / sum n^(1-q), for any q, from the same rows."""
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    batch = {"label": labels, "index": np.arange(len(labels))}
    for q in (0.0, 0.5, 1.0):
        decode = shard_source.Decode("crop_flip", 8, 3, train=True, rates=shard_source.poisson_rates(COUNTS, q))
        rng = np.random.default_rng(3407)  # a 0.999 quantile fails 1 run in 1000 by chance: fix the draw
        drawn = np.concatenate([labels[decode._rows(batch, np.zeros(len(labels), bool), rng)[0]]
                                for _ in range(200)])
        share = np.power(COUNTS, 1 - q) / np.power(COUNTS, 1 - q).sum()
        assert _chi_square(np.bincount(drawn, minlength=len(COUNTS)), share * len(drawn)) < CHI2_DF19_P999
        mean_total = len(drawn) / 200
        assert sum(COUNTS) < mean_total < sum(COUNTS) + 2 * shard_source.MARGIN_SIGMAS * np.sqrt(sum(COUNTS))


def test_two_workers_see_each_row_once_and_the_rebalanced_histogram(shard_root, tmp_path):
    """One epoch of both streams through a 2-worker TorchTrainer (Ray Train splits them across the workers)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = _cfg(shard_root)
    manifest = shard_format.read_manifest(shard_root / "train")
    out = str(tmp_path)

    def worker(loop_config):
        cfg, rank = config_lib.from_dict(loop_config), ray.train.get_context().get_world_rank()
        bundle = build_data(cfg, torch.device("cpu"), rank, 2, dataset_shard=ray.train.get_dataset_shard)
        seen = {"uniform": [b["index"].tolist() for b in bundle.train.uniform], "steps": len(bundle.train),
                "rebalanced": torch.cat([b["label"] for b in bundle.train.rebalanced]).tolist()}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(seen, f)

    TorchTrainer(worker, train_loop_config=config_lib.to_dict(cfg), datasets=shard_source.ray_datasets(cfg),
                 scaling_config=ScalingConfig(num_workers=2)).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rows = [i for seen in ranks for batch in seen["uniform"] for i in batch]
    # every kept row once; streaming_split(equal=True) leaves out rows % 2 so both ranks take as many steps
    kept = set(range(sum(COUNTS))) - {s["line"] - 1 for s in manifest["skipped"]}
    assert len(rows) == len(set(rows)) and set(rows) <= kept and len(kept) - len(rows) == manifest["num_rows"] % 2
    assert [len(seen["uniform"]) for seen in ranks] == [ranks[0]["steps"]] * 2
    # the re-balanced stream of q = 1: flat in expectation (Poisson rates), its histogram within chi-square bounds
    rebalanced = [label for seen in ranks for label in seen["rebalanced"]]
    rates = shard_source.poisson_rates(manifest["class_counts"], 1.0)
    expected = np.asarray(manifest["class_counts"]) * rates
    expected *= len(rebalanced) / expected.sum()
    assert _chi_square(np.bincount(rebalanced, minlength=20), expected) < CHI2_DF19_P999


def _sets(cfg_args):
    return [arg for item in cfg_args for arg in ("--set", item)]


SHARD_RUN = ["data.source=shards", "data.train_split=train", "data.test_split=test", "data.mean=[0.5,0.5,0.5]",
             "data.std=[0.25,0.25,0.25]", "data.image_size=32", "data.decode_cpus=0.25", "data.shuffle_buffer=64",
             "train.batch_size=32", "train.eval_batch_size=64", "model.width=4", "model.projection_dim=16",
             "model.norm=group"]


def _epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_in_process_from_shards(shard_root, tmp_path):
    """As a user runs it, in its own process and Ray instance, the simclr list's tail on the device: Ray Data's
    execution plans and logged progress stay in its log file, the console shows our lines."""
    args = ["-m", "glmc_ray.train", "--data-root", str(shard_root), "--output", str(tmp_path),
            *_sets([*SHARD_RUN, "train.epochs=1", "data.augmentation=simclr", "data.augment_on=device"])]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert "streaming_executor" not in console and "logging_progress" not in console, console[-3000:]
    assert_quiet(console)
    assert re.search(r"^epoch 0 \|.* \| ETA 0:00:00$", console, re.M) and len(console.splitlines()) < 20, console
    (run,) = tmp_path.iterdir()
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["test_top1"] >= 0 and record["train_bad_images"] == 0
    final = json.loads((run / "final.json").read_text())
    assert len(final["last"]["test"]["per_class"]) == 20  # Many/Medium/Few from the manifest's counts


def test_two_worker_run_from_shards_resumes_after_the_driver_is_killed(shard_root, tmp_path):
    """With the JPEGs decoded on the training device: encoded images, crop boxes and parameters through Ray Data."""
    address = ray.get_runtime_context().gcs_address
    args = ["-m", "glmc_ray.train", "--data-root", str(shard_root), "--output", str(tmp_path), "--workers", "2",
            "--address", address, *_sets([*SHARD_RUN, "train.epochs=2", "train.eval_every=2",
                                           "data.augmentation=simclr", "data.decode_on=device"])]
    driver = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*/metrics.jsonl")) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
    os.kill(driver.pid, signal.SIGKILL)  # after epoch 0 is committed
    assert driver.wait() == -signal.SIGKILL, driver.stderr.read().decode()[-3000:]
    (run,) = tmp_path.iterdir()
    assert _epochs(run)[:1] == [0]

    assert main(["--resume", str(run), "--workers", "2"]) == 0
    assert _epochs(run) == [0, 1]


def test_decode_names_and_counts_an_image_corrupted_after_the_build(capsys):
    """A shard row whose bytes no longer decode is skipped, named and counted, not fatal."""
    decode = shard_source.Decode("crop_flip", 16, 3, train=True)
    rows = decode({"image": np.array([b"\xff\xd8\xff\xe0 cut off"], dtype=object), "label": np.array([0]),
                   "path": np.array(["train/n0/x.JPEG"], dtype=object), "index": np.array([7])})
    assert rows["ok"].tolist() == [False] and rows["x1"].shape == (1, 3, 16, 16)
    from glmc_ray.data.images import BadImageLog

    log = BadImageLog(limit=5)
    assert len(shard_source.kept_rows(3, log, "train")(rows)["label"]) == 0
    assert log.take("train") == 1 and "train/n0/x.JPEG" in capsys.readouterr().err


def test_a_shard_damaged_after_the_build_stops_training_with_one_error_naming_it(shard_root, tmp_path, capfd):
    """Storage corruption inside a Parquet page of a shard (same size, footer intact, so the start-up check
    passes): the run stops at the first damaged row with one `error:` line naming the shard and its rows, exit 2,
    no run directory. Ray Data used to retry the failed read and end the run with ~300 lines of tracebacks,
    exit 1, the shard named only in a retry message."""
    data = tmp_path / "data"
    shutil.copytree(shard_root / "train", data / "train")
    damaged = data / "train" / "part-00001.parquet"
    corrupt_a_page(damaged, row_group=0)
    rows = pq.ParquetFile(damaged).metadata.row_group(0).num_rows
    output = tmp_path / "runs"
    capfd.readouterr()
    assert main(["--data-root", str(data), "--output", str(output),
                 *_sets([*SHARD_RUN, f"data.test_split={shard_root / 'test'}", "train.epochs=1"])]) == 2
    err = capfd.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: {damaged}: rows 0-{rows - 1} (row group 0) do not decode (OSError: ")
    assert errors[0].endswith(f"`python -m glmc_ray.shards check --deep {data / 'train'}` lists every damaged shard "
                              f"of its set")
    assert sum("Traceback" in line or 'File "' in line for line in err) < 10, "\n".join(err)
    assert not output.exists() or not list(output.iterdir())


def test_missing_shards_and_label_mismatch_are_clear_errors_and_leave_no_run(shard_root, tmp_path, capsys):
    args = ["--data-root", str(shard_root), "--output", str(tmp_path), *_sets([*SHARD_RUN, "train.epochs=1"])]
    assert main([*args, "--set", "data.train_split=nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err and not list(tmp_path.iterdir())
    # a test split with more classes than the training manifest
    images = shard_root.parent / "images"
    split = tmp_path / "wider.txt"
    split.write_text((images / "ImageNet_LT_test.txt").read_text().replace(" 19\n", " 25\n"))
    assert shards.main(["build", "--split", str(split), "--image-root", str(images), "--out",
                        str(tmp_path / "wider"), "--workers", "1"]) == 0
    with pytest.raises(ValueError, match="26 classes, more than the training manifest's 20"):
        build_data(_cfg(shard_root, f"data.test_split={tmp_path / 'wider'}"), torch.device("cpu"))


def test_a_search_over_shards_streams_each_trials_own_resampling(shard_root, tmp_path):
    """Issue 10, part 7: with a shards config each Tune trial builds its own Ray Data streams, so the searched
    re-sampling exponent q reaches the trial's re-balanced stream; the objective is the validation split's."""
    from tuning.search import main as search_main

    images = shard_root.parent / "images"  # the mini tree's held-out images, as a split of their own
    assert shards.main(["build", "--split", str(images / "ImageNet_LT_test.txt"), "--image-root", str(images),
                        "--out", str(tmp_path / "val"), "--workers", "1"]) == 0
    space = tmp_path / "space.yaml"
    space.write_text("method.glmc.resample_exponent: {float: [0.0, 1.0]}\n")
    output = tmp_path / "out"
    sets = [*SHARD_RUN, f"data.root={shard_root}", f"data.val_split={tmp_path / 'val'}", "train.epochs=1"]
    assert search_main([*_sets(sets), "--space", str(space), "--trials", "2", "--concurrent", "2",
                        "--output", str(output)]) == 0
    (experiment,) = output.iterdir()
    with open(experiment / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["complete", "complete"], rows
    assert len({float(r["method.glmc.resample_exponent"]) for r in rows}) == 2
    for run in sorted((experiment / "trials").iterdir()):
        trained = config_lib.load(run / "config.yaml")
        assert trained.data.source == "shards" and trained.data.val_split == str(tmp_path / "val")
        (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert record["val_bad_images"] == 0 and 0 <= record["val_balanced_top1"] <= 100
    q = {float(r["method.glmc.resample_exponent"]) for r in rows}
    assert {config_lib.load(run / "config.yaml").method.glmc.resample_exponent
            for run in (experiment / "trials").iterdir()} == q  # each trial trained on its own q
