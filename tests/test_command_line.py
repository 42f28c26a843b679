"""One command line: the installed commands are their `python -m` forms, every option of every command
(benchmarks included) says what it does, and every command prints its version."""
import argparse
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from glmc_ray import compare, shards, train
from glmc_ray.core.version import version_line
from glmc_ray.search import cli as search_cli
from tests.conftest import REPO

BIN = Path(sys.executable).parent
COMMANDS = {"glmc-train": train.parser, "glmc-search": search_cli.parser, "glmc-shards": shards.parser,
            "glmc-compare": compare.parser}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_installed_command_is_its_python_m_form_and_prints_its_version(command, capsys, monkeypatch):
    """The script pip installed runs the parser of `python -m glmc_ray.<name>` (its help, in a pipe, is that
    parser's help at 80 columns); --version prints the code's version."""
    monkeypatch.setenv("COLUMNS", "80")
    installed = subprocess.run([str(BIN / command), "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout == COMMANDS[command]().format_help()
    with pytest.raises(SystemExit) as exited:
        COMMANDS[command]().parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == version_line()


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


def test_output_piped_into_a_reader_that_leaves_ends_as_a_shell_expects():
    """`glmc-train --dry-run | head -1`: the reader has gone before the first write; exit 141 (128 + SIGPIPE), as
    a shell reports for such a command, and no traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader left
    try:
        done = subprocess.run([str(BIN / "glmc-train"), "--config", "smoke", "--dry-run"], cwd=REPO, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr
