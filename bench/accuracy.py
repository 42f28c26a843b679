"""Reduced accuracy protocol on the real CIFAR-10-LT: GLMC and CE at the same short budget.

CIFAR-10-LT IF 100 (`glmc` subset), ResNet-32 width 16, batch 64, 10 epochs with the cosine lr and the
cumulative alpha completed over those 10 epochs, the README CIFAR-10 IF-100 recipe (lr 0.01, wd 5e-3,
q 0.0, gamma 1.2, consistency 1). Runs go one after the other in this process; the JSON holds top-1,
Many/Medium, the mean accuracy of the three rarest classes and the wall time of each, per seed and averaged.

    python bench/accuracy.py --data-root ../shared/data [--epochs 10] [--methods glmc ce] [--seeds 3407 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.runs import rundir
from glmc_ray.training.worker import run_worker

OFFICIAL = {"glmc_top1": 37.0, "glmc_many": 26.1, "glmc_medium": 80.7, "glmc_minutes": 56.0,
            "ce_top1": 38.9, "ce_rarest3": 0.03}  # official code on this machine


def run_method(method: str, seed: int, args) -> dict:
    # the recipe's method section is GLMC's: another method replaces the whole section (its defaults)
    method_set = "method.name=glmc" if method == "glmc" else f"method={{name: {method}}}"
    cfg = config_lib.load("configs/recipes/cifar10_lt_if100/glmc.yaml", [
        f"data.root={Path(args.data_root).resolve()}", "model.width=16", f"train.epochs={args.epochs}",
        "data.protocol=paper", method_set, f"name=bench_{method}_seed{seed}", "train.memory_format=channels_last",
        f"train.seed={seed}",
        f"train.progress_every={args.progress_every}", f"train.eval_every={args.eval_every or args.epochs}"])
    run = rundir.new_run_dir(args.output, cfg)
    print(f"[{method} seed {seed}] run directory {run}", flush=True)
    start = time.perf_counter()
    final = run_worker(cfg, rundir.LocalReporter(run, cfg))
    minutes = (time.perf_counter() - start) / 60
    test = final["last"]["test"]
    counts = final["class_counts"]
    rarest = sorted(range(len(counts)), key=lambda c: counts[c])[:3]
    return {"top1": test["top1"], "many": test["many"], "medium": test["medium"], "few": test["few"],
            "rarest3_mean": sum(test["per_class"][c] for c in rarest) / 3, "per_class": test["per_class"],
            "minutes": minutes, "seed": seed, "run_dir": str(run)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default="../shared/data", help="the folder holding cifar-10-batches-py/")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each run")
    p.add_argument("--methods", nargs="+", default=["glmc", "ce"], help="the methods to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[3407], help="train.seed values (the subset is fixed)")
    p.add_argument("--output", default="runs/bench", help="parent folder of the runs it trains")
    p.add_argument("--progress-every", type=int, default=50, help="steps between progress lines (0: none)")
    p.add_argument("--eval-every", type=int, default=0, help="epochs between test evaluations (0: last only)")
    p.add_argument("--json", default="bench/results/accuracy.json", help="the results (JSON)")
    args = p.parse_args()
    runs = {m: [run_method(m, seed, args) for seed in args.seeds] for m in args.methods}
    summary = {m: {k: statistics.mean(r[k] for r in rs) for k in ("top1", "many", "medium", "rarest3_mean", "minutes")}
               | {"top1_min": min(r["top1"] for r in rs), "top1_max": max(r["top1"] for r in rs)}
               for m, rs in runs.items()}
    report = {"epochs": args.epochs, "seeds": args.seeds, "official_reference": OFFICIAL, "mean": summary,
              "runs": runs}
    if "glmc" in summary:
        report["glmc_minus_official_top1"] = summary["glmc"]["top1"] - OFFICIAL["glmc_top1"]
        report["time_ratio_vs_official"] = summary["glmc"]["minutes"] / OFFICIAL["glmc_minutes"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    for m, rs in runs.items():
        for r in rs:
            print(f"{m} seed {r['seed']}: top1 {r['top1']:.2f} many {r['many']:.2f} medium {r['medium']:.2f} "
                  f"rarest-3 {r['rarest3_mean']:.2f} in {r['minutes']:.1f} min")
    if "glmc" in summary:
        print(f"GLMC vs official: {report['glmc_minus_official_top1']:+.2f} points top-1, "
              f"time ratio {report['time_ratio_vs_official']:.2f} (official {OFFICIAL['glmc_minutes']} min)")


if __name__ == "__main__":
    main()
