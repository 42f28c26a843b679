"""Split-file datasets (the ImageNet-LT / iNat path) end to end: JPEGs on disk, PIL decode, DataLoader workers."""
import json

import numpy as np

from glmc_ray.train import main
from tests.conftest import REPO, write_image_split


def test_imagenet_lt_style_split_files_train_and_evaluate(tmp_path):
    # the simclr list with its tail on the training device (DataLoader workers crop and draw the parameters)
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    write_image_split(root, "train", [24, 8, 3], rng)
    write_image_split(root, "test", [4, 4, 4], rng)
    assert main(["--config", str(REPO / "configs/recipes/imagenet_lt/glmc.yaml"), "--data-root", str(root),
                 "--output", str(tmp_path / "runs"), "--set", "model.arch=resnet32", "--set", "model.width=4",
                 "--set", "data.image_size=32", "--set", "data.num_workers=1", "--set", "train.batch_size=8",
                 "--set", "train.epochs=2", "--set", "optim.warmup_epochs=1", "--set", "optim.lr=0.01",
                 "--set", "data.train_split=splits/train.txt", "--set", "data.test_split=splits/test.txt",
                 "--set", "train.progress_every=0", "--set", "data.augment_on=device", "--set", "data.classes=0"]) == 0
    run = next((tmp_path / "runs").iterdir())
    final = json.loads((run / "final.json").read_text())
    assert final["class_counts"] == [24, 8, 3]
    test = final["last"]["test"]
    assert len(test["per_class"]) == 3 and test["few"] is not None and 0 <= test["top1"] <= 100
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == 0.01 and records[1]["lr"] == 0.01  # warmup 1/1, then cosine from the top


GRAYSCALE_RECIPE = """
name: gray28_lt
data:
  source: files
  root: {root}
  train_split: splits/train.txt
  test_split: splits/test.txt
  mean: [0.5]          # one value: one channel
  std: [0.25]
  image_size: 28
  augmentation: crop_flip
  num_workers: 1
model: {{arch: resnet32, width: 4, projection_dim: 16}}
train: {{epochs: 2, batch_size: 8, progress_every: 0}}
"""


def test_a_grayscale_28px_long_tailed_split_trains_by_config_alone(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "gray"
    write_image_split(root, "train", [30, 10, 3], rng, shape=(28, 28))
    write_image_split(root, "test", [4, 4, 4], rng, shape=(28, 28))
    recipe = tmp_path / "gray28_lt.yaml"
    recipe.write_text(GRAYSCALE_RECIPE.format(root=root))
    assert main(["--config", str(recipe), "--output", str(tmp_path / "runs")]) == 0
    run = next((tmp_path / "runs").iterdir())
    final = json.loads((run / "final.json").read_text())
    assert final["class_counts"] == [30, 10, 3] and len(final["last"]["test"]["per_class"]) == 3
