"""Vision transformers from timm under the harness's heads, and the optimiser and step options DeiT trains with
(AdamW with timm's weight-decay groups, gradient accumulation, gradient clipping), usable by every method."""
import json
import re

import pytest
import timm
import torch

from glmc_ray.core import config as config_lib
from glmc_ray.core.config import TRANSFORMER_ARCHS, ConfigError
from glmc_ray.methods.base import Batch
from glmc_ray.models.transformers import TIMM_MODELS
from glmc_ray.train import main
from glmc_ray.training.worker import build_network, build_trainee
from tests.conftest import REPO, train_on

SMOKE = str(REPO / "configs/smoke.yaml")
MICRO = "model.arch=deit_micro_distilled_patch4_32"


def _config(*overrides):
    return config_lib.load(SMOKE, [MICRO, "method.name=ce", *overrides])


def test_every_transformer_arch_is_a_distilled_deit_of_timm():
    assert set(TIMM_MODELS) == set(TRANSFORMER_ARCHS)
    for name, _ in TIMM_MODELS.values():
        assert timm.is_model(name) and "distilled" in name


def test_a_single_head_method_reads_the_average_of_the_class_and_distillation_tokens():
    model = build_network(_config(), 10).eval()
    vit = model.backbone.vit
    assert type(vit).__name__ == "VisionTransformerDistilled" and len(vit.blocks) == 2 and vit.num_features == 64
    x = torch.randn(3, 3, 32, 32)
    tokens = vit.forward_features(x)
    torch.testing.assert_close(model.backbone(x), (tokens[:, 0] + tokens[:, 1]) / 2)
    torch.testing.assert_close(model(x), model.fc_cb((tokens[:, 0] + tokens[:, 1]) / 2))


def test_a_224_px_deit_takes_cifar_images_resized_on_the_device():
    model = build_network(_config("model.arch=deit_tiny_distilled_patch16_224"), 10).eval()
    x = torch.rand(2, 3, 32, 32)
    resized = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(x), model.fc_cb(model.backbone.vit(resized)))


def test_drop_path_is_timms_stochastic_depth_rising_to_the_rate():
    vit = build_network(_config("model.drop_path=0.2"), 10).backbone.vit
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in vit.blocks]  # rate 0: timm's Identity
    assert rates == pytest.approx([0.0, 0.2])


def test_adamw_groups_are_timms_no_decay_on_biases_norms_and_tokens_and_sgd_decays_everything():
    trainee = build_trainee(_config("optim.name=adamw", "optim.weight_decay=0.05", "optim.betas=[0.9,0.95]"),
                            [20] * 10, torch.device("cpu"), torch.contiguous_format)
    optimizer, names = trainee.optimizer, {id(p): n for n, p in trainee.raw_model.named_parameters()}
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.95)
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {"backbone.vit.cls_token", "backbone.vit.dist_token", "backbone.vit.pos_embed", "fc_cb.bias",
            "backbone.vit.norm.weight"} <= decay[0.0]
    assert "fc_cb.weight" in decay[0.05] and "backbone.vit.blocks.0.attn.qkv.weight" in decay[0.05]
    assert decay[0.0].isdisjoint(decay[0.05]) and decay[0.0] | decay[0.05] == set(names.values())
    sgd = build_trainee(_config(), [20] * 10, torch.device("cpu"), torch.contiguous_format).optimizer
    assert isinstance(sgd, torch.optim.SGD) and [g["weight_decay"] for g in sgd.param_groups] == [5e-4]


def _train_on(batches, *overrides):
    cfg = _config("train.progress_every=0", "train.finite_check_every=1", "optim.lr=0.5", *overrides)
    trainee = build_trainee(cfg, [20] * 10, torch.device("cpu"), torch.contiguous_format)
    record = train_on(trainee, cfg, batches)
    return trainee.raw_model.state_dict(), record


def _batch(x, y):
    return Batch(x, x, y)


def test_accumulated_batches_step_as_their_union_also_when_the_epochs_last_group_is_short():
    """3 batches of 4 with train.accumulate=2 (groups of 2 and 1) == a batch of 8 then a batch of 4. With SGD:
    its step is linear in the gradient (AdamW's first step is lr x sign(g), which float rounding flips where a
    gradient is ~0)."""
    optimizer = "optim.name=sgd"
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32, generator=generator), torch.randint(0, 10, (12,), generator=generator)
    parts = [_batch(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]
    accumulated, _ = _train_on(parts, "train.accumulate=2", optimizer)
    union, _ = _train_on([_batch(x[:8], y[:8]), parts[2]], optimizer)
    stepped_once_each, _ = _train_on(parts, optimizer)
    for key, value in union.items():
        torch.testing.assert_close(accumulated[key], value, atol=1e-5, rtol=1e-4, equal_nan=True, msg=key)
    assert not torch.allclose(stepped_once_each["fc_cb.weight"], union["fc_cb.weight"], atol=1e-4)


def test_clipping_bounds_the_step_and_logs_the_norm_before_it():
    generator = torch.Generator().manual_seed(1)
    batch = _batch(torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator))
    before = build_trainee(_config(), [20] * 10, torch.device("cpu"), torch.contiguous_format).raw_model.state_dict()
    clipped, record = _train_on([batch], "optim.clip_grad_norm=0.01", "optim.momentum=0", "optim.weight_decay=0")
    unclipped, plain = _train_on([batch], "optim.momentum=0", "optim.weight_decay=0")
    moved = torch.cat([(clipped[k] - before[k]).flatten() for k in before if k != "maxnorm_radii"])  # NaN: unset
    assert "grad_norm" not in plain and record["grad_norm"] > 0.01
    assert float(moved.norm()) == pytest.approx(0.5 * 0.01, rel=1e-3)  # lr x the clipped norm: one SGD step


@pytest.mark.parametrize("settings,key", [
    (["model.drop_path=0.1"], "model.drop_path"),  # resnet32 has no stochastic depth
    ([MICRO, "method.name=ride"], "model.arch"),
    ([MICRO, "model.norm=group"], "model.norm"),
    ([MICRO, "model.activation=aglu"], "model.activation"),
    ([MICRO, "dist.sync_batchnorm=true"], "dist.sync_batchnorm"),
    (["optim.name=adamw", "optim.nesterov=true"], "optim.nesterov"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["train.accumulate=0"], "train.accumulate"),
    (["optim.clip_grad_norm=-1"], "optim.clip_grad_norm"),
    (["model.arch=vit_base_patch16_224"], "model.arch"),
])
def test_options_that_cannot_apply_are_errors_naming_the_key(settings, key):
    with pytest.raises(ConfigError) as raised:
        config_lib.load(SMOKE, settings)
    assert raised.value.key == key and re.match(rf"--set [^ ]+: {re.escape(key)}: ", str(raised.value)), raised.value


def test_glmc_trains_a_deit_with_adamw_accumulation_and_clipping_in_process(tmp_path):
    settings = [MICRO, "optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05", "optim.nesterov=false",
                "train.accumulate=2", "train.batch_size=32", "optim.clip_grad_norm=5.0", "model.drop_path=0.1",
                "train.epochs=2"]
    assert main(["--config", SMOKE, "--output", str(tmp_path), *[a for s in settings for a in ("--set", s)]]) == 0
    (run,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(r["grad_norm"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["test_top1"] > 10  # 10 classes: chance is 10
