"""The Pareto front of a multi-objective search (`--pareto`): the complete trials no other trial beats in every
objective, as a table on the console, pareto.csv / pareto.json, pareto.png (every trial, the front joined), and
each point's config (pareto/trial_<number>.yaml, the full schedule) so a user picks a trade-off and trains it."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.runs import plots
from glmc_ray.search.objectives import pareto_front
from glmc_ray.search.space import Space, apply_values

FOLDER = "pareto"


def write_front(experiment: Path, rows: list[dict], space: Space, base, keys: list[str]) -> list[dict]:
    """The front of `rows` on `keys`, written beside trials.csv; returns it (best first objective first)."""
    front = sorted(pareto_front(rows, keys), key=lambda r: (-r[keys[0]], r["number"]))
    folder = experiment / FOLDER
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("trial_*.yaml"):  # a resumed search's front moves on
        stale.unlink()
    for row in front:
        config_lib.save(apply_values(base, space.active(row)), folder / f"trial_{row['number']}.yaml")
    columns = ["number", "trial_id", *keys, "test_top1", *space.keys()]
    with open(experiment / "pareto.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(front)
    points = [{**{k: row[k] for k in ("number", "trial_id", *keys, "test_top1")}, "values": space.active(row),
               "config": f"{FOLDER}/trial_{row['number']}.yaml"} for row in front]
    (experiment / "pareto.json").write_text(json.dumps({"objectives": keys, "front": points}, indent=1))
    done = [r for r in rows if r["status"] == "complete"]
    if done:
        plots.pareto_plot(done, front, keys, experiment / "pareto.png")
    return front


def front_table(front: list[dict], keys: list[str], searched: list[str]) -> str:
    lines = [f"Pareto front of {', '.join(keys)} (validation; {len(front)} trials no other beats in all of them):"]
    for row in front:
        values = " ".join(f"{k}={_short(row[k])}" for k in searched if row.get(k) not in (None, ""))
        scores = "  ".join(f"{row[k]:6.2f}" for k in keys)
        lines.append(f"  trial {row['number']:>3}  {scores}  test {row['test_top1']:6.2f}  {values}")
    return "\n".join(lines)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
