"""What the multi-expert methods cost against the single-head model: parameters, forward GFLOP and training-step
time of RIDE, MDCS and SHIKE next to CE and LDAM-DRW on the same ResNet-32, CIFAR-10-LT, batch and device; and
the CPU-size DeiT (deit_micro_distilled_patch4_32) with CE and as DeiT-LT's student, whose step includes its
teacher's forward pass (an untrained run of CE's ResNet-32: its cost, not its accuracy).

Each step is timed from taking the batch (so MDCS's strong view, AutoAugment + Cutout, is counted) to the
optimiser step; rounds alternate the methods and per-step times are medians over rounds. Prints the ratios to
CE's step and the absolute figures, and writes bench/results/expert_cost.json.

    python bench/expert_cost.py --data-root ../shared/data [--width 16] [--steps 10] [--rounds 3]
    python bench/expert_cost.py --synthetic --device cuda --amp bf16       # on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from glmc_ray.core import config as config_lib
from glmc_ray.data import build_data
from glmc_ray.training.worker import build_trainee

sys.path.insert(0, str(Path(__file__).parent))
from recipe_cost import untrained_run  # noqa: E402
from step_throughput import time_block  # noqa: E402  (bench/step_throughput.py: the same timed step)

NAMES = ("ce", "ldam_drw", "ride", "mdcs", "shike", "ce_deit", "deit_lt")
MICRO = "model.arch=deit_micro_distilled_patch4_32"
NEEDS = {"mdcs": ["data.strong_augmentation=autoaugment_cutout"], "ce_deit": [MICRO], "deit_lt": [MICRO]}
METHOD = {"ce_deit": "ce"}  # a variant that is not a method name: its method


def method_config(base: list[str], name: str, teacher: Path | None = None) -> config_lib.Config:
    taught = [f"method.deit_lt.teacher={teacher}"] if name == "deit_lt" else []
    return config_lib.load(None, [*base, f"method.name={METHOD.get(name, name)}", *NEEDS.get(name, []), *taught])


def forward_gflop(model, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="../shared/data", help="the folder holding cifar-10-batches-py/")
    p.add_argument("--width", type=int, default=16, help="ResNet-32 width")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of the timed steps")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (the median is reported)")
    p.add_argument("--synthetic", action="store_true", help="generated CIFAR-sized data instead of CIFAR-10")
    p.add_argument("--synthetic-max-count", type=int, default=5000, help="its largest class (10 classes, IF 100)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the device timed")
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="bf16 autocast, or off")
    p.add_argument("--methods", nargs="+", default=list(NAMES), choices=NAMES, help="ce first: the ratios' base")
    p.add_argument("--json", default="bench/results/expert_cost.json", help="the results (JSON)")
    args = p.parse_args()
    data = ["data.source=synthetic", f"data.synthetic_max_count={args.synthetic_max_count}",
            "data.synthetic_test_per_class=10"] \
        if args.synthetic else ["data.source=cifar10", f"data.root={Path(args.data_root).resolve()}"]
    base = [*data, f"model.width={args.width}", f"train.batch_size={args.batch_size}", f"train.amp='{args.amp}'",
            f"train.device={args.device}", "train.epochs=200"]
    device = torch.device(args.device)
    variants, report = {}, {"params": {}, "forward_gflop_per_image": {}, "experts": {}}
    names = args.methods
    folder = tempfile.TemporaryDirectory()
    teacher = None  # CIFAR-10 or the 10 synthetic classes
    if "deit_lt" in names:
        teacher = untrained_run(method_config(base, "ce"), Path(folder.name) / "teacher", 10)
    for name in names:
        cfg = method_config(base, name, teacher)
        bundle = build_data(cfg, device)
        trainee = build_trainee(cfg, bundle.class_counts, device, torch.contiguous_format)
        variants[name] = (trainee, bundle.train, torch.contiguous_format)
        report["params"][name] = sum(p.numel() for p in trainee.raw_model.parameters())
        report["experts"][name] = config_lib.experts_of(cfg)
        x = next(iter(bundle.train.epoch(0))).x1[:8].to(device)
        report["forward_gflop_per_image"][name] = forward_gflop(trainee.raw_model.eval(), x) / len(x)
        trainee.raw_model.train()
    samples = {n: [] for n in names}
    for round_index in range(args.rounds):
        for name in names:
            samples[name].append(statistics.median(time_block(*variants[name], epoch=round_index, steps=args.steps)))
            print(f"round {round_index} {name:9s} {samples[name][-1] * 1000:7.1f} ms/step", flush=True)
    per_step = {n: statistics.median(v) for n, v in samples.items()}
    report.update(width=args.width, batch_size=args.batch_size, steps_per_block=args.steps, rounds=args.rounds,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", amp=args.amp,
                  data="synthetic" if args.synthetic else "cifar10_lt", threads=torch.get_num_threads(),
                  seconds_per_step=per_step, images_per_s={n: args.batch_size / s for n, s in per_step.items()},
                  step_vs_ce={n: s / per_step["ce"] for n, s in per_step.items()},
                  params_vs_ce={n: v / report["params"]["ce"] for n, v in report["params"].items()},
                  gflop_vs_ce={n: v / report["forward_gflop_per_image"]["ce"]
                               for n, v in report["forward_gflop_per_image"].items()},
                  samples=samples)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    for name in names:
        print(f"{name:9s} {report['experts'][name]} expert(s) {report['params'][name] / 1e6:6.3f} M params "
              f"(x{report['params_vs_ce'][name]:.2f}) {report['forward_gflop_per_image'][name] * 1000:6.1f} MFLOP/img "
              f"(x{report['gflop_vs_ce'][name]:.2f}) {per_step[name] * 1000:7.1f} ms/step "
              f"(x{report['step_vs_ce'][name]:.2f} CE's step) {args.batch_size / per_step[name]:6.1f} img/s")


if __name__ == "__main__":
    main()
