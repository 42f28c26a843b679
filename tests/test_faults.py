"""Faults and bad input in-process: divergence, unreadable files, failed starts (docs/faults.md lists them)."""
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from glmc_ray.data.images import decode
from glmc_ray.runs import rundir
from glmc_ray.train import main
from glmc_ray.training import loop
from tests.conftest import REPO, write_image_split

SMOKE = str(REPO / "configs/smoke.yaml")
CIFAR10_GLMC = str(REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml")


def _epochs(run):
    return [r["epoch"] for r in rundir.read_metrics(run)]


def test_nan_at_the_first_epoch_says_nothing_was_kept_and_leaves_no_run_directory(tmp_path, capsys):
    assert main(["--config", SMOKE, "--output", str(tmp_path), "--set", "optim.lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "epoch 0 step" in err and "no checkpoint was written" in err
    assert "intact" not in err and not list(tmp_path.iterdir())


def test_a_nan_between_checks_names_its_own_step_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The loss is looked at every train.finite_check_every steps, yet the error names the first bad step."""
    from glmc_ray.data.arrays import InMemoryBatches

    epoch_batches = InMemoryBatches.epoch

    def poisoned(self, epoch):
        for step, batch in enumerate(epoch_batches(self, epoch)):
            if (epoch, step) == (1, 3):
                batch.x1 = batch.x1 * float("nan")
            yield batch

    monkeypatch.setattr(InMemoryBatches, "epoch", poisoned)
    assert main(["--config", SMOKE, "--output", str(tmp_path), "--set", "train.finite_check_every=1000"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss nan at epoch 1 step 3 " in err and "the checkpoint after epoch 0 is kept" in err
    assert _epochs(next(tmp_path.iterdir())) == [0]


def _host_reads_per_epoch(tmp_path, monkeypatch, batch_size: int) -> int:
    """Reads of a 0-dim tensor's value (bool, float, int, item) made inside one training epoch."""
    reads = {"on": False, "count": 0}
    for name in ("__bool__", "__float__", "__int__", "__index__", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original):
            if reads["on"] and self.dim() == 0:
                reads["count"] += 1
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    train_epoch = loop.train_epoch

    def watched(*args):
        reads["on"] = True
        try:
            return train_epoch(*args)
        finally:
            reads["on"] = False
    monkeypatch.setattr(loop, "train_epoch", watched)
    assert main(["--config", SMOKE, "--output", str(tmp_path), "--set", "train.epochs=1",
                 "--set", f"train.batch_size={batch_size}", "--set", "train.finite_check_every=1000"]) == 0
    return reads["count"]


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """On a GPU each read of a device value waits for the queue: the count per epoch must not grow with the
    steps (10 steps at batch 64, 40 at batch 16)."""
    few = _host_reads_per_epoch(tmp_path / "few", monkeypatch, 64)
    many = _host_reads_per_epoch(tmp_path / "many", monkeypatch, 16)
    assert many == few, (few, many)


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    """An exploding but finite loss can leave inf BatchNorm variances: the epoch is refused, its predecessor kept."""
    train_epoch = loop.train_epoch

    def exploding(t, data, epoch, cfg, dist, stop):
        record = train_epoch(t, data, epoch, cfg, dist, stop)
        if epoch == 1:
            batchnorm = next(m for m in t.raw_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            batchnorm.running_var.fill_(math.inf)
        return record

    monkeypatch.setattr(loop, "train_epoch", exploding)
    assert main(["--config", SMOKE, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "non-finite weights after epoch 1" in err and "running_var" in err
    assert "the checkpoint after epoch 0 is kept" in err
    run = next(tmp_path.iterdir())
    state = rundir.load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 1 and _epochs(run) == [0]
    assert all(torch.isfinite(v).all() for k, v in state["model"].items() if k != "maxnorm_radii")


def test_a_truncated_cifar_pickle_is_named_and_leaves_no_run_directory(tmp_path, capsys, cifar_root):
    root = tmp_path / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    (root / "data_batch_1").write_bytes((cifar_root / "cifar-10-batches-py/data_batch_1").read_bytes()[:5000])
    output = tmp_path / "runs"
    assert main(["--config", CIFAR10_GLMC, "--data-root", str(tmp_path / "data"),
                 "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'data_batch_1'} is not a readable CIFAR pickle" in err and "truncated or corrupt" in err
    assert not output.exists()
    (root / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    assert main(["--config", CIFAR10_GLMC, "--data-root", str(tmp_path / "data"),
                 "--output", str(output)]) == 2
    assert "expected a dict with keys 'data' and 'labels'" in capsys.readouterr().err


def test_failed_starts_leave_no_run_directory(tmp_path, capsys):
    output = tmp_path / "runs"
    assert main(["--config", CIFAR10_GLMC, "--data-root", str(tmp_path / "missing"),
                 "--output", str(output)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["--config", CIFAR10_GLMC, "--data-root", str(tmp_path / "empty"),
                 "--output", str(output)]) == 2
    assert main(["--config", CIFAR10_GLMC, "--set", "data.root=",
                 "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "missing does not exist" in err and "cifar-10-batches-py" in err
    assert "error: data.root is empty; expected the folder that holds cifar-10-batches-py/" in err
    assert not output.exists()  # the --output folder these runs made is removed with their run directory
    nested, own = tmp_path / "a" / "b", tmp_path / "own"
    own.mkdir()
    for folder in (nested, own):
        assert main(["--config", CIFAR10_GLMC, "--data-root", str(tmp_path / "missing"),
                     "--output", str(folder)]) == 2
    assert not (tmp_path / "a").exists()  # every folder the run made, when empty
    assert own.is_dir() and not list(own.iterdir())  # a folder the user made stays


STAMPED_FOLDERS = """
import sys, time
from pathlib import Path
from glmc_ray.runs import rundir
parents, out, go = sys.argv[1:]
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.001)
start = float(Path(go).read_text())
made, errors = [], []
for round, parent in enumerate(parents.split(",")):
    while time.time() < start + round:  # both processes start each round within microseconds
        pass
    for _ in range(200):
        try:
            made.append(str(rundir.new_stamped_folder(parent, "run")))
        except OSError as err:
            errors.append(repr(err))
Path(out).write_text("\\n".join(made + errors))
sys.exit(1 if errors else 0)
"""


def test_run_directories_started_at_once_by_two_processes_are_all_made_and_distinct(tmp_path):
    """Two processes x 200 new run directories in the same parent and second: each call gets its own.
    Three rounds (three parents, a second apart): one round alone caught the old check-then-create race
    4 times in 5."""
    parents, go = [tmp_path / f"runs{r}" for r in range(3)], tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [subprocess.Popen([sys.executable, "-c", STAMPED_FOLDERS, ",".join(map(str, parents)),
                                  str(tmp_path / f"made{i}"), str(go)], env=env, stdout=subprocess.PIPE, text=True)
                for i in range(2)]
    assert [child.stdout.readline().strip() for child in children] == ["ready", "ready"]  # imports done
    (tmp_path / "go.tmp").write_text(str(time.time() + 0.5))
    (tmp_path / "go.tmp").rename(go)  # never seen half-written
    codes = [child.wait(timeout=120) for child in children]
    made = [line for i in range(2) for line in (tmp_path / f"made{i}").read_text().splitlines()]
    assert codes == [0, 0], [line for line in made if "Error" in line][:5]
    assert len(made) == 1200 and len(set(made)) == 1200
    for parent in parents:
        assert sorted(p.name for p in parent.iterdir()) == sorted(Path(m).name for m in made
                                                                  if Path(m).parent == parent)


def _break(root, broken):
    """Replace the named JPEGs' bytes by what each function makes of them."""
    for file_name, damage in broken:
        path = next(root.glob(f"images/*/{file_name}"))
        path.write_bytes(damage(path.read_bytes()))


BROKEN = [("train_0.JPEG", lambda b: b[: len(b) // 2]),  # truncated
          ("train_1.JPEG", lambda b: b""),  # zero-length
          ("train_2.JPEG", lambda b: b"not a jpeg at all" * 10)]  # corrupt


def _split_run(root, output, *extra):
    sets = ["model.arch=resnet32", "model.width=4", "data.image_size=32", "data.num_workers=1",
            "train.batch_size=8", "train.epochs=2", "optim.warmup_epochs=1", "train.progress_every=0",
            "data.train_split=splits/train.txt", "data.test_split=splits/test.txt", "data.classes=0", *extra]
    return main(["--config", str(REPO / "configs/recipes/imagenet_lt/glmc.yaml"), "--data-root", str(root),
                 "--output", str(output), *[a for s in sets for a in ("--set", s)]])


def test_unreadable_images_are_skipped_named_and_counted(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    write_image_split(root, "train", [16, 8, 4], rng)
    write_image_split(root, "test", [3, 3, 3], rng)
    _break(root, [*BROKEN, ("test_1.JPEG", lambda b: b[:100])])
    assert _split_run(root, tmp_path / "runs") == 0
    err = capsys.readouterr().err
    for name, _ in BROKEN:  # each named once, with the reason, over two epochs
        assert err.count(f"{name} (") == 1, name
    assert "image file is truncated" in err or "truncated" in err
    records = rundir.read_metrics(next((tmp_path / "runs").iterdir()))
    # 3 broken of 28, each once an epoch however often the re-balanced stream draws it
    assert [r["train_bad_images"] for r in records] == [3, 3]
    assert [r["test_bad_images"] for r in records] == [1, 1]


def test_a_bad_tail_image_redrawn_by_the_class_balanced_stream_counts_once_and_is_not_read_again(
        tmp_path, capsys, monkeypatch):
    """One truncated image in a 2-image tail class, drawn over and over by the class-balanced stream: one bad
    image each epoch (the limit of 1 holds), named once, read once (the sampler skips it once known)."""
    from glmc_ray.data import files

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    write_image_split(root, "train", [16, 8, 2], rng)
    write_image_split(root, "test", [3, 3, 3], rng)
    bad = root / "images" / "n00000002" / "train_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    reads = []
    monkeypatch.setattr(files, "decode", lambda path, *a, **k: (reads.append(path), decode(path, *a, **k))[1])
    assert _split_run(root, tmp_path / "runs", "method.glmc.resample_exponent=1.0", "data.max_bad_images=1",
                      "data.num_workers=0", "data.augment_on=cpu", "train.epochs=3") == 0
    records = rundir.read_metrics(next((tmp_path / "runs").iterdir()))
    assert [r["train_bad_images"] for r in records] == [1, 1, 1]
    assert capsys.readouterr().err.count("train_1.JPEG (") == 1
    assert 1 <= reads.count(bad) <= 2  # its first batch may hold it twice; never read after


def test_more_unreadable_images_than_the_limit_stop_the_run_with_their_names(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    write_image_split(root, "train", [16, 8, 4], rng)
    write_image_split(root, "test", [3, 3, 3], rng)
    _break(root, BROKEN)
    assert _split_run(root, tmp_path / "runs", "data.max_bad_images=1") == 2
    err = capsys.readouterr().err
    assert "unreadable images in the train split this epoch, more than data.max_bad_images=1" in err
    assert "train_" in err.splitlines()[-1]  # the last one is named
    assert not (tmp_path / "runs").exists()


def test_a_partial_metrics_line_in_the_middle_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON epoch record"):
        rundir.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epo')
    assert rundir.read_metrics(tmp_path) == [{"epoch": 0}]  # cut off by a kill: that epoch is not committed
