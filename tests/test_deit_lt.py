"""DeiT-LT: the identities its math must satisfy (seed-systems-reference.md section 2, "Tests"), the teacher as a
run of this harness, and a teacher run followed by a student run in-process (the 2-worker student is
tests/test_ray_methods.py's)."""
import json
import re

import pytest
import timm.data.mixup
import torch
import torch.nn.functional as F

from glmc_ray.core import config as config_lib
from glmc_ray.core import longtail
from glmc_ray.methods import build_method
from glmc_ray.methods.base import Batch
from glmc_ray.methods.deit_lt import mix
from glmc_ray.methods.glmc import smoothed_one_hot
from glmc_ray.models.teacher import Teacher, renormalisation, teacher_input
from glmc_ray.train import main
from glmc_ray.training.worker import build_network, build_trainee
from tests.conftest import REPO, resume_matches_straight, tensorboard_scalars, train_on

SMOKE = str(REPO / "configs/smoke.yaml")
SMALL = ["data.synthetic_max_count=64", "train.progress_every=0"]
TEACHER = [*SMALL, "train.epochs=1", "model.width=4", "method.name=ldam_drw"]  # any CNN method
STUDENT = [*SMALL, "train.epochs=2", "method.name=deit_lt", "model.arch=deit_micro_distilled_patch4_32",
           "data.repeated_augmentation=3",
           "optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05", "method.deit_lt.drw_start=0.5"]
COUNTS = [40, 20, 10, 5, 2]


def _sets(settings):
    return [a for s in settings for a in ("--set", s)]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A 1-epoch LDAM-DRW ResNet-32 run of the smoke data: the teacher of this module's students."""
    output = tmp_path_factory.mktemp("teacher")
    assert main(["--config", SMOKE, "--output", str(output), *_sets(TEACHER)]) == 0
    (run,) = output.iterdir()
    return run


def _student(*overrides):
    return config_lib.load(SMOKE, [*STUDENT, "method.deit_lt.teacher=a-run", *overrides])


def _batch(n=8, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return Batch(x, x, torch.randint(classes, (n,), generator=g))


class Recording(torch.nn.Module):
    """A teacher network that records what it is shown and answers with fixed random logits per image."""

    def __init__(self, classes=5):
        super().__init__()
        self.shown, self.weight = [], torch.nn.Parameter(torch.randn(classes, 3 * 32 * 32) / 50)

    def forward(self, x):
        self.shown.append(x)
        return x.flatten(1) @ self.weight.t()


# ---- the pure math ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam,smoothing", [(1.0, 0.0), (0.7, 0.1), (0.3, 0.2)])
def test_mixed_smoothed_targets_are_timms(lam, smoothing):
    y = torch.tensor([0, 3, 1, 4, 2, 2])
    ours = smoothed_one_hot(y, 5, smoothing)
    ours = lam * ours + (1 - lam) * ours.flip(0)
    torch.testing.assert_close(ours, timm.data.mixup.mixup_target(y, 5, lam, smoothing))


def test_mixup_and_cutmix_mix_the_batch_with_itself_reversed_and_the_targets_by_the_pasted_share():
    """Image i is the constant i: a mixed pixel shows which image it came from."""
    cfg = config_lib.DeiTLTConfig()
    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 32, 32).contiguous()
    targets = F.one_hot(torch.arange(6), 6).float()
    seen = set()
    for seed in range(12):
        mixed, mixed_targets = mix(x, targets, cfg, torch.Generator().manual_seed(seed))
        lam = float(mixed_targets[0, 0])
        assert mixed_targets.sum(1).tolist() == pytest.approx([1.0] * 6) and float(mixed_targets[0, 5]) == \
            pytest.approx(1 - lam)
        if torch.all(mixed[0] == mixed[0, 0, 0, 0]):  # Mixup: every pixel lam i + (1 - lam)(5 - i)
            seen.add("mixup")
            torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
        else:  # CutMix: a box of the reversed batch, the target's share its area
            seen.add("cutmix")
            pasted = (mixed[0] == 5.0).float().mean()
            assert torch.all((mixed[0] == 0.0) | (mixed[0] == 5.0)) and float(pasted) == pytest.approx(1 - lam)
        again, _ = mix(x, targets, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(again, mixed)  # replayed from the same key
    assert seen == {"mixup", "cutmix"}  # switch_prob 0.5 over 12 draws


def test_the_teacher_sees_the_batch_renormalised_to_its_own_statistics_and_resized():
    student, teacher = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]), ([0.48, 0.45, 0.4], [0.22, 0.22, 0.22])
    scale, shift = renormalisation(student, teacher)
    pixels = torch.rand(2, 3, 16, 16)
    x = (pixels - torch.tensor(student[0]).view(1, 3, 1, 1)) / torch.tensor(student[1]).view(1, 3, 1, 1)
    expected = (pixels - torch.tensor(teacher[0]).view(1, 3, 1, 1)) / torch.tensor(teacher[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher_input(x, scale, shift, (16, 16)), expected)
    resized = F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(teacher_input(x, scale, shift, (32, 32)), resized)


# ---- the method's step --------------------------------------------------------------------------------------

def _method(cfg, network, counts=COUNTS):
    method = build_method(cfg.method, counts, cfg)
    method.teacher = Teacher(network, torch.ones(3), torch.zeros(3), (32, 32))
    return method


def test_the_distillation_target_is_the_teachers_argmax_of_the_mixed_batch_and_drw_weights_it():
    cfg = _student()
    model, network = build_network(cfg, 5), Recording()
    method, batch = _method(cfg, network), _batch()
    for progress, drw in ((0.0, False), (0.5, True)):
        network.shown.clear()
        torch.manual_seed(0)
        out = method.step(model, batch, progress, torch.Generator().manual_seed(3))
        (shown,) = network.shown
        assert torch.equal(shown, batch.x1) == drw  # mixed before DRW, the batch itself after (CIFAR's official)
        torch.manual_seed(0)
        dist = model(shown, experts=True).experts[:, 1]
        weights = longtail.effective_number_weights(COUNTS, 0.9999) if drw else None
        expected = F.cross_entropy(dist, network(shown).argmax(1), weight=weights)
        torch.testing.assert_close(out.terms["loss_distill"], expected)
        assert out.terms["drw"] == float(drw)
        torch.testing.assert_close(out.loss, 0.5 * out.terms["loss_cls"] + 0.5 * out.terms["loss_distill"])
    assert float(longtail.effective_number_weights(COUNTS, 0.9999).sum()) == pytest.approx(len(COUNTS))


def test_mixing_after_drw_is_an_option():
    cfg = _student("method.deit_lt.mix_after_drw=true")
    network = Recording()
    _method(cfg, network).step(build_network(cfg, 5), _batch(), 0.9, torch.Generator().manual_seed(3))
    assert not torch.equal(network.shown[0], _batch().x1)


def test_the_prediction_is_the_average_of_the_two_heads():
    model = build_network(_student(), 5).eval()
    out = model(_batch().x1, experts=True)
    torch.testing.assert_close(model(_batch().x1), (out.experts[:, 0] + out.experts[:, 1]) / 2)
    assert model.expert_names == ("cls", "dist")


def test_the_teacher_stays_frozen_in_eval_mode_while_the_student_trains():
    teacher_cfg = config_lib.load(SMOKE, ["model.width=4"])
    network = build_network(teacher_cfg, 5)
    network.train()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    cfg = _student("train.finite_check_every=1")
    cfg.method.deit_lt.teacher = ""  # build_trainee loads none: this test's is attached below
    trainee = build_trainee(cfg, COUNTS, torch.device("cpu"), torch.contiguous_format)
    trainee.method.teacher = Teacher(network, torch.ones(3), torch.zeros(3), (32, 32))
    trainee.raw_model.train()
    trainee.method.teacher.train()  # what a careless caller might do: the teacher stays in eval mode
    train_on(trainee, cfg, [_batch(seed=s) for s in range(3)])
    assert not network.training and all(p.grad is None and not p.requires_grad for p in network.parameters())
    for key, value in network.state_dict().items():  # BatchNorm's running statistics included
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)  # bit for bit


# ---- a teacher run, then its student --------------------------------------------------------------------------

def test_a_teacher_run_then_a_student_run_in_process(teacher_run, tmp_path, capsys):
    settings = [*STUDENT, f"method.deit_lt.teacher={teacher_run}"]
    assert main(["--config", SMOKE, "--output", str(tmp_path), *_sets(settings)]) == 0
    (run,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["drw"] for r in records] == [0.0, 1.0]
    last = records[-1]
    for key in ("loss_cls", "loss_distill", "teacher_agreement", "test_top1", "val_balanced_top1", "posthoc_tau"):
        assert key in last, key
    for head in ("cls", "dist"):
        assert {f"test_{head}_{k}" for k in ("top1", "balanced_top1", "many", "medium", "few")} <= set(last)
    assert tensorboard_scalars(run, "test/dist_top1") == {r["epoch"]: pytest.approx(r["test_dist_top1"])
                                                         for r in records}
    final = json.loads((run / "final.json").read_text())
    assert final["last"]["test"]["expert_names"] == ["cls", "dist"] and len(final["last"]["test"]["experts"]) == 2
    out = capsys.readouterr().out
    assert f"test_cls_top1 {last['test_cls_top1']:.2f} | test_dist_top1 {last['test_dist_top1']:.2f}" in out


def test_a_resumed_student_equals_a_straight_one(teacher_run, tmp_path):
    resume_matches_straight(tmp_path, SMOKE, [*STUDENT, f"method.deit_lt.teacher={teacher_run}"], stop_after=1)


def test_a_bad_teacher_stops_before_making_a_run(teacher_run, tmp_path, capsys):
    student_of_it = tmp_path / "student"
    assert main(["--config", SMOKE, "--output", str(student_of_it), *_sets(STUDENT[:-1]),
                 "--set", "train.epochs=1", "--set", f"method.deit_lt.teacher={teacher_run}"]) == 0
    (student_run,) = student_of_it.iterdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.yaml").write_text((teacher_run / "config.yaml").read_text())
    cases = [
        ([f"method.deit_lt.teacher={tmp_path / 'missing'}"], r"method.deit_lt.teacher: .*missing does not exist"),
        ([f"method.deit_lt.teacher={no_weights}"], r"method.deit_lt.teacher: .*no-weights: the run has no checkpoint"),
        ([f"method.deit_lt.teacher={teacher_run}", "data.imbalance_factor=20"],
         r"method.deit_lt.teacher: data.imbalance_factor is 10.0 in the teacher run"),
        ([f"method.deit_lt.teacher={teacher_run}", "data.val_fraction=0.2"],
         r"method.deit_lt.teacher: data.val_fraction is 0.1 in the teacher run"),
        ([f"method.deit_lt.teacher={student_run}"], r"method.deit_lt.teacher: .* is itself a distillation student"),
        ([], r"method.deit_lt.teacher: empty; deit_lt distils from a finished run"),
        ([f"method.deit_lt.teacher={teacher_run}", "model.arch=resnet32"],
         r"model.arch: resnet32, but method.name=deit_lt trains a DeiT"),
        (["method.name=ce", f"method.deit_lt.teacher={teacher_run}"],
         r"method.deit_lt.\w+: set, but method.name is 'ce'"),  # a teacher (and the rest) for a method without one
        ([f"method.deit_lt.teacher={teacher_run}", "model.arch=deit_nano"], r"model.arch: 'deit_nano' is not one of"),
    ]
    for settings, message in cases:
        output = tmp_path / "runs"
        assert main(["--config", SMOKE, "--output", str(output), *_sets([*STUDENT, *settings])]) == 2, settings
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (settings, err)
        assert not output.exists()


def test_a_config_from_before_smoothing_was_every_methods_reads_as_it_trained():
    """method.deit_lt.label_smoothing (a run's config.yaml written before train.label_smoothing) loads as
    train.label_smoothing; giving both, differently, is refused."""
    values = config_lib.to_dict(_student())
    values["method"]["deit_lt"]["label_smoothing"] = 0.2
    values["train"].pop("label_smoothing")
    assert config_lib.from_dict(values).train.label_smoothing == 0.2
    values["train"]["label_smoothing"] = 0.1
    with pytest.raises(config_lib.ConfigError, match=r"label_smoothing: 0.2 and train.label_smoothing: 0.1"):
        config_lib.from_dict(values)
