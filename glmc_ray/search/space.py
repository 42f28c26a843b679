"""The search space as a search runs it: its fields (`Param`), conditional branches (`Branch`) and what Optuna
samples from it (`Space`).

A space holds config fields and their ranges, and under `when:` conditions KEY=VALUE (KEY a choice searched
above) the fields searched (or fixed) only in trials whose KEY took VALUE: each method's knobs once
`method.name` is a choice, the power shape's exponent. Optuna samples it define-by-run (`Space` is the
function OptunaSearch calls), so a trial, its Optuna record and its trials.csv row hold only the fields its
choices searched, and a trial with another method than the base's gets a fresh method section
(`apply_values`). `Space.to_json`/`Space.from_json` keep the space in an experiment's search.json. A space
file is read and checked by glmc_ray/search/space_file.py; the search driver (glmc_ray/search/trials.py)
runs the trials.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from glmc_ray.core import config as config_lib
from glmc_ray.core.config import ConfigError

FIXED = "fixed"  # {fixed: VALUE}: a branch's trials all take VALUE (DeiT-LT's model.arch when it is chosen)
KINDS = ("float", "int", "choice", FIXED)
WHEN = "when"  # a space file's conditional part: when: {KEY=VALUE: {fields searched only then}}


@dataclass(frozen=True)
class Param:
    """One searched field: `kind` float/int with `low`/`high` (and `log`), choice with `choices`, or fixed with
    its one value in `choices` (set, not sampled: Optuna does not see it; Tune's config and trials.csv do)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    @property
    def value(self):
        return self.choices[0]  # a fixed field's

    def suggest(self, trial):
        """Sample this field in an Optuna trial (define-by-run: only the fields a trial asks for are recorded)."""
        if self.kind == FIXED:
            return self.value
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value) -> bool:
        if self.kind in ("choice", FIXED):
            return any(same_value(value, choice) for choice in self.choices)
        return self.low <= value <= self.high

    def ends(self) -> tuple:
        """The values a space check builds a config with: each choice, or both bounds."""
        return self.choices if self.kind in ("choice", FIXED) else (self.low, self.high)


_UNSET = object()  # a choice not (yet) made


def same_value(a, b) -> bool:
    """Equality that keeps true apart from 1 (YAML and JSON give both)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


@dataclass(frozen=True)
class Branch:
    """`when: KEY=VALUE: {...}`: a sub-space sampled only in trials whose choice KEY took VALUE."""

    key: str
    value: object
    space: Space


@dataclass(frozen=True)
class Space:
    """A search space: fields sampled in every trial the space applies to, then its conditional branches.

    It is the define-by-run function OptunaSearch calls per trial: each trial samples the top-level fields,
    then the fields of each branch whose condition its choices meet (a method's knobs when that method was
    chosen, the power shape's exponent when the shape is power), and nothing else; Optuna records exactly
    those, and the Tune config (trials.csv's row) holds exactly those. A branch may search or fix a field of
    the space right above it again (DeiT-LT's AdamW lr where the others' SGD lr is searched): the branch's
    trials take the branch's, not the outer one."""

    params: tuple[Param, ...] = ()
    branches: tuple[Branch, ...] = ()

    def __call__(self, trial) -> dict:
        """Optuna samples the searched fields; the fixed ones go back to Tune as constants of the trial's config."""
        constants = {}

        def value_of(param):
            if param.kind == FIXED:
                constants[param.key] = param.value
            return param.suggest(trial)

        self.resolve(value_of)
        return constants

    def resolve(self, value_of, values: dict | None = None) -> dict:
        """The fields a trial samples, each with `value_of(param)`: a branch's once its condition holds (and in
        the outer field's place, a field the branch takes over)."""
        values = {} if values is None else values
        for param in self.params:
            if self.taken_over(param.key, values) is None:
                values[param.key] = value_of(param)
        for branch in self.branches:
            if same_value(values.get(branch.key, _UNSET), branch.value):
                branch.space.resolve(value_of, values)
        return values

    def taken_over(self, key: str, values: dict) -> Branch | None:
        """The branch that applies to `values` (its choice made above) and searches or fixes `key` itself."""
        return next((b for b in self.branches if same_value(values.get(b.key, _UNSET), b.value)
                     and any(p.key == key for p in b.space.params)), None)

    def active(self, values: dict) -> dict:
        """The entries of `values` (a trial's config, a trials.csv row) that its own choices make searched."""
        return self.resolve(lambda param: values[param.key])

    def point(self, cfg: config_lib.Config, sampled_only: bool = False) -> dict:
        """`cfg`'s own values of the fields searched with its choices (the base config's point is trial 1);
        sampled_only: without the fixed ones (Optuna's first point: it samples the others)."""
        values = self.resolve(lambda param: _UNSET if sampled_only and param.kind == FIXED
                              else get_dotted(cfg, param.key))
        return {key: value for key, value in values.items() if value is not _UNSET}

    def entries(self, conditions: dict | None = None) -> list[tuple[Param, dict]]:
        """Every field in file order, with the conditions (key: value) under which it is sampled."""
        conditions = conditions or {}
        found = [(param, conditions) for param in self.params]
        for branch in self.branches:
            found += branch.space.entries({**conditions, branch.key: branch.value})
        return found

    def fixed_values(self, choices: dict) -> dict:
        """The fixed fields of the branches a trial with these `choices` is in (an inner branch's last)."""
        found = {}
        for branch in self.branches:
            if same_value(choices.get(branch.key, _UNSET), branch.value):
                found.update({param.key: param.value for param in branch.space.params if param.kind == FIXED})
                found.update(branch.space.fixed_values(choices))
        return found

    def keys(self) -> list[str]:
        """Every field the space searches or fixes, once each (a branch may take one over), in file order."""
        return list(dict.fromkeys(param.key for param, _ in self.entries()))

    def to_json(self) -> dict:
        return {"params": [asdict(p) for p in self.params],
                "when": [{"key": b.key, "value": b.value, "space": b.space.to_json()} for b in self.branches]}

    @classmethod
    def from_json(cls, saved) -> Space:
        """search.json's "space" (a flat list before conditional spaces)."""
        if isinstance(saved, list):
            saved = {"params": saved, "when": []}
        params = tuple(Param(**{**p, "choices": tuple(p["choices"])}) for p in saved["params"])
        return cls(params, tuple(Branch(b["key"], b["value"], cls.from_json(b["space"])) for b in saved["when"]))


def set_dotted(values: dict, key: str, value) -> dict:
    """Set `a.b` in a nested dict (sections are created; the config builder judges the key)."""
    node = values
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section", key)
    node[parts[-1]] = value
    return values


def apply_values(cfg: config_lib.Config, values: dict) -> config_lib.Config:
    """A new config: `cfg` with each dotted key of `values` set, validated like any config.

    A `method.name` other than cfg's starts a fresh method section, `{name: X, X: {the values' method.X.*}}`
    (X's defaults elsewhere): only the chosen method's section may be written, and cfg's own method settings
    belong to cfg's method."""
    merged = config_lib.to_dict(cfg)
    name = values.get("method.name", cfg.method.name)
    if name != cfg.method.name:
        merged["method"] = {"name": name}
    for key, value in values.items():
        set_dotted(merged, key, copy.deepcopy(value))
    return config_lib.from_dict(merged)


def get_dotted(cfg: config_lib.Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
