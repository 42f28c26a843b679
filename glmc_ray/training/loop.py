"""The training loop: one function, the same in-process and on every Ray Train worker.

It receives everything it works on: the model (DDP-wrapped or not), the method, the batch source, the
evaluation sets, how to sum a tensor across workers, and one reporting hook through which every epoch's
metrics and checkpoint leave. It builds none of them, so Ray Train, Ray Data and Tune wrap it unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from glmc_ray.core.config import to_dict
from glmc_ray.core.errors import kept_checkpoint
from glmc_ray.core.evaluation import choose_posthoc, evaluate, tau_grid
from glmc_ray.core.interrupts import Interrupted
from glmc_ray.data.batches import DataBundle, epoch_generator
from glmc_ray.methods import Method


class Reporter(Protocol):
    def report(self, record: dict, checkpoint: Callable[[], dict], is_best: bool, per_class: list | None) -> None:
        """Called by every worker once per epoch; `checkpoint()` builds the full training state; `per_class`
        is the test accuracy of each class (%) on epochs with an evaluation, else None."""

    def finish(self, final: dict) -> None:
        """Called once at the end with the final results (last epoch, best-on-validation epoch)."""

    def stop_requested(self) -> bool:
        """Whether the command was asked to stop (Ctrl-C, SIGTERM; core/interrupts.py): the loop then raises
        Interrupted at the next step boundary the workers agree on, keeping the committed epochs."""


@dataclass
class Dist:
    """What the loop needs to know about distribution; the defaults are one in-process worker."""

    rank: int = 0
    world_size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # in-place sum over workers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any worker's `flag` is set (a collective with several workers: all call it together)."""
        if self.world_size == 1:
            return flag
        return bool(self.all_reduce(torch.tensor([float(flag)], device=device)) > 0)


@dataclass
class Trainee:
    """The objects the loop updates; `model` may be a DDP wrapper around `raw_model`."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    memory_format: torch.memory_format = torch.contiguous_format
    best: dict = field(default_factory=lambda: {"val_balanced_top1": None, "epoch": None, "metrics": None})
    history: list[dict] = field(default_factory=list)  # the epoch records so far, saved in every checkpoint


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(t: Trainee, next_epoch: int, config: dict) -> dict:
    return {"epoch": next_epoch, "model": t.raw_model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "best": t.best, "rng": rng_state(), "config": config,
            "history": list(t.history)}


def restore(t: Trainee, state: dict) -> int:
    """Load a checkpoint made by `training_state`; returns the epoch to continue from."""
    t.raw_model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.best = state["best"]
    t.history = list(state["history"])
    set_rng_state(state["rng"])
    return state["epoch"]


def non_finite_state(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers holding inf or NaN (e.g. BatchNorm variances after an exploding loss).

    The MaxNorm radii buffer is NaN by design until the first step sets it, so NaN there is allowed."""
    bad = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or name.endswith("maxnorm_radii"):
            continue
        if not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


class Divergence:
    """The first step of the epoch whose loss is not finite, kept on the device: marking a step reads nothing
    back to the host (on a GPU every read waits for the queue to drain), and `check` reads one value."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)

    def mark(self, step: int, loss: torch.Tensor) -> None:
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.float(), self.loss)

    def check(self, epoch: int, lr: float) -> None:
        step = int(self.step)
        if step >= 0:
            raise FloatingPointError(f"non-finite loss {float(self.loss)} at epoch {epoch} step {step} (lr {lr}); "
                                     f"{kept_checkpoint(epoch)}")


def train_epoch(t: Trainee, data: DataBundle, epoch: int, cfg, dist: Dist, stop: Callable[[], bool]) -> dict:
    """One pass over the batch source; returns the epoch's mean loss terms, lr and throughput.

    Nothing is read back from the device per step: the loss terms are summed there, and a non-finite loss is
    noted there and looked at every train.finite_check_every steps, at each progress line and at the end of
    the epoch (the run stops naming the first bad step; the weights it went on to change are never saved).
    `stop()` is looked at after every step in-process, every train.finite_check_every steps with several
    workers (who must agree on the step: a collective); when set, Interrupted ends the epoch there."""
    steps, epochs = len(data.train), cfg.train.epochs
    generator = epoch_generator(cfg.train.seed, epoch, stream=1)  # same on all ranks: one lambda per global batch
    sums: dict[str, torch.Tensor] = {}
    host_sums: dict[str, float] = {}  # terms a method reports as Python numbers
    divergence, every, check_every = Divergence(t.device), cfg.train.progress_every, cfg.train.finite_check_every
    images, start, lr = 0, time.perf_counter(), t.optimizer.param_groups[0]["lr"]
    said = start  # when the last progress line was printed
    accumulate = cfg.train.accumulate
    for step, batch in enumerate(data.train.epoch(epoch)):
        batch = batch.to(t.device, t.memory_format)
        progress = (epoch + step / steps if t.method.progress_per_step else epoch) / epochs
        first = step - step % accumulate  # the first batch of this optimiser step's group
        group = min(accumulate, steps - first)  # its batches (the epoch's last group may have fewer)
        ends_group = step + 1 == first + group
        if step == first:
            t.optimizer.zero_grad(set_to_none=True)
        # DDP averages the gradients across workers at the group's last backward only
        with contextlib.nullcontext() if ends_group else getattr(t.model, "no_sync", contextlib.nullcontext)():
            with t.autocast():
                out = t.method.step(t.model, batch, progress, generator)
            divergence.mark(step, out.loss.detach())
            (out.loss / group).backward()  # the group's gradient: the mean of its batches'
        terms = {"loss": out.loss, **out.terms}
        if ends_group:
            terms.update(optimizer_step(t, cfg.optim.clip_grad_norm, group))
        for key, value in terms.items():
            if torch.is_tensor(value):
                sums[key] = sums.get(key, 0) + value.detach().float()
            else:
                host_sums[key] = host_sums.get(key, 0.0) + float(value)
        images += len(batch) * dist.world_size
        progress_line = dist.is_main and ((every and (step + 1) % every == 0) or (
            cfg.train.progress_seconds and time.perf_counter() - said >= cfg.train.progress_seconds))
        checkpoint_step = (step + 1) % check_every == 0
        if progress_line or checkpoint_step:
            divergence.check(epoch, lr)
        if (dist.world_size == 1 or checkpoint_step) and dist.any(stop(), t.device):
            raise Interrupted(epoch, step + 1)
        if progress_line:
            said, rate = time.perf_counter(), (step + 1) / (time.perf_counter() - start)
            print(f"  epoch {epoch} step {step + 1}/{steps} | loss {float(out.loss.detach()):.4f} | "
                  f"{images / (said - start):.0f} img/s | epoch ETA {clock((steps - step - 1) / rate)}", flush=True)
    divergence.check(epoch, lr)
    names = sorted(sums) + sorted(host_sums)
    totals = [sums[k] for k in sorted(sums)] + [torch.tensor(host_sums[k], device=t.device) for k in sorted(host_sums)]
    means = dist.all_reduce(torch.stack(totals)) / (dist.world_size * steps)
    seconds = time.perf_counter() - start
    record = {"epoch": epoch, "lr": lr, **{k: float(v) for k, v in zip(names, means.tolist(), strict=True)}}
    record.update(alpha=t.method.alpha(epoch / epochs), images_per_s=images / seconds, train_seconds=seconds)
    return record


def optimizer_step(t: Trainee, clip_grad_norm: float, group: int) -> dict:
    """Clip (where asked), step, and the method's projection after it; returns the gradient norm before
    clipping, times the group's batches (so that the epoch's mean over batches is the mean per step)."""
    terms = {}
    if clip_grad_norm:
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(t.raw_model.parameters(), clip_grad_norm) * group
    t.optimizer.step()
    t.method.after_optimizer_step(t.raw_model)
    return terms


def evaluate_splits(t: Trainee, data: DataBundle, dist: Dist, cfg) -> dict[str, dict]:
    """Each split's metrics; with post-hoc logit adjustment on, also `<split>_posthoc` at the tau chosen on
    "val" and "posthoc" (the tau and its scan), or "posthoc" saying there is no validation split to choose on."""
    taus = tau_grid(cfg.train.posthoc_tau_max, cfg.train.posthoc_tau_step)
    scan = taus if "val" in data.evals else []  # never scan (let alone choose) on test alone
    # The unwrapped model: DDP's forward is a collective (it broadcasts the buffers), and the ranks' shares of an
    # evaluation split may differ by a batch or more; rank 0 then waited in a forward that no other rank joined.
    results = {name: evaluate(t.raw_model, batches, data.class_counts, t.autocast, dist.all_reduce, scan,
                              t.method.logit_scale, cfg.train.posthoc_offset)
               for name, batches in data.evals.items()}
    return choose_posthoc(results, taus)


def bad_image_counts(t: Trainee, data: DataBundle, dist: Dist, splits: list[str]) -> dict:
    """`<split>_bad_images`: unreadable images skipped this epoch, summed over workers."""
    counts = torch.tensor([float(data.bad_images.take(s)) for s in splits], device=t.device)
    counts = dist.all_reduce(counts)
    return {f"{split}_bad_images": int(n) for split, n in zip(splits, counts.tolist(), strict=True)}


def flatten(results: dict[str, dict]) -> dict:
    """{"test": {"top1": ..}} -> {"test_top1": ..}, leaving per-class lists out of the epoch record; each
    expert's metrics as "test_expert<e>_top1" ...; of the post-hoc scan only its tau ("posthoc_tau", None
    without a validation split)."""
    record = {f"{split}_{k}": v for split, m in results.items() if split != "posthoc"
              for k, v in m.items() if k not in ("per_class", "experts", "expert_names")}
    record.update({f"{split}_{_expert_name(m, e)}_{k}": v for split, m in results.items() if split != "posthoc"
                   for e, expert in enumerate(m.get("experts", [])) for k, v in expert.items()})
    if "posthoc" in results:
        record["posthoc_tau"] = results["posthoc"]["tau"]
    return record


def _expert_name(metrics: dict, e: int) -> str:
    names = metrics.get("expert_names")
    return names[e] if names else f"expert{e}"


def fit(cfg, t: Trainee, data: DataBundle, reporter: Reporter, dist: Dist | None = None,
        state: dict | None = None) -> dict:
    """Train from `state` (or from scratch) to cfg.train.epochs; returns the final results."""
    dist = dist or Dist()
    start_epoch = restore(t, state) if state is not None else 0
    config, epochs, last, seconds = to_dict(cfg), cfg.train.epochs, None, []
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        if dist.any(reporter.stop_requested(), t.device):  # no new epoch starts after a stop
            raise Interrupted(epoch, 0)
        record = train_epoch(t, data, epoch, cfg, dist, reporter.stop_requested)
        t.scheduler.step()
        bad = non_finite_state(t.raw_model)
        if bad:  # never checkpoint a state that cannot train on (the rank that finds it ends the run)
            raise FloatingPointError(f"non-finite weights after epoch {epoch} (loss {record['loss']:.4g}) in "
                                     f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; {kept_checkpoint(epoch)}")
        splits, per_class = ["train"], None
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            last = evaluate_splits(t, data, dist, cfg)
            record.update(flatten(last))
            splits += list(data.evals)
            per_class = last.get("test", {}).get("per_class")
        record.update(bad_image_counts(t, data, dist, splits))
        is_best = _update_best(t, last, epoch) if "val_top1" in record else False
        t.history.append(record)
        seconds.append(time.perf_counter() - started)
        if dist.is_main:  # the run's ETA from this process's epochs (a resume starts counting again)
            eta = sum(seconds) / len(seconds) * (epochs - epoch - 1)
            print(f"{_epoch_line(record)} | {seconds[-1]:.1f} s | ETA {clock(eta)}", file=sys.stdout, flush=True)
        reporter.report(record, functools.partial(training_state, t, epoch + 1, config), is_best, per_class)
    if last is None:  # resumed after the last epoch: evaluate the restored model
        last = evaluate_splits(t, data, dist, cfg)
    final = {"epochs": epochs, "last": last, "best_on_val": t.best, "class_counts": data.class_counts,
             "class_names": data.class_names}
    if cfg.data.protocol == "paper":
        final["best_on_test"] = best_on_test(t.history)
    reporter.finish(final)
    return final


def _update_best(t: Trainee, results: dict, epoch: int) -> bool:
    score = results["val"]["balanced_top1"]
    if t.best["val_balanced_top1"] is not None and score <= t.best["val_balanced_top1"]:
        return False
    t.best = {"val_balanced_top1": score, "epoch": epoch, "metrics": flatten(results)}
    return True


def best_on_test(history: list[dict]) -> dict | None:
    """The paper protocol's second figure: the epoch of the highest test top-1, as the official codes report it.
    It is chosen on test, so it is biased upwards; it is read off the records, no checkpoint is kept for it."""
    scored = [r for r in history if r.get("test_top1") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["test_top1"], -r["epoch"]))  # the first epoch of a tie, as `>` keeps
    return {"epoch": best["epoch"], **{k: v for k, v in best.items() if k.startswith("test_")}}


def clock(seconds: float) -> str:
    """h:mm:ss, as timm's and Lightning's progress print a remaining time."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _epoch_line(r: dict) -> str:
    parts = [f"epoch {r['epoch']}", f"lr {r['lr']:.4g}", f"loss {r['loss']:.4f}", f"alpha {r['alpha']:.3f}"]
    for key in ("val_balanced_top1", "test_top1", "test_many", "test_medium", "test_few"):
        if r.get(key) is not None:
            parts.append(f"{key} {r[key]:.2f}")
    keys = itertools.takewhile(r.__contains__, (f"test_expert{e}_top1" for e in itertools.count()))
    experts = [r[key] for key in keys]
    if experts:
        parts.append("experts test_top1 " + "/".join(f"{a:.2f}" for a in experts))
    parts += [f"{key} {r[key]:.2f}" for key in ("test_cls_top1", "test_dist_top1") if key in r]
    if r.get("posthoc_tau") is not None:  # chosen on val
        parts.append(f"posthoc_tau {r['posthoc_tau']:g}")
        parts += [f"{key} {r[key]:.2f}" for key in ("test_posthoc_top1", "test_posthoc_few") if r.get(key) is not None]
    elif "posthoc_tau" in r:
        parts.append("posthoc_tau none (no validation split)")
    parts.append(f"{r['images_per_s']:.0f} img/s")
    return " | ".join(parts)
