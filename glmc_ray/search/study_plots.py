"""The search's plots from its Optuna study: Optuna's optimisation history and parameter importances, and a
slice plot of our own that stays readable for conditional spaces (Optuna's puts every field in one row, 15
panels for configs/search/methods.yaml): a grid of one panel per field that enough complete trials sampled."""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

COLUMNS = 4
SAMPLED_BY_AT_LEAST = 2  # complete trials a field needs for a slice panel


def write_study_plots(study: optuna.Study, folder: Path, metrics: list[str]) -> list[Path]:
    """optimization_history.png, slice.png and (with 2 complete trials or more) param_importances.png, of the
    first objective `metrics[0]` (a multi-objective study's front is pareto.png: glmc_ray/search/pareto.py)."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    first = {"target": lambda t: t.values[0], "target_name": metrics[0]} if len(metrics) > 1 else {}
    plots = {"optimization_history.png": lambda: _figure(ovm.plot_optimization_history(study, **first)),
             "slice.png": lambda: slice_grid(complete, metrics[0])}
    if len(complete) >= 2:
        plots["param_importances.png"] = lambda: _figure(ovm.plot_param_importances(study, **first))
    written = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's "experimental" warnings on every plot
                figure = plot()
            figure.savefig(folder / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(folder / name)
        except Exception as err:  # a plot is a convenience; never lose trials.csv over one
            print(f"note: {name} not written ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
    return written


def _figure(axes):
    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
    figure.set_size_inches(max(figure.get_size_inches()[0], 8), 6)
    return figure


def slice_grid(complete: list, metric: str) -> plt.Figure:
    """The (first) objective `metric` against each field's value, a panel per field sampled by
    SAMPLED_BY_AT_LEAST complete trials (a conditional field only in the trials that sampled it), COLUMNS panels a
    row; log axes for log ranges."""
    fields = sorted({k for t in complete for k in t.params})
    fields = [k for k in fields if sum(k in t.params for t in complete) >= SAMPLED_BY_AT_LEAST]
    rows = max(1, math.ceil(len(fields) / COLUMNS))
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(4 * COLUMNS, 3.2 * rows), squeeze=False)
    for ax, field in zip(axes.flat, fields, strict=False):
        trials = [t for t in complete if field in t.params]
        values, scores = [t.params[field] for t in trials], [t.values[0] for t in trials]
        distribution = trials[0].distributions[field]
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            labels = [str(c) for c in distribution.choices]
            ax.scatter([labels.index(str(v)) for v in values], scores, s=18)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        else:
            ax.scatter(values, scores, s=18)
            if getattr(distribution, "log", False):
                ax.set_xscale("log")
        ax.set_title(f"{field} ({len(trials)} trials)", fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
    for ax in list(axes.flat)[len(fields):]:
        ax.axis("off")
    if not fields:
        axes.flat[0].text(0.5, 0.5, "no field was sampled by two complete trials", ha="center", va="center")
    figure.tight_layout()
    return figure
