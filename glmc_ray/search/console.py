"""What a search prints: one line per trial event (started with its values, finished with its objective,
failed with its reason) and, at the end, the best trials with any tie named. Tune's own status tables stay
off the console (`RunConfig(verbose=0)`); its state is in the experiment's `tune/` folder."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow.fs as pafs

EVALUATED = "val_balanced_top1"  # in every record of an evaluated epoch (the search needs a validation split)


def creation_number(trial) -> int:
    """Tune's 1-based creation index, from its trial folder `<trainable>_<id>_<n>_<values>_<date>` (the
    order in which Optuna was asked: normally Optuna's trial number is this minus one)."""
    match = re.search(rf"_{re.escape(trial.trial_id)}_(\d+)_", Path(trial.path).name)
    return int(match.group(1)) if match else 0


def error_line(fs: pafs.FileSystem, trial) -> str:
    """The exception line of a failed trial (Tune's error.txt in its trial folder), e.g. the non-finite loss."""
    path = f"{trial.path}/error.txt"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return ""
    with fs.open_input_stream(path) as stream:
        return _last_line(stream.read().decode(errors="replace"))


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_lines_callback(searched: list[str], total: int, metrics: list[str]):
    """A Tune callback printing a line per trial event; `searched`: the space's fields (those a trial sampled
    are shown), `total`: the trials asked for, `metrics`: the objectives (the best so far of a single one)."""
    def values(trial) -> str:
        return " ".join(f"{k}={_value(trial.config[k])}" for k in searched if trial.config.get(k) is not None)

    return _event_lines(total, lambda trial: f"trial {creation_number(trial)}", values, metrics,
                        keep_best=len(metrics) == 1)


def full_lines_callback(total: int, epochs: int, metric: str):
    """The same lines for the full-schedule runs after a search (glmc_ray/search/full.py): each named by the
    trial whose values it trains (or the recipe) and its train seed, with the search's objective `metric`;
    their test top-1 is shown, not chosen on."""
    def name(trial) -> str:
        job = trial.config["job"]
        return f"full run {job['label']} seed {job['seed']}"

    return _event_lines(total, name, lambda trial: f"{epochs} epochs", [metric], keep_best=False)


def _event_lines(total: int, name, values, metrics: list[str], keep_best: bool):
    from ray.tune import Callback

    class EventLines(Callback):
        def __init__(self):
            self.done, self.best = 0, None

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"{name(trial)} started: {values(trial)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            result = trial.last_result or {}
            scores = [result.get(metric) for metric in metrics]
            if keep_best and scores[0] is not None and (self.best is None or scores[0] > self.best[0]):
                self.best = (scores[0], creation_number(trial))
            said = ", ".join(f"{m} {s:.2f}" for m, s in zip(metrics, scores, strict=True) if s is not None)
            said = said or "no objective"
            if not keep_best and result.get("test_top1") is not None:
                said += f", test top-1 {result['test_top1']:.2f}"
            best = f"; best so far {self.best[0]:.2f} (trial {self.best[1]})" if self.best else ""
            print(f"{name(trial)} finished in {result.get('time_total_s', 0):.0f} s: {said} "
                  f"({self.done} of {total} ended{best})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            # Tune has just written error.txt in the trial's folder on the driver (its storage copy follows)
            written = Path(trial.error_file) if trial.error_file else None
            reason = _last_line(written.read_text(errors="replace")) if written and written.is_file() else ""
            print(f"{name(trial)} failed: {reason or 'see its error.txt'} ({self.done} of {total} ended)", flush=True)

    return EventLines()


def best_table(rows: list[dict], searched: list[str], metric: str, top: int = 5) -> str:
    """The best `top` complete trials by `metric`, best first, with the fields each searched; trials tied with
    the best are named, and which one best_config.yaml takes (the first asked)."""
    done = sorted((r for r in rows if r["status"] == "complete"), key=lambda r: (-r[metric], r["number"]))
    if not done:
        return ""
    lines = [f"best trials by {metric} (validation; test top-1 is never optimised on):"]
    for r in done[:top]:
        values = " ".join(f"{k}={_value(r[k])}" for k in searched if r.get(k) not in (None, ""))
        lines.append(f"  trial {r['number']:>3}  {r[metric]:6.2f}  test {r['test_top1']:6.2f}  {values}")
    tied = [r["number"] for r in done if r[metric] == done[0][metric]]
    if len(tied) > 1:
        lines.append(f"trials {', '.join(map(str, tied))} tie at {done[0][metric]:.2f}; best_config.yaml is trial "
                     f"{tied[0]}'s (the first asked): compare them with --final-seeds or more epochs")
    return "\n".join(lines)
