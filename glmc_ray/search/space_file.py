"""A search-space file (configs/search/*.yaml): its syntax and its checks (`load_space`).

The file maps config fields to `{float: [low, high]}` (`log: true`), `{int: [low, high]}`, `{choice: [...]}`,
or, in a `when:` branch, `{fixed: value}`; `when:` maps conditions KEY=VALUE to the fields searched only in
trials whose KEY took VALUE, nested as deep as needed, and a branch may take over a field of the space right
above it. `load_space` checks every bound, choice and fixed value by building a config with it (in its
branch, with each value of every choice it can be sampled together with), so a bad space is one error
naming the file and the key before any trial; a method that learns from a teacher run is a choice only when
the search is given one (`teacher_branches`).
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

from glmc_ray.core import config as config_lib
from glmc_ray.core.config import ConfigError
from glmc_ray.search.space import FIXED, KINDS, WHEN, Branch, Param, Space, apply_values, get_dotted, same_value


def _scalar(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def _when(conditions: dict) -> str:
    """' (when a=x, b=y)': where a conditional field's errors say which branch it is in."""
    return f" (when {', '.join(f'{k}={_scalar(v)}' for k, v in conditions.items())})" if conditions else ""


def _parse_param(where: str, key, spec, base: config_lib.Config, conditions: dict, settings: dict,
                 branch_settings: dict) -> Param:
    """`settings`: the trial's conditions and the fixed fields in force where `key` is searched; `branch_settings`:
    (KEY, VALUE text) -> the fixed fields of this space's branch when: KEY=VALUE, the settings a choice makes."""
    label = f"{key}{_when(conditions)}"
    if not isinstance(key, str) or "." not in key:
        raise ConfigError(f"{where}: {label}: expected a dotted config field such as optim.lr", str(key))
    if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
        raise ConfigError(f"{where}: {label}: expected one of {{float: [low, high]}}, {{int: [low, high]}}, "
                          f"{{choice: [a, b, ...]}} (float/int may add log: true) or {{fixed: value}} (in a when: "
                          f"branch), got {spec!r}", key)
    kind = next(k for k in spec if k in KINDS)
    extra = set(spec) - {kind, "log"} if kind in ("float", "int") else set(spec) - {kind}
    if extra:
        raise ConfigError(f"{where}: {label}: unknown option(s) {', '.join(sorted(map(str, extra)))}", key)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {label}: log must be true or false, got {log!r}", key)
    values = spec[kind]
    if kind == FIXED:
        if not conditions:
            raise ConfigError(f"{where}: {label}: a fixed value for every trial is the base config's: use --set "
                              f"{key}=...; fixed is for the trials of a when: branch", key)
        values = [values]
    elif kind == "choice":
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
        made = branch_settings.get((key, _scalar(value)), {}) if kind == "choice" else {}
        try:
            built = apply_values(base, {**settings, **made, key: value})
        except ConfigError as err:
            if err.key in made:  # a fixed field of the branch this choice opens is named as itself
                fixed_label = f"{err.key}{_when({**conditions, key: value})}"
                reason = str(err).removeprefix(f"{err.key}: ")
                raise ConfigError(f"{where}: {fixed_label}: value {made[err.key]!r}: {reason}", err.key) from None
            reason = str(err).removeprefix(f"{key}: ")
            raise ConfigError(f"{where}: {label}: value {value!r}: {reason}", key) from None
        if dataclass_field(built, key):
            raise ConfigError(f"{where}: {label}: is a section, not a field", key)
    if kind in ("choice", FIXED):
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


def _fixed_fields(values) -> dict:
    """A space mapping's own {fixed: VALUE} fields, as they stand in the file (each is checked as it is parsed)."""
    if not isinstance(values, dict):
        return {}
    return {key: spec[FIXED] for key, spec in values.items() if isinstance(spec, dict) and FIXED in spec}


def _branch_settings(when) -> dict:
    """(KEY, VALUE text) -> the fixed fields of each `when: KEY=VALUE` branch: what choosing VALUE sets."""
    branches = when.items() if isinstance(when, dict) else ()
    return {_branch_value(text): _fixed_fields(body) for text, body in branches if _branch_value(text)}


def _parse_space(where: str, values: dict, base, conditions: dict, above: dict[str, Param],
                 settings: dict) -> Space:
    when = values.get(WHEN) or {}
    settings = {**settings, **_fixed_fields(values)}
    params = [_parse_param(where, key, spec, base, conditions, settings, _branch_settings(when))
              for key, spec in values.items() if key != WHEN]
    above = {**above, **{param.key: param for param in params}}
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
        space = _parse_space(where, body or {}, base, {**conditions, key: value}, above, {**settings, key: value})
        branches.append(Branch(key, value, space))
    _check_takeovers(where, params, branches, conditions)
    return Space(tuple(params), tuple(branches))


def _check_takeovers(where: str, params: list[Param], branches: list[Branch], conditions: dict) -> None:
    """A branch that takes over a field of this space needs its choice made before that field is sampled."""
    order = [param.key for param in params]
    for branch in branches:
        for param in branch.space.params:
            if param.key in order and branch.key in order and order.index(branch.key) > order.index(param.key):
                raise ConfigError(f"{where}: {param.key}{_when({**conditions, branch.key: branch.value})}: takes "
                                  f"over the {param.key} searched above, so {branch.key} must come before "
                                  f"{param.key} in the file (the choice is made first)", param.key)


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
            if _exclusive(conditions, other_conditions):
                continue  # never sampled in the same trial
            context = {**conditions, **other_conditions}
            for choice in other.choices:
                choices = {**context, other.key: choice}
                if any(p.key == param.key and _takes_over(conditions, c) and _met(c, choices) for p, c in entries):
                    continue  # a branch of this choice takes the field over
                for value in param.ends():
                    if param.key in context and not same_value(context[param.key], value):
                        continue
                    try:
                        apply_values(base, {**choices, **space.fixed_values(choices), param.key: value})
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


def _exclusive(a: dict, b: dict) -> bool:
    """Two sets of conditions no trial meets both of (one choice, two values)."""
    return any(key in b and not same_value(value, b[key]) for key, value in a.items())


def _met(conditions: dict, choices: dict) -> bool:
    """A trial with these `choices` is in the branch of `conditions` (each of its choices made, and so)."""
    return all(key in choices and same_value(choices[key], value) for key, value in conditions.items())


def _takes_over(outer: dict, inner: dict) -> bool:
    """`inner` is a branch right below `outer`'s space: its conditions and one more."""
    return len(inner) == len(outer) + 1 and all(k in inner and same_value(v, inner[k]) for k, v in outer.items())


def _check_twice(where: str, space: Space) -> None:
    """A field has one range where a trial samples it: in one place, or again in a branch right below that
    takes it over, or in branches that exclude each other."""
    found: dict[str, list[dict]] = {}
    for param, conditions in space.entries():
        for other in found.get(param.key, []):
            if not (_exclusive(other, conditions) or _takes_over(other, conditions)):
                raise ConfigError(f"{where}: {param.key}{_when(conditions)}: searched twice; a field has one range "
                                  f"in a space file, in one place (or one more in a when: branch right below it, "
                                  f"which takes it over)", param.key)
        found.setdefault(param.key, []).append(conditions)


def teacher_branches(where: str, values: dict, base: config_lib.Config, teacher: str) -> dict:
    """The space file's mapping with each choice of method.name that needs a teacher run (DeiT-LT) given one:
    its branch fixes the method's teacher key to `teacher` (or to the base config's own teacher, where the base
    trains that method). Without a teacher such a method leaves the choices, with a note on stderr."""
    spec = values.get("method.name")
    choices = spec.get("choice") if isinstance(spec, dict) else None
    needing = [m for m in choices or () if m in config_lib.TEACHER_REQUIRED]
    if not needing:
        if teacher:
            raise ConfigError(f"--teacher {teacher}: no method the space {where} can choose learns from a teacher "
                              f"run (those that do: {', '.join(config_lib.TEACHER_REQUIRED)})", "--teacher")
        return values
    own = config_lib.teacher_of(base)
    teacher = teacher or (own[1] if own and base.method.name in needing else "")
    values = copy.deepcopy(values)
    values[WHEN] = values.get(WHEN) or {}
    when = values[WHEN] if isinstance(values[WHEN], dict) else {}  # not a mapping: parsing says so
    branch_of = {_branch_value(text): text for text in when}
    for method in needing:
        text = branch_of.get(("method.name", method), f"method.name={method}")
        if teacher:
            body = when.get(text) or {}
            when[text] = {**body, config_lib.TEACHER_KEYS[method]: {FIXED: teacher}}
            continue
        values["method.name"]["choice"].remove(method)
        when.pop(text, None)
        print(f"note: {where}: {method} left out of method.name's choices: it learns from a teacher run; give "
              f"--teacher RUN (a finished run of this harness on the same data) to search it too", file=sys.stderr)
    return values


def _branch_value(text) -> tuple[str, str] | None:
    """`KEY=VALUE` of a when: entry as (KEY, VALUE text), None where it is not one (parsing says why)."""
    if not isinstance(text, str) or "=" not in text:
        return None
    key, raw = (part.strip() for part in text.split("=", 1))
    return key, raw


def load_space(path: str | Path, base: config_lib.Config, teacher: str = "") -> Space:
    """Read and validate a search-space YAML file against the base config; errors name the file and key.

    The file maps config fields to their ranges; `when:` maps conditions `KEY=VALUE` (KEY a choice searched
    above) to the fields searched (or fixed) only in trials where KEY took VALUE, nested as deep as needed.
    A method that learns from a teacher run is a choice only with `teacher` (teacher_branches)."""
    where = str(path)
    values = teacher_branches(where, config_lib.read_yaml_mapping(path, "search space file"), base, teacher)
    space = _parse_space(where, values, base, {}, {}, {})
    _check_twice(where, space)
    _check_together(where, space, base)
    entries = space.entries()
    applies = lambda conditions: all(same_value(get_dotted(base, k), v) for k, v in conditions.items())  # noqa: E731
    for param, conditions in entries:  # the base's own point: the fields its choices search
        if not applies(conditions) or any(p.key == param.key and _takes_over(conditions, c) and applies(c)
                                          for p, c in entries):
            continue
        value = get_dotted(base, param.key)
        if not param.contains(value):
            raise ConfigError(f"{where}: {param.key}{_when(conditions)}: the base config's value {value!r} is "
                              f"outside the space; it is the first point evaluated, so widen the range or --set "
                              f"another base value", param.key)
    return space
