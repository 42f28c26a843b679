"""Accuracy by class and by shot group, from per-class hit counts (which sum across workers), raw and after
post-hoc logit adjustment.

Shot groups follow the OLTR convention used by most long-tail papers: Many n_c > 100, Medium 20 <= n_c <= 100,
Few n_c < 20, with n_c the *training* count (the official GLMC Trainer uses Few n_c <= 20; the two differ
only for a class of exactly 20 images, e.g. class 69 of CIFAR-100-LT IF 100).

Post-hoc logit adjustment (Menon et al. 2021, reference section 2): predict argmax z - tau * log pi, pi the
training label distribution, for any trained model. One pass over a split counts the top-1 hits of every tau
of the grid at once (one extra argmax per tau and batch; the hit counts are summed across workers in the same
all_reduce as the raw ones). tau is chosen by balanced top-1 on the validation split and the test split is
reported at that tau; without a validation split no tau is chosen (the test split never chooses one).
Differences from the official post-hoc code: log(pi^tau + 1e-12) is exactly tau * log pi here, and tau is
chosen on validation instead of fixed at 1.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from glmc_ray.core import longtail

MANY_ABOVE = 100  # Many: n_c > 100
FEW_BELOW = 20  # Few: n_c < 20
NO_VALIDATION = "no validation split: tau is chosen on validation only, never on test"


def shot_groups(train_counts) -> dict[str, torch.Tensor]:
    counts = torch.as_tensor(train_counts)
    return {"many": counts > MANY_ABOVE, "medium": (counts >= FEW_BELOW) & (counts <= MANY_ABOVE),
            "few": counts < FEW_BELOW}


def tau_grid(tau_max: float, step: float) -> list[float]:
    """0, step, 2 step, ... up to tau_max (inclusive, to rounding); [] when tau_max is 0 (no post-hoc scan)."""
    if tau_max <= 0:
        return []
    return [round(i * step, 10) for i in range(math.floor(tau_max / step + 1e-9) + 1)]


def posthoc_logits(logits: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """z - tau * log pi: rare classes (log pi very negative) are raised."""
    return logits - tau * log_prior.to(logits)


@torch.no_grad()
def hit_counts(model, batches: Iterable, num_classes: int, autocast, offsets: torch.Tensor | None = None,
               logit_scale: float = 1.0) -> torch.Tensor:
    """(3 + T + E, C) tensor over this worker's share: top-1 hits, top-5 hits and samples per true class, then
    the top-1 hits with each of the T `offsets` rows subtracted from the logits (tau * log pi per tau), then each
    of a multi-expert model's E experts' own top-1 hits (E = 0 for other models), then, for a model with RIDE's
    router, the experts each class's samples used.

    The logits are multiplied by `logit_scale` first (the method's; argmax does not change). Top-1 is the
    argmax of the same tensor the offsets are subtracted from, so an offset of 0 gives the raw hits exactly."""
    model.eval()
    device = next(model.parameters()).device
    offsets = torch.zeros(0, num_classes) if offsets is None else offsets
    offsets = offsets.to(device, torch.float32)
    experts, routed = num_experts(model), is_routed(model)
    counts = torch.zeros(3 + len(offsets) + experts + routed, num_classes, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x, experts=True) if experts else model(x)
        logits = (out.mean if experts else out).float() * logit_scale
        for row in range(experts):
            hits = out.experts[:, row].float().argmax(dim=1) == y
            counts[3 + len(offsets) + row].index_add_(0, y, hits.double())
        if routed:
            counts[-1].index_add_(0, y, out.used.double())
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        counts[0].index_add_(0, y, (logits.argmax(dim=1) == y).double())
        counts[1].index_add_(0, y, (top5 == y[:, None]).any(dim=1).double())
        counts[2].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        for row, offset in enumerate(offsets, start=3):
            counts[row].index_add_(0, y, ((logits - offset).argmax(dim=1) == y).double())
    model.train()
    return counts


def class_metrics(top1_hits: torch.Tensor, totals: torch.Tensor, train_counts) -> dict:
    """top1 over samples, mean per-class accuracy, the worst class's, Many/Medium/Few (mean of per-class
    accuracy), per class (%)."""
    top1_hits, totals = top1_hits.double().cpu(), totals.double().cpu()
    seen = totals > 0
    per_class = torch.where(seen, top1_hits / totals.clamp_min(1), torch.full_like(totals, float("nan")))
    metrics = {"top1": float(100 * top1_hits.sum() / totals.sum()),
               "balanced_top1": float(100 * per_class[seen].mean()), "worst": float(100 * per_class[seen].min())}
    for name, members in shot_groups(train_counts).items():
        members = members & seen
        metrics[name] = float(100 * per_class[members].mean()) if members.any() else None
    metrics["per_class"] = [None if torch.isnan(a) else round(float(100 * a), 3) for a in per_class]
    return metrics


def accuracy_metrics(counts: torch.Tensor, train_counts) -> dict:
    """The raw metrics of `hit_counts`' first three rows, with top5."""
    counts = counts.double().cpu()
    metrics = class_metrics(counts[0], counts[2], train_counts)
    return {"top1": metrics["top1"], "top5": float(100 * counts[1].sum() / counts[2].sum()),
            **{k: v for k, v in metrics.items() if k != "top1"}}


def num_experts(model) -> int:
    """E of a multi-expert model (glmc_ray.models.experts.ExpertNet, whose forward takes experts=True), else 0."""
    return getattr(model, "num_experts", 0)


def is_routed(model) -> bool:
    """Whether a multi-expert model picks its experts per sample (RIDE's router), reporting how many it used."""
    return getattr(model, "router", None) is not None


def expert_metrics(counts: torch.Tensor, train_counts) -> list[dict]:
    """Each expert's top-1, balanced top-1 and Many/Medium/Few from its hit-count row (counts: its hit rows,
    then the samples per class)."""
    *rows, totals = counts
    return [{k: v for k, v in class_metrics(row, totals, train_counts).items() if k != "per_class"} for row in rows]


POSTHOC_OFFSETS = {"log_prior": longtail.log_prior, "iif": longtail.log_odds}  # train.posthoc_offset


def evaluate(model, batches: Iterable, train_counts, autocast, all_reduce: Callable[[torch.Tensor], torch.Tensor],
             taus: Sequence[float] = (), logit_scale: float = 1.0, offset: str = "log_prior") -> dict:
    """The split's metrics; with `taus`, also "posthoc_scan": the metrics at each tau (for `choose_posthoc`) of
    argmax z - tau * offset (log pi, or IIF's log(n / (N - n)))."""
    offsets = torch.stack([tau * POSTHOC_OFFSETS[offset](train_counts) for tau in taus]) if taus else None
    counts = all_reduce(hit_counts(model, batches, len(train_counts), autocast, offsets, logit_scale))
    metrics = accuracy_metrics(counts[:3], train_counts)
    first_expert = 3 + len(taus)
    if taus:
        metrics["posthoc_scan"] = [class_metrics(row, counts[2], train_counts) for row in counts[3:first_expert]]
    experts = num_experts(model)
    if experts:  # users of RIDE / MDCS / SHIKE read these to see the experts specialise
        rows = counts[first_expert:first_expert + experts]
        metrics["experts"] = expert_metrics(torch.cat([rows, counts[2:3]]), train_counts)
        if hasattr(model, "expert_names"):  # heads with names of their own (DeiT-LT's cls and dist tokens)
            metrics["expert_names"] = list(model.expert_names)
    if is_routed(model):
        metrics["experts_used"] = float(counts[-1].sum() / counts[2].sum())
    return metrics


def choose_posthoc(results: dict[str, dict], taus: Sequence[float]) -> dict[str, dict]:
    """Replace each split's "posthoc_scan" by `<split>_posthoc`, its metrics at the tau with the best balanced
    top-1 on "val" (the smallest such tau on a tie), and add "posthoc": the tau, the grid and validation's
    balanced top-1 along it. Without a validation split: "posthoc" says why there is no tau."""
    scans = {split: metrics.pop("posthoc_scan") for split, metrics in results.items() if "posthoc_scan" in metrics}
    if "val" not in scans:
        if taus:
            results["posthoc"] = {"tau": None, "reason": NO_VALIDATION}
        return results
    val = [m["balanced_top1"] for m in scans["val"]]
    best = max(range(len(taus)), key=lambda i: (val[i], -i))
    results["posthoc"] = {"tau": taus[best], "chosen_on": "val", "taus": list(taus), "val_balanced_top1": val}
    for split, scan in scans.items():
        results[f"{split}_posthoc"] = scan[best]
    return results
