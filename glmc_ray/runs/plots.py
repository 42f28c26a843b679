"""PNG plots people would rather look at than read."""
from __future__ import annotations

import functools
import threading
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from glmc_ray.core.evaluation import FEW_BELOW, MANY_ABOVE  # noqa: E402

# pyplot's figure manager and the mathtext parser behind log-scale tick labels are process-wide state: two runs
# finishing at once in one driver (Ray Train fits from threads) garbled each other's labels (ParseException).
_PLOTTING = threading.Lock()
NAMED_AT_MOST = 20  # classes named under their bars; more would overlap
SHOT_LABELS = {"many": f"Many (>{MANY_ABOVE})", "medium": f"Medium ({FEW_BELOW}-{MANY_ABOVE})",
               "few": f"Few (<{FEW_BELOW})"}


def _one_at_a_time(plot):
    @functools.wraps(plot)
    def locked(*args, **kwargs):
        with _PLOTTING:
            return plot(*args, **kwargs)
    return locked


@_one_at_a_time
def per_class_plot(per_class: list, class_counts: list[int], path: Path, title: str,
                   names: list[str] | None = None) -> None:
    """Per-class accuracy (bars, classes sorted by training count) against the training count (line); up to
    NAMED_AT_MOST classes are named under their bars (where the data names them)."""
    order = sorted(range(len(class_counts)), key=lambda c: -class_counts[c])
    accuracy = [per_class[c] if per_class[c] is not None else 0.0 for c in order]
    counts = [class_counts[c] for c in order]
    colours = ["tab:blue" if n > MANY_ABOVE else "tab:orange" if n >= FEW_BELOW else "tab:red" for n in counts]
    fig, ax = plt.subplots(figsize=(max(6.0, min(18.0, 0.12 * len(order) + 4)), 4))
    ax.bar(range(len(order)), accuracy, color=colours, width=1.0 if len(order) > 50 else 0.8)
    ax.set_xlabel("class (sorted by training count)")
    if names and len(order) <= NAMED_AT_MOST:
        ax.set_xticks(range(len(order)), [names[c] for c in order], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    twin = ax.twinx()
    twin.plot(range(len(order)), counts, color="black", linewidth=1.2)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange", "tab:red")]
    ax.legend(handles, list(SHOT_LABELS.values()),
              loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    ax.set_title(title)
    _save(fig, path)


@_one_at_a_time
def methods_per_class_plot(per_class: dict[str, list], class_counts: list[int], path: Path, title: str) -> None:
    """Per-class test accuracy of several methods (one line each, classes sorted by training count), with the
    training count behind them: where each method trades head classes for tail classes."""
    order = sorted(range(len(class_counts)), key=lambda c: -class_counts[c])
    fig, ax = plt.subplots(figsize=(max(7.0, min(18.0, 0.12 * len(order) + 5)), 4.5))
    twin = ax.twinx()
    twin.bar(range(len(order)), [class_counts[c] for c in order], color="0.88", width=0.8)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log, grey bars)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    for label, accuracy in per_class.items():
        ax.plot(range(len(order)), [accuracy[c] if accuracy[c] is not None else 0.0 for c in order],
                marker="o", markersize=3, linewidth=1.2, label=label)
    ax.set_xlabel("class (sorted by training count)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(5, len(per_class)), fontsize=8, frameon=False)
    ax.set_title(title)
    _save(fig, path)


@_one_at_a_time
def fidelity_plot(pairs: list[dict], report: dict, path: Path) -> None:
    """Each checked configuration's objective after the short schedule (x) and the full one (y)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for pair in pairs:
        recipe = pair["label"] == "recipe"
        full = pair[report["metric"]]
        ax.scatter(pair["short"], full, color="tab:red" if recipe else "tab:blue", zorder=2)
        ax.annotate("recipe" if recipe else f"#{pair['number']}", (pair["short"], full),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    rho = report["spearman"]
    ax.set_title(f"{report['metric']}: Spearman {rho:.2f}" if rho is not None else report["metric"])
    ax.set_xlabel(f"after the {report['short_epochs']}-epoch schedule (search)")
    ax.set_ylabel(f"after the {report['full_epochs']}-epoch schedule")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@_one_at_a_time
def shot_groups_plot(groups: dict[str, dict], path: Path, title: str) -> None:
    """Many / Medium / Few test accuracy of each group (bars side by side, the std over its runs as error bars);
    `groups`: name -> {"many"|"medium"|"few": {"mean", "std"}}. A shot group no class falls in is left out."""
    import numpy as np

    shots = [s for s in ("many", "medium", "few") if any(g[s]["mean"] is not None for g in groups.values())]
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * len(shots) / 2 + 3), 4))
    for i, (name, stats) in enumerate(groups.items()):
        means = [stats[s]["mean"] or 0.0 for s in shots]
        errors = [stats[s]["std"] or 0.0 for s in shots]
        ax.bar(np.arange(len(shots)) + (i - (len(groups) - 1) / 2) * width, means, width, yerr=errors, capsize=3,
               label=name)
    ax.set_xticks(range(len(shots)), [SHOT_LABELS[s] for s in shots])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(groups)), fontsize=8, frameon=False)
    ax.set_title(title)
    _save(fig, path)


@_one_at_a_time
def pareto_plot(rows: list[dict], front: list[dict], keys: list[str], path: Path) -> None:
    """Every complete trial's first two objectives (grey), the Pareto front's points joined and numbered;
    a third objective, where searched, is the front's colour."""
    x, y = keys[0], keys[1]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    ax.scatter([r[x] for r in rows], [r[y] for r in rows], s=18, color="0.7", label="trials")
    ordered = sorted(front, key=lambda r: r[x])
    colour = {"c": [r[keys[2]] for r in ordered], "cmap": "viridis"} if len(keys) > 2 else {"color": "tab:red"}
    points = ax.scatter([r[x] for r in ordered], [r[y] for r in ordered], s=36, zorder=3, label="Pareto front",
                        **colour)
    ax.plot([r[x] for r in ordered], [r[y] for r in ordered], color="tab:red", linewidth=1, zorder=2)
    for r in ordered:
        ax.annotate(str(r["number"]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(keys) > 2:
        fig.colorbar(points, ax=ax, label=keys[2])
    ax.set_xlabel(f"{x} (validation)")
    ax.set_ylabel(f"{y} (validation)")
    ax.legend(fontsize=8)
    ax.set_title(f"{len(front)} of {len(rows)} trials on the Pareto front")
    _save(fig, path)
