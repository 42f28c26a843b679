"""Ray Train overhead: the same epochs through Ray Train and through the bare in-process loop.

Variants, run one after the other in this process and repeated (--repeats) in alternating order:
  inprocess_1x1  the in-process loop, 1 worker x 1 torch thread
  ray_1x1        Ray Train, 1 worker x 1 thread (same work, same threads; Ray's processes keep a core)
  inprocess_1x2  the in-process loop, 1 worker x 2 torch threads
  ray_1x2        Ray Train, 1 worker x 2 threads (the worker shares both cores with Ray's processes)
  ray_2x1        Ray Train, 2 workers x 1 thread over gloo (what DDP costs per step on this machine)
Steady-state throughput is the mean images/s of the epochs after the first (from metrics.jsonl); the
remainder of the wall time (start-up, evaluation, reporting) is reported separately. Ratios are taken per
repeat (the two runs of a pair are neighbours in time) and summarised by their median and range.

    python bench/ray_overhead.py --data-root ../shared/data [--epochs 2] [--width 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray

from glmc_ray.core import config as config_lib
from glmc_ray.distributed import cluster, ray_train
from glmc_ray.runs import rundir
from glmc_ray.training.worker import run_worker

VARIANTS = {"inprocess_1x1": (None, 1), "ray_1x1": (1, 1), "inprocess_1x2": (None, 2), "ray_1x2": (1, 2),
            "ray_2x1": (2, 1)}
RATIOS = {"ray_1x1_over_inprocess_1x1": ("ray_1x1", "inprocess_1x1"),
          "ray_1x2_over_inprocess_1x2": ("ray_1x2", "inprocess_1x2"),
          "ray_2x1_over_ray_1x2": ("ray_2x1", "ray_1x2")}


def run_variant(name: str, args) -> dict:
    workers, threads = VARIANTS[name]
    cfg = config_lib.load("configs/recipes/cifar10_lt_if100/glmc.yaml", [
        f"data.root={Path(args.data_root).resolve()}", f"model.width={args.width}", f"train.epochs={args.epochs}",
        "data.protocol=paper", f"train.threads={threads}", f"train.eval_every={args.epochs}", "train.progress_every=0",
        f"name=overhead_{name}"])
    start = time.perf_counter()
    if workers is None:
        run = rundir.new_run_dir(args.output, cfg)
        run_worker(cfg, rundir.LocalReporter(run, cfg))
    else:
        run, _ = ray_train.launch(cfg, cluster.Scaling(workers, use_gpu=False), args.output)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r["images_per_s"] for r in records[1:]] or [records[0]["images_per_s"]]
    return {"images_per_s": statistics.mean(steady), "wall_seconds": wall,
            "outside_training_seconds": wall - sum(r["train_seconds"] for r in records)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="../shared/data", help="the folder holding cifar-10-batches-py/")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each run")
    p.add_argument("--width", type=int, default=8, help="ResNet-32 width")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternated")
    p.add_argument("--output", default="runs/bench", help="parent folder of the runs it trains")
    p.add_argument("--json", default="bench/results/ray_overhead.json", help="the results (JSON)")
    args = p.parse_args()
    ray.init(num_cpus=3)  # 2 cores; one logical CPU more so the 2-worker group fits beside the controller
    runs = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            runs[name].append(run_variant(name, args))
            print(f"repeat {repeat} {name}: {runs[name][-1]}", flush=True)
    ray.shutdown()
    mean = {n: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    per_repeat = {name: [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[num], runs[den], strict=True)]
                  for name, (num, den) in RATIOS.items()}
    report = {"epochs": args.epochs, "width": args.width, "repeats": args.repeats, "mean": mean, "runs": runs,
              "ratios_per_repeat": per_repeat,
              "ratios_median": {name: statistics.median(r) for name, r in per_repeat.items()},
              "ray_startup_extra_seconds": mean["ray_1x2"]["outside_training_seconds"]
              - mean["inprocess_1x2"]["outside_training_seconds"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    for name, m in mean.items():
        print(f"{name:14s} {m['images_per_s']:7.1f} img/s steady, wall {m['wall_seconds']:6.1f} s, "
              f"outside training {m['outside_training_seconds']:5.1f} s")
    for name, ratios in per_repeat.items():
        print(f"{name}: median {statistics.median(ratios):.3f} "
              f"(repeats {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"Ray start-up and reporting, extra seconds per run: {report['ray_startup_extra_seconds']:.1f}")


if __name__ == "__main__":
    main()
