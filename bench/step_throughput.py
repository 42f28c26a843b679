"""Training-step throughput on real CIFAR-10-LT, variants measured side by side in one process.

  official_style  the official pipeline: per-image PIL RandomCrop/Flip/ToTensor/Normalize in DataLoader
                  workers (4, as the official code), a uniform and a WeightedRandomSampler-style loader
                  zipped, two sequential forward passes, contiguous tensors
  glmc            ours: the uint8 dataset in memory, crop+flip batched as one gather, index sampling,
                  channels_last; the same two forward passes (same BatchNorm statistics, same math)
  glmc_contiguous ours without channels_last (separates the data path from the memory format)
  glmc_fused      one forward of both mixed batches (128): faster, but BatchNorm then normalises the
                  global and local batches together, which changes the method; measured, not adopted
  ce              the CE baseline step on our data path

Rounds alternate the variants; per-step times are medians over rounds. Prints ratios and absolute figures and
writes bench/results/step_throughput.json. Also prints the compute floor: the FLOPs of one forward + backward pass
(torch's FlopCounterMode) over this CPU's best fp32 matrix-multiply rate, i.e. the fastest any implementation of
the two-pass step could be here.

    python bench/step_throughput.py --data-root ../shared/data [--width 16] [--steps 15] [--rounds 3]
    python bench/step_throughput.py --synthetic --device cuda --amp bf16     # on a GPU (bench/gpu_check.py)

--synthetic trains on generated CIFAR-sized long-tailed data (10 classes, 5,000 down to 50 images, 32 px) where
the real CIFAR-10 is not at hand; --device cuda times with CUDA synchronisation, --amp bf16 under autocast.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from glmc_ray.core import config as config_lib
from glmc_ray.data import build_data
from glmc_ray.data.cifar import NORMALIZATION
from glmc_ray.data.files import ImageListDataset, LoaderBatches
from glmc_ray.data.images import TwoViews
from glmc_ray.methods import StepOutput, build_method
from glmc_ray.methods.glmc import (
    GLMC,
    cutmix_box,
    global_mixup,
    local_cutmix,
    mixed_targets,
    sample_mix_lambda,
    soft_cross_entropy,
    symmetric_consistency,
)
from glmc_ray.training.worker import build_trainee


class FusedGLMC(GLMC):
    """GLMC with both mixed batches in one forward pass (BatchNorm over 2B images): for timing only."""

    def step(self, model, batch, progress, generator):
        lam = sample_mix_lambda(self.cfg.mix_beta, generator)
        box = cutmix_box(*batch.x2.shape[-2:], lam, generator)
        both = torch.cat([global_mixup(batch.x1, batch.rx1, lam), local_cutmix(batch.x2, batch.rx2, box)])
        (o_g, o_l), (c_g, c_l), (z_g, z_l), (p_g, p_l) = (t.chunk(2) for t in model(both, all_heads=True))
        t = mixed_targets(batch.y, batch.ry, lam, self.num_classes)
        tw = mixed_targets(batch.y, batch.ry, lam, self.num_classes, self.label_weights)
        alpha = self.alpha(progress)
        loss = (alpha * (soft_cross_entropy(o_g, t) + soft_cross_entropy(o_l, t))
                + (1 - alpha) * (soft_cross_entropy(c_g, tw) + soft_cross_entropy(c_l, tw))
                + self.cfg.consistency_weight * symmetric_consistency(p_g, z_g, p_l, z_l))
        return StepOutput(loss)


def official_batches(cfg, data_bundle):
    """The official data path over the same subset: PIL transforms in 4 workers per loader."""
    mean, std = NORMALIZATION["cifar10"]
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                         T.Normalize(mean, std)])
    source = data_bundle.train
    images = source.padded[:, :, 4:-4, 4:-4].permute(0, 2, 3, 1).numpy()
    labels = source.labels.tolist()
    return LoaderBatches(ImageListDataset(list(images), labels, TwoViews(augment)), source.plan, num_workers=4,
                         finish=lambda x: x, bad_images=data_bundle.bad_images)  # normalised in the workers


def make_variant(name, cfg, data_official, data_fast, device):
    memory_format = torch.channels_last if name in ("glmc", "glmc_fused", "ce") else torch.contiguous_format
    method_cfg = cfg.method
    if name == "ce":
        method_cfg = config_lib.from_dict({**config_lib.to_dict(cfg), "method": {"name": "ce"}}).method
    trainee = build_trainee(cfg, data_fast.class_counts, device, memory_format)
    if name == "glmc_fused":
        trainee.method = FusedGLMC(method_cfg.glmc, torch.as_tensor(data_fast.class_counts))
    else:
        trainee.method = build_method(method_cfg, data_fast.class_counts)
    source = data_official.train if name == "official_style" else data_fast.train
    return trainee, source, memory_format


def time_block(trainee, source, memory_format, epoch, steps, warmup=3):
    generator = torch.Generator().manual_seed(epoch)
    iterator = iter(source.epoch(epoch))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(iterator).to(trainee.device, memory_format)
        with trainee.autocast():
            out = trainee.method.step(trainee.model, batch, 0.5, generator)
        trainee.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        trainee.optimizer.step()
        if trainee.device.type == "cuda":
            torch.cuda.synchronize()  # the step is done when the GPU is, not when its kernels are queued
        if i >= warmup:
            times.append(time.perf_counter() - start)
    del iterator  # stops the DataLoader workers so they do not run during other variants' blocks
    return times


def pass_gflop(trainee, batch) -> float:
    """GFLOP of one forward + backward pass of the model (all heads) on one batch."""
    with FlopCounterMode(display=False) as counter:
        outputs = trainee.model(batch.x1, all_heads=True)
        sum(o.float().sum() for o in outputs).backward()
    trainee.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def sgemm_gflops(device: torch.device, dtype=torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """The device's best matrix-multiply rate in `dtype` (the practical peak; on a CPU with its torch threads)."""
    if device.type == "cuda":
        n *= 4
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="../shared/data", help="the folder holding cifar-10-batches-py/")
    p.add_argument("--width", type=int, default=16, help="ResNet-32 width")
    p.add_argument("--steps", type=int, default=15, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (the median is reported)")
    p.add_argument("--synthetic", action="store_true", help="generated CIFAR-sized data instead of CIFAR-10")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the device timed")
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="autocast of every variant")
    p.add_argument("--json", default="bench/results/step_throughput.json", help="the results (JSON)")
    args = p.parse_args()
    data = ["data.source=synthetic", "data.synthetic_max_count=5000", "data.synthetic_test_per_class=10"] \
        if args.synthetic else [f"data.root={Path(args.data_root).resolve()}"]
    cfg = config_lib.load("configs/recipes/cifar10_lt_if100/glmc.yaml",
                          [*data, f"model.width={args.width}", f"train.amp='{args.amp}'",
                           f"train.device={args.device}"])
    device = torch.device(args.device)
    data_fast = build_data(cfg, device, memory_format=torch.channels_last)
    data_official = build_data(cfg, torch.device("cpu"))
    data_official.train = official_batches(cfg, data_official)
    names = ["official_style", "glmc", "glmc_contiguous", "glmc_fused", "ce"]
    variants = {n: make_variant(n, cfg, data_official, data_fast, device) for n in names}
    samples = {n: [] for n in names}
    for round_index in range(args.rounds):
        for name in names:
            block = time_block(*variants[name], epoch=round_index, steps=args.steps)
            samples[name].append(statistics.median(block))
            print(f"round {round_index} {name:16s} {samples[name][-1] * 1000:7.1f} ms/step", flush=True)
    per_step = {n: statistics.median(v) for n, v in samples.items()}
    batch = cfg.train.batch_size
    glmc, source, memory_format = variants["glmc"]
    gflop = pass_gflop(glmc, next(iter(source.epoch(0))).to(device, memory_format))
    peak = sgemm_gflops(device, torch.bfloat16 if args.amp == "bf16" else torch.float32)
    floor = {"gflop_per_pass": gflop, "sgemm_gflops": peak, "glmc_step_floor_seconds": 2 * gflop / peak,
             "glmc_achieved_gflops": 2 * gflop / per_step["glmc"],
             "step_seconds_for_2x_official_style": per_step["official_style"] / 2}
    floor["gflops_needed_for_2x"] = 2 * gflop / floor["step_seconds_for_2x_official_style"]
    report = {
        "width": args.width, "batch_size": batch, "steps_per_block": args.steps, "rounds": args.rounds,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "amp": args.amp,
        "data": "synthetic" if args.synthetic else "cifar10_lt",
        "threads": torch.get_num_threads(),
        "seconds_per_step": per_step,
        "images_per_s": {n: batch / s for n, s in per_step.items()},
        "speedup_vs_official_style": {n: per_step["official_style"] / s for n, s in per_step.items()},
        "compute_floor": floor,
        "samples": samples,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    for name in names:
        print(f"{name:16s} {per_step[name] * 1000:7.1f} ms/step {batch / per_step[name]:6.1f} img/s "
              f"x{report['speedup_vs_official_style'][name]:.2f} vs official-style")
    print(f"compute floor: 2 passes x {gflop:.1f} GFLOP at this device's matmul peak {peak:.0f} GFLOP/s = "
          f"{floor['glmc_step_floor_seconds'] * 1000:.0f} ms/step. GLMC runs at {floor['glmc_achieved_gflops']:.0f} "
          f"GFLOP/s ({floor['glmc_achieved_gflops'] / peak:.0%} of peak); 2x the official-style step needs "
          f"{floor['step_seconds_for_2x_official_style'] * 1000:.0f} ms/step = {floor['gflops_needed_for_2x']:.0f} "
          f"GFLOP/s ({floor['gflops_needed_for_2x'] / peak:.0%} of peak)")


if __name__ == "__main__":
    main()
