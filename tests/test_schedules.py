"""The lr schedules (glmc_ray/core/schedules.py) against the official codes' own formulas, at every epoch of the
recipes' 100-400-epoch schedules, through the optimizer and torch's LambdaLR as the loop steps them; a resume
mid-warm-up or mid-decay continues the same sequence; a search's shortened schedule keeps the milestones' place."""
import math
import re

import pytest
import torch

from glmc_ray.core import config as config_lib
from glmc_ray.core.config import ConfigError
from glmc_ray.core.schedules import lr_factor, lr_scheduler, scaled_milestones
from glmc_ray.runs import rundir
from glmc_ray.search.options import trial_config
from glmc_ray.training.loop import restore, training_state
from glmc_ray.training.worker import build_trainee
from tests.conftest import REPO

RECIPES = REPO / "configs" / "recipes"


# The official formulas, as each code computes the lr of 0-based epoch e (the epoch it trains with it).

def ldam_drw_official(e: int, lr: float) -> float:
    """kaidic/LDAM-DRW cifar_train.py adjust_learning_rate, called at the start of epoch e with epoch = e + 1."""
    epoch = e + 1
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.0001
    if epoch > 160:
        return lr * 0.01
    return lr


def custom_lr_official(e: int, lr: float, step1: int, step2: int, warmup: int, gamma: float, step3=None) -> float:
    """RIDE's and MDCS's train.py CustomLR: a LambdaLR, stepped after each epoch (so epoch e trains at lambda(e))."""
    if step3 is not None and e >= step3:
        factor = gamma * gamma * gamma
    elif e >= step2:
        factor = gamma * gamma
    elif e >= step1:
        factor = gamma
    else:
        factor = 1
    if e < warmup:
        factor = factor * float(1 + e) / warmup
    return lr * factor


def balms_warmup_cosine_official(k: int, base_lr: float, warmup_lr: float, t_max: int, warmup: int) -> float:
    """SHIKE's (and BALMS's) utils.py CosineAnnealingLRWarmup.get_lr at last_epoch k, eta_min 0; SHIKE steps it
    after each epoch, so epoch e trains at k = e."""
    if k < warmup:
        return ((warmup_lr - base_lr) / (warmup - 1) * (k - 1) + base_lr) / base_lr * base_lr
    return (0 + (warmup_lr - 0) * (1 + math.cos(math.pi * (k - warmup) / (t_max - warmup))) / 2) / base_lr * base_lr


def glmc_cosine_official(e: int, lr: float, t: int) -> float:
    """GLMC's CIFAR CosineAnnealingLR(T_max=T, eta_min=0), stepped after each epoch."""
    return lr * 0.5 * (1 + math.cos(math.pi * e / t))


def glmc_paco_official(e: int, lr: float, t: int, warmup: int = 10) -> float:
    """GLMC's Trainer.paco_adjust_learning_rate, called at the end of epoch k: epoch e trains at f(e - 1), epoch
    0 at the raw lr (glmc-reference.md section 4)."""
    if e == 0:
        return lr
    k = e - 1
    if k <= warmup:
        return lr * (k + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (k - warmup + 1) / (t - warmup + 1)))


OFFICIAL = {
    "cifar100_lt_if100/ldam_drw.yaml": lambda e: ldam_drw_official(e, 0.1),
    "cifar10_lt_if10/ldam_drw.yaml": lambda e: ldam_drw_official(e, 0.1),
    "cifar100_lt_if100/ride.yaml": lambda e: custom_lr_official(e, 0.1, 160, 180, 5, 0.01),
    "imagenet_lt/ride.yaml": lambda e: custom_lr_official(e, 0.1, 60, 80, 5, 0.1),
    "cifar100_lt_if100/mdcs.yaml": lambda e: custom_lr_official(e, 0.1, 200, 320, 20, 0.1, step3=380),
    "cifar100_lt_if100/shike.yaml": lambda e: balms_warmup_cosine_official(e, 0.05, 0.15, 180, 5),
    "cifar100_lt_if100/shike_retrain.yaml": lambda e: balms_warmup_cosine_official(e, 0.05, 0.1, 20, 5),
    "cifar100_lt_if100/glmc.yaml": lambda e: glmc_cosine_official(e, 0.01, 200),
    "imagenet_lt/mdcs.yaml": lambda e: glmc_cosine_official(e, 0.1, 180),  # CosineAnnealingLR(T_max 180)
}


def _recipe(recipe: str, overrides=()) -> config_lib.Config:
    parent = ["train.init_from=parent"] if "_retrain" in recipe or "_router" in recipe else []
    return config_lib.load(RECIPES / recipe, [*parent, *overrides])


def _lrs(optim, epochs: int, lr: float) -> list[float]:
    """The lr of each epoch as the loop sees it: an SGD optimizer's, torch's LambdaLR stepped after each epoch."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = lr_scheduler(optimizer, optim, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_every_epoch_of_each_recipe_schedule_equals_the_official_formula(recipe):
    cfg = _recipe(recipe)
    official = [OFFICIAL[recipe](e) for e in range(cfg.train.epochs)]
    assert _lrs(cfg.optim, cfg.train.epochs, cfg.optim.lr) == pytest.approx(official, rel=1e-12, abs=1e-15)


def test_shikes_warm_up_is_the_one_its_log_prints_and_glmcs_official_paco_its_off_by_one():
    shike = _lrs(_recipe("cifar100_lt_if100/shike.yaml").optim, 180, 0.05)
    assert shike[:6] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.125, 0.15], rel=1e-12)  # cifar100_LT_IF100.log
    assert 0 < shike[-1] < 2e-5
    paco = _recipe("imagenet_lt/glmc.yaml", ["optim.schedule=official_paco"])
    lrs = _lrs(paco.optim, 135, 0.1)
    assert lrs == pytest.approx([glmc_paco_official(e, 0.1, 135) for e in range(135)], rel=1e-12, abs=1e-15)
    assert lrs[11] == pytest.approx(0.11)  # the official 1.1x lr at epoch W+1 (D9); warmup_cosine has none
    assert max(_lrs(_recipe("imagenet_lt/glmc.yaml").optim, 135, 0.1)) == pytest.approx(0.1)


@pytest.mark.parametrize("recipe,resume_at", [
    ("cifar100_lt_if100/ride.yaml", 3),  # mid-warm-up
    ("cifar100_lt_if100/ride.yaml", 170),  # between the two decays
    ("cifar100_lt_if100/mdcs.yaml", 330),
    ("cifar100_lt_if100/shike.yaml", 2),
])
def test_a_resume_mid_schedule_continues_the_straight_runs_lr_sequence(recipe, resume_at, tmp_path):
    """Through the loop's own checkpoint (training_state, save, load, restore) into a freshly built trainee."""
    cfg = _recipe(recipe, ["model.width=4"])
    counts = [500 - 4 * c for c in range(cfg.data.classes)]

    def trainee():
        return build_trainee(cfg, counts, torch.device("cpu"), torch.contiguous_format)

    def run(t, start: int, stop: int) -> list[float]:
        lrs = []
        for _ in range(start, stop):
            lrs.append(t.optimizer.param_groups[0]["lr"])
            t.optimizer.step()
            t.scheduler.step()
        return lrs

    straight = run(trainee(), 0, cfg.train.epochs)
    first = trainee()
    before = run(first, 0, resume_at)
    rundir.save_checkpoint(training_state(first, resume_at, {}), tmp_path / rundir.CHECKPOINT)
    second = trainee()
    assert restore(second, rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT)) == resume_at
    assert before + run(second, resume_at, cfg.train.epochs) == straight


def test_a_searchs_shortened_schedule_keeps_the_milestones_place():
    """As DRW's start (a fraction), the step milestones keep their fraction of a trial's schedule, rounded down."""
    assert scaled_milestones([160, 180], 200, 10) == [8, 9]
    assert scaled_milestones([200, 320, 380], 400, 20) == [10, 16, 19]
    base = _recipe("cifar100_lt_if100/ldam_drw.yaml", ["optim.warmup_epochs=1"])
    trial = trial_config(base, {"optim.lr": 0.05}, 10)
    assert (trial.train.epochs, trial.optim.milestones, trial.optim.lr) == (10, [8, 9], 0.05)
    assert [lr_factor(e, 10, trial.optim) for e in (7, 8, 9)] == [1.0, 0.01, pytest.approx(1e-4)]
    with pytest.raises(ConfigError, match=r"optim.milestones: 4 is inside the warm-up"):
        trial_config(_recipe("cifar100_lt_if100/ldam_drw.yaml"), {}, 6)  # 160/200 of 6 -> 4 < 5 warm-up epochs


@pytest.mark.parametrize("overrides,message", [
    (["optim.milestones=[160, 200]"], r"optim.milestones: 200 is past the last epoch; expected epochs in "
                                      r"\[optim.warmup_epochs, train.epochs\) = \[5, 200\)"),
    (["optim.milestones=[180, 160]"], r"optim.milestones: \[180, 160\] are not in increasing order"),
    (["optim.milestones=[3, 160]"], r"optim.milestones: 3 is inside the warm-up"),
    (["optim.warmup_epochs=200"], r"optim.warmup_epochs: 200 is out of range; expected in \[0, train.epochs\)"),
    (["optim.schedule=cosine"], r"optim.warmup_epochs: 5, but optim.schedule 'cosine' has no warm-up"),
    (["optim.schedule=warmup_cosine"], r"optim.milestones: \[160, 180\], but optim.schedule is 'warmup_cosine'"),
    (["optim.gamma=0"], r"optim.gamma: 0.0 is out of range; expected a factor in \(0, 1\]"),
    (["optim.schedule=balms_warmup_cosine", "optim.milestones=[]", "optim.warmup_epochs=1"],
     r"optim.warmup_epochs: 1; optim.schedule balms_warmup_cosine needs at least 2"),
])
def test_a_bad_schedule_is_an_error_naming_the_key_before_training(overrides, message, capsys):
    with pytest.raises(ConfigError, match=message):
        _recipe("cifar100_lt_if100/ldam_drw.yaml", overrides)
    from glmc_ray.train import main

    argv = ["--config", str(RECIPES / "cifar100_lt_if100/ldam_drw.yaml"), "--dry-run"]
    assert main([*argv, *[a for item in overrides for a in ("--set", item)]]) == 2
    assert re.match(rf"error: .*{message}", capsys.readouterr().err)
