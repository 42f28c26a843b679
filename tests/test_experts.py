"""The multi-expert methods RIDE, MDCS and SHIKE: their models, the identities of methods-reference.md 5(g), 6(g),
7(g), per-expert metrics, the second stage from a parent run, and bad input. Each one's 2-epoch runs in-process
and on 2 Ray workers are tests/test_methods.py's and tests/test_ray_methods.py's (the registry's)."""
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from glmc_ray.core import config as config_lib
from glmc_ray.core import longtail
from glmc_ray.core.config import ConfigError
from glmc_ray.core.evaluation import evaluate
from glmc_ray.methods import Batch, build_method
from glmc_ray.methods.balanced_softmax import balanced_softmax_loss
from glmc_ray.methods.ldam_drw import ldam_loss
from glmc_ray.methods.mdcs import consistency_ramp, mdcs_loss
from glmc_ray.methods.ride import distill_loss, diversity_temperatures, ride_loss, router_loss, router_targets
from glmc_ray.methods.shike import shike_loss, transfer_teacher
from glmc_ray.models.experts import ExpertNet, ShallowExpert, freeze_except, routed_mean
from glmc_ray.runs import rundir
from glmc_ray.train import main
from glmc_ray.training.worker import build_network, parameter_groups, run_worker
from tests.conftest import Interrupted, StopAfter, resume_matches_straight
from tests.test_methods import SMOKE

COUNTS = [40, 20, 10, 5, 2]
STRONG = "data.strong_augmentation=autoaugment_cutout"


def _cfg(name, *overrides):
    extra = [STRONG] if name == "mdcs" else []
    return config_lib.load(SMOKE, [f"method.name={name}", "model.width=4", *extra, *overrides])


def _expert_logits(b=12, e=3, c=5, seed=0, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    cosines = torch.rand(b, e, c, generator=g, dtype=torch.float64) * 2 - 1
    return scale * cosines, torch.randint(c, (b,), generator=g)


def _images(n=6, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- the models -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ride", "mdcs", "shike"])
def test_the_output_is_the_mean_of_the_experts_and_returned_explicitly(name):
    model = build_network(_cfg(name), 5).eval()
    out = model(_images(), experts=True)
    assert out.experts.shape == (6, 3, 5) and out.features.shape[:2] == (6, 3)
    torch.testing.assert_close(out.mean, out.experts.mean(dim=1))
    torch.testing.assert_close(model(_images()), out.mean)
    assert out.experts.abs().max() <= 30.0 + 1e-4  # cosine heads times model.expert_scale


@pytest.mark.parametrize("name", ["ride", "shike"])
def test_shared_parameters_exist_once_and_expert_parameters_e_times(name):
    def sizes(experts):
        model = build_network(_cfg(name, f"model.experts={experts}"), 5)
        per_expert = {e: sum(p.numel() for n, p in model.named_parameters() if n.split(".")[:2] in
                             (["branches", str(e)], ["heads", str(e)], ["retrained_heads", str(e)]))
                      for e in range(experts)}
        return sum(p.numel() for p in model.trunk.parameters()), per_expert, sum(p.numel() for p in model.parameters())
    trunk2, experts2, total2 = sizes(2)
    trunk3, experts3, total3 = sizes(3)
    assert trunk2 == trunk3 > 0
    # RIDE's experts are alike; SHIKE's odd experts have one strided conv fewer (from stage 2, not stage 1)
    assert experts3[0] == experts3[2] == experts2[0] and (experts3[1] == experts3[0]) == (name == "ride")
    assert total2 == trunk2 + sum(experts2.values()) and total3 == trunk3 + sum(experts3.values())


def test_the_expert_logits_survive_torch_compile_in_one_graph():
    """fullgraph=True fails on any graph break: the expert logits are outputs, not a module attribute."""
    model = build_network(_cfg("shike"), 5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = _images(4)
    out = compiled(x, experts=True)
    torch.testing.assert_close(out.experts, model(x, experts=True).experts)
    out.experts.sum().backward()
    assert all(p.grad is not None for p in model.heads.parameters())


def test_ride_layout_widths_and_the_reduced_experts():
    reduced = build_network(_cfg("ride", "model.width=16"), 5)
    full = build_network(_cfg("ride", "model.width=16", "model.expert_width=full"), 5)
    assert reduced.heads[0].weight.shape == (5, 48) and full.heads[0].weight.shape == (5, 64)  # RIDE's 24/48
    assert reduced.branches[0].layers[0][0].conv1.out_channels == 24


@pytest.mark.parametrize("width", [4, 16])
def test_shallow_expert_shapes_match_the_last_stage(width):
    """SHIKE's depth-wise knowledge fusion: from stage 1 (two strided convs) or stage 2 (one) to stage 3's shape;
    a ReLU after each conv but the second (official `use_relu=(k != 1)`): the one-conv expert ends with one."""
    taps = [torch.randn(2, width, 32, 32), torch.randn(2, 2 * width, 16, 16)]
    for tap, relus in ((0, [True, False]), (1, [True])):
        shallow = ShallowExpert(width, tap, 2, torch.nn.BatchNorm2d)
        assert shallow(taps).shape == (2, 4 * width, 8, 8)
        assert [isinstance(conv[-1], torch.nn.ReLU) for conv in shallow.convs] == relus
    model = build_network(_cfg("shike", f"model.width={width}"), 5)
    assert [b.shallow.tap for b in model.branches] == [0, 1, 0]


def test_resnext_experts_clone_the_late_stages_at_ride_planes():
    cfg = config_lib.load(SMOKE, ["method.name=ride", "model.arch=resnext50_32x4d", "model.experts=2"])
    model = build_network(cfg, 7)
    assert model.heads[0].weight.shape == (7, 1536)  # planes 384 x 4
    assert model.branches[0].layers[0][0].conv1.out_channels == 384  # 192 planes, 32 groups x 12
    assert model.branches[0].layers[0][0].conv2.groups == 32
    first, second = (branch.layers[0][0].conv1.weight for branch in model.branches)
    assert first.data_ptr() != second.data_ptr()
    out = model.eval()(torch.randn(1, 3, 64, 64), experts=True)
    assert out.experts.shape == (1, 2, 7)


# ---- RIDE (methods-reference.md 5(g)) ---------------------------------------------------------------------------

def test_ride_with_one_expert_and_no_diversity_is_ldam_drw():
    logits, labels = _expert_logits(e=1)
    margins = longtail.ldam_margins(COUNTS, 0.5)
    weights = longtail.effective_number_weights(COUNTS, 0.9999).double()
    for w in (None, weights):
        loss, base, diversity = ride_loss(logits, labels, 30 * margins, w, 1.0, 0.0)
        torch.testing.assert_close(loss, ldam_loss(logits[:, 0] / 30, labels, margins, 30.0, w).float(),
                                   rtol=1e-5, atol=1e-5)
        assert float(diversity) == 0.0


def test_identical_experts_have_no_diversity_and_a_negative_factor_rewards_difference():
    logits, labels = _expert_logits()
    same = logits[:, :1].expand(-1, 3, -1)
    temperatures = diversity_temperatures(COUNTS, 0.05).double()
    for t in (1.0, temperatures):
        _, _, diversity = ride_loss(same, labels, torch.zeros(5), None, t, -0.45)
        assert abs(float(diversity)) < 1e-6
        _, _, diversity = ride_loss(logits, labels, torch.zeros(5), None, t, -0.45)
        assert float(diversity) < 0  # lambda < 0: the loss falls as the experts differ from the ensemble


def test_ride_diversity_is_lambda_t2_kl_against_the_detached_mean():
    logits, labels = _expert_logits()
    logits.requires_grad_(True)
    t = diversity_temperatures(COUNTS, 0.05).double()
    _, _, diversity = ride_loss(logits, labels, torch.zeros(5), None, t, -0.2)
    mean = logits.detach().mean(dim=1)
    expected = sum(-0.2 * float(t.mean()) ** 2 * F.kl_div(F.log_softmax(logits[:, e] / t, 1),
                                                          F.softmax(mean / t, 1), reduction="batchmean")
                   for e in range(3))
    torch.testing.assert_close(diversity.double(), expected.double(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(t.max(), torch.tensor(1.0, dtype=t.dtype)) and t[0] > t[-1]  # head classes get T = 1


def test_crossing_the_drw_epoch_changes_weights_and_temperature():
    cfg = _cfg("ride", "train.epochs=10", "method.ride.drw_start=0.5")
    method = build_method(cfg.method, COUNTS, cfg)
    model = build_network(cfg, 5)
    batch = Batch(_images(), _images(), torch.tensor([0, 1, 2, 3, 4, 4]))
    before = method.step(model, batch, 0.4, torch.Generator())
    after = method.step(model, batch, 0.5, torch.Generator())
    assert (before.terms["drw"], after.terms["drw"]) == (0.0, 1.0)
    assert float(before.terms["loss_base"].detach()) != float(after.terms["loss_base"].detach())
    assert float(before.terms["loss_diversity"].detach()) != float(after.terms["loss_diversity"].detach())


def test_the_base_temperature_scales_the_per_class_temperatures_after_drw():
    """Official `RIDELoss`: T_c = base_diversity_temperature * v_c / max v from the DRW epoch on."""
    cfg = _cfg("ride", "train.epochs=10", "method.ride.drw_start=0.5", "method.ride.diversity_temperature=2")
    method = build_method(cfg.method, COUNTS, cfg)
    model = build_network(cfg, 5)
    batch = Batch(_images(), _images(), torch.tensor([0, 1, 2, 3, 4, 4]))
    step = method.step(model, batch, 0.5, torch.Generator())
    expected = ride_loss(model(batch.x1, experts=True).experts, batch.y, method.margin_offsets,
                         method.drw_weights, 2 * diversity_temperatures(COUNTS, cfg.method.ride.reweight_factor),
                         cfg.method.ride.diversity_factor)[2]
    torch.testing.assert_close(step.terms["loss_diversity"], expected)


def test_distillation_is_t2_kl_from_the_detached_teacher_and_zero_when_they_agree():
    student, _ = _expert_logits(e=1, seed=1)
    teacher, _ = _expert_logits(e=1, seed=2)
    student, teacher = student[:, 0].requires_grad_(True), teacher[:, 0].requires_grad_(True)
    assert abs(float(distill_loss(student, student, 1.5).detach())) < 1e-6
    loss = distill_loss(student, teacher, 1.5)
    p = F.softmax(teacher.detach() / 1.5, dim=1)
    expected = 1.5 ** 2 * (p * (p.log() - F.log_softmax(student.detach() / 1.5, dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_a_teacher_adds_its_distillation_once_not_once_per_expert():
    """The official loop adds the whole RIDE loss and the distillation term once per expert (E times)."""
    cfg = _cfg("ride", "method.ride.distill_weight=0.7")
    method, model = build_method(cfg.method, COUNTS, cfg), build_network(cfg, 5)
    method.teacher = build_network(_cfg("ride", "model.experts=4"), 5).eval()
    batch = Batch(_images(), _images(), torch.tensor([0, 1, 2, 3, 4, 4]))
    out = method.step(model, batch, 0.1, torch.Generator())
    expected = out.terms["loss_base"] + out.terms["loss_diversity"] + 0.7 * out.terms["loss_distill"]
    torch.testing.assert_close(out.loss, expected)
    with torch.no_grad():
        alone = distill_loss(model(batch.x1), method.teacher(batch.x1), 1.5)
    torch.testing.assert_close(out.terms["loss_distill"].detach(), alone)


def test_router_targets_ask_for_the_next_expert_only_where_a_larger_ensemble_is_right():
    # 3 experts, 2 classes, label 0: expert logits chosen so the running means are right at [no, yes, yes],
    # [yes, ...], [no, no, no]
    logits = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [0.0, 0.0]],
                           [[1.0, 0.0], [0.0, 5.0], [0.0, 5.0]],
                           [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    targets = router_targets(logits, torch.zeros(3, dtype=torch.long))
    assert targets.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_the_routed_mean_adds_experts_while_every_router_so_far_says_yes():
    logits = torch.arange(3 * 3 * 2, dtype=torch.float32).reshape(3, 3, 2)
    routes = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])
    mean, used = routed_mean(logits, routes)
    assert used.tolist() == [3.0, 2.0, 1.0]
    torch.testing.assert_close(mean, torch.stack([logits[0].mean(0), logits[1, :2].mean(0), logits[2, 0]]))
    loss = router_loss(torch.zeros(4, 2), torch.tensor([[1.0, 0.0]] * 4), 100.0)
    assert float(loss) == pytest.approx((100 + 1) * math.log(2) / 2)  # BCE(0) = log 2, positives x 100


# ---- MDCS (6(g)) ------------------------------------------------------------------------------------------------

def test_mdcs_without_shift_or_consistency_is_a_sum_of_ces_and_q1_is_balanced_softmax():
    logits, labels = _expert_logits(b=12)
    both = torch.cat([labels[:6], labels[:6]])
    loss, diversity, _, _ = mdcs_loss(logits, labels[:6], torch.zeros(3, 5), 0.0)
    expected = sum(F.cross_entropy(logits[:, k].float(), both) for k in range(3))
    torch.testing.assert_close(loss, expected)
    shift = torch.tensor(COUNTS, dtype=torch.float64).log().expand(3, -1)
    _, diversity, _, _ = mdcs_loss(logits, labels[:6], shift, 0.0)
    bs = sum(balanced_softmax_loss(logits[:, k].float(), both, longtail.log_prior(COUNTS)) for k in range(3))
    torch.testing.assert_close(diversity, bs)


def test_mdcs_consistency_is_zero_for_equal_views_and_finite_with_an_empty_mask():
    logits, labels = _expert_logits(b=6)
    _, _, consistency, _ = mdcs_loss(torch.cat([logits, logits]), labels, torch.zeros(3, 5), 0.6)
    assert abs(float(consistency)) < 1e-6
    wrong = F.one_hot((labels + 1) % 5, 5).double()[:, None].expand(-1, 3, -1) * 30  # every expert wrong on weak
    loss, _, consistency, used = mdcs_loss(torch.cat([wrong, logits]), labels, torch.zeros(3, 5), 0.6)
    assert float(consistency) == 0.0 and float(used) == 0.0 and torch.isfinite(loss)


def test_mdcs_consistency_averages_over_the_rows_right_on_the_weak_view():
    logits, labels = _expert_logits(b=8, e=1, seed=3)
    strong, _ = _expert_logits(b=8, e=1, seed=4)
    _, _, consistency, used = mdcs_loss(torch.cat([logits, strong]), labels, torch.zeros(1, 5), 1.0)
    mask = logits[:, 0].argmax(1) == labels
    assert 0 < int(mask.sum()) < 8
    expected = F.kl_div(F.log_softmax(strong[mask, 0], 1), F.softmax(logits[mask, 0], 1), reduction="batchmean")
    torch.testing.assert_close(consistency.double(), expected, rtol=1e-5, atol=1e-6)
    assert float(used) == pytest.approx(float(mask.double().mean()))


def test_mdcs_ramp_is_003_in_the_first_epoch_and_06_from_epoch_20():
    assert 0.6 * consistency_ramp(0, 400, 0.05) == pytest.approx(0.03)
    assert [0.6 * consistency_ramp(e, 400, 0.05) for e in (19, 20, 399)] == [pytest.approx(0.6)] * 3
    assert consistency_ramp(0, 10, 0.05) == 1.0  # a 10-epoch schedule keeps the proportion (half an epoch)


def test_mdcs_evaluates_the_raw_mean_of_the_experts():
    """Evaluation argmaxes the model's mean of raw expert logits: the training shifts q_k log n are not in it."""
    cfg = _cfg("mdcs")
    model = build_network(cfg, 5)
    x, y = _images(10, seed=1), torch.arange(10) % 5
    metrics = evaluate(model, [(x, y)], COUNTS, lambda: torch.autocast("cpu", enabled=False), lambda t: t)
    with torch.no_grad():
        expected = (model.eval()(x, experts=True).experts.mean(1).argmax(1) == y).double().mean() * 100
    assert metrics["top1"] == pytest.approx(float(expected))


# ---- SHIKE (7(g)) -----------------------------------------------------------------------------------------------

def test_identical_experts_have_zero_mutual_kl():
    logits, labels = _expert_logits()
    _, _, _, mutual = shike_loss(logits[:, :1].expand(-1, 3, -1), labels, 30.0, 10.0, 1.0)
    assert abs(float(mutual)) < 1e-7
    _, _, _, mutual = shike_loss(logits, labels, 30.0, 10.0, 1.0)
    assert float(mutual) > 0


@pytest.mark.parametrize("strong,view", [("auto", "x2"), ("none", "x1")])
def test_shike_trains_on_its_one_view_the_strong_one_when_there_is_one(strong, view):
    cfg = _cfg("shike", f"data.strong_augmentation={strong}")
    method, model = build_method(cfg.method, COUNTS, cfg), build_network(cfg, 5)
    a, b, y = _images(seed=1), _images(seed=2), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = method.step(model, Batch(a, b, y), 0.0, torch.Generator()).loss
    same = Batch(b, b, y) if view == "x2" else Batch(a, a, y)
    torch.testing.assert_close(loss, method.step(model, same, 0.0, torch.Generator()).loss)


def test_transfer_teacher_picks_the_hardest_negative_and_the_experts_maximum():
    logits, labels = _expert_logits()
    teacher = transfer_teacher(logits, labels)
    mean = logits.mean(1)
    for i, y in enumerate(labels.tolist()):
        non_target = [c for c in range(5) if c != y]
        h = max(non_target, key=lambda c: mean[i, c])
        assert teacher[i, y] == 0  # the official sets the target to 0
        assert teacher[i, h] == mean[i, h]
        for c in non_target:
            if c != h:
                assert teacher[i, c] == logits[i, :, c].max()


def test_shike_stage_two_is_balanced_softmax_which_is_ce_on_uniform_counts():
    cfg = _cfg("shike", "method.shike.stage=retrain", "train.init_from=/nowhere")
    method = build_method(cfg.method, [7] * 5, cfg)
    model = build_network(cfg, 5)
    batch = Batch(_images(), _images(), torch.tensor([0, 1, 2, 3, 4, 0]))
    out = method.step(model, batch, 0.0, torch.Generator())
    z = model(batch.x1, experts=True).experts
    torch.testing.assert_close(out.loss, sum(F.cross_entropy(z[:, e], batch.y) for e in range(3)))
    assert model.use_retrained_heads and method.trainable == ("retrained_heads",)


def test_a_stage_two_step_changes_only_the_retrained_heads():
    """BatchNorm buffers included: the frozen model stays in eval mode even after model.train() (the loop calls
    it after each evaluation), and SGD holds only the re-trained heads (no weight decay on frozen weights)."""
    cfg = _cfg("shike", "method.shike.stage=retrain", "train.init_from=/nowhere")
    method = build_method(cfg.method, COUNTS, cfg)
    model = build_network(cfg, 5)
    kept = freeze_except(model, method.trainable)
    assert kept == [f"retrained_heads.{e}.weight" for e in range(3)]
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    optimizer = torch.optim.SGD(parameter_groups(model), lr=0.5, momentum=0.9, weight_decay=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = Batch(_images(), _images(), torch.tensor([0, 1, 2, 3, 4, 0]))
    for _ in range(2):
        optimizer.zero_grad()
        method.step(model, batch, 0.0, torch.Generator()).loss.backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(kept)


# ---- per-expert metrics -----------------------------------------------------------------------------------------

def test_each_experts_accuracy_and_shot_groups_are_reported():
    cfg = _cfg("ride")
    model = build_network(cfg, 5)
    x, y = _images(20, seed=2), torch.arange(20) % 5
    counts = [150, 90, 50, 19, 5]
    metrics = evaluate(model, [(x[:12], y[:12]), (x[12:], y[12:])], counts,
                       lambda: torch.autocast("cpu", enabled=False), lambda t: t)
    assert len(metrics["experts"]) == 3
    with torch.no_grad():
        z = model.eval()(x, experts=True).experts
    for e, expert in enumerate(metrics["experts"]):
        hits = z[:, e].argmax(1) == y
        assert expert["top1"] == pytest.approx(float(hits.double().mean() * 100))
        assert expert["many"] == pytest.approx(float(hits[y == 0].double().mean() * 100))
        assert expert["few"] == pytest.approx(float(hits[(y == 3) | (y == 4)].double().mean() * 100))
        assert set(expert) == {"top1", "balanced_top1", "worst", "many", "medium", "few"}


# ---- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["method.name=ce", "model.experts=3"], r"model.experts: 3, but method.name=ce trains one head"),
    (["method.name=mdcs", "data.strong_augmentation=none"],
     r"data.strong_augmentation: none, but method.name=mdcs distils from a weak view"),
    (["method.name=mdcs", STRONG, "model.experts=2"], r"method.mdcs.prior_exponents: \[-0.5, 1.0, 2.5\] has 3 "
                                                      r"values for 2 experts"),
    (["method.name=shike", "model.experts=1"], r"model.experts: 1; SHIKE's mutual and transfer terms need"),
    (["method.name=shike", "model.arch=resnet50"], r"model.arch: resnet50, but SHIKE's shallow experts"),
    (["method.name=ride", "model.classifier=linear"], r"model.classifier: 'linear', but method.name=ride builds"),
    (["method.name=ride", "model.activation=aglu"], r"model.activation: 'aglu', but method.name=ride"),
    (["method.name=shike", "method.shike.stage=retrain"], r"train.init_from: empty, but method.shike.stage=retrain"),
    (["method.name=ride", "method.ride.stage=router"], r"train.init_from: empty, but method.ride.stage=router"),
    (["method.name=ride", "method.ride.diversity_factor=9"], r"method.ride.diversity_factor: 9.0 is out of range"),
    (["method.name=ride", "model.experts=17"], r"model.experts: 17 is out of range"),
    (["method.name=ride", "method.ride.distill_temperature=0"], r"method.ride.distill_temperature: 0.0 is out of"),
    (["method.name=ride", "method.ride.stage=router", "train.init_from=r", "method.ride.teacher=t"],
     r"method.ride.teacher: 't', but method.ride.stage is router"),
    (["method.name=ride", "method.ride.stage=router", "train.init_from=r", "train.label_smoothing=0.1"],
     r"train.label_smoothing: 0.1, but method.ride.stage is router, whose loss is on the routers' yes/no"),
    (["train.label_smoothing=1"], r"train.label_smoothing: 1.0 is out of range"),
])
def test_bad_expert_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(SMOKE, overrides)


# ---- two stages: SHIKE's classifier re-training from a stage-1 run ----------------------------------------------

STAGE1 = ["method.name=shike", "train.epochs=1", "data.synthetic_max_count=64", "model.width=4"]


def _args(settings):
    return [a for s in settings for a in ("--set", s)]


def _trained_run(tmp_path_factory, name: str, settings: list[str]):
    output = tmp_path_factory.mktemp(name)
    assert main(["--config", str(SMOKE), "--output", str(output), *_args(settings)]) == 0
    (run,) = output.iterdir()
    return run


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    return _trained_run(tmp_path_factory, "stage1", STAGE1)


def test_stage_two_trains_only_the_retrained_heads_of_its_parent(stage_one, tmp_path, capsys):
    stage2 = [*STAGE1, "method.shike.stage=retrain", f"train.init_from={stage_one}", "optim.lr=0.01"]
    assert main(["--config", str(SMOKE), "--output", str(tmp_path), *_args(stage2)]) == 0
    (run,) = tmp_path.iterdir()
    parent = json.loads((run / "parent.json").read_text())
    assert parent == {"init_from": str(stage_one), "checkpoint": str(stage_one / "checkpoint.pt"),
                      "method": "shike", "name": "smoke"}
    before = rundir.load_checkpoint(stage_one / "checkpoint.pt")["model"]
    after = rundir.load_checkpoint(run / "checkpoint.pt")["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"retrained_heads.{e}.weight" for e in range(3)}
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_bs" in record and 0 <= record["test_expert2_few"] <= 100


def test_a_resumed_stage_two_needs_only_its_own_checkpoint(stage_one, tmp_path):
    """Interrupted after its first epoch, a stage-2 run resumes although its parent run is gone by then."""
    parent = shutil.copytree(stage_one, tmp_path / "parent")
    cfg = config_lib.load(SMOKE, [*STAGE1, "method.shike.stage=retrain", f"train.init_from={parent}",
                                  "train.epochs=2"])
    run = rundir.new_run_dir(tmp_path / "runs", cfg)
    with pytest.raises(Interrupted):
        run_worker(cfg, StopAfter(run, cfg, epochs=1))
    shutil.rmtree(parent)
    assert main(["--resume", str(run)]) == 0
    assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]


RIDE1 = ["method.name=ride", "train.epochs=1", "data.synthetic_max_count=64", "model.width=4"]


@pytest.fixture(scope="module")
def ride_one(tmp_path_factory):
    return _trained_run(tmp_path_factory, "ride1", RIDE1)


def test_ride_router_stage_trains_only_the_router_and_reports_the_experts_used(ride_one, tmp_path):
    parent = ride_one
    stage2 = [*RIDE1, "method.ride.stage=router", f"train.init_from={parent}"]
    assert main(["--config", str(SMOKE), "--output", str(tmp_path), *_args(stage2)]) == 0
    (run,) = tmp_path.iterdir()
    before = rundir.load_checkpoint(parent / "checkpoint.pt")["model"]
    after = rundir.load_checkpoint(run / "checkpoint.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # experts, BatchNorm buffers included
    assert {k for k in after if k not in before} == {"router.features.0.weight", "router.features.0.bias",
                                                     "router.features.1.weight", "router.features.1.bias",
                                                     "router.decide.weight", "router.decide.bias"}
    record = json.loads((run / "metrics.jsonl").read_text())
    assert 1.0 <= record["test_experts_used"] <= 3.0 and "loss_router" in record
    assert json.loads((run / "parent.json").read_text())["method"] == "ride"


def test_a_ride_run_learns_from_a_teacher_run_with_other_experts(ride_one, tmp_path):
    """RIDE's distillation: the teacher is a finished RIDE run (3 experts here, 2 in the student)."""
    student = [*RIDE1, "model.experts=2", f"method.ride.teacher={ride_one}"]
    before = rundir.load_checkpoint(ride_one / "checkpoint.pt")["model"]
    assert main(["--config", str(SMOKE), "--output", str(tmp_path), *_args(student)]) == 0
    (run,) = tmp_path.iterdir()
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["loss_distill"] > 0 and "test_expert1_top1" in record and "test_expert2_top1" not in record
    after = rundir.load_checkpoint(ride_one / "checkpoint.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("teacher,settings,message", [
    ("{missing}", [], r"method.ride.teacher: .*missing does not exist; expected the run directory"),
    ("{empty}", [], r"method.ride.teacher: .*empty: no config.yaml there"),
    ("{shike}", [], r"method.ride.teacher: .* is a shike stage mixture run; expected a RIDE stage-1 run"),
    ("{ride}", ["data.imbalance_factor=20"], r"method.ride.teacher: data.imbalance_factor is 10.0 in the teacher"),
])
def test_a_bad_teacher_stops_before_making_a_run(ride_one, stage_one, tmp_path, capsys, teacher, settings, message):
    (tmp_path / "empty").mkdir()
    where = teacher.format(missing=tmp_path / "missing", empty=tmp_path / "empty", shike=stage_one, ride=ride_one)
    student = [*RIDE1, f"method.ride.teacher={where}", *settings]
    assert main(["--config", str(SMOKE), "--output", str(tmp_path / "runs"), *_args(student)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("settings,message", [
    (["train.init_from={missing}"], r"train.init_from: .*missing does not exist; expected the run directory"),
    (["train.init_from={parent}/config.yaml"], r"train.init_from: .*config.yaml is a file; expected the run directory"),
    (["train.init_from={parent}", "model.width=8"],
     r"model.width: 8 here, 4 in the parent run .*differing: model.width"),
    (["train.init_from={parent}", "data.imbalance_factor=20"], r"data.imbalance_factor: 20.0 here, 10.0 in the parent"),
])
def test_a_stage_two_with_a_bad_parent_stops_before_making_a_run(stage_one, tmp_path, capsys, settings, message):
    values = [s.format(missing=tmp_path / "missing", parent=stage_one) for s in settings]
    stage2 = [*STAGE1, "method.shike.stage=retrain", *values]
    assert main(["--config", str(SMOKE), "--output", str(tmp_path / "runs"), *_args(stage2)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


# ---- resume: a run interrupted mid-way ends with the straight run's weights -------------------------------------

@pytest.mark.parametrize("name", ["ride", "mdcs", "shike"])
def test_an_interrupted_expert_run_resumes_to_the_straight_runs_weights(name, tmp_path):
    settings = [f"method.name={name}", "train.epochs=2", "data.synthetic_max_count=48", "model.width=4",
                "method.ride.drw_start=0.5" if name == "ride" else None, STRONG if name == "mdcs" else None]
    straight, run = resume_matches_straight(tmp_path, str(SMOKE), [s for s in settings if s], stop_after=1)
    assert straight["epoch"] == 2


def test_a_model_that_is_not_an_expert_net_has_no_expert_metrics():
    assert not isinstance(build_network(config_lib.load(SMOKE), 5), ExpertNet)
