"""Accuracy by class and by shot group, from per-class hit counts (which sum across workers).

Shot groups follow the OLTR convention used by most long-tail papers: Many n_c > 100, Medium 20 <= n_c <= 100,
Few n_c < 20, with n_c the *training* count (the official GLMC Trainer uses Few n_c <= 20; the two differ
only for a class of exactly 20 images, e.g. class 69 of CIFAR-100-LT IF 100).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

MANY_ABOVE = 100  # Many: n_c > 100
FEW_BELOW = 20  # Few: n_c < 20


def shot_groups(train_counts) -> dict[str, torch.Tensor]:
    counts = torch.as_tensor(train_counts)
    return {"many": counts > MANY_ABOVE, "medium": (counts >= FEW_BELOW) & (counts <= MANY_ABOVE),
            "few": counts < FEW_BELOW}


@torch.no_grad()
def hit_counts(model, batches: Iterable, num_classes: int, autocast) -> torch.Tensor:
    """(3, C) tensor: top-1 hits, top-5 hits and samples per true class, over this worker's share."""
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(3, num_classes, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        counts[0].index_add_(0, y, (top5[:, 0] == y).double())
        counts[1].index_add_(0, y, (top5 == y[:, None]).any(dim=1).double())
        counts[2].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    model.train()
    return counts


def accuracy_metrics(counts: torch.Tensor, train_counts) -> dict:
    """top1/top5 over samples, mean per-class accuracy, Many/Medium/Few (mean of per-class accuracy, %)."""
    counts = counts.double().cpu()
    top1_hits, top5_hits, totals = counts
    seen = totals > 0
    per_class = torch.where(seen, top1_hits / totals.clamp_min(1), torch.full_like(totals, float("nan")))
    metrics = {
        "top1": float(100 * top1_hits.sum() / totals.sum()),
        "top5": float(100 * top5_hits.sum() / totals.sum()),
        "balanced_top1": float(100 * per_class[seen].mean()),
    }
    for name, members in shot_groups(train_counts).items():
        members = members & seen
        metrics[name] = float(100 * per_class[members].mean()) if members.any() else None
    metrics["per_class"] = [None if torch.isnan(a) else round(float(100 * a), 3) for a in per_class]
    return metrics


def evaluate(model, batches: Iterable, train_counts, autocast, all_reduce: Callable[[torch.Tensor], torch.Tensor]):
    counts = all_reduce(hit_counts(model, batches, len(train_counts), autocast))
    return accuracy_metrics(counts, train_counts)
