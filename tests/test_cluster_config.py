"""cluster.yaml checked offline with Ray's own cluster-config validation (no cloud calls), against what the
code asks Ray for and the versions pyproject.toml pins."""
import copy
import re

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO

RAW = yaml.safe_load((REPO / "cluster.yaml").read_text())


def _prepared(raw=RAW):
    config = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults, as `ray up` does first
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_validation_and_a_typo_would_not():
    config = _prepared()
    assert config["provider"]["type"] == "aws"
    typo = {**copy.deepcopy(RAW), "setup_comands": RAW["setup_commands"]}
    with pytest.raises(Exception, match="setup_comands"):
        _prepared(typo)
    fractional = copy.deepcopy(RAW)
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(Exception, match="integer"):
        _prepared(fractional)


def test_every_node_installs_this_checkout_with_the_versions_pyproject_pins():
    config = _prepared()
    (target, source), = RAW["file_mounts"].items()
    assert source == "."  # the checkout `ray up` runs from
    commands = config["setup_commands"]
    installs = [c for c in commands if "pip install" in c and "-e" in c.split()]
    assert installs and all(target.replace("/home/ubuntu", "~") in c for c in installs)
    pins = dict(re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text()))
    assert pins["ray"] == "2.60.0" and "torch" in pins
    for command in commands + config["head_setup_commands"]:
        for name, version in re.findall(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([0-9][^\s'\"]*)", command):
            assert pins.get(name) == version, f"{command!r} installs {name}=={version}, pyproject pins {pins.get(name)}"
    ray_commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("glmc-venv/bin/ray" in c for c in ray_commands if "ray start" in c)  # the pinned Ray, not another


def test_node_types_give_what_the_trainer_the_search_and_ray_data_ask_for():
    config = _prepared()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    assert head["CPU"] == 0 and head.get("GPU", 0) == 0 and head["driver_slot"] >= 1  # the head trains nothing
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type: --nodes N needs nodes with GPUs"
    for node_type in types.values():
        resources = node_type["resources"]
        assert all(isinstance(v, int) for v in resources.values())
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", 0) <= config["max_workers"]
    for gpu_type in gpu_types:  # one Train worker (1 CPU) per GPU plus CPUs for decoding and augmentation
        assert gpu_type["resources"]["CPU"] >= 8 * gpu_type["resources"]["GPU"]
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] > 0 for t in types.values()
               if t is not types[config["head_node_type"]])  # optional CPU-only decode nodes


def test_the_documented_cluster_search_writes_to_object_storage_and_the_nfs_mount_is_optional():
    """No node needs a network filesystem: the docs' cluster search writes its experiment to S3; the EFS mount
    for users who keep runs on one is in cluster.yaml as a commented setup command, at the folder the docs name."""
    config = _prepared()
    assert not any("mount -t nfs4" in command for command in config["setup_commands"])
    page = (REPO / "docs/cluster.md").read_text()
    cluster = page[page.index("## Cluster"):]
    search_job = cluster[cluster.index("tuning/search.py"):]
    assert re.search(r"--output (\S+)", search_job).group(1).startswith("s3://")
    text = (REPO / "cluster.yaml").read_text()
    optional = re.search(r"^\s*#\s*- sudo mkdir -p \S+ .*mount -t nfs4 .* (/\S+)\)", text, re.MULTILINE)
    assert optional and f"--storage {optional.group(1)}/runs" in " ".join(cluster.split())
    assert not any(types.get("worker_setup_commands") or types.get("setup_commands")
                   for types in RAW["available_node_types"].values())  # no node type replaces them
