"""The GPU check: what only a CUDA machine can show, in one script that needs no network, no Ray and no test
runner (torch, torchvision, numpy, pyyaml, pillow and this checkout), in well under 8 minutes on an H100/H200.

  1. tail parity      the augmentation tail on CPU and on CUDA from the same crops and parameters: at most one
                      level apart (design note T6)
  2. nvjpeg           torchvision.io.decode_jpeg(device="cuda") against the CPU decoder on generated ImageNet-like
                      JPEGs (RGB, grayscale, CMYK, a PNG named .JPEG): mean and max level difference, and the
                      images the GPU decoder refused (they fall back to the CPU decoder)
  3. feed             two-view rows/s with the JPEG decoded, cropped and augmented on the GPU (batches of 256,
                      the tail eager and under torch.compile), and the CPU seconds per row that costs
  4. training         `python -m glmc_ray.train` in-process on a generated split (files source, the simclr list
                      with its tail on the device, bf16, channels_last) for one short epoch: the CUDA path end to end
  5. step             bench/step_throughput.py --synthetic --device cuda --amp bf16: our step vs the official-style
                      one
  6. experts          bench/expert_cost.py --synthetic --device cuda --amp bf16: RIDE, MDCS, SHIKE's steps (their
                      expert models and losses under bf16) against CE's
  7. recipe           a real run of configs/recipes/cifar10_lt_if100/ldam_drw.yaml (ResNet-32, batch 128) for 4
                      epochs on generated images with CIFAR-10-LT's class counts (../shared does not travel): its
                      images/s and the projected wall time of the recipe's 200 epochs
  8. deit             DeiT-LT's student as configs/recipes/cifar10_lt_if100/deit_lt.yaml trains it, with DeiT-S
                      (32 px images upsampled to 224 on the device, Mixup/CutMix, the distillation token) and its
                      ResNet-32 teacher's forward pass, under bf16: seconds per step, images/s, peak memory

Each part prints PASS, FAIL or its figures and goes on; the JSON (bench/results/gpu_check.json) holds them all,
and the exit code is 1 if a check failed. `--device cpu` runs the same code on the CPU (a dry run of the script,
as CI does, without the CUDA-only comparisons).

    python bench/gpu_check.py [--device cuda] [--images 256] [--json bench/results/gpu_check.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from glmc_ray.core import config as config_lib  # noqa: E402
from glmc_ray.data import cifar  # noqa: E402
from glmc_ray.data.device_augment import JpegDecoder, KeyedViews, augment_tail, view_key  # noqa: E402
from glmc_ray.data.images import BadImageLog, decode_tensor  # noqa: E402
from glmc_ray.training.worker import build_trainee  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import recipe_cost  # noqa: E402  (bench/recipe_cost.py: a recipe's config, its teacher, a timed step)

SIZE = 224
ROWS_PER_GPU = 5000  # two-view rows/s that one H100 needs on GLMC's two ResNet-50 passes


def image_tree(root: Path, images: int) -> Path:
    """A mini ImageNet-LT of about `images` ImageNet-like JPEGs (300-500 px, ~110 KB; one grayscale, one CMYK
    JPEG and one PNG named .JPEG among them) with a test split; returns the train split file."""
    from glmc_ray.data.synthetic import write_image_tree

    counts = [max(2, round(images * share)) for share in (0.5, 0.25, 0.15, 0.1)]
    return write_image_tree(root, counts, seed=0, corrupt=0, test_per_class=4, sides=(300, 500), mixed=False)


def encoded_images(split: Path) -> list[bytes]:
    return [(split.parent / line.split()[0]).read_bytes() for line in split.read_text().splitlines() if line]


def tail_parity(encoded: list[bytes], device: torch.device) -> dict:
    views = KeyedViews("simclr", 96)
    image = decode_tensor(encoded[0], 3)
    crops, params = zip(*(views(image, view_key(1, 0, 0, i, 0)) for i in range(256)), strict=True)
    crops, params = torch.stack(crops), torch.stack(params)
    cpu = augment_tail(crops, params)
    other = augment_tail(crops.to(device), params.to(device)).cpu()
    diff = (cpu - other).abs()
    return {"views": len(crops), "max_level_difference": float(diff.max()), "mean_level_difference":
            float(diff.mean()), "pass": bool(diff.max() <= 1)}


def gpu_decode(encoded: list[bytes], device: torch.device) -> tuple[list[torch.Tensor], int]:
    """The training path's decoder (data.decode_on: device): one batched call on `device`, what it refuses
    decoded on the CPU and counted."""
    decoder = JpegDecoder(device, 3, SIZE, BadImageLog(len(encoded)))
    images, kept = decoder.decode(encoded, [f"image {i}" for i in range(len(encoded))])
    assert bool(kept.all()), "an image no decoder reads"
    return images, decoder.cpu_decoded


def nvjpeg_against_cpu(encoded: list[bytes], device: torch.device) -> dict:
    decoded, fallbacks = gpu_decode(encoded, device)
    diffs = [(d.cpu().float() - decode_tensor(e, 3).float()).abs() for d, e in zip(decoded, encoded, strict=True)]
    mean = float(np.mean([d.mean() for d in diffs]))
    return {"images": len(encoded), "fallbacks_to_cpu": fallbacks, "mean_level_difference": mean,
            "max_level_difference": float(max(d.max() for d in diffs)), "pass": mean <= 1.5}


def feed(encoded: list[bytes], device: torch.device, batch: int, rounds: int = 3) -> dict:
    """Rows/s with everything on `device`: decode, two crops per image (boxes drawn on the CPU from the decoded
    sizes, as from JPEG headers), the tail; and the process's CPU seconds per row."""
    views = KeyedViews("simclr", SIZE)
    results = {}
    tails = {"eager": augment_tail}
    if device.type == "cuda":
        tails["compiled"] = torch.compile(augment_tail, dynamic=False)
    for name, tail in tails.items():
        times, cpu_times, rows = [], [], 0
        for round_index in range(rounds + 1):  # the first round warms up (and compiles)
            chunk = encoded[:batch]
            wall, cpu = time.perf_counter(), time.process_time()
            images, _ = gpu_decode(chunk, device)
            crops, params = [], []
            for position, image in enumerate(images):  # the boxes: drawn on the CPU from the sizes
                for view in (0, 1):
                    box, drawn = views.draw_for_size(*image.shape[-2:], view_key(0, round_index, 0, position, view))
                    crops.append(TF2.resized_crop(image, *box, [SIZE, SIZE], antialias=True))
                    params.append(drawn)
            out = tail(torch.stack(crops), torch.stack(params).to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:
                times.append(time.perf_counter() - wall)
                cpu_times.append(time.process_time() - cpu)
                rows += len(chunk)
            assert out.shape == (2 * len(chunk), 3, SIZE, SIZE)
        rate = rows / sum(times)
        cpu_ms = sum(cpu_times) * 1e3 / rows
        results[name] = {"rows_per_s": rate, "cpu_ms_per_row": cpu_ms,
                         "cpu_cores_for_5000_rows_per_s": ROWS_PER_GPU * cpu_ms / 1e3}
    return results


def training(split: Path, device: torch.device, workdir: Path) -> dict:
    """One epoch of the ImageNet-LT config on the tree: ResNet-50 at 224 px on CUDA, a small one on the CPU."""
    model = ["model.arch=resnet50"] if device.type == "cuda" else ["model.arch=resnet32", "model.width=4",
                                                                   "data.image_size=32"]
    sets = [f"data.train_split={split.name}", "data.test_split=ImageNet_LT_test.txt", "data.augment_on=device",
            "data.num_workers=4", "train.epochs=1", "train.batch_size=32", f"train.device={device.type}",
            "train.progress_every=1", "optim.warmup_epochs=0", "data.classes=0", *model]  # a 4-class tree
    recipe = REPO / "configs/recipes/imagenet_lt/glmc.yaml"
    command = [sys.executable, "-m", "glmc_ray.train", "--config", str(recipe),
               "--data-root", str(split.parent), "--output", str(workdir / "runs"),
               *[arg for s in sets for arg in ("--set", s)]]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    final = next((workdir / "runs").glob("*/final.json"), None)
    return {"exit_code": done.returncode, "seconds": time.perf_counter() - start,
            "test_top1": json.loads(final.read_text())["last"]["test"]["top1"] if final else None,
            "output_tail": (done.stdout + done.stderr)[-1500:], "pass": done.returncode == 0 and final is not None}


def step_throughput(device: torch.device, workdir: Path) -> dict:
    out = workdir / "step_throughput.json"
    command = [sys.executable, str(REPO / "bench/step_throughput.py"), "--synthetic", "--device", device.type,
               "--amp", "bf16", "--json", str(out), "--steps", "10" if device.type == "cuda" else "2",
               "--rounds", "3" if device.type == "cuda" else "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=360)
    report = json.loads(out.read_text()) if out.is_file() else {}
    return {"exit_code": done.returncode, "output_tail": (done.stdout + done.stderr)[-1500:],
            "speedup_vs_official_style": report.get("speedup_vs_official_style"),
            "images_per_s": report.get("images_per_s"), "pass": done.returncode == 0}


def expert_cost(device: torch.device, workdir: Path) -> dict:
    out = workdir / "expert_cost.json"
    small = [] if device.type == "cuda" else ["--width", "4", "--batch-size", "16", "--synthetic-max-count", "100"]
    command = [sys.executable, str(REPO / "bench/expert_cost.py"), "--synthetic", "--device", device.type,
               "--amp", "bf16", "--json", str(out), "--steps", "10" if device.type == "cuda" else "1",
               "--rounds", "3" if device.type == "cuda" else "1", *small]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=360)
    report = json.loads(out.read_text()) if out.is_file() else {}
    return {"exit_code": done.returncode, "output_tail": (done.stdout + done.stderr)[-1500:],
            "step_vs_ce": report.get("step_vs_ce"), "images_per_s": report.get("images_per_s"),
            "pass": done.returncode == 0}


RECIPE = "configs/recipes/cifar10_lt_if100/ldam_drw.yaml"


def recipe_run(device: torch.device, workdir: Path) -> dict:
    """The recipe's model, method, batch and optimiser on generated CIFAR-10-LT-sized data (the same class counts)
    for a few epochs on a constant lr; the steady epochs' images/s projects the recipe's training time."""
    cfg = config_lib.load(REPO / RECIPE)
    size = [] if device.type == "cuda" else ["data.synthetic_max_count=200", "model.width=4"]
    epochs = 4 if device.type == "cuda" else 2
    sets = ["data.source=synthetic", "data.synthetic_classes=10", "data.synthetic_max_count=5000",
            "data.synthetic_test_per_class=100", f"train.epochs={epochs}", "optim.schedule=cosine",
            "optim.warmup_epochs=0", "optim.milestones=[]", f"train.device={device.type}", "train.progress_every=0",
            "data.protocol=paper", *size]
    command = [sys.executable, "-m", "glmc_ray.train", "--config", str(REPO / RECIPE),
               "--output", str(workdir / "recipe-runs"), *[arg for s in sets for arg in ("--set", s)]]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    metrics = next((workdir / "recipe-runs").glob("*/metrics.jsonl"), None)
    epochs_done = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics else []
    steady = [e["images_per_s"] for e in epochs_done[1:] if "images_per_s" in e]  # the first epoch warms up
    report = {"recipe": RECIPE, "exit_code": done.returncode, "epochs": len(epochs_done),
              "images_per_s": statistics.median(steady) if steady else None,
              "output_tail": (done.stdout + done.stderr)[-1500:], "pass": done.returncode == 0 and bool(steady)}
    if steady:
        images = sum(cifar.long_tailed_counts(5000, 10, cfg.data.imbalance_factor)) * cfg.train.epochs
        report["projected_recipe_hours"] = images / report["images_per_s"] / 3600  # training only, no evaluation
    return report


DEIT = "cifar10_lt_if100/deit_lt.yaml"


def deit_step(device: torch.device, workdir: Path) -> dict:
    """A few timed training steps of DeiT-LT's student (DeiT-S on CUDA; the CPU-size DeiT on the CPU) with its
    teacher (an untrained run of the teacher recipe: its cost counts, not its accuracy)."""
    cuda = device.type == "cuda"
    arch = "deit_small_distilled_patch16_224" if cuda else "deit_micro_distilled_patch4_32"
    sets = [f"model.arch={arch}", f"train.batch_size={64 if cuda else 4}", f"train.device={device.type}",
            "train.amp=bf16", *recipe_cost.teacher_run(DEIT, workdir)]
    cfg = recipe_cost.recipe_config(DEIT, sets)
    counts = cifar.long_tailed_counts(5000, 10, cfg.data.imbalance_factor)
    trainee = build_trainee(cfg, counts, device, torch.contiguous_format)
    seconds = recipe_cost.seconds_per_step(trainee, cfg, len(counts), steps=10 if cuda else 1)
    return {"recipe": DEIT, "arch": arch, "batch_size": cfg.train.batch_size, "seconds_per_step": seconds,
            "images_per_s": cfg.train.batch_size / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "pass": seconds > 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the device timed")
    p.add_argument("--images", type=int, default=256, help="generated JPEGs for the decode and feed parts")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=("tail", "nvjpeg", "feed", "training", "step", "experts", "recipe", "deit"),
                   help="parts not to run")
    p.add_argument("--json", default="bench/results/gpu_check.json", help="the results (JSON)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; `--device cpu` runs the script's code on the CPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    started = time.perf_counter()
    report = {"machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                          "cpu_cores": os.cpu_count(), "torch": torch.__version__,
                          "torchvision": torchvision.__version__, "cuda": torch.version.cuda}}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        split = image_tree(Path(scratch) / "images", args.images)
        encoded = encoded_images(split)
        parts = {"tail": lambda: tail_parity(encoded, device), "nvjpeg": lambda: nvjpeg_against_cpu(encoded, device),
                 "feed": lambda: feed(encoded, device, batch=min(256, len(encoded))),
                 "training": lambda: training(split, device, Path(scratch)),
                 "step": lambda: step_throughput(device, Path(scratch)),
                 "experts": lambda: expert_cost(device, Path(scratch)),
                 "recipe": lambda: recipe_run(device, Path(scratch)),
                 "deit": lambda: deit_step(device, Path(scratch))}
        for name, run in parts.items():
            if name in args.skip:
                continue
            start = time.perf_counter()
            try:
                report[name] = run()
            except Exception:  # a part that breaks is reported and the others still run
                report[name] = {"pass": False, "error": traceback.format_exc()[-2000:]}
            report[name]["seconds"] = time.perf_counter() - start
            status = {True: "PASS", False: "FAIL", None: "done"}[report[name].get("pass")]
            figures = {k: v for k, v in report[name].items() if k not in ("output_tail", "seconds")}
            print(f"{name}: {status} ({report[name]['seconds']:.0f} s) {json.dumps(figures)[:600]}", flush=True)
    report["seconds"] = time.perf_counter() - started
    report["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    failed = [name for name, part in report.items() if isinstance(part, dict) and part.get("pass") is False]
    print(f"gpu check done in {report['seconds']:.0f} s; failed: {', '.join(failed) or 'none'}; JSON in {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
