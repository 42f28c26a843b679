"""The GLMC math as pure functions (reference section 3); the other methods are in tests/test_methods.py."""
import math

import pytest
import torch

from glmc_ray.core.config import GLMCConfig, MethodConfig, ModelConfig
from glmc_ray.core.longtail import class_balanced_weights, resampling_probabilities
from glmc_ray.data.cifar import long_tailed_counts
from glmc_ray.methods import Batch, build_method
from glmc_ray.methods.glmc import (
    cumulative_alpha,
    cutmix_box,
    cutmix_label_lambda,
    local_cutmix,
    maxnorm_project_,
    maxnorm_radii,
    mixed_targets,
    negative_cosine,
    sample_mix_lambda,
)
from glmc_ray.models.backbones import build_model


def test_mixed_targets_sum_to_one_for_both_mixes():
    g = torch.Generator().manual_seed(0)
    y, yr = torch.randint(10, (32,), generator=g), torch.randint(10, (32,), generator=g)
    for lam in (0.0, 0.3, 0.77, 1.0):
        t = mixed_targets(y, yr, lam, 10)
        assert torch.allclose(t.sum(1), torch.ones(32))
        assert torch.allclose(t[torch.arange(32), y] + (y != yr) * t[torch.arange(32), yr],
                              torch.ones(32))


def test_weighted_targets_are_class_weighted_not_renormalised():
    counts = torch.tensor(long_tailed_counts(5000, 10, 100))
    w = class_balanced_weights(counts, 1.2)
    t = mixed_targets(torch.tensor([0]), torch.tensor([9]), 0.25, 10, w)
    assert t[0, 0] == pytest.approx(0.25 * w[0]) and t[0, 9] == pytest.approx(0.75 * w[9])


def test_class_weights_match_reference_values():
    w10 = class_balanced_weights(torch.tensor(long_tailed_counts(5000, 10, 100)), 1.2)
    assert float(w10.sum()) == pytest.approx(10, rel=1e-5)
    assert float(w10[0]) == pytest.approx(0.018, abs=5e-4) and float(w10[-1]) == pytest.approx(4.59, abs=5e-3)
    w100 = class_balanced_weights(torch.tensor(long_tailed_counts(500, 100, 100)), 1.2)
    assert float(w100[0]) == pytest.approx(0.020, abs=5e-4) and float(w100[-1]) == pytest.approx(5.13, abs=5e-3)


def test_resampling_probabilities_match_reference_example():
    p = resampling_probabilities(torch.tensor(long_tailed_counts(500, 100, 100)), 0.2)
    assert float(p.sum()) == pytest.approx(1.0)
    assert float(p[0]) == pytest.approx(0.0376, abs=1e-4) and float(p[-1]) == pytest.approx(0.00094, abs=1e-5)
    flat = resampling_probabilities(torch.tensor([500, 50, 5]), 1.0)
    assert torch.allclose(flat, torch.full((3,), 1 / 3))


def test_cumulative_alpha_endpoints_and_shapes():
    assert cumulative_alpha(0.0) == 1.0
    assert cumulative_alpha(50 / 200) == pytest.approx(0.9375)
    assert cumulative_alpha(150 / 200) == pytest.approx(0.4375)
    assert cumulative_alpha(199 / 200) == pytest.approx(0.00998, abs=1e-5)
    assert cumulative_alpha(1.0, "cosine") == pytest.approx(0.0) and cumulative_alpha(0.5, "linear") == 0.5
    assert cumulative_alpha(0.5, "power", 0.5) == pytest.approx(1 - math.sqrt(0.5))
    values = [cumulative_alpha(u / 10, "power", 3.0) for u in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError, match="progress"):
        cumulative_alpha(1.5)
    with pytest.raises(ValueError, match="shape"):
        cumulative_alpha(0.5, "sigmoid")


def test_stop_gradient_branch_gets_no_gradient():
    p = torch.randn(8, 16, requires_grad=True)
    z = torch.randn(8, 16, requires_grad=True)
    negative_cosine(p, z).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


def test_cutmix_box_area_and_label_lambda():
    g = torch.Generator().manual_seed(1)
    for lam in (0.1, 0.5, 0.9):
        for _ in range(20):
            box = cutmix_box(32, 32, lam, g)
            area = (box[1] - box[0]) * (box[3] - box[2]) / 1024
            assert area <= 1 - lam + 1e-9  # floored halves and clipping never paste more than 1 - lambda
            assert cutmix_label_lambda(lam, box, 32, 32, area_corrected=False) == lam
            assert cutmix_label_lambda(lam, box, 32, 32, area_corrected=True) == pytest.approx(1 - area)
    a, b = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)
    mixed = local_cutmix(a, b, (2, 5, 1, 4))
    assert mixed.sum() == 2 * 3 * 3 * 3 and a.sum() == 0  # pasted box only, input untouched


def test_mix_beta_is_used():
    g = torch.Generator().manual_seed(0)
    uniform = [sample_mix_lambda(1.0, g) for _ in range(2000)]
    u_shaped = [sample_mix_lambda(0.2, g) for _ in range(2000)]
    extreme = lambda xs: sum(x < 0.05 or x > 0.95 for x in xs) / len(xs)  # noqa: E731
    assert extreme(uniform) == pytest.approx(0.1, abs=0.03)
    assert extreme(u_shaped) > 0.4


def test_maxnorm_bounds_rows_and_leaves_short_rows():
    w = torch.randn(10, 16) * torch.linspace(0.1, 3, 10)[:, None]
    radii = maxnorm_radii(w, 0.1)
    before = w.norm(dim=1)
    maxnorm_project_(w, radii)
    after = w.norm(dim=1)
    assert torch.all(after <= radii + 1e-5)
    short = before <= radii
    assert short.any() and torch.allclose(after[short], before[short])


def _tiny_batch(num_classes=5, n=8):
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(n, 3, 16, 16, generator=g)  # noqa: E731
    return Batch(x(), x(), torch.randint(num_classes, (n,), generator=g), x(), x(),
                 torch.randint(num_classes, (n,), generator=g))


@pytest.mark.parametrize("name", ["glmc", "ce"])
def test_method_step_runs_forward_backward(name):
    counts = [40, 20, 10, 5, 2]
    model = build_model(ModelConfig(width=4, projection_dim=8), len(counts))
    method = build_method(MethodConfig(name=name, glmc=GLMCConfig(maxnorm_threshold=0.1)), counts)
    out = method.step(model, _tiny_batch(), 0.5, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.fc_cb.weight.grad is not None
    method.after_optimizer_step(model)
    if name == "glmc":
        assert set(out.terms) >= {"loss_balanced", "loss_rebalanced", "loss_consistency", "alpha"}
        assert torch.all(model.fc_cb.weight.norm(dim=1) <= model.maxnorm_radii + 1e-5)
        total = (out.terms["alpha"] * out.terms["loss_balanced"] + (1 - out.terms["alpha"])
                 * out.terms["loss_rebalanced"] + out.terms["loss_consistency"])
        assert float(out.loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5)


def test_glmc_alpha_moves_weight_between_heads():
    counts = [40, 20, 10, 5, 2]
    model = build_model(ModelConfig(width=4, projection_dim=8), len(counts))
    method = build_method(MethodConfig(glmc=GLMCConfig(consistency_weight=0.0)), counts)
    for progress, trained, idle in ((0.0, "fc", "fc_cb"), (1.0, "fc_cb", "fc")):
        model.zero_grad()
        method.cfg.cumulative_shape = "linear"
        method.step(model, _tiny_batch(), progress, torch.Generator().manual_seed(0)).loss.backward()
        assert getattr(model, trained).weight.grad.abs().sum() > 0
        assert getattr(model, idle).weight.grad.abs().sum() == 0
