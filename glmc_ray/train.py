"""Command line: `python -m glmc_ray.train --config configs/cifar10_lt.yaml --data-root ../shared/data`.

Without Ray options the loop runs in-process on the local device. With --workers, --nodes, --address (or
RAY_ADDRESS set) it runs under Ray Train: on a cluster, or on a Ray instance started in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from glmc_ray import config as config_lib
from glmc_ray import rundir
from glmc_ray.errors import exit_code


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glmc_ray.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML recipe from configs/ (defaults when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.02 (repeatable)")
    p.add_argument("--data-root", help="shorthand for --set data.root=DIR")
    p.add_argument("--output", default="runs", help="parent folder of run directories (default runs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and class counts, exit")
    ray = p.add_argument_group("Ray Train (any of these runs the loop under Ray Train)")
    ray.add_argument("--nodes", type=int, help="nodes to train on: one worker per GPU on each")
    ray.add_argument("--gpus-per-node", type=int, help="GPUs used per node (default: what the nodes report)")
    ray.add_argument("--workers", type=int, help="number of CPU workers (gloo) when there is no GPU")
    ray.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    ray.add_argument("--storage", default=os.environ.get("GLMC_STORAGE"),
                     help="checkpoint storage: shared (s3://, NFS) on clusters (default: GLMC_STORAGE, else --output)")
    return p.parse_args(argv)


def uses_ray(args) -> bool:
    return any(v is not None for v in (args.nodes, args.workers, args.address, args.gpus_per_node)) or \
        bool(os.environ.get("RAY_ADDRESS"))


def resolve_config(args) -> config_lib.Config:
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={Path(args.data_root).resolve()}")
    if args.resume:
        if args.config or overrides:
            raise config_lib.ConfigError("--resume uses the run's saved config.yaml; drop --config/--set/--data-root")
        return config_lib.load(Path(args.resume) / "config.yaml")
    cfg = config_lib.load(args.config, overrides)
    if cfg.data.root:  # Ray workers run in another working directory
        cfg.data.root = str(Path(cfg.data.root).resolve())
    return cfg


def dry_run(cfg) -> None:
    from glmc_ray.data import training_class_counts

    print(json.dumps({"config": config_lib.to_dict(cfg), "class_counts": training_class_counts(cfg)}, indent=1))


def run_local(cfg, args) -> dict:
    from glmc_ray.worker import run_worker

    state = None
    if args.resume:
        run = Path(args.resume).resolve()
        state = rundir.load_checkpoint(run / rundir.CHECKPOINT)
        rundir.remove_partial_writes(run)
        rundir.write_metrics(run, state["history"])  # exactly the epochs the checkpoint holds
        print(f"resuming {run} at epoch {state['epoch']}", flush=True)
    else:
        run = rundir.new_run_dir(args.output, cfg)
        print(f"run directory: {run}", flush=True)
    try:
        final = run_worker(cfg, rundir.LocalReporter(run, cfg), state=state)
    except BaseException:
        if state is None:
            rundir.report_failed_start(run)
        raise
    print(f"done: {run}", flush=True)
    return final


def run_ray(cfg, args) -> dict:
    from glmc_ray import ray_train

    ray_train.connect(args.address, args.workers or 1)
    scaling = ray_train.scaling_for(args.nodes, args.workers, args.gpus_per_node)
    resume = Path(args.resume).resolve() if args.resume else None
    run, final = ray_train.launch(cfg, scaling, args.output, resume, args.storage)
    print(f"done: {run}", flush=True)
    return final


def summary(final: dict) -> str:
    test = final["last"].get("test", {})
    groups = " ".join(f"{g} {test[g]:.2f}" for g in ("many", "medium", "few") if test.get(g) is not None)
    return f"last epoch test top-1 {test.get('top1', float('nan')):.2f} ({groups})"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        final = run_ray(cfg, args) if uses_ray(args) else run_local(cfg, args)
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return code
    print(summary(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
