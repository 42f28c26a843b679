"""Hyper-parameter search: Ray Tune runs the trials, Optuna (TPE) proposes them, the study lives in an RDB.

    <output>/<name>-search-<stamp>/      the experiment directory (Tune's state is kept here too)
      search.json                        the search's own options (what --resume needs)
      base_config.yaml                   the base config (the dataset's recipe) with --set applied
      study.db                           the Optuna study (SQLite; any SQLAlchemy URL via --storage-url)
      trials/<name>-<trial id>-<stamp>/  one normal run directory per trial (config, metrics, final.json)
      trials.csv                         id, status, searched values (empty where a trial's choices did not
                                         search the field: another method's knobs), the objectives
                                         (val_balanced_top1 by default: objectives.py), test_top1, s, error
      best_config.yaml                   the base config with the best values, full schedule: train it
      pareto.csv/.json/.png, pareto/     with several objectives (--pareto), their front and each point's
                                         config instead (pareto.py)
      *.png                              Optuna's optimisation history, slice and importance plots
      fidelity.json, fidelity.png        the fidelity check: short vs full-schedule objective, Spearman
      final_seeds.json                   the winner and the recipe, full schedule, several train seeds
      full/<name>-<label>-seed<S>-<stamp>/  their full-schedule run directories (Tune's state in full/tune/)

With `--output s3://bucket/searches` (or any URI) the experiment lives on object storage and no folder has to be
shared: Tune keeps its state there itself (its `storage_path`), each trial trains in a node-local scratch folder
and copies its run directory to <experiment>/trials/<run> after every epoch (run_mirror: a resumed trial pulls it
back), and the driver works in a local copy of the experiment's own files (GLMC_STAGING, default
~/.cache/glmc-ray/searches/<experiment>) that it uploads whenever a trial starts or ends and when the outputs are
written. The SQLite study is one of those files; a study that must outlive the head node goes in a database
off it (--storage-url postgresql://...).

The space (`Space`, `apply_values`) is glmc_ray/search/space.py, its file (`load_space`) space_file.py, the
options and the checks before Ray options.py.

Fidelity: every trial trains a complete, shortened schedule of `trial_epochs` epochs (default: the
config's own train.epochs), so GLMC's cumulative alpha and the lr schedule both finish inside the trial,
and the objective is the last epoch's validation metric (balanced top-1 unless --objective says otherwise).
There is no mid-run early stopping: alpha hands the loss to the re-balanced head late, so the mid-run
accuracy of a long schedule says little about its end. After the search, `full_stages` measures how well the
short schedule ranks configurations for the full one (Spearman over trials re-trained with the full schedule)
and trains the winner and the recipe with several train seeds; their runs go to <experiment>/full/
(glmc_ray/search/full.py).

The loop, methods and data know nothing of Tune: a trial wraps `worker.run_worker` (one worker, in the
trial's own process) or `ray_train.launch` (K workers under Ray Train) with a reporter that also calls
`ray.tune.report`.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.core import storage
from glmc_ray.core.config import ConfigError
from glmc_ray.core.errors import StorageLost
from glmc_ray.runs import mirror, provenance, rundir
from glmc_ray.search import objectives as objectives_lib
from glmc_ray.search import pareto
from glmc_ray.search.console import EVALUATED, best_table, creation_number, error_line, trial_lines_callback
from glmc_ray.search.options import SearchOptions, check_resources, trial_config, warn_sqlite_on_network
from glmc_ray.search.space import Space, apply_values

MODE = "max"  # every objective (objectives.py): a validation metric, never the test set
SEARCH_FILE = "search.json"
BASE_CONFIG = "base_config.yaml"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"  # Tune's own state in the experiment


# ----------------------------------------------------------------------------------------------- trials

class TuneReporter(rundir.LocalReporter):
    """The run directory as in-process (metrics.jsonl, checkpoint.pt, best.pt, final.json) plus one
    `ray.tune.report` per evaluated epoch. Trial resume uses the run directory's checkpoint.pt, so no
    Tune checkpoint is passed."""

    def __init__(self, run: Path, cfg, objectives: tuple, names: list[str] | None = None):
        super().__init__(run, cfg, names=names)
        self.objectives = objectives

    def report(self, record: dict, checkpoint, is_best: bool, per_class: list | None) -> None:
        super().report(record, checkpoint, is_best, per_class)
        report_evaluated([record], self.objectives)


def report_evaluated(records: list[dict], objectives: tuple) -> None:
    """`ray.tune.report` each evaluated record (epochs without evaluation, with train.eval_every > 1, have no
    objective), with the value of each mixed objective."""
    from ray import tune

    for record in records:
        if EVALUATED in record:
            tune.report(objectives_lib.with_values(record, objectives))


def run_trial(values: dict, base: dict, opts: dict, experiment: str, command: str) -> None:
    """The Tune function trainable: one trial = one normal run directory under <experiment>/trials/."""
    from ray import tune

    options = SearchOptions(**opts)
    cfg = trial_config(config_lib.from_dict(base), values, options.trial_epochs)
    cfg.name = f"{cfg.name}-{tune.get_context().get_trial_id()}"
    train_run(cfg, options, storage.join(experiment, TRIALS_DIR), command)


def train_run(cfg, options: SearchOptions, parent: str, command: str) -> None:
    """Train `cfg` in the run directory named cfg.name under `parent` (a folder or URI): a new one, or the one
    an interrupted trial left (continued from its checkpoint; a finished one is only reported again). Under
    a URI the run trains in a node-local scratch folder and its copy under `parent` is kept current."""
    os.environ[provenance.COMMAND_ENV] = command  # version.json names the search, not this Ray worker
    if options.gpus_per_trial == 0 and cfg.train.threads == 0:  # CPU trials share the node's cores
        cfg.train.threads = max(1, int(options.cpus_per_trial // options.workers_per_trial) or 1)
    existing = mirror.find(parent, cfg.name)
    if existing is not None and storage.exists(storage.join(existing, "final.json")):  # finished before
        report_evaluated(_read_metrics(existing), options.parsed_objectives())
        return
    if not storage.is_uri(parent):
        _train_in(cfg, options, Path(parent), Path(existing) if existing else None, None)
        return
    with tempfile.TemporaryDirectory(prefix="glmc-trial-") as scratch:
        local = mirror.pull(existing, Path(scratch) / storage.name(existing)) if existing else None
        _train_in(cfg, options, Path(scratch), local, parent)


def _read_metrics(run: str) -> list[dict]:
    fs, path = storage.resolve(run)
    text = storage.read_text(fs, f"{path}/{rundir.METRICS}")
    return [json.loads(line) for line in text.splitlines()]


def _train_in(cfg, options: SearchOptions, parent: Path, existing: Path | None, remote: str | None) -> None:
    if options.workers_per_trial > 1:
        _run_ray_trial(cfg, options, parent, existing, remote)
    else:
        _run_local_trial(cfg, options.parsed_objectives(), parent, existing, remote)


class MirroredTuneReporter(TuneReporter):
    """TuneReporter whose run directory is copied to `remote`/<run> after every epoch and at the end."""

    def __init__(self, run: Path, cfg, objectives: tuple, remote: str, names: list[str] | None = None):
        super().__init__(run, cfg, objectives, names=names)
        self.remote, self.pushed = storage.join(remote, run.name), None

    def report(self, record: dict, checkpoint, is_best: bool, per_class: list | None) -> None:
        super().report(record, checkpoint, is_best, per_class)
        self.pushed = mirror.push(self.run, self.remote, self.pushed, self.cfg.dist.storage_retry_seconds)

    def finish(self, final: dict) -> None:
        super().finish(final)
        mirror.push(self.run, self.remote, self.pushed, self.cfg.dist.storage_retry_seconds)


def _run_local_trial(cfg, objectives: tuple, parent: Path, existing: Path | None, remote: str | None) -> None:
    from glmc_ray.data import class_names
    from glmc_ray.training.worker import run_worker

    state = None
    if existing is not None and (existing / rundir.CHECKPOINT).exists():
        state = rundir.restore_run(existing)
        report_evaluated(state["history"], objectives)  # Tune's view of the trial restarts with the restored epochs
        run = existing
        print(f"resuming trial run {run} at epoch {state['epoch']}", flush=True)
    elif existing is not None:
        run = existing
        rundir.write_metrics(run, [])
    else:
        run = rundir.new_run_dir(parent, cfg)
    # as the trainer: a trial that saved no epoch leaves no run directory (trials.csv and Tune's trial
    # folder keep its values and error)
    names = class_names(cfg)
    reporter = TuneReporter(run, cfg, objectives, names=names) if remote is None else \
        MirroredTuneReporter(run, cfg, objectives, remote, names)
    with rundir.removed_if_failed_start(run, fresh=state is None):
        run_worker(cfg, reporter, state=state)


def _run_ray_trial(cfg, options: SearchOptions, parent: Path, existing: Path | None, remote: str | None) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from glmc_ray.distributed import cluster, ray_train

    class ForwardEvaluated(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            record = {k: v for k, v in metrics[0].items() if k not in (ray_train.SCORE, ray_train.PER_CLASS)}
            if EVALUATED in record:
                super().after_report(run_context, [objectives_lib.with_values(record, objectives)], None)

    objectives = options.parsed_objectives()
    workers = options.workers_per_trial
    scaling = cluster.Scaling(workers, options.gpus_per_trial > 0, 1, options.cpus_per_trial / workers)
    # under a URI, Ray Train keeps the checkpoints and the copy of the run directory in `remote`/<run>
    ray_train.launch(cfg, scaling, parent, existing, storage=remote, callbacks=[ForwardEvaluated()])


# ----------------------------------------------------------------------------------------------- tuner

def tune_trainable(experiment: Path, base: config_lib.Config, opts: SearchOptions, function=run_trial):
    from ray import tune

    fn = tune.with_parameters(function, base=config_lib.to_dict(base), opts=asdict(opts),
                              experiment=location(experiment), command=shlex.join(sys.orig_argv))
    if opts.workers_per_trial > 1:  # the Train workers take the resources; the trial is their driver
        resources = {"CPU": 0.01}
    else:
        resources = {"CPU": opts.cpus_per_trial, "GPU": opts.gpus_per_trial}
    return tune.with_resources(fn, resources)


def storage_url(experiment: Path, opts: SearchOptions) -> str:
    return opts.storage_url or f"sqlite:///{experiment / 'study.db'}"


def study_storage(experiment: Path, opts: SearchOptions, base):
    """The study's database, riding out outages as the trials' storage does (base.dist.storage_retry_seconds)."""
    from glmc_ray.search.study_db import StudyStorage

    return StudyStorage(storage_url(experiment, opts), base.dist.storage_retry_seconds)


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the results: Optuna's 10, but a third of a small budget (a
    16-trial search would otherwise be 10 random points and 6 guided ones)."""
    return max(3, min(10, trials // 3))


def _searcher(experiment: Path, base, space: Space, opts: SearchOptions):
    import warnings

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" on the console
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE
        # group: TPE models each set of fields sampled together (a method's knobs) on the trials that
        # sampled them, as the conditional (define-by-run) space asks for
        sampler = optuna.samplers.TPESampler(seed=opts.seed, multivariate=True, group=True,
                                             n_startup_trials=startup_trials(opts.trials))
    first = space.point(base, sampled_only=True)  # the recipe itself is trial 1
    metric, mode = (opts.metrics, [MODE] * len(opts.metrics)) if opts.pareto else (opts.metrics[0], MODE)
    return OptunaSearch(space=space, metric=metric, mode=mode,
                        points_to_evaluate=[first], sampler=sampler, study_name=experiment.name,
                        storage=study_storage(experiment, opts, base))


def staging_root() -> Path:
    """Where the driver keeps its working copy of experiments that live on object storage."""
    return Path(os.environ.get("GLMC_STAGING", "~/.cache/glmc-ray")).expanduser() / "searches"


def new_experiment(output: str | Path, base) -> Path:
    """The experiment's local folder: the experiment itself, or the working copy of `output`/<name> when
    `output` is a URI (the name is checked free there first)."""
    if not storage.is_uri(output):
        return rundir.new_stamped_folder(output, f"{base.name}-search")
    experiment = rundir.new_stamped_folder(staging_root(), f"{base.name}-search")
    try:
        storage.check_free(storage.join(output, experiment.name), "--output", "search experiment")
    except storage.StorageError:
        experiment.rmdir()
        raise
    return experiment


def location(experiment: Path) -> str:
    """Where the experiment lives: its URI on object storage (search.json says), else its own folder (also for
    a folder of full-schedule runs alone, such as bench/methods.py's, which has no search.json)."""
    saved = experiment / SEARCH_FILE
    return (json.loads(saved.read_text()).get("location") if saved.is_file() else None) or str(experiment)


class Publish:
    """Uploads the driver's working copy of an experiment on object storage (study.db among its files)."""

    def __init__(self, experiment: Path):
        self.experiment, self.pushed = experiment, None

    def __call__(self) -> None:
        if storage.is_uri(location(self.experiment)):
            ride_out = config_lib.load(self.experiment / BASE_CONFIG).dist.storage_retry_seconds
            self.pushed = mirror.push(self.experiment, location(self.experiment), self.pushed, ride_out)


def publish_callback(experiment: Path):
    """A Tune callback that publishes the experiment when a trial starts (its Optuna trial was just asked)
    or ends (just told), so that the copy on storage stays at most one event behind the study."""
    from ray.tune import Callback

    class PublishOnTrialEvents(Callback):
        def __init__(self):
            self.publish = Publish(experiment)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.publish()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.publish()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.publish()

    return PublishOnTrialEvents()


def check_output(output: str | Path, opts: SearchOptions) -> None:
    """Trials write their run directories wherever Tune places them: on a cluster of several machines the
    experiment directory must be on storage every node sees (object storage, or a network filesystem)."""
    from glmc_ray.distributed import cluster

    if storage.is_uri(output):
        storage.check_writable(str(output), "--output")
        return
    if opts.storage_url is None:
        warn_sqlite_on_network(Path(output), "--output")
    hosts = cluster.cluster_hosts()
    try:
        cluster.check_shared_storage(str(Path(output).resolve()), hosts, hosts)
    except ValueError:
        raise ConfigError(f"--output {output} is on a node-local filesystem, but this cluster has {hosts} machines: "
                          f"trials write their run directories there; use an NFS mount every node sees") from None


def search(base, space: Space, opts: SearchOptions, output: str | Path) -> tuple[Path, bool]:
    """Start a search (Ray must be connected); returns the experiment directory with its outputs and whether
    every trial ran (False after an interruption such as Ctrl-C: Tune saved its state, --resume continues)."""
    check_resources(opts)
    check_output(output, opts)
    experiment = new_experiment(output, base)
    remote = storage.join(output, experiment.name) if storage.is_uri(output) else None
    config_lib.save(base, experiment / BASE_CONFIG)
    (experiment / SEARCH_FILE).write_text(json.dumps(
        {"options": asdict(opts), "space": space.to_json(), "location": remote}, indent=1))
    print(f"experiment directory: {remote or experiment}" + (f" (working copy {experiment})" if remote else ""),
          flush=True)
    from ray import tune

    tuner = tune.Tuner(
        tune_trainable(experiment, base, opts),
        tune_config=tune.TuneConfig(search_alg=_searcher(experiment, base, space, opts), num_samples=opts.trials,
                                    max_concurrent_trials=opts.concurrent, reuse_actors=True),
        run_config=tune_run_config(experiment, TUNE_DIR, location(experiment),
                                   lines=trial_lines_callback(space.keys(), opts.trials, opts.metrics)))
    _fit(tuner, experiment)  # an errored trial (NaN: FloatingPointError) is recorded and the search goes on
    return experiment, write_outputs(experiment)


def _fit(tuner, experiment: Path) -> None:
    """tuner.fit(); the study's database or the experiment's storage lost for longer than the window ends the
    search with the command that continues it (what Tune saved and the finished trials are kept)."""
    try:
        tuner.fit()
    except StorageLost as lost:
        raise StorageLost(f"{lost}; the finished trials are kept; resume with: python tuning/search.py --resume "
                          f"{location(experiment)}") from None


def tune_run_config(experiment: Path, name: str, storage_path: str, lines=None):
    """Tune's state in `storage_path`/`name`; `lines`: the console's trial lines (console.py), or None."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage_path, failure_config=tune.FailureConfig(max_failures=0),
                          callbacks=[publish_callback(experiment), *([lines] if lines else [])],
                          verbose=0)  # no status tables: a line per trial event (console.py); epochs in trials/


def tune_location(experiment: Path) -> str:
    """Tune's own state (its trial folders, experiment and searcher state), out of the way in `tune/`; an
    experiment made before it moved there keeps it in its own folder (its tuner.pkl says so)."""
    inside, own = storage.join(location(experiment), TUNE_DIR), location(experiment)
    if not storage.exists(inside) and storage.exists(storage.join(own, "tuner.pkl")):
        return own
    return inside


def read_experiment(experiment: Path) -> tuple[config_lib.Config, Space, SearchOptions]:
    saved = json.loads((experiment / SEARCH_FILE).read_text())
    return config_lib.load(experiment / BASE_CONFIG), Space.from_json(saved["space"]), \
        SearchOptions(**saved["options"])


def resume(experiment: str | Path) -> tuple[Path, bool]:
    """Continue an interrupted search: finished trials are kept, unfinished ones continue from their run
    directory's checkpoint, errored ones stay errored."""
    from ray import tune

    given = str(experiment)
    experiment = working_copy(given)
    if not (experiment / SEARCH_FILE).is_file():
        raise ConfigError(f"--resume {given}: not a search experiment directory (no {SEARCH_FILE})")
    if not tune.Tuner.can_restore(tune_location(experiment)):
        raise ConfigError(f"--resume {given}: Tune saved no experiment state there yet; start a new search")
    base, _, opts = read_experiment(experiment)
    check_resources(opts)
    print(f"resuming experiment {given}", flush=True)
    # Tune restores the run config it saved, the publishing callback with it
    tuner = tune.Tuner.restore(tune_location(experiment), trainable=tune_trainable(experiment, base, opts),
                               resume_unfinished=True, resume_errored=False, restart_errored=False)
    _fit(tuner, experiment)
    return experiment, write_outputs(experiment)


# ------------------------------------------------------------------------------ full-schedule runs

def working_copy(given: str) -> Path:
    """The local folder of an experiment given as a folder, or as a URI: its working copy in staging_root(),
    pulled from the URI when this machine has none (the head node that had it is gone)."""
    if not storage.is_uri(given):
        return Path(given).resolve()
    experiment = staging_root() / storage.name(given)
    if not (experiment / SEARCH_FILE).is_file():
        try:
            found = storage.exists(storage.join(given, SEARCH_FILE))
        except OSError as err:
            raise storage.StorageError(f"--resume {given}: {storage.explain(err)}") from None
        if not found:
            raise ConfigError(f"--resume {given}: not a search experiment (no {SEARCH_FILE} there)")
        mirror.pull(given, experiment)
        print(f"restored the working copy {experiment} from {given}", flush=True)
    return experiment


# ----------------------------------------------------------------------------------------------- outputs

def trial_rows(experiment: Path) -> tuple[list[dict], Space]:
    """One row per Tune trial, in creation order: id, status, searched values, objectives, test top-1, s.
    A field the trial's choices did not search (another method's knob) is None: an empty cell."""
    from ray.tune import ExperimentAnalysis

    _, space, opts = read_experiment(experiment)
    metrics = opts.metrics
    analysis = ExperimentAnalysis(tune_location(experiment))
    fs, _ = storage.resolve(location(experiment))  # trial.path is a path in it
    rows = []
    for trial in sorted(analysis.trials, key=creation_number):
        last = trial.last_result or {}
        ok = trial.status == "TERMINATED" and all(last.get(key) is not None for key in metrics)
        rows.append({"number": creation_number(trial), "trial_id": trial.trial_id,
                     "status": "complete" if ok else trial.status.lower(),
                     **{key: trial.config.get(key) for key in space.keys()},
                     **{key: last.get(key) if ok else None for key in metrics}, "test_top1": last.get("test_top1"),
                     "seconds": round(last["time_total_s"], 1) if "time_total_s" in last else None,
                     "error": error_line(fs, trial)})
    for row in rows:
        if row["status"] == "error":
            row["status"] = "failed"
    return rows, space


def write_outputs(experiment: Path) -> bool:
    """trials.csv, the winner's best_config.yaml (full schedule) or, with several objectives, the Pareto front
    (pareto.py), and the plots; returns whether every trial ran."""
    rows, space = trial_rows(experiment)
    base, _, opts = read_experiment(experiment)
    searched = space.keys()  # a conditional field's cell is empty where it was not searched
    columns = ["number", "trial_id", "status", *searched, *opts.metrics, "test_top1", "seconds", "error"]
    with open(experiment / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    done = [r for r in rows if r["status"] == "complete"]
    failed = sum(r["status"] == "failed" for r in rows)
    unfinished = len(rows) - len(done) - failed
    metric = opts.metrics[0]
    best = max(done, key=lambda r: r[metric]) if done and not opts.pareto else None
    if best is not None:  # train.epochs stays the base's: the full schedule
        cfg = apply_values(base, space.active(best))
        config_lib.save(cfg, experiment / "best_config.yaml")
    write_plots(experiment)
    if opts.pareto:
        front = pareto.write_front(experiment, rows, space, base, opts.metrics)
        print(pareto.front_table(front, opts.metrics, searched) if front else "no trial completed", flush=True)
    else:
        print(best_table(rows, searched, metric) or "no trial completed", flush=True)
    print(f"{len(rows)} trials ({len(done)} complete, {failed} failed, {unfinished} unfinished); "
          f"trials.csv in {experiment}", flush=True)
    interrupted = bool(unfinished or len(rows) < opts.trials)
    if not interrupted:
        close_stale_trials(experiment, base, opts)
    Publish(experiment)()
    if interrupted:
        print(f"the search was interrupted; continue it: python tuning/search.py --resume {location(experiment)}",
              flush=True)
    if best is not None:
        print(f"best trial {best['number']} ({best['trial_id']}): {metric} {best[metric]:.2f} (test top-1 "
              f"{best['test_top1']:.2f}, not optimised on); train it: python -m glmc_ray.train --config "
              f"{experiment / 'best_config.yaml'}", flush=True)
    elif opts.pareto and done:
        print(f"pick a trade-off: each point's config is in {experiment / pareto.FOLDER} (pareto.csv, pareto.png); "
              f"train one: python -m glmc_ray.train --config {experiment / pareto.FOLDER}/trial_<number>.yaml",
              flush=True)
    elif not done:
        print("no trial completed: no best_config.yaml", flush=True)
    return not interrupted


def close_stale_trials(experiment: Path, base, opts: SearchOptions) -> int:
    """Once every Tune trial has ended: Optuna trials still RUNNING were asked by a driver that was killed
    before Tune saved them (no Tune trial ran them); mark them FAIL so the study says what happened."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=experiment.name, storage=study_storage(experiment, opts, base))
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def write_plots(experiment: Path) -> list[Path]:
    """The plots of the persisted study (what `optuna-dashboard` would read too): study_plots.py."""
    import optuna

    from glmc_ray.search.study_plots import write_study_plots

    base, _, opts = read_experiment(experiment)
    return write_study_plots(optuna.load_study(study_name=experiment.name,
                                               storage=study_storage(experiment, opts, base)), experiment,
                             opts.metrics)


def set_environment() -> None:
    """Before Tune is imported: no per-snapshot sync warnings (the experiment is on local disk)."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's console output: the legacy reporter at verbose 0 prints nothing; the new one (AIR output) still
    # prints its experiment box and paths. The search prints its own lines (console.py).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
