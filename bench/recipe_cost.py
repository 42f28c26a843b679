"""What each recipe (configs/recipes/<dataset>/<method>.yaml) costs in full: the FLOPs of one training step of its
model and method, counted on its own batch shapes, times the images of its epochs; the GPU-hours that makes at a
sustained rate; and, with --time, the step measured on this device and the wall time it projects.

The count runs the method's whole step (GLMC's two passes, MDCS's two views, the experts, a second stage's frozen
trunk, DeiT-LT's teacher) forward and backward under torch's FlopCounterMode on random images of the recipe's size,
2 a step (the count is per image: linear in the batch). Training images per epoch: the CIFAR-LT subset's own count,
115,846 for ImageNet-LT, 437,513 for iNaturalist 2018. The projection divides by --tflops, an assumed sustained rate
(default 73 TFLOP/s: 3,000 ResNet-50 training images/s at the 24.3 GFLOP of one forward and backward pass, a rate
assumed for an H100 in PyTorch with bf16 and channels_last, not measured here): a projection, not a measurement,
that scales with the rate a user's GPU reaches. Small CIFAR models run below such a rate (their steps are bound by
kernel launches), so their projected hours are lower bounds; --time measures instead (bench/gpu_check.py part 7).

    python bench/recipe_cost.py                                  # every recipe, the count (CPU, ~2 minutes)
    python bench/recipe_cost.py --time 20 --device cuda --amp bf16 --recipes cifar10_lt_if100/ldam_drw.yaml
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from glmc_ray.core import config as config_lib  # noqa: E402
from glmc_ray.core.command_line import TEACHER_RECIPES  # noqa: E402
from glmc_ray.core.method_config import rebalanced_stream  # noqa: E402
from glmc_ray.data import cifar  # noqa: E402
from glmc_ray.methods.base import Batch  # noqa: E402
from glmc_ray.runs import rundir  # noqa: E402
from glmc_ray.training.worker import build_network, build_trainee  # noqa: E402

RECIPES = REPO / "configs" / "recipes"
TRAIN_IMAGES = {"imagenet_lt": 115_846, "inat2018": 437_513}  # the OLTR / iNat-2018 training splits
CIFAR_MAX = {"cifar10": 5000, "cifar100": 500}
H100_TFLOPS = 73.0


def recipe_config(recipe: str, overrides=()) -> config_lib.Config:
    second_stage = ["train.init_from=parent"] if recipe.endswith(("_retrain.yaml", "_router.yaml")) else []
    # the published protocol's whole subset, as the figures the projections sit beside
    return config_lib.load(RECIPES / recipe, [*second_stage, "data.protocol=paper", *overrides])


def class_counts(recipe: str, cfg) -> list[int]:
    """The training subset's counts (CIFAR-LT), or a long tail of the dataset's classes summing near its size."""
    if cfg.data.source in CIFAR_MAX:
        return cifar.long_tailed_counts(CIFAR_MAX[cfg.data.source], cfg.data.classes, cfg.data.imbalance_factor)
    images = TRAIN_IMAGES[recipe.split("/")[0]]
    counts = cifar.long_tailed_counts(1280, cfg.data.classes, 256.0)
    counts = [max(1, round(n * images / sum(counts))) for n in counts]
    counts[0] += images - sum(counts)  # the split's exact size
    return counts


def random_batch(cfg, size: int, classes: int, device) -> Batch:
    def images():
        return torch.randn(size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device)

    labels = torch.arange(size, device=device) % classes
    batch = Batch(images(), images(), labels)
    if rebalanced_stream(cfg) is not None:
        batch.rx1, batch.rx2, batch.ry = images(), images(), labels.flip(0)
    return batch


def step(trainee, batch: Batch, generator) -> None:
    with trainee.autocast():
        out = trainee.method.step(trainee.model, batch, 0.5, generator)
    trainee.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    trainee.optimizer.step()


def gflop_per_image(trainee, cfg, classes: int) -> float:
    batch = random_batch(cfg, 2, classes, trainee.device)
    with FlopCounterMode(display=False) as counter:
        step(trainee, batch, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / 1e9 / 2


def seconds_per_step(trainee, cfg, classes: int, steps: int) -> float:
    batch = random_batch(cfg, cfg.train.batch_size, classes, trainee.device)
    generator, times = torch.Generator().manual_seed(0), []
    for i in range(steps + 3):
        start = time.perf_counter()
        step(trainee, batch, generator)
        if trainee.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def teacher_run(recipe: str, folder: Path) -> list[str]:
    """A distillation recipe's --set naming a run of its teacher recipe (untrained: the count includes the
    teacher's forward pass, not its accuracy); [] for the others."""
    if recipe not in TEACHER_RECIPES:
        return []
    cfg = recipe_config(TEACHER_RECIPES[recipe])
    return [f"method.deit_lt.teacher={untrained_run(cfg, folder / 'teacher', cfg.data.classes)}"]


def untrained_run(cfg, run: Path, classes: int) -> Path:
    """A run directory of `cfg` with its untrained model of `classes` classes as the checkpoint: a teacher whose
    cost, not accuracy, counts."""
    run.mkdir()
    config_lib.save(cfg, run / "config.yaml")
    rundir.save_checkpoint({"model": build_network(cfg, classes).state_dict()}, run / rundir.CHECKPOINT)
    return run


def cost(recipe: str, device, amp: str, time_steps: int, tflops: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        return recipe_cost(recipe, device, amp, time_steps, tflops, teacher_run(recipe, Path(folder)))


def recipe_cost(recipe: str, device, amp: str, time_steps: int, tflops: float, teacher: list[str]) -> dict:
    cfg = recipe_config(recipe, [f"train.device={device.type}", f"train.amp='{amp}'", *teacher])
    counts = class_counts(recipe, cfg)
    trainee = build_trainee(cfg, counts, device, torch.contiguous_format, from_parent=False)
    images = sum(counts) * cfg.train.epochs
    row = {"recipe": recipe, "epochs": cfg.train.epochs, "train_images": sum(counts),
           "batch_size": cfg.train.batch_size, "params_m": sum(p.numel() for p in trainee.raw_model.parameters()) / 1e6,
           "gflop_per_image": gflop_per_image(trainee, cfg, len(counts))}
    row["pflop"] = row["gflop_per_image"] * images / 1e6
    row["projected_hours"] = row["pflop"] * 1e3 / tflops / 3600
    if time_steps:
        seconds = seconds_per_step(trainee, cfg, len(counts), time_steps)
        row.update(seconds_per_step=seconds, images_per_s=cfg.train.batch_size / seconds,
                   measured_hours=math.ceil(sum(counts) / cfg.train.batch_size) * cfg.train.epochs * seconds / 3600,
                   achieved_tflops=row["gflop_per_image"] * cfg.train.batch_size / seconds / 1e3)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipes", nargs="*", help="paths under configs/recipes (default: every recipe)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the device timed")
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="bf16 autocast, or off")
    p.add_argument("--time", type=int, default=0, metavar="STEPS", help="also time STEPS steps at the recipe's batch")
    p.add_argument("--tflops", type=float, default=H100_TFLOPS, help="sustained TFLOP/s of the projection")
    p.add_argument("--json", default="bench/results/recipe_cost.json", help="the results (JSON)")
    args = p.parse_args()
    recipes = args.recipes or sorted(str(f.relative_to(RECIPES)) for f in RECIPES.rglob("*.yaml"))
    device = torch.device(args.device)
    rows = []
    for recipe in recipes:
        rows.append(cost(recipe, device, args.amp, args.time, args.tflops))
        row = rows[-1]
        timed = (f"  {row['images_per_s']:8.0f} img/s measured, {row['measured_hours']:7.2f} h"
                 if args.time else "")
        print(f"{recipe:42s} {row['epochs']:5d} ep x {row['train_images']:7d} img  {row['gflop_per_image']:7.2f} "
              f"GFLOP/img  {row['pflop']:9.1f} PFLOP  {row['projected_hours']:7.2f} h at {args.tflops:g} TFLOP/s"
              f"{timed}", flush=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "amp": args.amp,
              "tflops_assumed": args.tflops, "recipes": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
