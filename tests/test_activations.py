"""APA / AGLU as a model option (seed-systems-reference.md section 1): the special cases of the math, the exact
and the official gradient, one module per activation site in the CIFAR ResNet-32 and torchvision's ResNeXt-50,
no weight decay on the scalars, IIF as a post-hoc offset, and training: 2 epochs in-process with a resume that
gives the straight run's weights, and on 2 Ray workers."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from glmc_ray.core import config as config_lib
from glmc_ray.core import longtail
from glmc_ray.core.config import ModelConfig
from glmc_ray.core.evaluation import evaluate
from glmc_ray.models.activations import AGLU, APA, SqueezeExcite, _OfficialAGLU, aglu, apa, no_decay
from glmc_ray.models.backbones import build_model
from glmc_ray.training.worker import parameter_groups
from tests.conftest import REPO, resume_matches_straight

SMOKE = str(REPO / "configs/smoke.yaml")
APA_RUN = ["model.activation=aglu", "model.se=apa", "train.epochs=2", "data.synthetic_max_count=64"]
Z = torch.linspace(-8, 8, 401, dtype=torch.float64)


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def test_special_cases():
    one = _scalar(1.0)
    torch.testing.assert_close(apa(Z, one, one), torch.sigmoid(Z))  # lambda = kappa = 1: the sigmoid
    torch.testing.assert_close(aglu(Z, one, one), F.silu(Z))  # and AGLU is SiLU
    kappa = _scalar(0.7)
    gumbel = torch.exp(-torch.exp(-kappa * Z))  # lambda -> 0: the Gumbel CDF
    torch.testing.assert_close(apa(Z, _scalar(1e-4), kappa), gumbel, atol=2e-3, rtol=0)
    assert torch.isfinite(apa(torch.tensor([-1e4, 1e4], dtype=torch.float64), _scalar(0.3), kappa)).all()


def test_the_exact_gradient_is_autograds_and_checks_numerically():
    z = torch.randn(20, dtype=torch.float64, requires_grad=True)
    lam, kappa = _scalar(0.6).requires_grad_(), _scalar(1.1).requires_grad_()
    assert torch.autograd.gradcheck(aglu, (z, lam, kappa))
    assert torch.autograd.gradcheck(apa, (z, lam, kappa))


def test_the_official_gradient_lacks_exactly_the_log_term_of_d_lambda():
    z = torch.randn(50, dtype=torch.float64, requires_grad=True)
    lam, kappa = _scalar(0.6).requires_grad_(), _scalar(1.1).requires_grad_()
    weights = torch.randn(50, dtype=torch.float64)
    exact = torch.autograd.grad((aglu(z, lam, kappa) * weights).sum(), (z, lam, kappa))
    official = torch.autograd.grad((_OfficialAGLU.apply(z, lam, kappa) * weights).sum(), (z, lam, kappa))
    torch.testing.assert_close(official[0], exact[0])  # z and kappa: the same
    torch.testing.assert_close(official[2], exact[2])
    with torch.no_grad():
        p = apa(z, lam, kappa)
        missing = (weights * z * p / lam ** 2 * torch.log1p(lam * torch.exp(-kappa * z))).sum()
    torch.testing.assert_close(exact[1] - official[1], missing.reshape(1))
    assert abs(float(missing)) > 1e-3  # the difference is real, not rounding


def _modules(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def test_every_activation_site_of_resnet32_gets_its_own_aglu_and_se_its_apa_gate():
    model = build_model(ModelConfig(width=8, projection_dim=8, activation="aglu", se="apa"), 10)
    aglus, gates = _modules(model, AGLU), _modules(model, APA)
    # stem 1 + 15 blocks x 2 sites; one APA gate per block; the SE excitation keeps its ReLU (official SE class)
    assert len(aglus) == 1 + 15 * 2 and len(gates) == 15
    relus = _modules(model, torch.nn.ReLU)
    excitations = _modules(model, SqueezeExcite)
    assert len(relus) == 15 and all(any(r is m for m in se.excite) for r, se in zip(relus, excitations, strict=True))
    x = torch.randn(2, 3, 32, 32)
    fc, fc_cb, z, p = model(x, all_heads=True)
    (fc.sum() + fc_cb.sum() + p.sum()).backward()
    assert all(m.lam.grad is not None and m.kappa.grad is not None for m in aglus + gates)
    groups = parameter_groups(model)
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 2 * (len(aglus) + len(gates))
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_bad_options_are_config_errors_naming_the_key():
    with pytest.raises(config_lib.ConfigError, match=r"model.activation: 'gelu' is not one of relu, aglu"):
        config_lib.load(SMOKE, ["model.activation=gelu"])
    with pytest.raises(config_lib.ConfigError, match="model.aglu_gradient: official is AGLU's"):
        config_lib.load(SMOKE, ["model.aglu_gradient=official"])
    with pytest.raises(config_lib.ConfigError, match="train.posthoc_offset: 'rel' is not one of log_prior, iif"):
        config_lib.load(SMOKE, ["train.posthoc_offset=rel"])


def test_relu_keeps_the_same_model():
    """The default is the model as before: the same parameter names and shapes, one weight-decay group."""
    model = build_model(ModelConfig(width=4, projection_dim=8), 5)
    assert not no_decay(model) and len(parameter_groups(model)) == 1
    assert {k for k in model.state_dict() if "act" in k or "se" in k} == set()


def test_resnext50_gets_one_aglu_per_site_although_torchvision_reuses_its_relu():
    model = build_model(ModelConfig(arch="resnext50_32x4d", projection_dim=8, activation="aglu", se="sigmoid"), 10)
    aglus = _modules(model, AGLU)
    # stem 1 + 16 bottlenecks x 3 sites, each its own module; the SE excitations keep ReLU
    assert len(aglus) == 1 + 16 * 3 and len({id(m) for m in aglus}) == len(aglus)
    assert len(_modules(model, torch.nn.ReLU)) == 16
    reference = build_model(ModelConfig(arch="resnext50_32x4d", projection_dim=8), 10)
    convs = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [m.weight.shape for m in reference.modules() if isinstance(m, torch.nn.Conv2d)]  # same layers
    out = model(torch.randn(1, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (1, 10) and all(m.lam.grad is not None for m in aglus)


def test_iif_is_the_log_odds_offset_and_its_tau_1_is_the_official_adjustment():
    counts = [50, 20, 5, 1]
    n = torch.tensor(counts, dtype=torch.float64)
    torch.testing.assert_close(longtail.log_odds(counts), (-torch.log((n.sum() - n) / n)).float())

    class Fixed(torch.nn.Module):  # logits a function of the input alone
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x

    logits = torch.randn(64, 4) * 2
    labels = torch.randint(4, (64,))
    metrics = evaluate(Fixed(), [(logits, labels)], counts, contextlib.nullcontext,
                       lambda t: t, taus=[1.0], offset="iif")
    adjusted = (logits + torch.log((n.sum() - n) / n).float()).argmax(1)
    hits = torch.bincount(labels[adjusted == labels], minlength=4).double()
    per_class = 100 * hits / torch.bincount(labels, minlength=4).double()
    assert metrics["posthoc_scan"][0]["balanced_top1"] == pytest.approx(float(per_class.mean()))


def test_apa_trains_and_a_resume_gives_the_straight_runs_weights(tmp_path):
    straight, _ = resume_matches_straight(tmp_path, SMOKE, APA_RUN, stop_after=1)
    assert straight["epoch"] == 2
    lams = [v for k, v in straight["model"].items() if k.endswith(".lam")]
    assert len(lams) == 1 + 15 * 2 + 15 and all(math.isfinite(float(v)) for v in lams)  # AGLUs, APA gates
    assert len(straight["optimizer"]["param_groups"]) == 2  # the scalars without weight decay, also resumed
