"""Hyper-parameter search for any long-tail method (and for the method itself): Ray Tune runs the trials,
Optuna (TPE) proposes them.

    python tuning/search.py --config configs/recipes/cifar100_lt_if100/glmc.yaml --space configs/search/glmc.yaml \\
        --trials 64 --concurrent 4 --gpus-per-trial 0.25
    python tuning/search.py --config configs/recipes/cifar100_lt_if100/glmc.yaml --space configs/search/methods.yaml \\
        --trials 64
        # methods.yaml searches the method too, each method's knobs only in the trials that chose it

Optimises balanced top-1 on the validation split (never the test set); every trial trains a complete,
shortened schedule (--trial-epochs). Outputs (trials.csv, best_config.yaml, plots, the Optuna study) go to
<output>/<name>-search-<stamp>/; `--resume` that directory after an interruption. See glmc_ray/search/trials.py.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.core import storage
from glmc_ray.core.command_line import CONFIGS, add_recipe_arguments, find_config, recipe_overrides
from glmc_ray.core.errors import run_command
from glmc_ray.core.interrupts import TermAsInt
from glmc_ray.core.version import version_line
from glmc_ray.search import full as search_full
from glmc_ray.search import objectives, space_file, trials
from glmc_ray.search import options as search_options
from glmc_ray.search import space as search_space

SPACES = CONFIGS / "search"


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tuning/search.py", description=__doc__.split("\n\n")[0])
    add_recipe_arguments(p, "the base recipe (its values are the first trial; it needs a validation split)",
                         "data.val_fraction=0.2")
    p.add_argument("--space", help="the search space (required for a new search): a YAML file, or a name in "
                                   "configs/search/: glmc (GLMC's knobs) or methods (the method itself and each "
                                   "one's knobs)")
    p.add_argument("--teacher", metavar="RUN",
                   help="a finished run of this harness on the same data (its folder or s3:// copy): the methods "
                        "that learn from a teacher (deit_lt) are searched too, distilling from it; without it "
                        "the space leaves them out")
    p.add_argument("--dry-run", action="store_true",
                   help="check the base config and the space, print the base config as YAML and the searched "
                        "fields with the first trial's values; nothing is started or written")
    p.add_argument("--trials", type=int, default=64, help="number of trials (default 64)")
    p.add_argument("--concurrent", type=int, default=4, help="trials running at once (default 4)")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial, fractions allowed (default: 1 if the cluster has GPUs, else 0: CPU trials)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="K > 1: each trial is a K-worker Ray Train run (default 1: the loop in the trial's process)")
    p.add_argument("--trial-epochs", type=int,
                   help="epochs of each trial's complete, shortened schedule (default: the config's train.epochs)")
    p.add_argument("--objective", metavar="SPEC",
                   help="what is maximised on the validation split: balanced_top1 (default), top1, many, medium, "
                        "few, worst (the worst class), or a weighted sum such as 0.7*balanced_top1+0.3*few")
    p.add_argument("--pareto", nargs="+", metavar="SPEC",
                   help="two or more objectives (as --objective) maximised together by Optuna's multi-objective "
                        "TPE: the search writes their Pareto front (pareto.csv, pareto.png, each point's config)")
    p.add_argument("--fidelity-check", type=int, default=0, metavar="K",
                   help="after the search: train K trials spread over its ranking, and the recipe, with the full "
                        "schedule; fidelity.json/png give the Spearman correlation of the two objectives")
    p.add_argument("--final-seeds", type=int, default=0, metavar="N",
                   help="after the search: train the winner and the recipe with the full schedule and N train "
                        "seeds each; final_seeds.json gives their results as glmc_ray.compare does (mean +- std)")
    p.add_argument("--output", default="runs", help="parent folder of the experiment directory (default runs/), or "
                                                      "object storage: s3://bucket/searches (no shared folder needed)")
    p.add_argument("--resume", metavar="EXPERIMENT", help="continue an interrupted search (its folder or URI)")
    p.add_argument("--ray-verbose", action="store_true",
                   help="also show Ray's own lines and what the trials print (their epoch lines)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a cluster on this node, "
                                     "else a local Ray instance)")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna's TPE sampler (default 0)")
    p.add_argument("--storage-url", help="SQLAlchemy URL of the Optuna study, e.g. postgresql://user@host/db for a "
                                         "study that outlives the head node (default: SQLite in the experiment)")
    return p


def _new_search(args) -> tuple[config_lib.Config, search_space.Space, search_options.SearchOptions]:
    """The base config, the space and the options of a new search, each checked (no Ray needed)."""
    if not args.space:
        raise config_lib.ConfigError("--space is required for a new search (e.g. --space glmc or --space methods, "
                                     "configs/search/)")
    base = config_lib.load_for_workers(find_config(args.config), recipe_overrides(args))
    teacher = args.teacher or ""
    if teacher and not storage.is_uri(teacher):  # the trials run in their own folders
        teacher = str(Path(teacher).resolve())
    space = space_file.load_space(find_config(args.space, "--space", SPACES), base, teacher)
    opts = _options(args)
    search_options.prepare(base, space, opts, args.config or "the default config")
    return base, space, opts


def _dry_run(base, space, opts: search_options.SearchOptions) -> None:
    """The base config as YAML (a config file), the searched fields and the first trial's values as comments."""
    first = space.point(base)
    print(f"# {version_line()}\n# {opts.trials} trials of {opts.trial_epochs or base.train.epochs} epochs, "
          f"{opts.concurrent} at once, maximising {' and '.join(opts.objectives)} on the validation split; "
          f"searched (first trial: the base config's values):")
    for key in space.keys():
        print(f"#   {key}: {first.get(key, '(not searched by the first trial)')}")
    print(config_lib.to_yaml(base), end="")


def _options(args) -> search_options.SearchOptions:
    return search_options.SearchOptions(
        space=str(find_config(args.space, "--space", SPACES).resolve()), trials=args.trials, concurrent=args.concurrent,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial, workers_per_trial=args.workers_per_trial,
        trial_epochs=args.trial_epochs, seed=args.seed, storage_url=args.storage_url, objectives=_objectives(args))


def _objectives(args) -> list[str]:
    if args.objective and args.pareto:
        raise config_lib.ConfigError("--objective and --pareto: give one objective (--objective) or several "
                                     "(--pareto), not both")
    if args.pareto is not None and len(args.pareto) < 2:
        raise config_lib.ConfigError(f"--pareto {' '.join(args.pareto)}: a Pareto front needs two objectives or "
                                     f"more; for one, use --objective")
    if args.pareto and (args.fidelity_check or args.final_seeds):
        raise config_lib.ConfigError("--pareto with --fidelity-check or --final-seeds: those rank the trials by one "
                                     "objective; train the point of the front you pick with python -m glmc_ray.train")
    return args.pareto or [args.objective or objectives.DEFAULT]


def _default_gpus(opts: search_options.SearchOptions) -> None:
    import ray

    if opts.gpus_per_trial is None:  # not given: one GPU per worker where there are GPUs
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        opts.gpus_per_trial = float(opts.workers_per_trial) if has_gpus else 0.0


def run(args, term: TermAsInt | None = None) -> tuple[Path, bool]:
    """The search and the stages after it; `term`: SIGTERM as Ctrl-C (Tune's graceful stop) once Ray is up."""
    for name, value in (("--fidelity-check", args.fidelity_check), ("--final-seeds", args.final_seeds)):
        if value < 0:
            raise config_lib.ConfigError(f"{name}: {value} is out of range; expected >= 0")
    experiment, finished = _run_search(args, term or TermAsInt())
    if finished and (args.fidelity_check or args.final_seeds):
        finished = search_full.full_stages(experiment, args.fidelity_check, args.final_seeds) is not None
    return experiment, finished


def _run_search(args, term: TermAsInt) -> tuple[Path, bool]:
    from glmc_ray.distributed import cluster

    trials.set_environment()
    if args.resume:
        if args.config or args.space or args.overrides or args.teacher or args.objective or args.pareto:
            raise config_lib.ConfigError("--resume uses the experiment's saved base config, space and objectives; "
                                         "drop --config/--set/--space/--teacher/--objective/--pareto")
        cluster.connect(args.address, 1, verbose=args.ray_verbose, worker_output=False)
        term.install()
        return trials.resume(args.resume)
    base, space, opts = _new_search(args)
    storage.check_writable(args.output, "--output")  # object storage: before Ray starts
    from glmc_ray.data import ray_cpus

    # a trial streaming shards makes its own Ray Data streams (q is searched): their CPUs on top
    cluster.connect(args.address, max(1, int(opts.concurrent * opts.cpus_per_trial)),
                    opts.concurrent * ray_cpus(base), verbose=args.ray_verbose, worker_output=False)
    _default_gpus(opts)
    term.install()
    return trials.search(base, space, opts, args.output)


def main(argv=None) -> int:
    return run_command(functools.partial(_search, parse_args(argv)))


def _search(args) -> int:
    if args.dry_run:
        if args.resume:
            raise config_lib.ConfigError("--dry-run checks a new search; drop --resume")
        _dry_run(*_new_search(args))
        return 0
    term = TermAsInt()
    _, finished = run(args, term)
    # interrupted (Ctrl-C, SIGTERM): the outputs so far are written, --resume continues
    return 0 if finished else term.exit_code


