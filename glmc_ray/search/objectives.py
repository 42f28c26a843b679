"""What a search optimises, always on the validation split (never the test set): one objective (`--objective`)
or several at once (`--pareto`: Optuna's multi-objective TPE, and the Pareto front of the trials).

An objective is a validation metric of a trial's last epoch, or a weighted mix of them:

    balanced_top1            the mean per-class accuracy (the default: what long-tail papers report)
    top1                     accuracy over images (on a long-tailed validation split, mostly the head)
    many | medium | few      the mean accuracy of the classes with > 100, 20-100, < 20 training images
    worst                    the worst class's accuracy
    0.7*balanced_top1+0.3*few  a weighted sum (weights are numbers, terms are the names above)

A plain name is reported to Tune under the record's own key (val_balanced_top1, val_few, ...); a mix under
`objective_<k>` (its place in the list, from 1). Larger is better for all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from glmc_ray.core.config import ConfigError

NAMES = {"balanced_top1": "mean per-class accuracy", "top1": "accuracy over images",
         "many": "classes with > 100 training images", "medium": "classes with 20-100",
         "few": "classes with < 20", "worst": "the worst class"}
DEFAULT = "balanced_top1"
TERM = re.compile(r"^\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?([a-z_0-9]+)\s*$")


@dataclass(frozen=True)
class Objective:
    spec: str
    terms: tuple[tuple[float, str], ...]  # (weight, name)
    position: int  # 1-based, among the search's objectives

    @property
    def key(self) -> str:
        """The result key Tune and Optuna see, trials.csv's column."""
        (weight, name), *rest = self.terms
        return f"val_{name}" if not rest and weight == 1.0 else f"objective_{self.position}"

    def value(self, record: dict) -> float | None:
        """The objective of an epoch record (None where the record lacks a term: an epoch without evaluation,
        or no class in a shot group)."""
        values = [record.get(f"val_{name}") for _, name in self.terms]
        if any(v is None for v in values):
            return None
        return sum(weight * v for (weight, _), v in zip(self.terms, values, strict=True))


def parse(specs: list[str], option: str = "--objective") -> tuple[Objective, ...]:
    """The objectives of `specs`; an unknown name, a malformed term or the same objective twice is an error
    naming `option` and the spec."""
    found = []
    for position, spec in enumerate(specs, start=1):
        terms = []
        for text in str(spec).split("+"):
            match = TERM.match(text)
            if not match or match.group(2) not in NAMES:
                raise ConfigError(f"{option} {spec}: {text.strip()!r} is not an objective; expected one of "
                                  f"{', '.join(NAMES)}, or a weighted sum such as 0.7*balanced_top1+0.3*few",
                                  option)
            terms.append((float(match.group(1) or 1.0), match.group(2)))
        objective = Objective(str(spec), tuple(terms), position)
        if any(o.terms == objective.terms for o in found):
            raise ConfigError(f"{option}: {spec} is given twice", option)
        found.append(objective)
    return tuple(found)


def with_values(record: dict, objectives: tuple[Objective, ...]) -> dict:
    """The record with each mixed objective's value added (a plain one is the record's own key)."""
    return {**record, **{o.key: o.value(record) for o in objectives if o.key not in record}}


def dominates(a: dict, b: dict, keys: list[str]) -> bool:
    """Row a is at least as good as b in every objective and better in one (all maximised)."""
    return all(a[k] >= b[k] for k in keys) and any(a[k] > b[k] for k in keys)


def pareto_front(rows: list[dict], keys: list[str]) -> list[dict]:
    """The complete trials no other complete trial dominates, in trial order."""
    done = [r for r in rows if r["status"] == "complete" and all(r.get(k) is not None for k in keys)]
    return [r for r in done if not any(dominates(other, r, keys) for other in done)]
