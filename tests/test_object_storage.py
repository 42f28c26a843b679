"""Shards, Ray Train runs and searches on object storage, against a real S3 API server (moto's, on loopback,
checking credentials): built, streamed, checkpointed, killed and resumed there, and every bad input refused
with one error line before anything is made."""
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
import ray
import torch
from ray.train import Result

from glmc_ray import shards
from glmc_ray.core import config as config_lib
from glmc_ray.core import storage
from glmc_ray.data import build_data, shard_format
from glmc_ray.data import shards as shard_source
from glmc_ray.data.cifar import long_tailed_counts
from glmc_ray.data.synthetic import write_image_tree
from glmc_ray.distributed import cluster, ray_train
from glmc_ray.distributed.local_cluster import free_port
from glmc_ray.runs import rundir
from glmc_ray.search.trials import TRIALS_DIR
from glmc_ray.train import main as train_main
from tests.conftest import REPO, stop_ray
from tests.servers import make_bucket, s3_keys, s3_server
from tests.test_ray_faults import KILLED_DRIVER
from tests.test_search import FAST
from tuning.search import main as search_main

SMOKE = str(REPO / "configs/smoke.yaml")
BUCKET = "glmc"
COUNTS = long_tailed_counts(30, 10, 10)  # 10 classes, 30 down to 3 images


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server's environment, set in this process before Ray starts (Ray's processes inherit it)."""
    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        make_bucket(env, BUCKET)
        yield env
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_address(s3):
    stop_ray()  # its own instance: Ray's processes must inherit the server's environment
    cluster.start_local(6, object_store_memory=256 << 20)
    yield ray.get_runtime_context().gcs_address
    stop_ray()


def _run_copy(prefix: str) -> set[str]:
    """The names under s3://glmc/<prefix>/ one level down (files, and folders with a trailing /)."""
    names = set()
    for key in s3_keys(os.environ, BUCKET, prefix + "/"):
        rest = key[len(prefix) + 1:]
        names.add(rest.split("/")[0] + ("/" if "/" in rest else ""))
    return names


# ------------------------------------------------------------------------------------------- shards

@pytest.fixture(scope="module")
def s3_shards(s3, tmp_path_factory):
    """A mini ImageNet-LT (JPEG tree, split files, one corrupt image) built into shards in the bucket."""
    root = tmp_path_factory.mktemp("imagenet_lt")
    train_split = write_image_tree(root / "images", COUNTS, seed=0, corrupt=1, test_per_class=2)
    for split, name in ((train_split, "train"), (root / "images/ImageNet_LT_test.txt", "test")):
        assert shards.main(["build", "--split", str(split), "--image-root", str(root / "images"),
                            "--out", f"s3://{BUCKET}/shards/{name}", "--rows-per-shard", "24", "--workers", "2"]) == 0
    return f"s3://{BUCKET}/shards"


SHARD_RUN = ["data.source=shards", "data.train_split=train", "data.test_split=test", "data.image_size=32",
             "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.decode_cpus=0.25",
             "data.shuffle_buffer=16", "train.batch_size=8", "train.eval_batch_size=32", "model.width=4",
             "model.projection_dim=16", "model.norm=group"]


def test_shards_built_to_s3_are_checked_and_streamed_into_two_workers_each_row_once(s3_shards, tmp_path,
                                                                                     ray_address):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    out = f"{s3_shards}/train"
    assert shards.main(["check", out, "--deep"]) == 0
    assert {k.rsplit("/", 1)[-1] for k in s3_keys(os.environ, BUCKET, "shards/train/")} >= {"manifest.json",
                                                                                          "part-00000.parquet"}
    manifest = shard_format.read_manifest(out)
    cfg = config_lib.load(None, [f"data.root={s3_shards}", *SHARD_RUN])
    seen_dir = str(tmp_path)

    def worker(loop_config):
        cfg, rank = config_lib.from_dict(loop_config), ray.train.get_context().get_world_rank()
        bundle = build_data(cfg, torch.device("cpu"), rank, 2, dataset_shard=ray.train.get_dataset_shard)
        with open(f"{seen_dir}/rank{rank}.json", "w") as f:
            json.dump([i for b in bundle.train.uniform for i in b["index"].tolist()], f)

    TorchTrainer(worker, train_loop_config=config_lib.to_dict(cfg), datasets=shard_source.ray_datasets(cfg),
                 scaling_config=ScalingConfig(num_workers=2)).fit()
    rows = [i for r in range(2) for i in json.loads((tmp_path / f"rank{r}.json").read_text())]
    kept = set(range(sum(COUNTS))) - {s["line"] - 1 for s in manifest["skipped"]}
    assert len(rows) == len(set(rows)) and set(rows) <= kept and len(kept) - len(rows) == manifest["num_rows"] % 2


@pytest.mark.parametrize("ray_options", [[], ["--workers", "2"]], ids=["in-process", "2 workers"])
def test_training_streams_shards_from_s3(s3_shards, tmp_path, ray_address, ray_options):
    """On 2 workers the test set (one 20-row shard, one block) goes to one rank only: evaluation must not run
    DDP's forward (a collective), or that rank waits for a partner that has no batch (it did)."""
    sets = [a for item in [*SHARD_RUN, "train.epochs=1"] for a in ("--set", item)]
    if ray_options:
        ray_options = [*ray_options, "--address", ray_address, "--storage", f"s3://{BUCKET}/shard-runs"]
    assert train_main(["--data-root", s3_shards, "--output", str(tmp_path), *sets, *ray_options]) == 0
    (run,) = tmp_path.iterdir()
    record = rundir.read_metrics(run)[0]
    assert record["test_top1"] >= 0 and record["train_bad_images"] == 0  # the corrupt JPEG was skipped at build
    assert len(json.loads((run / "final.json").read_text())["last"]["test"]["per_class"]) == 10


# ------------------------------------------------------------------------------------------- Ray Train

def test_a_run_on_s3_killed_with_its_head_node_resumes_from_its_storage_uri_alone(tmp_path, ray_address):
    """--storage s3://: the driver is killed after epoch 2 is committed, the local run directory is lost with
    it; `--resume s3://.../<run>` restores the run directory from the bucket and continues: each epoch once,
    no orphaned checkpoint folder in the bucket, the bucket's copy of the run complete."""
    output = tmp_path / "head"
    args = ["--config", SMOKE, "--workers", "2", "--output", str(output), "--address", ray_address,
            "--storage", f"s3://{BUCKET}/runs", "--set", "train.epochs=5"]
    killed = subprocess.run([sys.executable, "-c", KILLED_DRIVER, "after_commit", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = output.iterdir()
    uri = f"s3://{BUCKET}/runs/{run.name}"
    assert Result.from_path(uri).checkpoint.path.endswith("checkpoint_epoch0002")  # committed, no metrics line
    shutil.rmtree(output)  # the head node is gone, and its disk with it

    assert train_main(["--resume", uri, "--workers", "2", "--output", str(output)]) == 0
    records = rundir.read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(5))
    result = Result.from_path(uri)
    tracked = {os.path.basename(c.path) + "/" for c, _ in result.best_checkpoints}
    copy = _run_copy(f"runs/{run.name}")
    assert {name for name in copy if name.startswith("checkpoint_epoch")} == tracked
    assert {"config.yaml", "version.json", "storage.json", "metrics.jsonl", "final.json"} <= copy
    fs, path = storage.resolve(uri)
    for name in ("metrics.jsonl", "final.json"):  # the bucket's copy is the run directory's
        assert storage.read_text(fs, f"{path}/{name}") == (run / name).read_text()
    assert len(json.loads((run / "final.json").read_text())["last"]["test"]["per_class"]) == 10

    # a next run starts from the bucket's copy alone (train.init_from: a second stage, or a fine-tuning)
    shutil.rmtree(output)
    assert train_main(["--config", SMOKE, "--output", str(tmp_path / "next"), "--set", f"train.init_from={uri}",
                       "--set", "train.epochs=1"]) == 0
    (child,) = (tmp_path / "next").iterdir()
    assert json.loads((child / "parent.json").read_text())["checkpoint"] == f"{uri}/checkpoint_epoch0004"


# ------------------------------------------------------------------------------------------- search

def _trial_files(experiment_prefix: str) -> dict[str, set[str]]:
    """run name -> its file names in the bucket, for the trials of the experiment at s3://glmc/<prefix>."""
    runs: dict[str, set[str]] = {}
    for key in s3_keys(os.environ, BUCKET, f"{experiment_prefix}/{TRIALS_DIR}/"):
        run, _, file = key[len(experiment_prefix) + len(TRIALS_DIR) + 2:].partition("/")
        if file:
            runs.setdefault(run, set()).add(file)
    return runs


def _experiments() -> set[str]:
    return {key.split("/")[1] for key in s3_keys(os.environ, BUCKET, "searches/")}


def _mid_search() -> str | None:
    """The experiment prefix once a trial has finished and another has copied some epochs but not all."""
    for name in _experiments():
        runs = _trial_files(f"searches/{name}").values()
        if any("final.json" in files for files in runs) and \
                any("metrics.jsonl" in files and "final.json" not in files for files in runs):
            return f"searches/{name}"
    return None


def test_a_search_on_s3_killed_with_its_head_node_resumes_with_every_trial_once(tmp_path, ray_address, monkeypatch):
    """The experiment on S3, no shared folder: trials train in scratch folders and copy their run directories to
    the bucket; the driver is killed mid-trial and its working copy lost; `--resume s3://...` restores it from
    the bucket and finishes the search: finished trials are not trained again, the interrupted one continues
    from its checkpoint, each trial once."""
    monkeypatch.setenv("GLMC_STAGING", str(tmp_path / "staging"))
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {float: [0.003, 0.1], log: true}\n"
                     "method.glmc.consistency_weight: {float: [0.1, 20], log: true}\n")
    argv = ["--config", SMOKE, *FAST, "--space", str(space), "--trials", "4", "--concurrent", "1",
            "--trial-epochs", "3", "--output", f"s3://{BUCKET}/searches", "--address", ray_address]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen([sys.executable, "tuning/search.py", *argv], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _mid_search() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        _, err = driver.communicate()
    prefix = _mid_search()
    assert prefix is not None, err.decode()[-3000:]
    before = _trial_files(prefix)
    finished = {run for run, files in before.items() if "final.json" in files}
    interrupted = {run for run, files in before.items() if "final.json" not in files}
    fs, _ = storage.resolve(f"s3://{BUCKET}")
    finals = {run: storage.read_text(fs, f"{BUCKET}/{prefix}/{TRIALS_DIR}/{run}/final.json") for run in finished}
    shutil.rmtree(tmp_path / "staging")  # the head node is gone

    assert search_main(["--resume", f"s3://{BUCKET}/{prefix}"]) == 0
    after = _trial_files(prefix)
    assert len(after) == 4 and all("final.json" in files for files in after.values())  # one run per trial
    for run, text in finals.items():  # finished trials were not trained again
        assert storage.read_text(fs, f"{BUCKET}/{prefix}/{TRIALS_DIR}/{run}/final.json") == text
    for run in interrupted:  # continued from its checkpoint: each epoch once
        metrics = storage.read_text(fs, f"{BUCKET}/{prefix}/{TRIALS_DIR}/{run}/metrics.jsonl")
        assert [json.loads(line)["epoch"] for line in metrics.splitlines()] == [0, 1, 2]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(fs, f"{BUCKET}/{prefix}/trials.csv"))))
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4 and {r["status"] for r in rows} == {"complete"}
    assert {"best_config.yaml", "search.json", "base_config.yaml", "study.db"} <= {
        key.rsplit("/", 1)[-1] for key in s3_keys(os.environ, BUCKET, f"{prefix}/")}
    study = optuna.load_study(study_name=prefix.split("/")[1],
                              storage=f"sqlite:///{tmp_path / 'staging' / 'searches' / prefix.split('/')[1]}/study.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4


# ------------------------------------------------------------------------------------------- bad input

def _unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@pytest.mark.parametrize("uri,env,words", [
    ("s3://no-such-bucket/runs", {}, "the bucket 'no-such-bucket' does not exist at http://127.0.0.1:"),
    (f"s3://{BUCKET}/runs", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied at http://127.0.0.1:"),
    (f"s3://{BUCKET}/runs", {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"}, "access denied at http://127.0.0.1:"),
    (f"s3://{BUCKET}/runs", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                             "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     ": no credentials found ("),  # the useful part first, the SDK's words after it
    (f"s3://{BUCKET}/runs", {"AWS_ENDPOINT_URL": _unreachable}, "cannot reach the storage endpoint"),
], ids=["no bucket", "wrong secret", "unknown key", "no credentials", "unreachable"])
@pytest.mark.parametrize("command", ["train", "search", "shards"])
def test_bad_storage_is_one_error_line_naming_the_uri_and_nothing_is_made(
        tmp_path, s3, monkeypatch, capsys, uri, env, words, command):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value() if callable(value) else value)
    keys = s3_keys(s3, BUCKET)
    output = tmp_path / "out"
    if command == "train":
        code = train_main(["--config", SMOKE, "--workers", "2", "--output", str(output), "--storage", uri])
    elif command == "search":
        space = tmp_path / "space.yaml"
        space.write_text("optim.lr: {float: [0.003, 0.1], log: true}\n")
        code = search_main(["--config", SMOKE, "--space", str(space), "--trials", "1", "--output", uri])
    else:
        split = write_image_tree(tmp_path / "images", [3, 2], seed=0)
        code = shards.main(["build", "--split", str(split), "--image-root", str(tmp_path / "images"), "--out", uri])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and uri in lines[0] and words in lines[0], err
    assert not output.exists() and s3_keys(s3, BUCKET) == keys


def test_a_run_on_s3_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, ray_address, capsys):
    output = tmp_path / "out"
    assert train_main(["--config", SMOKE, "--workers", "2", "--address", ray_address, "--output", str(output),
                       "--storage", f"s3://{BUCKET}/failed", "--set", "optim.lr=1e30"]) == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert not output.exists()
    assert s3_keys(os.environ, BUCKET, "failed/") in ([], ["failed/"])  # at most the empty folder marker


def test_a_prefix_holding_something_else_is_refused(s3):
    taken = f"s3://{BUCKET}/taken"
    fs, path = storage.resolve(taken)
    storage.write_bytes(fs, f"{path}/config.yaml", b"name: another run\n")
    with pytest.raises(storage.StorageError, match=f"--storage: {taken} already exists; it holds another run"):
        storage.check_free(taken, "--storage", "run")
    storage.check_free(f"s3://{BUCKET}/free", "--storage", "run")  # nothing there: fine


def test_resuming_a_uri_that_holds_no_run_or_another_storage_is_refused(tmp_path, s3, capsys):
    assert train_main(["--resume", f"s3://{BUCKET}/runs/never-ran", "--workers", "2", "--output", str(tmp_path)]) == 2
    assert "no config.yaml there; not the storage copy of a run" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((REPO / "configs/smoke.yaml").read_text())
    (run / ray_train.STORAGE_FILE).write_text(json.dumps({"storage": f"s3://{BUCKET}/runs"}))
    assert train_main(["--resume", str(run), "--workers", "2", "--storage", f"s3://{BUCKET}/elsewhere"]) == 2
    assert f"keeps its checkpoints in s3://{BUCKET}/runs" in capsys.readouterr().err
