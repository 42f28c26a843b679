"""configs/recipes/<dataset>/<method>.yaml: each recipe equals what its source states, loads, and passes --dry-run
on its dataset; a recipe given another dataset, or a second stage without its parent, is an error before training.

The table below is the check: each row's values are read from the official code or paper named beside it (the
same sources as each recipe's header and ../shared/docs/{glmc-reference,methods-reference}.md)."""
import pickle
import re

import numpy as np
import pytest
import yaml

from glmc_ray.core import config as config_lib
from glmc_ray.core.command_line import TEACHER_RECIPES
from glmc_ray.core.config import ConfigError
from glmc_ray.runs import parent_run, rundir
from glmc_ray.train import main
from glmc_ray.training.worker import build_network
from tests.conftest import CIFAR_ROOT, REPO

RECIPES = REPO / "configs" / "recipes"
SPLITS = CIFAR_ROOT / "splits"  # ../shared/data/splits: the real ImageNet-LT test and iNat-2018 val split files

GLMC_CIFAR = {"model.arch": "resnet32", "model.width": 64, "optim.lr": 0.01, "optim.weight_decay": 5e-3,
              "optim.schedule": "cosine", "train.epochs": 200, "train.batch_size": 64, "data.subset_protocol": "glmc",
              "data.subset_seed": 3407, "train.seed": 3407}
LDAM_STEPS = {"optim.schedule": "warmup_step", "optim.warmup_epochs": 5, "optim.milestones": [160, 180],
              "optim.gamma": 0.01, "train.epochs": 200}  # cifar_train.py adjust_learning_rate; RIDE's CustomLR
STANDARD_CIFAR = {"model.arch": "resnet32", "model.width": 16, "data.subset_protocol": "ldam", "data.subset_seed": 0}
LDAM_DRW = {**STANDARD_CIFAR, **LDAM_STEPS, "method.name": "ldam_drw", "optim.lr": 0.1, "optim.weight_decay": 2e-4,
            "optim.nesterov": False, "train.batch_size": 128, "method.ldam_drw.max_margin": 0.5,
            "method.ldam_drw.scale": 30.0, "method.ldam_drw.drw_start": 0.8, "method.ldam_drw.drw_beta": 0.9999}
RIDE_CIFAR = {"model.experts": 3, "model.expert_width": "reduced", "model.expert_scale": 30.0,
              "method.ride.weak_rotation": 15.0}
MDCS_CIFAR = {**STANDARD_CIFAR, "method.name": "mdcs", "model.experts": 3, "model.expert_width": "reduced",
              "optim.lr": 0.1, "optim.nesterov": True, "optim.weight_decay": 5e-4, "optim.schedule": "warmup_step",
              "optim.warmup_epochs": 20, "optim.milestones": [200, 320, 380], "optim.gamma": 0.1,
              "train.epochs": 400, "train.batch_size": 64, "method.mdcs.prior_exponents": [-0.5, 1.0, 2.5],
              "method.mdcs.consistency_weight": 0.6, "method.mdcs.consistency_ramp": 0.05,
              "method.mdcs.weak_rotation": 15.0, "data.strong_augmentation": "autoaugment_cutout"}
SHIKE = {**STANDARD_CIFAR, "method.name": "shike", "model.experts": 3, "optim.lr": 0.05, "optim.weight_decay": 5e-4,
         "optim.nesterov": False, "optim.schedule": "balms_warmup_cosine", "optim.warmup_epochs": 5,
         "train.batch_size": 128, "data.strong_augmentation": "autoaugment_cutout"}
BALMS = {**STANDARD_CIFAR, "method.name": "balanced_softmax", "optim.lr": 0.05, "optim.weight_decay": 5e-4,
         "optim.schedule": "balms_warmup_cosine", "optim.warmup_peak": 2.0, "train.batch_size": 512}
LOGIT_ADJUSTED = {**STANDARD_CIFAR, "method.name": "logit_adjusted", "method.logit_adjusted.tau": 1.0,
                  "optim.lr": 0.1, "optim.nesterov": True, "optim.weight_decay": 2e-4, "optim.schedule": "warmup_step",
                  "optim.gamma": 0.1, "train.batch_size": 128}
# val-iisc/DeiT-LT sh/*.sh, arguments.py (seed-systems-reference.md 2): lr 5e-4 x per-step batch / 512
DEIT_LT = {"model.arch": "deit_base_distilled_patch16_224", "model.drop_path": 0.1, "method.name": "deit_lt",
           "method.deit_lt.alpha": 0.5, "method.deit_lt.drw_beta": 0.9999, "method.deit_lt.mixup_alpha": 0.8,
           "method.deit_lt.cutmix_alpha": 1.0, "train.label_smoothing": 0.1, "optim.name": "adamw",
           "optim.weight_decay": 0.05, "optim.schedule": "warmup_cosine", "optim.warmup_epochs": 5,
           "train.accumulate": 4, "data.repeated_augmentation": 3}
DEIT_LT_CIFAR = {**DEIT_LT, "data.subset_protocol": "ldam", "data.subset_seed": 0, "optim.lr": 2.5e-4,
                 "train.batch_size": 256, "train.epochs": 1200, "method.deit_lt.drw_start": 0.916667,
                 "method.deit_lt.mix_after_drw": False}
IMAGENET = {"data.classes": 1000, "data.image_size": 224, "data.augmentation": "simclr",
            "model.arch": "resnext50_32x4d"}


def _glmc_cifar(classes, factor, q, gamma, weight):
    return {**GLMC_CIFAR, "data.source": f"cifar{classes}", "data.classes": classes, "data.imbalance_factor": factor,
            "method.glmc.resample_exponent": q, "method.glmc.label_weight_exponent": gamma,
            "method.glmc.consistency_weight": weight}


SOURCES = {
    # ynu-yangpeng/GLMC@2c0261c README.md, the training commands (glmc-reference.md section 6)
    "cifar10_lt_if100/glmc.yaml": _glmc_cifar(10, 100, 0.0, 1.2, 1.0),
    "cifar10_lt_if50/glmc.yaml": _glmc_cifar(10, 50, 0.0, 1.2, 1.0),
    "cifar10_lt_if10/glmc.yaml": _glmc_cifar(10, 10, 0.2, 1.0, 2.0),
    "cifar100_lt_if100/glmc.yaml": _glmc_cifar(100, 100, 0.0, 1.2, 4.0),
    "cifar100_lt_if50/glmc.yaml": _glmc_cifar(100, 50, 0.2, 1.2, 6.0),
    "cifar100_lt_if10/glmc.yaml": _glmc_cifar(100, 10, 0.2, 1.2, 4.0),
    "imagenet_lt/glmc.yaml": {**IMAGENET, "optim.lr": 0.1, "train.epochs": 135, "train.batch_size": 120,
                              "optim.weight_decay": 2e-4, "optim.warmup_epochs": 10,
                              "method.glmc.resample_exponent": 0.2, "method.glmc.label_weight_exponent": 1.0,
                              "method.glmc.consistency_weight": 10.0},
    "inat2018/glmc.yaml": {"data.classes": 8142, "model.arch": "resnext50_32x4d", "optim.lr": 0.1, "train.epochs": 120,
                           "train.batch_size": 128, "optim.weight_decay": 1e-4, "optim.warmup_epochs": 10,
                           "method.glmc.resample_exponent": 0.2, "method.glmc.label_weight_exponent": 1.0,
                           "method.glmc.consistency_weight": 10.0},
    # kaidic/LDAM-DRW@2536330 cifar_train.py (methods-reference.md 3(d), 3(e))
    "cifar10_lt_if100/ldam_drw.yaml": {**LDAM_DRW, "data.source": "cifar10", "data.imbalance_factor": 100},
    "cifar10_lt_if10/ldam_drw.yaml": {**LDAM_DRW, "data.source": "cifar10", "data.imbalance_factor": 10},
    "cifar100_lt_if100/ldam_drw.yaml": {**LDAM_DRW, "data.source": "cifar100", "data.imbalance_factor": 100},
    "cifar100_lt_if10/ldam_drw.yaml": {**LDAM_DRW, "data.source": "cifar100", "data.imbalance_factor": 10},
    # richardaecn/class-balanced-loss@1d78572 src/cifar_main.py, cifar_im_trainval_cb.sh (methods-reference.md 4)
    "cifar10_lt_if50/class_balanced.yaml": {**STANDARD_CIFAR, **LDAM_STEPS, "data.imbalance_factor": 50,
                                            "method.class_balanced.beta": 0.9999, "optim.lr": 0.1,
                                            "optim.weight_decay": 2e-4, "train.batch_size": 128},
    # frank-xwang/RIDE-LongTailRecognition@ab8be5c configs/*.json, train.py's CustomLR (methods-reference.md 5)
    "cifar100_lt_if100/ride.yaml": {**STANDARD_CIFAR, **LDAM_STEPS, **RIDE_CIFAR, "optim.lr": 0.1,
                                    "optim.nesterov": True, "optim.weight_decay": 5e-4, "train.batch_size": 128,
                                    "method.ride.diversity_factor": -0.45, "method.ride.reweight_factor": 0.05,
                                    "method.ride.drw_start": 0.8, "train.seed": 123},
    "cifar100_lt_if100/ride_router.yaml": {**STANDARD_CIFAR, **RIDE_CIFAR, "method.ride.stage": "router",
                                           "optim.lr": 0.01, "optim.nesterov": True, "optim.schedule": "cosine",
                                           "train.epochs": 5, "train.batch_size": 512,
                                           "method.ride.router_pos_weight": 100.0, "method.ride.router_top_k": 30},
    "imagenet_lt/ride.yaml": {**IMAGENET, "model.experts": 3, "optim.lr": 0.1, "optim.nesterov": True,
                              "optim.weight_decay": 2e-4, "optim.schedule": "warmup_step", "optim.warmup_epochs": 5,
                              "optim.milestones": [60, 80], "optim.gamma": 0.1, "train.epochs": 100,
                              "train.batch_size": 256, "method.ride.drw_start": 0.8,
                              "method.ride.reweight_factor": 0.02, "method.ride.diversity_factor": -0.2},
    # fistyee/MDCS@1a1d54e configs/*.json, train.py's CustomLR (methods-reference.md 6)
    "cifar100_lt_if100/mdcs.yaml": {**MDCS_CIFAR, "data.source": "cifar100"},
    "cifar10_lt_if100/mdcs.yaml": {**MDCS_CIFAR, "data.source": "cifar10"},
    "cifar100_lt_if50/mdcs.yaml": {**MDCS_CIFAR, "data.source": "cifar100", "data.imbalance_factor": 50},
    "cifar10_lt_if50/mdcs.yaml": {**MDCS_CIFAR, "data.source": "cifar10", "data.imbalance_factor": 50},
    "imagenet_lt/mdcs.yaml": {**IMAGENET, "model.experts": 3, "optim.lr": 0.1, "optim.nesterov": True,
                              "optim.weight_decay": 5e-4, "optim.schedule": "cosine", "train.epochs": 180,
                              "train.batch_size": 256, "data.strong_augmentation": "randaugment_cutout"},
    # Keke921/SHIKE@addfb5c cifarTrain.py, utils.py's CosineAnnealingLRWarmup (methods-reference.md 7)
    "cifar100_lt_if100/shike.yaml": {**SHIKE, "method.shike.stage": "mixture", "optim.warmup_peak": 3.0,
                                     "train.epochs": 180, "method.shike.transfer_weight": 10.0,
                                     "method.shike.mutual_weight": 1.0},
    "cifar100_lt_if100/shike_retrain.yaml": {**SHIKE, "method.shike.stage": "retrain", "optim.warmup_peak": 2.0,
                                             "train.epochs": 20},
    # jiawei-ren/BalancedMetaSoftmax-Classification@34a61e4 config/CIFAR*_LT/balanced_softmax_imba200.yaml,
    # run_networks.py: epochs = ceil(iterations / ceil(images / 512)) (methods-reference.md 1(e))
    "cifar10_lt_if200/balanced_softmax.yaml": {**BALMS, "data.imbalance_factor": 200, "optim.warmup_epochs": 37,
                                               "train.epochs": 591},  # 11,203 images: 22 batches
    "cifar100_lt_if200/balanced_softmax.yaml": {**BALMS, "data.imbalance_factor": 200, "optim.warmup_epochs": 43,
                                                "train.epochs": 685},  # 9,502 images: 19 batches
    # google-research logit_adjustment/utils.py dataset_mappings (methods-reference.md 2(e))
    "cifar10_lt_if100/logit_adjusted.yaml": {**LOGIT_ADJUSTED, "optim.warmup_epochs": 20,
                                             "optim.milestones": [604, 926, 1128], "train.epochs": 1241},
    "cifar100_lt_if100/logit_adjusted.yaml": {**LOGIT_ADJUSTED, "optim.warmup_epochs": 22,
                                              "optim.milestones": [691, 1059, 1290], "train.epochs": 1419},
    "cifar10_lt_if100/deit_lt.yaml": {**DEIT_LT_CIFAR, "data.source": "cifar10"},
    "cifar100_lt_if100/deit_lt.yaml": {**DEIT_LT_CIFAR, "data.source": "cifar100"},
    "imagenet_lt/deit_lt.yaml": {**IMAGENET, **DEIT_LT, "optim.lr": 5e-4, "train.batch_size": 512,
                                 "train.epochs": 1400, "method.deit_lt.drw_start": 0.857143,
                                 "method.deit_lt.mix_after_drw": True},
}
SECOND_STAGES = {"cifar100_lt_if100/ride_router.yaml": "cifar100_lt_if100/ride.yaml",
                 "cifar100_lt_if100/shike_retrain.yaml": "cifar100_lt_if100/shike.yaml"}
TEACHERS = TEACHER_RECIPES
DATASETS = {"cifar10_lt": ("cifar10", 10), "cifar100_lt": ("cifar100", 100), "imagenet_lt": ("files", 1000),
            "inat2018": ("files", 8142)}


def recipe_files() -> list[str]:
    return sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml"))


def load(recipe: str, overrides=()) -> config_lib.Config:
    stage_two = ["train.init_from=parent"] if recipe in SECOND_STAGES else []
    teacher = ["method.deit_lt.teacher=teacher"] if recipe in TEACHERS else []
    return config_lib.load(RECIPES / recipe, [*stage_two, *teacher, *overrides])


def test_every_recipe_is_in_the_source_table_and_names_its_source_and_published_figures():
    assert recipe_files() == sorted(SOURCES)
    for recipe in recipe_files():
        header = [line for line in (RECIPES / recipe).read_text().splitlines() if line.startswith("#")]
        assert any(line.startswith("# Source: ") for line in header), recipe
        assert any(line.startswith("# Published") for line in header), recipe
        if recipe in TEACHERS:  # and the teacher recipe it is run after
            assert any(f"configs/recipes/{TEACHERS[recipe]}" in line for line in header), recipe


@pytest.mark.parametrize("recipe", sorted(SOURCES))
def test_each_recipe_equals_what_its_source_states(recipe):
    cfg = load(recipe)
    assert {key: _get(cfg, key) for key in SOURCES[recipe]} == SOURCES[recipe]
    folder, name = recipe.split("/")
    dataset = folder.rsplit("_if", 1)[0]
    source, classes = DATASETS[dataset]
    assert (cfg.data.source, cfg.data.classes) == (source, classes)  # the folder names the recipe's dataset
    if "_if" in folder:
        assert cfg.data.imbalance_factor == float(folder.rsplit("_if", 1)[1])
    assert cfg.method.name == name.removesuffix(".yaml").removesuffix("_router").removesuffix("_retrain")
    assert cfg.name == f"{folder}_{name.removesuffix('.yaml')}"


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """../shared/data's real CIFAR-10 and split files with an empty file for each image they list, and a
    cifar-100-python/ made of CIFAR-10's pixels relabelled into 100 classes of 500 (the recipes' dry runs count
    classes and images, they train on none)."""
    root = tmp_path_factory.mktemp("data")
    (root / "cifar-10-batches-py").symlink_to(CIFAR_ROOT / "cifar-10-batches-py")
    (root / "splits").symlink_to(SPLITS)
    for split in SPLITS.glob("*.txt"):
        for line in split.read_text().splitlines():
            image = root / line.split()[0]
            image.parent.mkdir(parents=True, exist_ok=True)
            image.touch()
    (root / "cifar-100-python").mkdir()
    for name, batches in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        pixels = np.concatenate([_unpickle(CIFAR_ROOT / "cifar-10-batches-py" / b)[b"data"] for b in batches])
        labels = (np.arange(len(pixels)) % 100).tolist()
        with open(root / "cifar-100-python" / name, "wb") as f:
            pickle.dump({"data": pixels, "fine_labels": labels}, f)
    return root


def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _dry_run_arguments(recipe: str, root, tmp_path) -> list[str]:
    """--set items that point the recipe at `root`; files recipes train on the split file here (the train splits
    are not in ../shared): ImageNet-LT's test split (1,000 classes), iNat-2018's val split (8,142)."""
    sets = [f"data.root={root}"]
    if recipe.startswith("imagenet_lt/"):
        sets.append("data.train_split=splits/ImageNet_LT_test.txt")
    if recipe.startswith("inat2018/"):
        sets += ["data.train_split=splits/iNaturalist18_val.txt", "data.test_split=splits/iNaturalist18_val.txt"]
    if recipe in SECOND_STAGES:
        sets.append(f"train.init_from={_parent_run(SECOND_STAGES[recipe], sets, tmp_path)}")
    if recipe in TEACHERS:
        sets.append(f"method.deit_lt.teacher={_parent_run(TEACHERS[recipe], sets, tmp_path, 'teacher')}")
    return sets


def _parent_run(recipe: str, sets: list[str], tmp_path, name: str = "parent"):
    """A stage-1 (or teacher) run directory of `recipe`: its config and a checkpoint of its (untrained) model."""
    cfg = config_lib.load(RECIPES / recipe, sets)
    run = tmp_path / name
    run.mkdir()
    config_lib.save(cfg, run / "config.yaml")
    rundir.save_checkpoint({"model": build_network(cfg, cfg.data.classes).state_dict()}, run / rundir.CHECKPOINT)
    return run


@pytest.mark.parametrize("recipe", sorted(SOURCES))
def test_every_recipe_passes_its_dry_run(recipe, data_root, tmp_path, capsys):
    sets = _dry_run_arguments(recipe, data_root, tmp_path)
    assert main(["--config", str(RECIPES / recipe), *[a for s in sets for a in ("--set", s)], "--dry-run"]) == 0
    out = capsys.readouterr().out
    classes = config_lib.load(RECIPES / recipe, sets).data.classes
    assert yaml.safe_load(out)["data"]["classes"] == classes


@pytest.mark.parametrize("recipe,sets,message", [
    ("imagenet_lt/glmc.yaml", ["data.train_split=splits/iNaturalist18_val.txt"],
     r"data.classes: 1000, the recipe's dataset, but the training split \(data.root=.*, "
     r"data.train_split=splits/iNaturalist18_val.txt\) has 8142 classes"),
    ("cifar100_lt_if100/ldam_drw.yaml", ["data.source=cifar10"],
     r"data.classes: 100, the recipe's dataset, but the training split \(data.source=cifar10\) has 10 classes"),
    ("cifar100_lt_if100/shike_retrain.yaml", [], r"train.init_from: empty, but method.shike.stage=retrain"),
    ("cifar100_lt_if100/ride_router.yaml", [], r"train.init_from: empty, but method.ride.stage=router"),
])
def test_a_recipe_given_another_dataset_or_a_second_stage_without_its_parent_stops_before_training(
        recipe, sets, message, data_root, tmp_path, capsys):
    argv = ["--config", str(RECIPES / recipe), "--set", f"data.root={data_root}", "--output", str(tmp_path / "runs")]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: .*{message}", err, re.MULTILINE), err
    assert not (tmp_path / "runs").exists()


def test_a_second_stage_recipe_matches_its_first_stage_model_and_subset(data_root, tmp_path):
    """A parent made by another recipe is refused, naming the first differing key."""
    sets = [f"data.root={data_root}"]
    parent = _parent_run("cifar100_lt_if100/ride.yaml", sets, tmp_path)
    with pytest.raises(ConfigError, match=r"method.name: 'shike' here, 'ride' in the parent run .*differing"):
        parent_run.check(load("cifar100_lt_if100/shike_retrain.yaml", [*sets, f"train.init_from={parent}"]))


@pytest.mark.parametrize("recipe", [r for r in sorted(SOURCES) if r.startswith("cifar")])
def test_a_cifar_recipe_validates_on_a_held_out_split_unless_the_paper_protocol_is_named(recipe):
    validated = load(recipe)
    assert (validated.data.protocol, validated.data.val_fraction) == ("validation", 0.1)
    paper = load(recipe, ["data.protocol=paper"])
    assert (paper.data.val_fraction, paper.data.val_split) == (0.0, "")
    assert {key: _get(paper, key) for key in SOURCES[recipe]} == SOURCES[recipe]  # the published recipe, whole
    assert config_lib.from_dict(config_lib.to_dict(paper)) == paper  # what a paper run's config.yaml reloads to
