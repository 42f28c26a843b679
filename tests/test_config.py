"""Config loading, overrides, errors, and the rule that every field is read somewhere."""
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml

from glmc_ray.core import config as config_lib
from glmc_ray.core.command_line import find_config
from glmc_ray.core.config import Config, ConfigError
from glmc_ray.train import main
from glmc_ray.training.worker import build_trainee
from tests.conftest import REPO


def test_overrides_are_typed_and_applied_in_order():
    cfg = config_lib.load(REPO / "configs/smoke.yaml", ["optim.lr=0.5", "train.epochs=7", "optim.lr=2e-3",
                                                        "method.glmc.area_corrected_cutmix=true"])
    assert cfg.optim.lr == 0.002 and cfg.train.epochs == 7 and cfg.method.glmc.area_corrected_cutmix is True


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", r"unknown key 'optim.lrr'; did you mean 'optim.lr'\? valid keys here: .*lr"),
    ("bogus.x=1", r"unknown key 'bogus'"),
    ("train.epochs=ten", r"train.epochs: expected int, got 'ten'"),
    ("method.glmc.area_corrected_cutmix=1", r"expected true or false, got 1"),
    ("method.name=ldam", r"method.name: 'ldam' is not one of glmc, ce"),
    ("data.imbalance_factor=0.5", r"data.imbalance_factor: 0.5 is out of range; expected a number >= 1"),
    ("optim", r"expected key=value"),
    ("data.dataset=cifar10", r"unknown key 'data.dataset'; (did you mean .*\? )?valid keys here: .*source"),
    ("data.source=imagenet", r"data.source: 'imagenet' is not one of cifar10, cifar100, synthetic, files, shards"),
    ("data.mean=[0.5,0.5]", r"data.mean, data.std: .*1 \(grayscale\) or 3 \(RGB\)"),
    ("data.mean=0.5", r"data.mean: expected a list, got 0.5"),
    ("data.std=[0.2,x,0.2]", r"data.std\[1\]: expected float, got 'x'"),
    ("data.augmentation=simclr", r"data.augmentation: in-memory sources .* crop_flip only"),
    ("data.source=files", r"data.train_split: required for data.source=files"),
    ("dist.storage_retry_seconds=-1", r"dist.storage_retry_seconds: -1.0 is out of range; expected >= 0 \(0: no retry"),
])
def test_bad_overrides_name_key_value_and_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(REPO / "configs/smoke.yaml", [override])


def test_yaml_typo_names_the_file(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("optim:\n  momentun: 0.8\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'optim.momentun'"):
        config_lib.load(bad)


def _leaf_fields(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name, hints[f.name]


def test_every_config_field_is_read_by_the_code():
    """A field nobody reads is the official code's `--beta`: parsed, documented, silently ignored."""
    source = "\n".join(p.read_text() for p in (REPO / "glmc_ray").rglob("*.py") if p.name != "config.py")
    unread = [path for path, name, _ in _leaf_fields() if not re.search(rf"\.{name}\b", source)]
    assert not unread, f"config fields never read: {unread}"


def test_momentum_and_weight_decay_reach_the_optimizer():
    cfg = config_lib.load(REPO / "configs/smoke.yaml", ["optim.momentum=0.7", "optim.weight_decay=0.03",
                                                        "optim.nesterov=true"])
    import torch
    trainee = build_trainee(cfg, [50, 20, 5], torch.device("cpu"), torch.contiguous_format)
    group = trainee.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.7, 0.03, True)


def test_dry_run_prints_a_config_that_loads_back_with_the_device_and_counts(capsys, cifar_root, tmp_path):
    """A recipe named by name; the output is YAML that trains as it is (a config), its comments say where."""
    assert main(["--config", "cifar10_lt_if100/glmc", "--data-root", str(cifar_root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert comments[1] == "# trains on: cpu in this process"
    assert comments[2].endswith("4500 down to 45 per class: [4500, 2697, 1616, 969, 581, 348, 209, 125, 75, 45]")
    assert comments[3] == "# protocol: validation on 0.1 of each class, held out (best.pt and the post-hoc tau)"
    (tmp_path / "saved.yaml").write_text(out)
    cfg = config_lib.load(tmp_path / "saved.yaml")
    recipe = config_lib.load(REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml", [f"data.root={cifar_root}"])
    recipe.data.root = str(Path(recipe.data.root).resolve())  # the command makes it absolute (workers move)
    assert cfg == recipe
    assert set(yaml.safe_load(out)["method"]) == {"name", "glmc"}  # the chosen method's section only


def test_a_device_this_machine_lacks_is_refused_by_the_dry_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--config", "smoke", "--set", "train.device=cuda", "--dry-run"]) == 2
    assert "train.device: 'cuda' requested, but this worker has no CUDA device" in capsys.readouterr().err


def test_names_find_packaged_configs_and_a_near_miss_is_suggested(capsys):
    assert find_config("cifar10_lt_if100") == REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml"
    assert find_config("imagenet_lt/ride") == REPO / "configs/recipes/imagenet_lt/ride.yaml"
    assert find_config("smoke") == REPO / "configs/smoke.yaml"
    assert find_config("methods", "--space", REPO / "configs/search") == REPO / "configs/search/methods.yaml"
    assert main(["--config", "cifar10_lt_if100/ldam", "--dry-run"]) == 2
    assert "did you mean cifar10_lt_if100/ldam_drw?" in capsys.readouterr().err
    assert main(["--config", "smoke", "--set", "train.epoch=3", "--dry-run"]) == 2
    assert "unknown key 'train.epoch'; did you mean 'train.epochs'?" in capsys.readouterr().err


def test_cli_reports_config_errors(capsys, tmp_path):
    assert main(["--config", str(REPO / "configs/smoke.yaml"), "--set", "train.batch_size=-1",
                 "--output", str(tmp_path)]) == 2
    assert "train.batch_size: -1 is out of range" in capsys.readouterr().err
    cifar10 = str(REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml")
    assert main(["--config", cifar10, "--data-root", str(tmp_path / "missing"),
                 "--output", str(tmp_path)]) == 2
    assert "missing does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"", r"empty\.yaml is empty; expected YAML sections"),
    (b"# only a comment\n", r"empty\.yaml is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", r"empty\.yaml is not a text file"),
    (b"- a\n- b\n", r"expected a mapping at top level, got list"),
])
def test_empty_binary_and_non_mapping_config_files_are_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "empty.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        config_lib.load(path)


def test_a_directory_given_as_config_is_named_as_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory; expected a YAML file"):
        config_lib.load(tmp_path)


def test_errors_blame_the_set_item_or_the_file_that_wrote_the_key(tmp_path):
    smoke = REPO / "configs/smoke.yaml"
    with pytest.raises(ConfigError) as err:  # warmup's range depends on epochs: the epochs must be blamed
        config_lib.load(smoke, ["train.epochs=0"])
    assert str(err.value).startswith("--set train.epochs=0: train.epochs: 0 is out of range")
    with pytest.raises(ConfigError) as err:
        config_lib.load(smoke, ["optim.lr=-1"])
    assert "smoke.yaml" not in str(err.value) and str(err.value).startswith("--set optim.lr=-1: optim.lr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as err:  # the file wrote the bad key; an unrelated --set is not blamed
        config_lib.load(bad, ["optim.lr=0.1"])
    assert str(err.value).startswith(f"{bad}: train.batch_size: 0 is out of range")
    with pytest.raises(ConfigError, match=r"^--set train=3: train: expected a mapping"):
        config_lib.load(smoke, ["train=3"])
    with pytest.raises(ConfigError, match=r"^--set optim.lr=\[1: the value is not valid YAML"):
        config_lib.load(smoke, ["optim.lr=[1"])


@pytest.mark.parametrize("key,scalar", sorted((path, kind is float) for path, _, kind in _leaf_fields()
                                               if kind is float or kind == list[float]))
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "1e400"])
def test_every_float_field_refuses_non_finite_values(key, scalar, value):
    """Walks the config itself, so the fields added later (a method's own section) are covered too."""
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(key)}=.*: {re.escape(key)}(\[0\])?: .* is not a "
                                          r"finite number"):
        config_lib.load(REPO / "configs/smoke.yaml", [f"{key}={value if scalar else f'[{value}]'}"])


def test_a_non_finite_value_is_one_error_line_before_anything_is_made(tmp_path, capsys):
    assert main(["--config", str(REPO / "configs/smoke.yaml"), "--output", str(tmp_path / "runs"),
                 "--set", "method.glmc.resample_exponent=.nan"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --set method.glmc.resample_exponent=.nan: method.glmc.resample_exponent: nan is not a finite number; "
        "expected a finite float"]
    assert not (tmp_path / "runs").exists()
