"""Assemble one worker's training from the config and hand it to the loop (in-process or on Ray Train)."""
from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable

import numpy as np
import torch
from timm.optim import param_groups_weight_decay

from glmc_ray.core import longtail
from glmc_ray.core.config import EXPERT_LAYOUTS, default_classifier, experts_of, teacher_of
from glmc_ray.core.schedules import lr_scheduler
from glmc_ray.data import build_data, normalization
from glmc_ray.methods import build_method
from glmc_ray.models.activations import no_decay
from glmc_ray.models.backbones import build_model
from glmc_ray.models.experts import ExpertPlan, build_expert_model, freeze_except
from glmc_ray.models.teacher import Teacher, renormalisation
from glmc_ray.models.transformers import DistilledDeiT
from glmc_ray.runs import parent_run
from glmc_ray.training.loop import Dist, Reporter, Trainee, fit


def select_device(requested: str, available: torch.device | None = None) -> torch.device:
    """train.device resolved against the device this worker was given (Ray Train's), else the first GPU."""
    if available is None:
        available = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if requested == "cuda" and available.type != "cuda":
        raise ValueError("train.device: 'cuda' requested, but this worker has no CUDA device")
    return torch.device("cpu") if requested == "cpu" else available


def autocast_for(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA by default; `bf16` forces it (also on CPU), `off` disables it."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def memory_format_for(device: torch.device, requested: str) -> torch.memory_format:
    on = requested == "channels_last" or (requested == "auto" and device.type == "cuda")
    return torch.channels_last if on else torch.contiguous_format


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_trainee(cfg, class_counts, device, memory_format, prepare_model=lambda m: m,
                  from_parent: bool = True) -> Trainee:
    """Model, optimiser, schedule and method. A class without training images is a ValueError naming it, here,
    before training: every method's class weights and the post-hoc log-prior need n_c > 0. `from_parent`:
    start from train.init_from's weights (not when a checkpoint of this run replaces them)."""
    longtail.positive_counts(class_counts, f"method {cfg.method.name} (and post-hoc logit adjustment)")
    method = build_method(cfg.method, class_counts, cfg)
    if (teacher := teacher_of(cfg)) is not None:  # checked by the driver (parent_run.check_teacher)
        method.teacher = load_teacher(cfg, *teacher, len(class_counts), device, memory_format)
    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    raw = build_network(cfg, len(class_counts))
    if cfg.train.init_from and from_parent:  # checked against this run by the driver (parent_run.check)
        load_parent_weights(raw, cfg.train.init_from, method.trainable)
    if cfg.dist.sync_batchnorm:
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    if method.trainable is not None:  # a stage that trains some parameters only: DDP must never see the others
        freeze_except(raw, method.trainable)
    raw = raw.to(device, memory_format=memory_format)
    model = prepare_model(raw)
    optimizer = build_optimizer(raw, cfg.optim)
    scheduler = lr_scheduler(optimizer, cfg.optim, cfg.train.epochs)
    return Trainee(model, raw, method, optimizer, scheduler, device, autocast_for(device, cfg.train.amp),
                   memory_format)


def load_parent_weights(model: torch.nn.Module, init_from: str, trainable: tuple[str, ...] | None) -> None:
    """The parent run's newest weights; only what this stage trains may be missing there (RIDE's router)."""
    _, state = parent_run.newest_weights(init_from)
    missing, unexpected = model.load_state_dict(state, strict=False)
    wrong = unexpected + [key for key in missing if not key.startswith(trainable or ())]
    if wrong:
        raise ValueError(f"train.init_from: {init_from}: its weights do not fit this model ({', '.join(wrong[:5])}"
                         f"{' ...' if len(wrong) > 5 else ''} missing or unexpected)")


def load_teacher(cfg, key: str, run: str, num_classes: int, device, memory_format) -> Teacher:
    """A distillation teacher: the network of a finished run with its newest weights, frozen, in eval mode for
    good (it is no part of the trained model, outside DDP's), seeing this run's batches as its own data."""
    teacher_cfg, state = parent_run.newest_weights(run, key)
    network = build_network(teacher_cfg, num_classes)
    network.load_state_dict(state)
    scale, shift = renormalisation(normalization(cfg), normalization(teacher_cfg))
    size = (teacher_cfg.data.image_size,) * 2
    return Teacher(network, scale, shift, size).to(device, memory_format=memory_format)


def build_network(cfg, num_classes: int) -> torch.nn.Module:
    """The method's model: GLMC's heads on a backbone, the multi-expert model of RIDE / MDCS / SHIKE, or
    DeiT-LT's two-token DeiT."""
    name = cfg.method.name
    if name == "deit_lt":  # both tokens' heads
        return DistilledDeiT(cfg.model.arch, num_classes, cfg.data.channels, cfg.model.drop_path)
    if name not in EXPERT_LAYOUTS:
        return build_model(cfg.model, num_classes, cfg.data.channels, default_classifier(name))
    retrained = name == "shike" and cfg.method.shike.stage == "retrain"
    ride = cfg.method.ride
    router = (ride.router_hidden, ride.router_top_k) if name == "ride" and ride.stage == "router" else None
    plan = ExpertPlan(experts_of(cfg), EXPERT_LAYOUTS[name], use_retrained_heads=retrained, router=router)
    return build_expert_model(cfg.model, num_classes, cfg.data.channels, plan)


def build_optimizer(model: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """optim.name's optimiser over the trainable parameters. AdamW's groups are timm's (DeiT's): no weight decay
    on biases, norms and what a module lists in its `no_weight_decay()` (a ViT's tokens, position embedding)."""
    if optim.name == "adamw":
        exempt = [f"{prefix}.{name}".lstrip(".") for prefix, module in model.named_modules()
                  if callable(getattr(module, "no_weight_decay", None)) for name in module.no_weight_decay()]
        groups = param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=exempt)
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))
    return torch.optim.SGD(parameter_groups(model), lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


def parameter_groups(model) -> list[dict]:
    """The trainable parameters: one group with optim.weight_decay; the APA/AGLU scalars, if any, in a second
    without (the official). Frozen ones (a stage that trains some heads only) are left out: SGD's weight decay
    and momentum would still move them."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    free = [p for p in no_decay(model) if p.requires_grad]
    if not free:
        return [{"params": trainable}]
    ids = {id(p) for p in free}
    return [{"params": [p for p in trainable if id(p) not in ids]}, {"params": free, "weight_decay": 0.0}]


def run_worker(cfg, reporter: Reporter, dist: Dist | None = None, state: dict | None = None,
               device: torch.device | None = None, prepare_model=lambda m: m, dataset_shard=None) -> dict:
    """Everything one worker does: device, data share, model, method, optimiser, then the loop.

    `dataset_shard`: Ray Train's get_dataset_shard, for sources streamed by Ray Data."""
    dist = dist or Dist()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg.train.device, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input sizes: let cuDNN pick its kernels
    memory_format = memory_format_for(device, cfg.train.memory_format)
    data = build_data(cfg, device, dist.rank, dist.world_size, memory_format, dataset_shard)
    # a resumed second stage needs its own checkpoint only: its parent run may be gone by now
    trainee = build_trainee(cfg, data.class_counts, device, memory_format, prepare_model, from_parent=state is None)
    return fit(cfg, trainee, data, reporter, dist, state)
