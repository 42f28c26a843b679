"""Which code made a run: `<run>/version.json`, copied into final.json, so a number traces back to its code.

It records the package version, the git commit and whether the tree had uncommitted changes (when the package
runs from a checkout), the library versions, the device and the command line. The process that makes the run
directory writes it (under Ray, the driver); a resume adds its own record under "resumed", since it may run
other code.
"""
from __future__ import annotations

import collections
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from glmc_ray.core.storage import atomic_write

VERSION_FILE = "version.json"
COMMAND_ENV = "GLMC_COMMAND"  # set in a Tune trial to the search's command line (its own is a Ray worker's)
SOURCE = Path(__file__).resolve().parents[2]  # the checkout root when the package runs from one


def code_version(command: list[str] | str | None = None) -> dict:
    """This process's code, libraries, device and command line (`command`, default: GLMC_COMMAND if a
    search set it, else how this process was started)."""
    if command is None:
        command = os.environ.get(COMMAND_ENV) or shlex.join(sys.orig_argv)
    elif not isinstance(command, str):
        command = shlex.join(command)
    return {
        "glmc_ray": _installed("glmc-ray"),
        **git_state(SOURCE),
        "python": platform.python_version(),
        "torch": torch.__version__,  # names the CUDA build (2.14.1+cu130); the wheel metadata may not
        "torchvision": _installed("torchvision"),
        "ray": _installed("ray"),  # from the metadata: an in-process run need not import Ray
        "device": device_description(),
        "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_state(root: Path) -> dict:
    """Commit and uncommitted changes (untracked files included) of the git checkout whose top is `root`.

    None for both when `root` is not the top of a checkout (an installed wheel, whose site-packages may
    well sit inside some other repository) or when git is missing.
    """
    try:
        if Path(_git(root, "rev-parse", "--show-toplevel")).resolve() == root.resolve():
            return {"git_commit": _git(root, "rev-parse", "HEAD"),
                    "git_dirty": _git(root, "status", "--porcelain") != ""}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": None, "git_dirty": None}


def device_description() -> dict:
    """The CPU model and logical CPU count, and the CUDA GPUs this process sees (name -> count)."""
    gpus = collections.Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "gpus": dict(gpus)}


def write_version(run: Path) -> None:
    _save(run, code_version())


def record_resume(run: Path) -> None:
    """Add this process's code version to the run's record: the run's later epochs come from this code."""
    document = read_version(run) or {}
    document.setdefault("resumed", []).append(code_version())
    _save(run, document)


def read_version(run: Path) -> dict | None:
    """The run's version.json, or None for a run made before it was recorded."""
    path = run / VERSION_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _save(run: Path, document: dict) -> None:
    atomic_write(run / VERSION_FILE, lambda tmp: tmp.write_text(json.dumps(document, indent=1) + "\n"))


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
