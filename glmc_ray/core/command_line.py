"""What every command line shares: `--config` (a file, or a packaged recipe by name), `--set KEY=VALUE`,
`--data-root`, `--version`, and the lookup of configs by name.

A name is looked up in the checkout's configs/ folder: `cifar10_lt_if100/ldam_drw` is
configs/recipes/cifar10_lt_if100/ldam_drw.yaml, a dataset alone (`cifar10_lt_if100`) its GLMC recipe, `smoke`
configs/smoke.yaml; a search space by its name in configs/search/ (`--space methods`).
"""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from glmc_ray.core.config import ConfigError
from glmc_ray.core.version import SOURCE, version_line

CONFIGS = SOURCE / "configs"
RECIPES = CONFIGS / "recipes"
# the teacher recipe of each distillation recipe (its header says so): the run its method.deit_lt.teacher names
TEACHER_RECIPES = {"cifar10_lt_if100/deit_lt.yaml": "cifar10_lt_if100/ldam_drw.yaml",
                   "cifar100_lt_if100/deit_lt.yaml": "cifar100_lt_if100/ldam_drw.yaml",
                   "imagenet_lt/deit_lt.yaml": "imagenet_lt/glmc.yaml"}


def add_recipe_arguments(parser: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    parser.add_argument("--config", metavar="RECIPE",
                        help=f"{config_help}: a YAML file, or a packaged recipe by name (cifar10_lt_if100/ldam_drw; "
                             f"a dataset alone is its GLMC recipe; smoke). Default: the built-in defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config field, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--data-root", metavar="DIR",
                        help="shorthand for --set data.root=DIR (the folder holding cifar-10-batches-py/, or "
                             "the split files' image root, or a URI)")
    parser.add_argument("--version", action="version", version=version_line())


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """--set items, with --data-root last (as an absolute path: workers run in other folders)."""
    overrides = list(args.overrides)
    if args.data_root:
        root = args.data_root if "://" in args.data_root else Path(args.data_root).resolve()
        overrides.append(f"data.root={root}")
    return overrides


def find_config(given: str | None, option: str = "--config", folder: Path = RECIPES) -> Path | None:
    """The YAML file `given` names: a path, else a name under `folder` (see the module's doc)."""
    if given is None:
        return None
    path = Path(given)
    if path.is_file() or path.suffix in (".yaml", ".yml") or path.is_dir():
        return path  # a file, or a path the loader reports as missing or not a file
    for candidate in (folder / f"{given}.yaml", folder / given / "glmc.yaml", CONFIGS / f"{given}.yaml"):
        if candidate.is_file():
            return candidate
    names = _names(folder)
    close = difflib.get_close_matches(given, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"{option} {given}: no such file, and no packaged config of that name in {folder}; "
                      f"{hint}names: {', '.join(names)}")


def _names(folder: Path) -> list[str]:
    named = [str(p.relative_to(folder).with_suffix("")) for p in sorted(folder.rglob("*.yaml"))]
    return named + ([p.stem for p in sorted(CONFIGS.glob("*.yaml"))] if folder == RECIPES else [])
