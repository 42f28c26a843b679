"""The README and docs/ stay true: every link (and heading anchor) they give resolves, every command they show
exists and takes the options shown with it, every config key and config file they name exists."""
import contextlib
import io
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

from glmc_ray.core import config as config_lib
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = ("data", "model", "method", "optim", "train", "dist")
# a command as the docs write it: the program, then its arguments up to the end of the line or a comment
COMMAND = re.compile(r"(?:\.venv/bin/)?python (-m glmc_ray\.\w+(?:\.\w+)?|tuning/search\.py|bench/\w+\.py)"
                     r"((?:\\\n|[^\n`#|])*)")


def _text(page: Path) -> str:
    return page.read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(page)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            if anchor not in anchors:
                broken.append(target)
    assert not broken, f"{page.name}: links that lead nowhere: {broken}"


@cache
def _options(program: str, subcommand: str | None) -> frozenset[str]:
    """The options `python program [subcommand] --help` lists (run in this process: runpy as `python` would)."""
    argv = [program, *([subcommand] if subcommand else []), "--help"]
    out, saved = io.StringIO(), sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            if program.startswith("-m "):
                runpy.run_module(program[3:], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(REPO / program), run_name="__main__")
    finally:
        sys.argv = saved
    assert exited.value.code in (0, None), f"python {' '.join(argv)}: exit {exited.value.code}"
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", out.getvalue()))


def _commands() -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        for program, rest in COMMAND.findall(_text(page)):
            found.append((page.name, program, rest.replace("\\\n", " ")))
    return found


@pytest.mark.parametrize("page, program, rest", _commands(), ids=lambda v: v if len(v) < 40 else v[:40])
def test_every_command_shown_exists_with_its_options(page, program, rest):
    words = shlex.split(rest.replace("<", "").replace(">", ""), posix=True) if rest.count("'") % 2 == 0 else \
        rest.split()
    words = words[:words.index("--")] if "--" in words else words  # after it: the command this one runs
    subcommand = words[0] if words and not words[0].startswith("-") and program.endswith("shards") else None
    unknown = sorted({w.split("=")[0] for w in words if w.startswith("--")} - _options(program, subcommand))
    assert not unknown, f"{page}: python {program}{rest}: options it does not take: {unknown}"


def _config_keys(text: str) -> set[str]:
    keys = set(re.findall(r"--set '?([a-z_][\w.]*)=", text))
    keys |= {k for k in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)", text) if k.split(".")[0] in SECTIONS}
    return {k for k in keys if not k.endswith(".") and k.split(".")[0] in SECTIONS and not _module(k)}


def _module(key: str) -> bool:
    """data.images.PILGaussianBlur is a module's name (glmc_ray/data/images.py), not a key."""
    return (REPO / "glmc_ray" / "/".join(key.split(".")[:2])).with_suffix(".py").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_named_exists(page):
    cfg = config_lib.load(REPO / "configs/smoke.yaml")
    missing = []
    for key in sorted(_config_keys(_text(page))):
        node = cfg
        for part in key.split("."):
            if not hasattr(node, part):
                missing.append(key)
                break
            node = getattr(node, part)
    assert not missing, f"{page.name}: config keys that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_file_named_exists(page):
    named = set(re.findall(r"(?<![\w/<])(configs/[\w/.-]+\.yaml)", _text(page)))
    assert not [p for p in sorted(named) if not (REPO / p).is_file()], page.name
