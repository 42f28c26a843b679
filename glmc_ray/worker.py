"""Assemble one worker's training from the config and hand it to the loop (in-process or on Ray Train)."""
from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable

import numpy as np
import torch

from glmc_ray import longtail
from glmc_ray.activations import no_decay
from glmc_ray.config import default_classifier
from glmc_ray.data import build_data
from glmc_ray.loop import Dist, Reporter, Trainee, fit
from glmc_ray.methods import METHODS, build_method
from glmc_ray.models import build_model
from glmc_ray.schedules import lr_factor


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


def build_trainee(cfg, class_counts, device, memory_format, prepare_model=lambda m: m) -> Trainee:
    """Model, optimiser, schedule and method. A class without training images is a ValueError naming it, here,
    before training: every method's class weights and the post-hoc log-prior need n_c > 0."""
    longtail.positive_counts(class_counts, f"method {cfg.method.name} (and post-hoc logit adjustment)")
    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    raw = build_model(cfg.model, len(class_counts), cfg.data.channels, default_classifier(cfg.method.name))
    if cfg.dist.sync_batchnorm:
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    raw = raw.to(device, memory_format=memory_format)
    model = prepare_model(raw)
    optimizer = torch.optim.SGD(parameter_groups(raw), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(
        e, cfg.train.epochs, cfg.optim.schedule, cfg.optim.warmup_epochs))
    method = build_method(cfg.method, class_counts)
    return Trainee(model, raw, method, optimizer, scheduler, device, autocast_for(device, cfg.train.amp),
                   memory_format)


def parameter_groups(model) -> list[dict]:
    """One group with optim.weight_decay; the APA/AGLU scalars, if any, in a second without (the official)."""
    free = no_decay(model)
    if not free:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in free}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": free, "weight_decay": 0.0}]


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
    rebalanced = METHODS[cfg.method.name].uses_rebalanced_stream
    data = build_data(cfg, device, dist.rank, dist.world_size, memory_format, rebalanced, dataset_shard)
    trainee = build_trainee(cfg, data.class_counts, device, memory_format, prepare_model)
    return fit(cfg, trainee, data, reporter, dist, state)
