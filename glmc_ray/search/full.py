"""The full-schedule stages after a search (glmc_ray/search/trials.py): the fidelity check (trials re-trained with the
full schedule, Spearman of the short against the full objective) and the final seeds (the winner and the recipe,
several train seeds). Each run is a Tune trial of its own, named by label and seed under <experiment>/full/, so a
run both stages need is trained once and a repeated call continues or reuses it. bench/methods.py trains its
method rows the same way (`train_full`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.core import storage
from glmc_ray.core.config import ConfigError
from glmc_ray.runs import comparison, mirror, plots, rundir
from glmc_ray.search.console import full_lines_callback
from glmc_ray.search.objectives import with_values
from glmc_ray.search.options import SearchOptions, check_resources
from glmc_ray.search.space import Space, apply_values, same_value
from glmc_ray.search.trials import (
    Publish,
    location,
    read_experiment,
    train_run,
    trial_rows,
    tune_run_config,
    tune_trainable,
)

FULL_DIR = "full"  # full-schedule runs: the fidelity check and the final seeds
RECIPE = "recipe"  # the label of the base config's own values
FINAL_METRICS = ["val_balanced_top1", "top1", "balanced_top1", "many", "medium", "few", "posthoc_top1"]


def run_full(config: dict, base: dict, opts: dict, experiment: str, command: str) -> None:
    """The Tune function trainable of a full-schedule run (the base's train.epochs, not --trial-epochs):
    config["job"] is a FullRun. Its run directory is named by label and seed, so that the fidelity check
    and the final seeds share a run they both need, and a repeated call continues or reuses it."""
    job = FullRun(**config["job"])
    cfg = apply_values(config_lib.from_dict(base), {**job.values, "train.seed": job.seed})
    cfg.name = job.run_name(cfg.name)
    train_run(cfg, SearchOptions(**opts), Path(experiment) / FULL_DIR, command)


@dataclass(frozen=True)
class FullRun:
    label: str  # RECIPE for the base's own values, else the Tune trial id whose values these are
    values: dict
    seed: int

    def run_name(self, base_name: str) -> str:
        return f"{base_name}-{self.label}-seed{self.seed}"


def full_job(row: dict, space: Space, base, seed: int) -> FullRun:
    """The full-schedule run of a trial's values (those its choices searched; the recipe's own are RECIPE)."""
    values = space.active(row)
    recipe = space.point(base)
    is_recipe = values.keys() == recipe.keys() and all(same_value(v, recipe[k]) for k, v in values.items())
    return FullRun(RECIPE if is_recipe else row["trial_id"], values, seed)


def train_full(experiment: Path, base, opts: SearchOptions, jobs: list[FullRun]) -> list[dict]:
    """Train the jobs' full schedules as Tune trials (as many at once as the search ran), then return
    each run's last-epoch validation and test results. Runs finished earlier are not trained again."""
    from ray import tune

    check_resources(opts)
    unique = list({_job_key(asdict(job)): job for job in jobs}.values())
    print(f"full schedule: {len(unique)} runs of {base.train.epochs} epochs, {opts.concurrent} at once (runs "
          f"finished before are not trained again); each run's epochs: {experiment / FULL_DIR}", flush=True)
    tuner = tune.Tuner(
        tune_trainable(experiment, base, opts, run_full),
        param_space={"job": tune.grid_search([asdict(job) for job in unique])},
        tune_config=tune.TuneConfig(max_concurrent_trials=opts.concurrent, reuse_actors=True),
        run_config=tune_run_config(experiment, rundir.new_stamped_folder(experiment / FULL_DIR / "tune", "full").name,
                                   storage.join(location(experiment), FULL_DIR, "tune"),
                                   lines=full_lines_callback(len(unique), base.train.epochs, opts.metrics[0])))
    errored = {_job_key(result.config["job"]) for result in tuner.fit() if result.error is not None}
    return [full_result(experiment, base, job, _job_key(asdict(job)) in errored, opts) for job in jobs]


def _job_key(job: dict) -> str:
    return json.dumps(job, sort_keys=True)


def full_result(experiment: Path, base, job: FullRun, errored: bool, opts: SearchOptions) -> dict:
    """The run's last-epoch validation and test results and the search's objectives; status failed (its trial
    raised) or unfinished (interrupted)."""
    run = mirror.find(storage.join(location(experiment), FULL_DIR), job.run_name(base.name))
    row = {"label": job.label, "seed": job.seed, "run": run}
    final = storage.join(run, "final.json") if run else None
    if final is None or not storage.exists(final):
        return {**row, "status": "failed" if errored else "unfinished"}
    last = json.loads(storage.read_text(*storage.resolve(final)))["last"]
    flat = {f"{split}_{key}": value for split in ("val", "test") for key, value in last[split].items()
            if not isinstance(value, list | dict)}
    return {**row, "status": "complete", **with_values(flat, opts.parsed_objectives())}


def full_stages(experiment: Path, fidelity: int, seeds: int) -> dict | None:
    """The stages after a search, with the full schedule: the fidelity check (`fidelity` trials spread over
    the ranking, and the recipe) and the final seeds (the winner and the recipe, `seeds` train seeds each).
    Their runs go to Tune as one list (the check's first), so no slot idles between the stages and a run
    both need is trained once; then each stage writes its report (fidelity.json, final_seeds.json). None
    when the runs were interrupted: nothing is reported, the same call continues them."""
    rows, space = trial_rows(experiment)
    base, _, opts = read_experiment(experiment)
    if opts.pareto:
        raise ConfigError(f"--fidelity-check and --final-seeds rank the trials by one objective; {experiment} has "
                          f"several (--pareto {' '.join(opts.objectives)}): pick a point of its Pareto front "
                          f"(pareto/trial_<number>.yaml) and train it with python -m glmc_ray.train")
    metric = opts.metrics[0]
    ranked = sorted((r for r in rows if r["status"] == "complete"), key=lambda r: -r[metric])
    if not ranked:
        raise ConfigError(f"no trial of {experiment} completed: nothing to train with the full schedule")
    checked = _spread(ranked, fidelity) if fidelity else []
    check_jobs = [full_job(r, space, base, base.train.seed) for r in checked]
    groups = {"found": full_job(ranked[0], space, base, 0), "recipe": FullRun(RECIPE, space.point(base), 0)}
    train_seeds = [base.train.seed + i for i in range(seeds)]
    seed_jobs = [FullRun(job.label, job.values, seed) for job in groups.values() for seed in train_seeds]
    results = train_full(experiment, base, opts, check_jobs + seed_jobs)
    if any(r["status"] == "unfinished" for r in results):  # interrupted (Ctrl-C): no report from part of the runs
        print("the full-schedule runs were interrupted; repeat the command to continue them", flush=True)
        return None
    reports = {}
    if fidelity:
        short_epochs = opts.trial_epochs or base.train.epochs
        reports["fidelity"] = fidelity_report(experiment, (short_epochs, base.train.epochs), checked,
                                              results[:len(check_jobs)], metric)
    if seeds:
        by_group = {name: results[len(check_jobs) + i * seeds:][:seeds] for i, name in enumerate(groups)}
        reports["final_seeds"] = final_seeds_report(experiment, base.train.epochs, ranked[0], groups,
                                                    train_seeds, by_group)
    Publish(experiment)()
    return reports


def _spread(ranked: list[dict], count: int) -> list[dict]:
    """`count` rows at evenly spaced ranks (best and worst included), and the recipe (trial 1), in rank order."""
    picked = {ranked[round(i * (len(ranked) - 1) / max(count - 1, 1))]["trial_id"] for i in range(count)}
    picked |= {r["trial_id"] for r in ranked if r["number"] == 1}
    return [r for r in ranked if r["trial_id"] in picked]


def fidelity_report(experiment: Path, epochs: tuple[int, int], checked: list[dict], results: list[dict],
                    metric: str) -> dict:
    """The Spearman rank correlation of the checked trials' short-schedule objective (`metric`) with the full
    schedule's (`epochs`: their lengths): whether the short schedule ranks configurations as the full one does."""
    pairs = [{"trial_id": r["trial_id"], "number": r["number"], "short": r[metric], **result}
             for r, result in zip(checked, results, strict=True)]
    complete = [p for p in pairs if p["status"] == "complete"]
    report = {"short_epochs": epochs[0], "full_epochs": epochs[1], "metric": metric,
              "spearman": spearman([p["short"] for p in complete], [p[metric] for p in complete]),
              "pairs": pairs}
    (experiment / "fidelity.json").write_text(json.dumps(report, indent=1))
    plots.fidelity_plot(complete, report, experiment / "fidelity.png")
    rho = "n/a (fewer than 3)" if report["spearman"] is None else f"{report['spearman']:.2f}"
    print(f"fidelity check: {len(complete)} configurations, {metric} after {report['short_epochs']} vs "
          f"{report['full_epochs']} epochs, Spearman {rho}; fidelity.json in {experiment}", flush=True)
    return report


def final_seeds_report(experiment: Path, epochs: int, best: dict, groups: dict, seeds: list[int],
                       by_group: dict) -> dict:
    """Mean and standard deviation over the train seeds of the winner's and the recipe's results, as
    glmc_ray.compare computes them from the runs' final.json (`summary`: each group's, and its failed runs)."""
    compared = [comparison.Group(name, [comparison.read_run(r["run"]) for r in rows if r["status"] == "complete"])
                for name, rows in by_group.items()]
    compared = [group for group in compared if group.runs]
    summary = {group.name: {**group.summary(), "failed": sum(r["status"] != "complete" for r in by_group[group.name])}
               for group in compared}
    report = {"seeds": seeds, "epochs": epochs, "best_trial": best["trial_id"],
              "values": {name: job.values for name, job in groups.items()}, "summary": summary, "runs": by_group}
    (experiment / "final_seeds.json").write_text(json.dumps(report, indent=1))
    shown = comparison.shown_metrics(compared, FINAL_METRICS)
    print(f"full schedule ({epochs} epochs), train seeds {seeds}, mean ± std "
          f"(python -m glmc_ray.compare {experiment / FULL_DIR} for every run):\n"
          f"{comparison.markdown_table(compared, shown)}", flush=True)
    return report


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank)."""
    import numpy as np
    import pandas as pd

    if len(a) < 3:
        return None
    ranks = np.corrcoef(pd.Series(a).rank(), pd.Series(b).rank())
    return float(ranks[0, 1])
