"""Command line:
`python -m glmc_ray.train --config configs/recipes/cifar10_lt_if100/glmc.yaml --data-root ../shared/data`.

Without Ray options the loop runs in-process on the local device. With --workers, --nodes, --address (or
RAY_ADDRESS set) it runs under Ray Train: on a cluster, or on a Ray instance started in-process.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.core import storage
from glmc_ray.core.command_line import add_recipe_arguments, find_config, recipe_overrides
from glmc_ray.core.errors import STORAGE_LOST, StorageLost, run_command
from glmc_ray.core.interrupts import Interrupted, StopOnSignal
from glmc_ray.core.version import version_line
from glmc_ray.runs import mirror, parent_run, provenance, rundir


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glmc_ray.train", description=__doc__.split("\n\n")[0])
    add_recipe_arguments(p, "the recipe", "optim.lr=0.02")
    p.add_argument("--output", default="runs", help="parent folder of run directories (default runs/)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint; a Ray Train run also from its copy on storage "
                        "(--resume s3://bucket/runs/<run>: its run directory is restored under --output)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config as YAML (save it and train it with --config), with the device "
                        "and the training class counts as comments; nothing is trained or written")
    p.add_argument("--ray-verbose", action="store_true",
                   help="under Ray Train: also show its own log lines (each rank's reports, worker group start)")
    ray = p.add_argument_group("Ray Train (any of these runs the loop under Ray Train)")
    ray.add_argument("--nodes", type=int, help="nodes to train on: one worker per GPU on each")
    ray.add_argument("--gpus-per-node", type=int, help="GPUs used per node (default: what the nodes report)")
    ray.add_argument("--workers", type=int, help="number of CPU workers (gloo) when there is no GPU")
    ray.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    ray.add_argument("--storage", help="checkpoint storage, shared on clusters (s3://bucket/runs, NFS); it also "
                                       "keeps a copy of the run directory (default: GLMC_STORAGE, else --output; "
                                       "a resume: the run's own)")
    return p


def uses_ray(args) -> bool:
    return any(v is not None for v in (args.nodes, args.workers, args.address, args.gpus_per_node)) or \
        bool(os.environ.get("RAY_ADDRESS"))


def resume_dir(args) -> Path | None:
    """The run directory to resume; given as a storage URI (the copy a Ray Train run keeps beside its
    checkpoints), it is restored from there into <output>/<run> unless that folder holds it already."""
    if not args.resume:
        return None
    if not storage.is_uri(args.resume):
        return Path(args.resume).resolve()
    run = Path(args.output).resolve() / storage.name(args.resume)
    if not (run / "config.yaml").is_file():
        try:
            found = storage.exists(storage.join(args.resume, "config.yaml"))
        except OSError as err:
            raise storage.StorageError(f"--resume {args.resume}: {storage.explain(err)}") from None
        if not found:
            raise FileNotFoundError(f"--resume {args.resume}: no config.yaml there; not the storage copy of a run "
                                    f"(a Ray Train run writes it there with its first checkpoint)")
        mirror.pull(args.resume, run)
        print(f"restored run directory {run} from {args.resume}", flush=True)
    return run


def resolve_config(args) -> config_lib.Config:
    overrides = recipe_overrides(args)
    if args.resume:
        if args.config or overrides:
            raise config_lib.ConfigError(f"--resume continues the run with its saved config.yaml; drop --config/--set/"
                                         f"--data-root. To train on from its weights with other settings (a longer "
                                         f"schedule), start a new run from it: {extend_command(resume_dir(args))}")
        return config_lib.load(resume_dir(args) / "config.yaml")
    return config_lib.load_for_workers(find_config(args.config), overrides)


def finished_epochs(run: Path) -> int:
    """The epochs a finished run trained (its final.json), 0 for one that has not finished."""
    final = run / "final.json"
    return json.loads(final.read_text())["epochs"] if final.is_file() else 0


def extend_command(run: Path) -> str:
    """A new run that starts from `run`'s newest weights (train.init_from, recorded in its parent.json)."""
    return (f"python -m glmc_ray.train --config {run}/config.yaml --set train.init_from={run} "
            f"--set train.epochs=N")


def dry_run(cfg, args) -> None:
    """The config as YAML that loads back as a config, after comments on what the run would use."""
    from glmc_ray.data import training_class_counts
    from glmc_ray.training.worker import select_device

    counts = training_class_counts(cfg)
    if uses_ray(args):
        where = f"Ray Train workers ({' '.join(ray_options(args, RAY_OPTIONS))})"
    else:  # what this machine would train on; a device it does not have is refused here too
        where = f"{select_device(cfg.train.device)} in this process"
    print(f"# {version_line()}\n# trains on: {where}\n# training set: {len(counts)} classes, {sum(counts)} images, "
          f"{max(counts)} down to {min(counts)} per class: {counts}\n# protocol: {protocol_line(cfg.data)}")
    print(config_lib.to_yaml(cfg), end="")


def protocol_line(data) -> str:
    if data.protocol == "paper":
        return "paper (the whole subset trains; the last epoch and the best epoch on test are reported)"
    if data.val_fraction:
        return f"validation on {data.val_fraction:g} of each class, held out (best.pt and the post-hoc tau)"
    if data.val_split:
        return f"validation on {data.val_split} (best.pt and the post-hoc tau)"
    return "no validation split: the last epoch is reported, nothing is chosen"


RAY_OPTIONS = ("nodes", "gpus_per_node", "workers", "address")


def ray_options(args, names) -> list[str]:
    """`--name value` for each of `names` given on this command line."""
    return [f"--{name.replace('_', '-')} {value}" for name in names if (value := getattr(args, name))]


def resume_command(args, run: Path) -> str:
    """The command that continues `run` as this one trained it (the Ray options and the storage it used)."""
    return " ".join(["python -m glmc_ray.train --resume", str(run), *ray_options(args, (*RAY_OPTIONS, "storage"))])


def stopped_line(stopped: Interrupted | StorageLost, args) -> str:
    """The one line an interrupted run or one that lost its storage ends with: why it stopped, what it keeps,
    how to go on (a fresh run that committed no epoch was removed: there is nothing to resume)."""
    if stopped.run is None or stopped.fresh and not (stopped.run / "config.yaml").exists():
        return f"{stopped}; no epoch was committed; nothing to resume"
    return f"{stopped}; the epochs committed before it are kept; resume with: {resume_command(args, stopped.run)}"


def run_local(cfg, args, stop: StopOnSignal) -> dict:
    from glmc_ray.data import class_names, ray_cpus
    from glmc_ray.training.worker import run_worker

    if ray_cpus(cfg):  # the loop runs here, its data streams through Ray Data
        from glmc_ray.distributed import cluster

        cluster.connect(None, 0, ray_cpus(cfg))
        stop.install()  # again: ray.init puts Ray's own SIGTERM handler in place of ours
    state = None
    if args.resume:
        run = resume_dir(args)
        state = rundir.restore_run(run)
        provenance.record_resume(run)
        print(f"resuming {run} at epoch {state['epoch']}", flush=True)
    else:
        run = rundir.new_run_dir(args.output, cfg)
        parent_run.record(run, cfg)
        print(f"run directory: {run}", flush=True)
    try:
        with rundir.removed_if_failed_start(run, fresh=state is None, quiet=(Interrupted, StorageLost)):
            reporter = rundir.LocalReporter(run, cfg, stop.requested, class_names(cfg))
            final = run_worker(cfg, reporter, state=state)
    except Interrupted as interruption:
        interruption.run, interruption.fresh = run, state is None
        raise
    print(f"done: {run}", flush=True)
    return final


def run_ray(cfg, args, stop: StopOnSignal) -> dict:
    from glmc_ray.data import ray_cpus
    from glmc_ray.distributed import cluster, ray_train

    resume = resume_dir(args)
    run_storage = ray_train.run_storage(resume, args.storage) or os.environ.get("GLMC_STORAGE")
    if run_storage:  # before Ray starts: a bucket that does not exist is one error line, not a failed run
        storage.check_writable(run_storage, "--storage")
    cluster.connect(args.address, args.workers or 1, ray_cpus(cfg), args.ray_verbose)
    scaling = cluster.scaling_for(args.nodes, args.workers, args.gpus_per_node)
    stop.install()  # again: ray.init puts Ray's own SIGTERM handler in place of ours
    run, final = ray_train.launch(cfg, scaling, args.output, resume, run_storage, args.ray_verbose, stop=stop)
    print(f"done: {run}", flush=True)
    return final


def summary(final: dict) -> str:
    """The last epoch's test results, then those of the best epoch on validation (best.pt) and, under the paper
    protocol, of the best epoch on test, each on a line."""
    def line(test: dict) -> str:
        groups = " ".join(f"{g} {test[g]:.2f}" for g in ("many", "medium", "few") if test.get(g) is not None)
        return f"test top-1 {test.get('top1', float('nan')):.2f} ({groups})"

    def flat_line(record: dict) -> str:
        return line({k.removeprefix("test_"): v for k, v in record.items() if k.startswith("test_")})

    last = final["last"]
    lines = [f"last epoch {line(last.get('test', {}))}"]
    if last.get("test_posthoc"):  # post-hoc logit adjustment at the tau chosen on validation
        lines[0] += f"; post-hoc tau {last['posthoc']['tau']:g}: {line(last['test_posthoc'])}"
    best = final.get("best_on_val") or {}
    if best.get("epoch") is not None:
        lines.append(f"best on validation (best.pt): epoch {best['epoch']}, val balanced top-1 "
                     f"{best['val_balanced_top1']:.2f}, {flat_line(best['metrics'])}")
    if final.get("best_on_test"):
        lines.append(f"best on test, as the published figures were chosen (upper-biased): epoch "
                     f"{final['best_on_test']['epoch']}, {flat_line(final['best_on_test'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_command(functools.partial(_train, parse_args(argv)))


def _train(args) -> int:
    cfg = resolve_config(args)
    if not args.resume:  # a second stage's parent: there, with a checkpoint, the same model and subset
        parent_run.check(cfg)
    parent_run.check_teacher(cfg)  # read again by every worker, also on a resume
    if args.dry_run:  # its class counts are checked against data.classes there
        dry_run(cfg, args)
        return 0
    run = resume_dir(args)
    if run is not None and (trained := finished_epochs(run)) >= cfg.train.epochs:
        print(f"{run} has finished all its {trained} epochs (final.json): nothing to resume. To train on "
              f"from its weights: {extend_command(run)}")
        return 0
    if cfg.data.classes:  # a recipe's dataset against the data given (the workers count again)
        from glmc_ray.data import training_class_counts

        training_class_counts(cfg)
    with StopOnSignal() as stop:
        try:
            final = run_ray(cfg, args, stop) if uses_ray(args) else run_local(cfg, args, stop)
        except Interrupted as interruption:
            print(stopped_line(interruption, args), file=sys.stderr, flush=True)
            return stop.exit_code
        except StorageLost as lost:
            print(f"error: {stopped_line(lost, args)}", file=sys.stderr, flush=True)
            return STORAGE_LOST
    print(summary(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
