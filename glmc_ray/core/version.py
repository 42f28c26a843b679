"""The code's identity: the package version and, when it runs from a git checkout, the commit and whether the
tree has uncommitted changes. A run records it in version.json (runs/provenance.py); `--version` prints it."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2]  # the checkout root when the package runs from one


def installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def git_state(root: Path = SOURCE) -> dict:
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


def version_line() -> str:
    """`glmc-ray 0.1.0 (git 1a2b3c4d5e6f, uncommitted changes)`: what `--version` prints."""
    state = git_state()
    where = ""
    if state["git_commit"]:
        where = f" (git {state['git_commit'][:12]}{', uncommitted changes' if state['git_dirty'] else ''})"
    return f"glmc-ray {installed('glmc-ray') or 'not installed'}{where}"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()
