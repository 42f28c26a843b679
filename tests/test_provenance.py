"""The code version a run records: commit and uncommitted changes from a checkout, libraries, device, command."""
import os
import subprocess

import ray
import torch

from glmc_ray.core.version import git_state
from glmc_ray.runs import provenance
from tests.conftest import REPO, git_head


def test_code_version_names_the_commit_libraries_device_and_command():
    version = provenance.code_version(["python", "-m", "glmc_ray.train", "--set", "data.root=my data"])
    assert version["git_commit"] == git_head() and isinstance(version["git_dirty"], bool)
    assert version["torch"] == torch.__version__ and version["ray"] == ray.__version__
    assert version["glmc_ray"] and version["torchvision"] and version["python"]
    assert version["device"]["cpu"] and version["device"]["logical_cpus"] == os.cpu_count()
    assert sum(version["device"]["gpus"].values()) == torch.cuda.device_count()
    assert version["command"] == "python -m glmc_ray.train --set 'data.root=my data'"


def test_git_state_sees_uncommitted_changes_and_only_a_checkout_top(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": True}
    # a package installed into a virtual environment inside some repository is not that repository's code
    (tmp_path / "site-packages").mkdir()
    assert git_state(tmp_path / "site-packages") == {"git_commit": None, "git_dirty": None}
    assert git_state(REPO / "glmc_ray") == {"git_commit": None, "git_dirty": None}
