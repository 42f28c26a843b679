"""One command line: the installed commands are their `python -m` forms, every option of every command
(benchmarks included) says what it does, and every command prints its version."""
import argparse
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from glmc_ray import shards, train
from glmc_ray.core.version import version_line
from glmc_ray.search import cli as search_cli
from tests.conftest import REPO

BIN = Path(sys.executable).parent
COMMANDS = {"glmc-train": "glmc_ray.train", "glmc-search": "glmc_ray.search", "glmc-shards": "glmc_ray.shards"}


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command, module", sorted(COMMANDS.items()))
def test_each_installed_command_is_its_python_m_form(command, module):
    installed, as_module = _run([str(BIN / command), "--help"]), _run([sys.executable, "-m", module, "--help"])
    assert installed.returncode == as_module.returncode == 0, installed.stderr + as_module.stderr
    assert installed.stdout == as_module.stdout
    version = _run([str(BIN / command), "--version"])
    assert version.stdout.strip() == version_line() and version.stdout.startswith("glmc-ray ")


def _bench_parser(script: Path) -> argparse.ArgumentParser:
    """The parser a benchmark's main() builds, taken when it parses (nothing of the benchmark runs)."""
    taken = []

    class Taken(Exception):
        pass

    def take(self, *args, **kwargs):
        taken.append(self)
        raise Taken

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", take)
        with pytest.raises(Taken):
            runpy.run_path(str(script), run_name="__main__")
    return taken[0]


def _parsers():
    top = shards.parser()
    subcommands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    found = {"train": train.parser(), "search": search_cli.parser(), "shards": top,
             **{f"shards {name}": p for name, p in subcommands.items()}}
    return found | {f"bench/{s.name}": s for s in sorted((REPO / "bench").glob("*.py"))}


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_says_what_it_does(name):
    parser = _parsers()[name]
    if isinstance(parser, Path):
        parser = _bench_parser(parser)
    silent = [a.option_strings or a.dest for a in parser._actions
              if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not silent, f"{name}: options without help: {silent}"
