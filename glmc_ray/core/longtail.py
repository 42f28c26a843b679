"""Class-frequency math, in one place: the data sources (the re-balanced stream), GLMC, every long-tail method
and the post-hoc logit adjustment at evaluation all read it from here.

Every function takes the training count n_c of each class (class c at position c, a list or a 1-D tensor)
and is computed in float64. A class without training images has no prior, weight or margin (log 0, 0^-q):
each function refuses it with a ValueError naming the class, instead of returning inf or NaN that would
only surface as a non-finite loss after training has started.
"""
from __future__ import annotations

import torch


def positive_counts(class_counts, what: str = "the class-frequency math") -> torch.Tensor:
    """The counts as float64, or a ValueError naming the first empty class (and how many there are)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or len(counts) == 0:
        raise ValueError(f"class counts: expected one count per class, got shape {tuple(counts.shape)}")
    empty = torch.nonzero(counts <= 0).flatten().tolist()
    if empty:
        listed = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        also = f" ({len(empty)} classes are empty: {listed})" if len(empty) > 1 else ""
        raise ValueError(f"class {empty[0]} has {int(counts[empty[0]])} training images{also}; {what} needs at "
                         f"least one image of every class (log n_c, n_c^-q)")
    return counts


def class_balanced_weights(class_counts, exponent: float) -> torch.Tensor:
    """w_c = n_c^-e / sum_j n_j^-e * C (mean weight 1), float32: GLMC's re-sampling (q) and label (gamma) weights.

    Not Cui et al.'s effective-number weights (`effective_number_weights`)."""
    raw = positive_counts(class_counts, "a class weight n_c^-q").pow(-exponent)
    return (raw / raw.sum() * len(raw)).float()


def resampling_probabilities(class_counts, exponent: float) -> torch.Tensor:
    """Per-class probability of a draw when each sample of class c has weight n_c^-q (WeightedRandomSampler)."""
    counts = positive_counts(class_counts, "the re-balanced stream")
    mass = counts * counts.pow(-exponent)
    return (mass / mass.sum()).float()


def effective_numbers(class_counts, beta: float) -> torch.Tensor:
    """E_c = (1 - beta^n_c) / (1 - beta) (Cui et al. 2019), float64; beta = 0 gives 1 for every class, and
    E_c -> n_c as beta -> 1. Computed as -expm1(n log beta) / -expm1(log beta), exact for beta near 1."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta: {beta} is out of range; expected [0, 1)")
    counts = positive_counts(class_counts, "the effective number of samples")
    if beta == 0.0:
        return torch.ones_like(counts)
    log_beta = torch.log(torch.tensor(beta, dtype=torch.float64))
    return torch.expm1(counts * log_beta) / torch.expm1(log_beta)


def effective_number_weights(class_counts, beta: float) -> torch.Tensor:
    """Class-balanced weights w_c = (1 - beta) / (1 - beta^n_c) normalised to sum C, float32 (Cui et al.; LDAM's
    DRW): all ones at beta = 0, proportional to 1/n_c as beta -> 1."""
    inverse = 1.0 / effective_numbers(class_counts, beta)
    return (inverse / inverse.sum() * len(inverse)).float()


def log_prior(class_counts) -> torch.Tensor:
    """log pi_c = log(n_c / sum n), float64: the offset of Balanced Softmax, logit adjustment (loss and
    post-hoc). Balanced Softmax's official log n_c differs by a constant, which softmax ignores."""
    counts = positive_counts(class_counts, "the log-prior log n_c (Balanced Softmax, logit adjustment)")
    return torch.log(counts) - torch.log(counts.sum())


def ldam_margins(class_counts, max_margin: float) -> torch.Tensor:
    """m_c = max_margin * n_c^-1/4 / max_j n_j^-1/4, float64: the rarest class gets max_margin (Cao et al.)."""
    raw = positive_counts(class_counts, "LDAM's margins n_c^-1/4").pow(-0.25)
    return max_margin * raw / raw.max()


def log_odds(class_counts) -> torch.Tensor:
    """log(n_c / (N - n_c)), float32: the APA paper's IIF ("rel") adds its negative to the logits at evaluation."""
    counts = positive_counts(class_counts, "the IIF offset log(n_c / (N - n_c))")
    if len(counts) < 2:
        raise ValueError("the IIF offset needs at least 2 classes (N - n_c > 0)")
    return (counts.log() - (counts.sum() - counts).log()).float()
