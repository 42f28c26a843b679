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
import sys
import time
from pathlib import Path

import torch

from glmc_ray.core.storage import atomic_write
from glmc_ray.core.version import SOURCE, git_state, installed

VERSION_FILE = "version.json"
COMMAND_ENV = "GLMC_COMMAND"  # set in a Tune trial to the search's command line (its own is a Ray worker's)


def code_version(command: list[str] | str | None = None) -> dict:
    """This process's code, libraries, device and command line (`command`, default: GLMC_COMMAND if a
    search set it, else how this process was started)."""
    if command is None:
        command = os.environ.get(COMMAND_ENV) or shlex.join(sys.orig_argv)
    elif not isinstance(command, str):
        command = shlex.join(command)
    return {
        "glmc_ray": installed("glmc-ray"),
        **git_state(SOURCE),
        "python": platform.python_version(),
        "torch": torch.__version__,  # names the CUDA build (2.14.1+cu130); the wheel metadata may not
        "torchvision": installed("torchvision"),
        "ray": installed("ray"),  # from the metadata: an in-process run need not import Ray
        "device": device_description(),
        "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
