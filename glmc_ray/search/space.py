"""The search space: a space file's syntax and checks, and what Optuna samples from it.

The space (configs/search/*.yaml, `load_space`): config fields and their ranges, and under `when:`
conditions KEY=VALUE (KEY a choice searched above) with the fields searched only in trials whose KEY took
VALUE: each method's knobs once `method.name` is a choice, the power shape's exponent. Optuna samples it
define-by-run (`Space` is the function OptunaSearch calls), so a trial, its Optuna record and its
trials.csv row hold only the fields its choices searched, and a trial with another method than the base's
gets a fresh method section (`apply_values`).

`load_space` reads a space file and checks every bound and every choice by building a config with it (in
its branch, and with each value of every choice it can be sampled together with), so a bad space is one
error naming the file and the key before any trial. `apply_values` turns a sampled point into config
overrides; `Space.to_json`/`Space.from_json` keep the space in an experiment's search.json. The search
driver (glmc_ray/search/trials.py) runs the trials.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.core.config import ConfigError

KINDS = ("float", "int", "choice")
WHEN = "when"  # a space file's conditional part: when: {KEY=VALUE: {fields searched only then}}


@dataclass(frozen=True)
class Param:
    """One searched field: `kind` float/int with `low`/`high` (and `log`), or choice with `choices`."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        """Sample this field in an Optuna trial (define-by-run: only the fields a trial asks for are recorded)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

    def contains(self, value) -> bool:
        if self.kind == "choice":
            return any(same_value(value, choice) for choice in self.choices)
        return self.low <= value <= self.high

    def ends(self) -> tuple:
        """The values a space check builds a config with: each choice, or both bounds."""
        return self.choices if self.kind == "choice" else (self.low, self.high)


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
    those, and the Tune config (trials.csv's row) holds exactly those."""

    params: tuple[Param, ...] = ()
    branches: tuple[Branch, ...] = ()

    def __call__(self, trial) -> None:
        self.resolve(lambda param: param.suggest(trial))

    def resolve(self, value_of, values: dict | None = None) -> dict:
        """The fields a trial samples, each with `value_of(param)`: a branch's once its condition holds."""
        values = {} if values is None else values
        for param in self.params:
            values[param.key] = value_of(param)
        for branch in self.branches:
            if same_value(values.get(branch.key), branch.value):
                branch.space.resolve(value_of, values)
        return values

    def active(self, values: dict) -> dict:
        """The entries of `values` (a trial's config, a trials.csv row) that its own choices make searched."""
        return self.resolve(lambda param: values[param.key])

    def point(self, cfg: config_lib.Config) -> dict:
        """`cfg`'s own values of the fields searched with its choices (the base config's point is trial 1)."""
        return self.resolve(lambda param: get_dotted(cfg, param.key))

    def entries(self, conditions: dict | None = None) -> list[tuple[Param, dict]]:
        """Every field in file order, with the conditions (key: value) under which it is sampled."""
        conditions = conditions or {}
        found = [(param, conditions) for param in self.params]
        for branch in self.branches:
            found += branch.space.entries({**conditions, branch.key: branch.value})
        return found

    def all_params(self) -> list[Param]:
        return [param for param, _ in self.entries()]

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


def _scalar(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


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


def _when(conditions: dict) -> str:
    """' (when a=x, b=y)': where a conditional field's errors say which branch it is in."""
    return f" (when {', '.join(f'{k}={_scalar(v)}' for k, v in conditions.items())})" if conditions else ""


def _parse_param(where: str, key, spec, base: config_lib.Config, conditions: dict) -> Param:
    label = f"{key}{_when(conditions)}"
    if not isinstance(key, str) or "." not in key:
        raise ConfigError(f"{where}: {label}: expected a dotted config field such as optim.lr", str(key))
    if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
        raise ConfigError(f"{where}: {label}: expected one of {{float: [low, high]}}, {{int: [low, high]}} "
                          f"or {{choice: [a, b, ...]}} (float/int may add log: true), got {spec!r}", key)
    kind = next(k for k in spec if k in KINDS)
    extra = set(spec) - {kind, "log"} if kind != "choice" else set(spec) - {kind}
    if extra:
        raise ConfigError(f"{where}: {label}: unknown option(s) {', '.join(sorted(map(str, extra)))}", key)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {label}: log must be true or false, got {log!r}", key)
    values = spec[kind]
    if kind == "choice":
        if not isinstance(values, list) or len(values) < 2 or len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: {label}: choice needs a list of at least two distinct values, "
                              f"got {values!r} (empty range)", key)
    elif not isinstance(values, list) or len(values) != 2:
        raise ConfigError(f"{where}: {label}: {kind} needs [low, high], got {values!r}", key)
    else:
        for value in values:
            number = value if kind == "int" else _as_float(value)
            ok = isinstance(number, int) if kind == "int" else isinstance(number, float)
            if not ok or isinstance(number, bool):
                what = "an integer" if kind == "int" else "a number"
                raise ConfigError(f"{where}: {label}: {kind} bound {value!r} is not {what}", key)
        values = [v if kind == "int" else _as_float(v) for v in values]
    _check_method(where, label, key, base, conditions)
    # each value (each bound, each choice) must make a config the trainer accepts, in the branch it is
    # sampled in: the field exists, has the right type and is in range (config.validate's own checks)
    for value in values:
        try:
            built = apply_values(base, {**conditions, key: value})
        except ConfigError as err:
            reason = str(err).removeprefix(f"{key}: ")
            raise ConfigError(f"{where}: {label}: value {value!r}: {reason}", key) from None
        if dataclass_field(built, key):
            raise ConfigError(f"{where}: {label}: is a section, not a field", key)
    if kind == "choice":
        return Param(key, kind, choices=tuple(values))
    low, high = values
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: {label}: bounds must be finite, got [{low}, {high}]", key)
    if low >= high:
        raise ConfigError(f"{where}: {label}: empty range [{low}, {high}] (low must be below high; "
                          f"use --set for a fixed value)", key)
    if log and low <= 0:
        raise ConfigError(f"{where}: {label}: a log range needs low > 0, got {low}", key)
    field_type = type(get_dotted(base, key))
    if kind == "float" and field_type is int:
        raise ConfigError(f"{where}: {label}: is an integer field; use {{int: [low, high]}}", key)
    return Param(key, kind, low, high, log)


def _check_method(where: str, label: str, key: str, base, conditions: dict) -> None:
    """A method's setting is searched only where that method is the one trained."""
    method, chosen = _method_of(key), conditions.get("method.name", base.method.name)
    if method is None or method == chosen:
        return
    if "method.name" in conditions:
        raise ConfigError(f"{where}: {label}: a setting of method {method}, searched when method.name={chosen}; "
                          f"move it under when: method.name={method}:", key)
    raise ConfigError(f"{where}: {label}: a setting of method {method}, but the base config trains {chosen}: "
                      f"search method.name and put it under when: method.name={method}:, or switch the base's "
                      f"method (--set 'method={{name: {method}}}')", key)


def dataclass_field(cfg, key: str) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(get_dotted(cfg, key))


def _as_float(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_condition(where: str, text, choices: dict[str, Param], conditions: dict) -> tuple[str, object]:
    """`KEY=VALUE` of a `when:` entry: KEY is a choice searched above (in this space or an enclosing one),
    VALUE one of its choices (read as YAML: true, 2, power)."""
    import yaml

    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{where}: when: {text}: expected KEY=VALUE, a choice searched above and one of its "
                          f"values, e.g. method.name=ldam_drw", str(text))
    key, raw = (part.strip() for part in text.split("=", 1))
    if key in conditions:
        raise ConfigError(f"{where}: when: {text}: {key} is already {_scalar(conditions[key])} in this branch; "
                          f"a condition inside it cannot test {key} again", text)
    param = choices.get(key)
    if param is None or param.kind != "choice":
        raise ConfigError(f"{where}: when: {text}: {key} is not searched as a {{choice: [...]}} above this "
                          f"when: (a condition tests a choice of this space or an enclosing one)", text)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    for choice in param.choices:
        if same_value(choice, value) or _scalar(choice) == raw:
            return key, choice
    raise ConfigError(f"{where}: when: {text}: {raw!r} is not one of {key}'s choices "
                      f"({', '.join(map(_scalar, param.choices))})", text)


def _parse_space(where: str, values: dict, base, conditions: dict, above: dict[str, Param]) -> Space:
    params = [_parse_param(where, key, spec, base, conditions) for key, spec in values.items() if key != WHEN]
    above = {**above, **{param.key: param for param in params}}
    when = values.get(WHEN) or {}
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: when: expected a mapping of KEY=VALUE conditions to the fields searched "
                          f"under them, e.g. when: {{method.name=ldam_drw: {{method.ldam_drw.scale: "
                          f"{{float: [10, 50]}}}}}}, got {when!r}", WHEN)
    branches, seen = [], set()
    for text, body in when.items():
        key, value = _parse_condition(where, text, above, conditions)
        if (key, repr(value)) in seen:
            raise ConfigError(f"{where}: when: {text}: the same condition twice; merge the two", str(text))
        seen.add((key, repr(value)))
        if not isinstance(body or {}, dict):
            raise ConfigError(f"{where}: when: {text}: expected the fields searched when {text} "
                              f"(a mapping like the file's own), got {body!r}", str(text))
        space = _parse_space(where, body or {}, base, {**conditions, key: value}, above)
        branches.append(Branch(key, value, space))
    return Space(tuple(params), tuple(branches))


def _method_of(key: str) -> str | None:
    """The method whose section holds `key` (method.ldam_drw.scale: ldam_drw), else None."""
    parts = key.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "method" and parts[1] in config_lib.METHOD_NAMES else None


def _check_together(where: str, space: Space, base) -> None:
    """Every value of every field with every value of each choice it can be sampled together with (the
    branches' conditions included): e.g. a method's knob outside that method's branch while method.name is
    searched, or a warmup bound with a schedule choice that refuses warmup, is an error before any trial."""
    entries = space.entries()
    for param, conditions in entries:
        label = f"{param.key}{_when(conditions)}"
        for other, other_conditions in entries:
            if other.kind != "choice" or other.key == param.key or other.key in conditions:
                continue
            if any(k in conditions and not same_value(conditions[k], v) for k, v in other_conditions.items()):
                continue  # never sampled in the same trial
            context = {**conditions, **other_conditions}
            for choice in other.choices:
                for value in param.ends():
                    if param.key in context and not same_value(context[param.key], value):
                        continue
                    try:
                        apply_values(base, {**context, other.key: choice, param.key: value})
                    except ConfigError as err:
                        method = _method_of(param.key)
                        if other.key == "method.name" and method and method != choice:
                            raise ConfigError(
                                f"{where}: {label}: a setting of method {method}, but it is also sampled when "
                                f"method.name={choice}; search it under when: method.name={method}:",
                                param.key) from None
                        raise ConfigError(f"{where}: {label}: value {value!r} with {other.key}="
                                          f"{_scalar(choice)}: {str(err).removeprefix(f'{param.key}: ')}",
                                          param.key) from None


def load_space(path: str | Path, base: config_lib.Config) -> Space:
    """Read and validate a search-space YAML file against the base config; errors name the file and key.

    The file maps config fields to their ranges; `when:` maps conditions `KEY=VALUE` (KEY a choice searched
    above) to the fields searched only in trials where KEY took VALUE, nested as deep as needed."""
    where = str(path)
    space = _parse_space(where, config_lib.read_yaml_mapping(path, "search space file"), base, {}, {})
    seen = set()
    for param, conditions in space.entries():
        if param.key in seen:
            raise ConfigError(f"{where}: {param.key}{_when(conditions)}: searched twice; a field has one range "
                              f"in a space file, in one place", param.key)
        seen.add(param.key)
    _check_together(where, space, base)
    for param, conditions in space.entries():  # the base's own point: the fields its choices search
        if not all(same_value(get_dotted(base, k), v) for k, v in conditions.items()):
            continue
        value = get_dotted(base, param.key)
        if not param.contains(value):
            raise ConfigError(f"{where}: {param.key}{_when(conditions)}: the base config's value {value!r} is "
                              f"outside the space; it is the first point evaluated, so widen the range or --set "
                              f"another base value", param.key)
    return space
