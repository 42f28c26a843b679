"""The long-tail methods as plug-ins: their numeric identities (methods-reference.md sections 1-4), the shared
class-frequency math, post-hoc logit adjustment, the per-method config sections and bad input."""
import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from glmc_ray.core import config as config_lib
from glmc_ray.core import longtail
from glmc_ray.core.config import ConfigError, GLMCConfig, MethodConfig, ModelConfig
from glmc_ray.core.evaluation import choose_posthoc, evaluate, hit_counts, posthoc_logits, tau_grid
from glmc_ray.methods import METHODS, Batch, build_method
from glmc_ray.methods.balanced_softmax import balanced_softmax_loss
from glmc_ray.methods.class_balanced import class_balanced_loss
from glmc_ray.methods.glmc import mixed_targets, smoothed_one_hot, soft_cross_entropy
from glmc_ray.methods.ldam_drw import drw_active, drw_first_epoch, ldam_logits, ldam_loss
from glmc_ray.methods.logit_adjusted import logit_adjusted_loss
from glmc_ray.models.backbones import CosineLinear, build_model
from glmc_ray.models.teacher import Teacher
from glmc_ray.runs import rundir
from glmc_ray.train import main
from glmc_ray.training.worker import build_network, build_trainee
from tests.conftest import REPO, resume_matches_straight, tensorboard_scalars

SMOKE = REPO / "configs/smoke.yaml"
LOSS_TERM = {"glmc": "loss_rebalanced", "ce": "loss_ce", "balanced_softmax": "loss_bs", "logit_adjusted": "loss_la",
             "ldam_drw": "loss_ldam", "class_balanced": "loss_cb", "ride": "loss_diversity",
             "mdcs": "loss_consistency", "shike": "loss_transfer"}
COUNTS = [40, 20, 10, 5, 2]
# every registered method, and GLMC's non-official Balanced Softmax option
VARIANTS = [(name, []) for name in METHODS] + [("glmc", ["method.glmc.rebalanced_loss=balanced_softmax_unofficial"])]
VARIANT_IDS = [name + ("_bs_unofficial" if extra else "") for name, extra in VARIANTS]
# the end-to-end runs: plain GLMC's are tests/test_train.py's and tests/test_ray_train.py's smoke runs, DeiT-LT's
# (after its teacher's) tests/test_deit_lt.py's
TRAINED = [(v, i) for v, i in zip(VARIANTS, VARIANT_IDS, strict=True) if i not in ("glmc", "deit_lt")]
# what a method needs beyond the smoke config: DeiT-LT trains a DeiT and names its teacher run (the tests that
# step it here give it a small CNN teacher: `_with_teacher`)
NEEDS = {"deit_lt": ["model.arch=deit_micro_distilled_patch4_32", "method.deit_lt.teacher=a-teacher-run"]}


def _logits(n=16, c=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=dtype) * 3, torch.randint(c, (n,), generator=g)


def _method_config(name, *overrides) -> config_lib.Config:
    return config_lib.load(SMOKE, [f"method.name={name}", *NEEDS.get(name, []), *overrides])


def _with_teacher(method, cfg):
    """The method, with a small untrained CNN as its teacher where it takes one (on the 16 px tiny batch)."""
    if config_lib.teacher_of(cfg) is not None:
        network = build_network(config_lib.load(SMOKE, ["model.width=4"]), len(COUNTS))
        method.teacher = Teacher(network, torch.ones(3), torch.zeros(3), (16, 16))
    return method


def _inference_heads(model) -> list:
    if hasattr(model, "fc_cb"):
        return [model.fc_cb]
    return list(model.heads) if hasattr(model, "heads") else [model.vit.head, model.vit.head_dist]


def _tiny_batch(num_classes=5, n=8):
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(n, 3, 16, 16, generator=g)  # noqa: E731
    return Batch(x(), x(), torch.randint(num_classes, (n,), generator=g), x(), x(),
                 torch.randint(num_classes, (n,), generator=g))


# ---- the registry and the Method protocol ------------------------------------------------------------------

def test_the_registry_and_the_config_name_the_same_methods():
    assert set(METHODS) == set(config_lib.METHOD_NAMES)
    assert set(config_lib.DEFAULT_CLASSIFIER) <= set(METHODS)
    sections = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    assert sections <= set(METHODS)  # a section is named after its method


@pytest.mark.parametrize("name,extra", VARIANTS, ids=VARIANT_IDS)
def test_each_method_steps_and_declares_its_heads_truthfully(name, extra):
    """uses_all_heads must be exact: DDP without find_unused_parameters hangs on a parameter left without a
    gradient, and one with it is slower for nothing."""
    cfg = _method_config(name, *extra, "model.width=4", "model.projection_dim=8")
    model = build_network(cfg, len(COUNTS))
    method = _with_teacher(build_method(cfg.method, COUNTS, cfg), cfg)
    out = method.step(model, _tiny_batch(), 0.9, torch.Generator().manual_seed(0))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    method.after_optimizer_step(model)
    with_grad = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters()]
    assert all(with_grad) == method.uses_all_heads
    assert all(head.weight.grad.abs().sum() > 0 for head in _inference_heads(model))  # the inference head always trains
    for attribute in ("progress_per_step", "logit_scale", "trainable"):
        assert hasattr(method, attribute), attribute
    assert method.alpha(0.5) <= 1.0


@pytest.mark.parametrize("name,extra", VARIANTS, ids=VARIANT_IDS)
def test_every_method_smooths_its_class_targets_by_train_label_smoothing(name, extra):
    """Smoothing mixes the one-hot with the uniform target, and every term on class targets is linear in the
    target, so each method's loss is affine in eps: L(0.2) - L(0) = 2 (L(0.1) - L(0)), and L(0.1) != L(0)."""
    def loss(eps):
        cfg = _method_config(name, *extra, "model.width=4", "model.projection_dim=8", f"train.label_smoothing={eps}")
        torch.manual_seed(0)
        model = build_network(cfg, len(COUNTS))
        method = _with_teacher(build_method(cfg.method, COUNTS, cfg), cfg)
        assert method.label_smoothing == eps
        return float(method.step(model, _tiny_batch(), 0.9, torch.Generator().manual_seed(0)).loss)

    none, some, more = loss(0.0), loss(0.1), loss(0.2)
    assert abs(some - none) > 1e-3
    assert more - none == pytest.approx(2 * (some - none), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smoothed_hard_label_losses_are_the_soft_cross_entropy_of_the_smoothed_one_hot(eps):
    z, y = _logits()
    targets = smoothed_one_hot(y, 5, eps).double()
    log_prior = longtail.log_prior(COUNTS).double()
    torch.testing.assert_close(balanced_softmax_loss(z, y, log_prior, eps), soft_cross_entropy(z + log_prior, targets))
    torch.testing.assert_close(logit_adjusted_loss(z, y, log_prior, 1.5, eps),
                               soft_cross_entropy(z + 1.5 * log_prior, targets))
    weights = longtail.effective_number_weights(COUNTS, 0.99).double()
    per_sample = -(targets * F.log_softmax(z, dim=1)).sum(dim=1)
    torch.testing.assert_close(class_balanced_loss(z, y, weights, 0.0, eps), (weights[y] * per_sample).mean())
    mixed = mixed_targets(y, y.flip(0), 0.7, 5, smoothing=eps)
    torch.testing.assert_close(mixed, 0.7 * smoothed_one_hot(y, 5, eps) + 0.3 * smoothed_one_hot(y.flip(0), 5, eps))
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(len(y)))


@pytest.mark.parametrize("name,extra", [*VARIANTS, ("ride", ["method.ride.stage=router", "train.init_from=a-run"])],
                         ids=[*VARIANT_IDS, "ride_router"])
def test_a_method_reads_the_rebalanced_stream_exactly_when_its_config_asks_for_one(name, extra):
    """The sources make the second stream where config.rebalanced_stream says so, and only there."""
    cfg = _method_config(name, *extra, "model.width=4", "model.projection_dim=8")
    model, method = build_network(cfg, len(COUNTS)), _with_teacher(build_method(cfg.method, COUNTS, cfg), cfg)
    without = dataclasses.replace(_tiny_batch(), rx1=None, rx2=None, ry=None)
    step = functools.partial(method.step, model, without, 0.9, torch.Generator().manual_seed(0))
    if config_lib.rebalanced_stream(cfg) is None:
        assert torch.isfinite(step().loss)
    else:
        with pytest.raises((TypeError, AttributeError)):
            step()


# ---- the shared class-frequency math (glmc_ray/core/longtail.py) --------------------------------------------------

@pytest.mark.parametrize("function", [
    lambda c: longtail.class_balanced_weights(c, 1.2), lambda c: longtail.resampling_probabilities(c, 0.5),
    lambda c: longtail.effective_number_weights(c, 0.99), longtail.log_prior,
    lambda c: longtail.ldam_margins(c, 0.5)])
def test_a_class_without_training_images_is_named(function):
    with pytest.raises(ValueError, match=r"class 2 has 0 training images \(2 classes are empty: 2, 4\)"):
        function([30, 10, 0, 4, 0])


def test_effective_number_weights():
    counts = torch.tensor([500.0, 100, 20, 5], dtype=torch.float64)
    assert torch.equal(longtail.effective_number_weights(counts, 0.0), torch.ones(4))  # beta 0: ones
    for beta in (0.9, 0.999, 0.9999):
        w = longtail.effective_number_weights(counts, beta)
        assert float(w.sum()) == pytest.approx(4) and torch.all(w[:-1] < w[1:])  # sum C, decreasing in n
    w = longtail.effective_number_weights(counts, 1 - 1e-9)  # beta -> 1: proportional to 1/n
    torch.testing.assert_close(w.double(), (1 / counts) / (1 / counts).sum() * 4, rtol=1e-5, atol=0)
    torch.testing.assert_close(longtail.effective_numbers([1, 3], 0.5), torch.tensor([1.0, 1.75], dtype=torch.float64))
    assert torch.equal(longtail.effective_number_weights([7, 7, 7], 0.9999), torch.ones(3))  # uniform: ones


def test_ldam_margins_follow_the_quarter_power():
    m = longtail.ldam_margins([500, 100, 20, 5], 0.5)
    assert float(m.max()) == pytest.approx(0.5) and int(m.argmax()) == 3  # the rarest class gets max_margin
    assert float(m[0] / m[1]) == pytest.approx((100 / 500) ** 0.25)


# ---- Balanced Softmax and the logit-adjusted loss ------------------------------------------------------------

def test_balanced_softmax_identities():
    z, y = _logits()
    prior = longtail.log_prior([9, 9, 9, 9, 9])
    assert float(balanced_softmax_loss(z, y, prior)) == pytest.approx(float(F.cross_entropy(z, y)), abs=1e-12)
    counts = torch.tensor([40.0, 20, 10, 5, 2])
    bs = balanced_softmax_loss(z, y, longtail.log_prior(counts))
    assert float(bs) == pytest.approx(float(balanced_softmax_loss(z, y, longtail.log_prior(7 * counts))), abs=1e-12)
    z = z.clone().requires_grad_()
    balanced_softmax_loss(z, y, longtail.log_prior(counts)).backward()
    expected = (torch.softmax(z.detach() + counts.double().log(), 1) - F.one_hot(y, 5)) / len(y)
    torch.testing.assert_close(z.grad, expected, rtol=0, atol=1e-12)


def test_logit_adjusted_loss_identities():
    z, y = _logits()
    counts = [40, 20, 10, 5, 2]
    prior = longtail.log_prior(counts)
    ce = float(F.cross_entropy(z, y))
    assert float(logit_adjusted_loss(z, y, prior, 0.0)) == pytest.approx(ce, abs=1e-12)  # tau 0: CE
    assert float(logit_adjusted_loss(z, y, longtail.log_prior([3] * 5), 1.7)) == pytest.approx(ce, abs=1e-12)
    la = float(logit_adjusted_loss(z, y, prior, 1.0))
    bs = float(F.cross_entropy(z + torch.tensor(counts, dtype=torch.float64).log(), y))  # the official log n form
    assert la == pytest.approx(bs, abs=1e-12)  # tau 1 is Balanced Softmax


# ---- LDAM-DRW ------------------------------------------------------------------------------------------------

def test_ldam_identities():
    z, y = _logits()
    cosines = torch.tanh(z)
    zero = torch.zeros(5, dtype=torch.float64)
    assert float(ldam_loss(cosines, y, zero, 1.0)) == pytest.approx(float(F.cross_entropy(cosines, y)), abs=1e-12)
    margins = longtail.ldam_margins(COUNTS, 0.5)
    expected = 30 * cosines - 30 * margins[y, None] * F.one_hot(y, 5)
    torch.testing.assert_close(ldam_logits(cosines, y, margins, 30.0), expected, rtol=0, atol=1e-12)
    w = longtail.effective_number_weights(COUNTS, 0.9999).double()
    per_sample = F.cross_entropy(expected, y, reduction="none")
    assert float(ldam_loss(cosines, y, margins, 30.0, w)) == pytest.approx(
        float((w[y] * per_sample).sum() / w[y].sum()), abs=1e-12)


@pytest.mark.parametrize("epochs,start,first", [(200, 0.8, 160), (10, 0.8, 8), (10, 0.75, 8), (2, 0.5, 1),
                                                (2, 0.8, None), (5, 0.0, 0), (5, 1.0, None), (3, 2 / 3, 2)])
def test_drw_switches_at_the_configured_epoch(epochs, start, first):
    assert drw_first_epoch(epochs, start) == first
    method = build_method(_method_config("ldam_drw", f"method.ldam_drw.drw_start={start}").method, COUNTS)
    model = build_model(ModelConfig(width=4, projection_dim=8), 5, default_classifier="cosine")
    on = [drw_active(e / epochs, start) for e in range(epochs)]
    assert on == [first is not None and e >= first for e in range(epochs)]
    checked = {0, epochs - 1} | ({first - 1, first} - {-1} if first is not None else set())
    for epoch in sorted(checked):
        out = method.step(model, _tiny_batch(), epoch / epochs, torch.Generator())
        assert out.terms["drw"] == float(on[epoch])
        weights = method.class_weights(epoch / epochs)
        assert (weights is None) != on[epoch]


def test_cosine_classifier_is_scale_invariant_and_bounded():
    head = CosineLinear(16, 5)
    x = torch.randn(8, 16) * 5
    out = head(x)
    torch.testing.assert_close(head(3.5 * x), out)
    assert out.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(5))


# ---- class-balanced loss ------------------------------------------------------------------------------------

def test_class_balanced_loss_identities():
    z, y = _logits()
    ce = float(F.cross_entropy(z, y))
    ones = longtail.effective_number_weights(COUNTS, 0.0).double()
    assert float(class_balanced_loss(z, y, ones)) == pytest.approx(ce, abs=1e-12)  # beta 0: CE
    uniform = longtail.effective_number_weights([6] * 5, 0.9999).double()
    assert float(class_balanced_loss(z, y, uniform)) == pytest.approx(ce, abs=1e-12)  # uniform counts: CE
    w = longtail.effective_number_weights(COUNTS, 0.99).double()
    assert float(class_balanced_loss(z, y, w)) == pytest.approx(
        float((w[y] * F.cross_entropy(z, y, reduction="none")).mean()), abs=1e-12)  # batch mean of w * l
    p_y = torch.softmax(z, 1)[torch.arange(len(y)), y]
    focal = (w[y] * (1 - p_y) ** 2 * -p_y.log()).mean()
    assert float(class_balanced_loss(z, y, w, 2.0)) == pytest.approx(float(focal), abs=1e-12)


# ---- GLMC's non-official Balanced Softmax option -------------------------------------------------------------

def test_glmc_balanced_softmax_option_equals_the_official_loss_on_uniform_counts():
    """Uniform counts: weights 1 and a constant log-prior, so both re-balanced losses agree."""
    counts = [12] * 5
    model = build_model(ModelConfig(width=4, projection_dim=8), 5)
    losses = {}
    for option in ("weighted_ce", "balanced_softmax_unofficial"):
        method = build_method(MethodConfig(glmc=GLMCConfig(rebalanced_loss=option)), counts)
        out = method.step(model, _tiny_batch(), 0.5, torch.Generator().manual_seed(3))
        losses[option] = float(out.terms["loss_rebalanced"].detach())
    assert losses["weighted_ce"] == pytest.approx(losses["balanced_softmax_unofficial"], rel=1e-6)


# ---- post-hoc logit adjustment -------------------------------------------------------------------------------

def test_tau_grid_defaults_to_zero_to_two_in_tenths():
    train = config_lib.TrainConfig()
    grid = tau_grid(train.posthoc_tau_max, train.posthoc_tau_step)
    assert len(grid) == 21 and grid[0] == 0.0 and grid[7] == 0.7 and grid[-1] == 2.0
    assert tau_grid(0.0, 0.1) == [] and tau_grid(1.0, 0.5) == [0.0, 0.5, 1.0] and tau_grid(1.0, 0.3)[-1] == 0.9


def test_posthoc_predictions_ignore_a_constant_and_tau_zero_changes_nothing():
    z, _ = _logits(c=5)
    prior = longtail.log_prior(COUNTS)
    assert torch.equal(posthoc_logits(z, prior, 0.0), z)
    assert torch.equal(posthoc_logits(z + 4.0, prior, 1.3).argmax(1), posthoc_logits(z, prior, 1.3).argmax(1))
    assert torch.equal(posthoc_logits(z, longtail.log_prior([4] * 5), 2.0).argmax(1), z.argmax(1))


def _eval_batches(n=60, c=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(20, 3, 16, 16, generator=g), torch.randint(c, (20,), generator=g)) for _ in range(n // 20)]


def test_posthoc_scan_at_tau_zero_is_the_raw_result_and_tau_is_chosen_on_val():
    model = build_model(ModelConfig(width=4, projection_dim=8), 5)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    taus = tau_grid(2.0, 0.5)
    splits = {"val": _eval_batches(seed=1), "test": _eval_batches(seed=2)}
    results = {s: evaluate(model, b, COUNTS, no_autocast, lambda t: t, taus, 3.0) for s, b in splits.items()}
    for metrics in results.values():
        at_zero = metrics["posthoc_scan"][0]
        assert {k: at_zero[k] for k in ("top1", "balanced_top1", "per_class")} == \
            {k: metrics[k] for k in ("top1", "balanced_top1", "per_class")}
    val_curve = [m["balanced_top1"] for m in results["val"]["posthoc_scan"]]
    test_scan = results["test"]["posthoc_scan"]
    chosen = choose_posthoc(results, taus)
    best = val_curve.index(max(val_curve))  # the first (smallest) tau on a tie
    assert chosen["posthoc"] == {"tau": taus[best], "chosen_on": "val", "taus": taus, "val_balanced_top1": val_curve}
    assert chosen["test_posthoc"] == test_scan[best] and "posthoc_scan" not in chosen["test"]
    assert set(chosen["test_posthoc"]) >= {"top1", "balanced_top1", "many", "medium", "few", "per_class"}
    counts = hit_counts(model, splits["test"], 5, no_autocast, torch.zeros(1, 5))
    assert torch.equal(counts[0], counts[3])  # an offset of 0 reproduces the raw top-1 hits exactly


def test_without_a_validation_split_no_tau_is_chosen():
    results = choose_posthoc({"test": {"top1": 50.0}}, [0.0, 1.0])
    assert results["posthoc"]["tau"] is None and "no validation split" in results["posthoc"]["reason"]
    assert "test_posthoc" not in results
    assert "posthoc" not in choose_posthoc({"test": {"top1": 50.0}}, [])  # switched off


# ---- config: one section per method, and bad input -----------------------------------------------------------

@pytest.mark.parametrize("name,extra", VARIANTS, ids=VARIANT_IDS)
def test_each_method_config_round_trips_through_dict_and_yaml(name, extra, tmp_path):
    section = {"logit_adjusted": ["method.logit_adjusted.tau=1.5"],
               "ldam_drw": ["method.ldam_drw.drw_start=0.5", "method.ldam_drw.scale=10"],
               "class_balanced": ["method.class_balanced.focal_gamma=1", "method.class_balanced.beta=0.99"],
               "glmc": ["method.glmc.consistency_weight=3"]}.get(name, [])
    cfg = _method_config(name, *extra, *section)
    values = config_lib.to_dict(cfg)
    assert set(values["method"]) == {"name"} | ({name} if cfg.method.section is not None else set())
    assert config_lib.from_dict(values) == cfg
    config_lib.save(cfg, tmp_path / "config.yaml")
    assert config_lib.load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("overrides,message", [
    (["method.name=ldam"], r"^--set method.name=ldam: method.name: 'ldam' is not one of glmc, ce, balanced_softmax, "
                           r"logit_adjusted, ldam_drw, class_balanced, ride, mdcs, shike, deit_lt$"),
    (["method.ldam_drw.max_margin=0.3"], r"^--set method.ldam_drw.max_margin=0.3: method.ldam_drw.max_margin: set, "
                                         r"but method.name is 'glmc'; method.ldam_drw applies only with "
                                         r"method.name=ldam_drw"),
    (["method.name=ce", "method.glmc.mix_beta=2"], r"^--set method.glmc.mix_beta=2: method.glmc.mix_beta: set, but "
                                                   r"method.name is 'ce'"),
    (["method.consistency_weight=4"], r"method.consistency_weight: moved to method.glmc.consistency_weight"),
    (["method.name=balanced_softmax", "method.balanced_softmax.x=1"], r"unknown key 'method.balanced_softmax'"),
    (["method.name=logit_adjusted", "method.logit_adjusted.tau=-0.5"],
     r"^--set method.logit_adjusted.tau=-0.5: method.logit_adjusted.tau: -0.5 is out of range; expected in \[0, 5\]"),
    (["method.name=ldam_drw", "method.ldam_drw.max_margin=1.5"],
     r"method.ldam_drw.max_margin: 1.5 is out of range; expected in \[0, 1\]"),
    (["method.name=ldam_drw", "method.ldam_drw.scale=0"],
     r"method.ldam_drw.scale: 0.0 is out of range; expected in \(0"),
    (["method.name=ldam_drw", "method.ldam_drw.drw_start=1.2"],
     r"method.ldam_drw.drw_start: 1.2 is out of range; expected a fraction of the schedule in \[0, 1\]"),
    (["method.name=ldam_drw", "method.ldam_drw.drw_beta=1"], r"method.ldam_drw.drw_beta: 1.0 is out of range"),
    (["method.name=class_balanced", "method.class_balanced.beta=1.0"],
     r"method.class_balanced.beta: 1.0 is out of range; expected in \[0, 1\)"),
    (["method.name=class_balanced", "method.class_balanced.focal_gamma=-1"], r"method.class_balanced.focal_gamma"),
    (["method.glmc.rebalanced_loss=balanced_softmax"], r"method.glmc.rebalanced_loss: 'balanced_softmax' is not one "
                                                       r"of weighted_ce, balanced_softmax_unofficial"),
    (["model.classifier=cosine"], r"model.classifier: cosine outputs cosines .* method.name is 'glmc'"),
    (["train.posthoc_tau_max=-1"], r"train.posthoc_tau_max: -1.0 is out of range; expected in \[0, 10\]"),
    (["train.posthoc_tau_step=0"], r"train.posthoc_tau_step: 0.0 is out of range; expected > 0"),
])
def test_bad_method_settings_name_the_key_and_the_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(SMOKE, overrides)


def test_a_recipe_switches_method_by_replacing_its_section():
    with pytest.raises(ConfigError, match=r"glmc.yaml: method.glmc.resample_exponent: set, but method.name "
                                          r"is 'ce'.*--set 'method=\{name: <method>"):
        config_lib.load(REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml", ["method.name=ce"])
    cfg = config_lib.load(REPO / "configs/recipes/cifar10_lt_if100/glmc.yaml",
                          ["method={name: ldam_drw, ldam_drw: {drw_start: 0.5}}"])
    assert cfg.method.name == "ldam_drw" and cfg.method.ldam_drw.drw_start == 0.5


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_class_without_images_stops_every_method_before_training(name):
    cfg = _method_config(name)
    with pytest.raises(ValueError, match=r"class 1 has 0 training images"):
        build_trainee(cfg, [50, 0, 5], torch.device("cpu"), torch.contiguous_format)


def test_the_error_line_of_a_bad_method_setting(tmp_path, capsys):
    assert main(["--config", str(SMOKE), "--output", str(tmp_path / "runs"), "--set", "method.name=ldam_drw",
                 "--set", "method.ldam_drw.max_margin=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --set method.ldam_drw.max_margin=2: method.ldam_drw.max_margin: 2.0 is out of range; expected in "
        "[0, 1] (a margin on cosine logits; official 0.5)"]
    assert not (tmp_path / "runs").exists()



# ---- each method in the loop: 2 smoke epochs in-process, DRW across a resume -----------------------------------

def run_settings(name: str, extra: list[str]) -> list[str]:
    """2 smoke epochs of the method on a quarter of the smoke data at width 4; LDAM-DRW re-weights in the
    second (drw_start 0.5)."""
    drw = ["method.ldam_drw.drw_start=0.5"] if name == "ldam_drw" else []
    return ["train.epochs=2", "data.synthetic_max_count=64", "model.width=4", f"method.name={name}", *extra, *drw]


def check_method_run(run, name: str, settings: list[str]) -> None:
    """What every method's 2-epoch smoke run leaves (also asserted on the Ray runs, tests/test_ray_methods.py)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    last = records[-1]
    assert LOSS_TERM[name] in last and 0 <= last["test_top1"] <= 100
    assert last["posthoc_tau"] in tau_grid(2.0, 0.1)  # chosen on the smoke config's validation split
    for key in ("test_posthoc_top1", "test_posthoc_balanced_top1", "val_posthoc_balanced_top1"):
        assert 0 <= last[key] <= 100, key
    assert {"test_posthoc_many", "test_posthoc_medium", "test_posthoc_few"} <= set(last)
    final = json.loads((run / "final.json").read_text())
    assert final["last"]["posthoc"]["tau"] == last["posthoc_tau"]
    assert len(final["last"]["test_posthoc"]["per_class"]) == 10
    assert final["last"]["test_posthoc"]["top1"] == last["test_posthoc_top1"]
    assert config_lib.load(run / "config.yaml") == config_lib.load(SMOKE, settings)
    if name == "ldam_drw":
        assert [r["drw"] for r in records] == [0.0, 1.0]
    if name in config_lib.EXPERT_LAYOUTS:  # each expert's metrics beside the ensemble's
        for split in ("val", "test"):
            assert {f"{split}_expert{e}_{k}" for e in range(3) for k in ("top1", "many", "medium", "few")} <= set(last)
        assert [set(e) for e in final["last"]["test"]["experts"]] == [{"top1", "balanced_top1", "worst", "many",
                                                                       "medium", "few"}] * 3
        assert tensorboard_scalars(run, "test/expert2_few") == {1: pytest.approx(last["test_expert2_few"]),
                                                               0: pytest.approx(records[0]["test_expert2_few"])}


@pytest.mark.parametrize("name,extra", [v for v, _ in TRAINED], ids=[i for _, i in TRAINED])
def test_each_method_trains_two_smoke_epochs_in_process(name, extra, tmp_path, capsys):
    settings = run_settings(name, extra)
    assert main(["--config", str(SMOKE), "--output", str(tmp_path), *[a for s in settings for a in ("--set", s)]]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    check_method_run(run, name, settings)
    assert "| posthoc_tau " in capsys.readouterr().out
    state = rundir.load_checkpoint(run / "checkpoint.pt")["model"]
    if name not in config_lib.EXPERT_LAYOUTS:
        assert ("fc_cb.bias" in state) == (name != "ldam_drw")  # auto: LDAM's cosine head has no bias


def test_drw_resumed_mid_drw_matches_a_straight_run(tmp_path, capsys):
    """3 epochs, DRW from epoch 1 (drw_start 0.3); interrupted after epoch 1, with DRW on, and resumed: the
    same weights as a straight run, bit for bit. Without a validation split no post-hoc tau is chosen, and
    the run says so."""
    settings = ["train.epochs=3", "method.name=ldam_drw", "method.ldam_drw.drw_start=0.3", "data.val_fraction=0.0",
                "data.synthetic_max_count=64"]
    straight, run = resume_matches_straight(tmp_path, str(SMOKE), settings, stop_after=2)
    assert straight["epoch"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["drw"] for r in records] == [0.0, 1.0, 1.0]
    assert records[-1]["posthoc_tau"] is None and "test_posthoc_top1" not in records[-1]
    assert json.loads((run / "final.json").read_text())["last"]["posthoc"]["reason"].startswith("no validation split")
    assert "posthoc_tau none (no validation split)" in capsys.readouterr().out
