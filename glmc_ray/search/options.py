"""A search's options and every check that needs no trial: the options themselves (`SearchOptions`, kept in the
experiment's search.json), the base config (a validation split, a class in each shot group an objective
names), the trial schedule, each method's teacher run, the study's storage, and, once connected, that a trial
fits on one node (`check_resources`). `trial_config` is the config a trial trains."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.core.config import ConfigError
from glmc_ray.core.schedules import scaled_milestones
from glmc_ray.runs import parent_run
from glmc_ray.search import objectives as objectives_lib
from glmc_ray.search.space import Space, apply_values


@dataclass
class SearchOptions:
    space: str
    trials: int = 64
    concurrent: int = 4
    gpus_per_trial: float | None = None  # None: decided once connected (1 per worker with GPUs, else 0)
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1
    trial_epochs: int | None = None  # default: the base config's train.epochs
    seed: int = 0
    storage_url: str | None = None  # default: sqlite:///<experiment>/study.db
    # what is maximised on the validation split (objectives.py): one, or several for a Pareto front
    objectives: list[str] = field(default_factory=lambda: [objectives_lib.DEFAULT])

    @property
    def pareto(self) -> bool:
        return len(self.objectives) > 1

    def parsed_objectives(self) -> tuple[objectives_lib.Objective, ...]:
        return objectives_lib.parse(self.objectives, self.objective_option)

    @property
    def objective_option(self) -> str:
        """The command-line option that named the objectives, for their errors."""
        return "--pareto" if self.pareto else "--objective"

    @property
    def metrics(self) -> list[str]:
        """The objectives' result keys (trials.csv's columns, Optuna's values)."""
        return [objective.key for objective in self.parsed_objectives()]

    def check(self) -> None:
        self.parsed_objectives()
        for name, value, ok in (("--trials", self.trials, self.trials >= 1),
                                ("--concurrent", self.concurrent, self.concurrent >= 1),
                                ("--workers-per-trial", self.workers_per_trial, self.workers_per_trial >= 1),
                                ("--cpus-per-trial", self.cpus_per_trial, self.cpus_per_trial > 0),
                                ("--gpus-per-trial", self.gpus_per_trial, (self.gpus_per_trial or 0) >= 0)):
            if not ok:
                raise ConfigError(f"{name}: {value} is out of range")
        if self.trial_epochs is not None and self.trial_epochs < 1:
            raise ConfigError(f"--trial-epochs: {self.trial_epochs} is out of range; expected >= 1")
        if self.workers_per_trial > 1 and self.gpus_per_trial not in (None, 0, self.workers_per_trial):
            raise ConfigError(f"--gpus-per-trial {self.gpus_per_trial}: with --workers-per-trial "
                              f"{self.workers_per_trial} each worker takes one GPU; use 0 or {self.workers_per_trial}")


def check_base(cfg, source: str) -> None:
    if not config_lib.has_validation(cfg):
        paper = " (data.protocol=paper trains on the whole subset)" if cfg.data.protocol == "paper" else ""
        raise ConfigError(f"{source}: no validation split{paper}; the search optimises validation metrics "
                          f"(--objective) and never the test set: set data.val_fraction > 0 (CIFAR, synthetic) or "
                          f"data.val_split (split files), with data.protocol=validation")


def check_shot_groups(base, opts: SearchOptions) -> None:
    """An objective on Many, Medium or Few needs a class of that group in the training split (else no trial
    would have a value)."""
    from glmc_ray.core.evaluation import shot_groups
    from glmc_ray.data import training_class_counts

    named = {name for objective in opts.parsed_objectives() for _, name in objective.terms}
    needed = [name for name in ("many", "medium", "few") if name in named]
    if not needed:
        return
    groups = shot_groups(training_class_counts(base))
    for name in needed:
        if not bool(groups[name].any()):
            option = opts.objective_option
            raise ConfigError(f"{option} {' '.join(opts.objectives)}: no class of the training split is {name} "
                              f"({objectives_lib.NAMES[name]}), so the objective has no value; choose another",
                              option)


def trial_config(base, values: dict, trial_epochs: int | None) -> config_lib.Config:
    """The config a trial trains: base, the shortened schedule, then the sampled values."""
    values = dict(values)
    if trial_epochs is not None:  # the step schedule's milestones keep their place in it, as DRW's start does
        milestones = scaled_milestones(base.optim.milestones, base.train.epochs, trial_epochs)
        values = {"train.epochs": trial_epochs, "optim.milestones": milestones, **values}
    return apply_values(base, values)


def prepare(base, space: Space, opts: SearchOptions, source: str) -> None:
    """Every check that needs no Ray: validation split, trial schedule, the options, each method's teacher run."""
    opts.check()
    check_base(base, source)
    check_shot_groups(base, opts)
    methods = next((p.choices for p in space.params if p.key == "method.name"), (base.method.name,))
    for method in methods:  # the teacher a trial of each method would load (the base's own included)
        choices = {"method.name": method}
        parent_run.check_teacher(apply_values(base, {**choices, **space.fixed_values(choices)}))
    try:
        trial_config(base, {}, opts.trial_epochs)
    except ConfigError as err:
        raise ConfigError(f"--trial-epochs {opts.trial_epochs}: {err}", err.key) from None
    if opts.storage_url:  # fail before anything is made; the default SQLite file is made in the experiment
        import optuna

        if opts.storage_url.startswith("sqlite:///"):
            warn_sqlite_on_network(Path(opts.storage_url.removeprefix("sqlite:///")), "--storage-url")

        try:
            optuna.storages.RDBStorage(opts.storage_url)
        except Exception as err:
            raise ConfigError(f"--storage-url {opts.storage_url}: cannot open it as an Optuna RDB storage "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def warn_sqlite_on_network(path: Path, option: str) -> None:
    """SQLite's file locking is unreliable on network filesystems; Optuna's docs advise against a SQLite study
    there. Said once on stderr: the search driver is the study's only writer, which makes it work in practice."""
    from glmc_ray.distributed.cluster import NETWORK_FILESYSTEMS, filesystem_type

    kind = filesystem_type(path)
    if kind in NETWORK_FILESYSTEMS:
        print(f"warning: {option} {path} is on {kind}: the Optuna study's SQLite file would be on a network "
              f"filesystem, where SQLite's locking is unreliable (Optuna's docs advise against it); give "
              f"--storage-url postgresql://... (a study that outlives the head node) or a sqlite:/// path on a "
              f"local disk", file=sys.stderr, flush=True)


def check_resources(opts: SearchOptions) -> None:
    """After connecting: a trial must fit on one node of this cluster."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    need_gpus = opts.gpus_per_trial
    if need_gpus > gpus:
        raise ConfigError(f"--gpus-per-trial {opts.gpus_per_trial}: no node of this cluster has that many GPUs "
                          f"(largest: {gpus:g})")
    if opts.cpus_per_trial > cpus:
        raise ConfigError(f"--cpus-per-trial {opts.cpus_per_trial}: no node of this cluster has that many CPUs "
                          f"(largest: {cpus:g})")
