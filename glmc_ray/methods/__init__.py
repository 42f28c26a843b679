"""Method registry: `build_method(cfg.method, class_counts, cfg)` builds the method `cfg.method.name` names from its
own config section (`cfg.method.<name>`; CE and Balanced Softmax have none)."""
from __future__ import annotations

import torch

from glmc_ray.methods.balanced_softmax import BalancedSoftmax
from glmc_ray.methods.base import Batch, Method, StepOutput
from glmc_ray.methods.ce import CrossEntropy
from glmc_ray.methods.class_balanced import ClassBalanced
from glmc_ray.methods.deit_lt import DeiTLT
from glmc_ray.methods.experts import ExpertMethod
from glmc_ray.methods.glmc import GLMC
from glmc_ray.methods.ldam_drw import LDAMDRW
from glmc_ray.methods.logit_adjusted import LogitAdjusted
from glmc_ray.methods.mdcs import MDCS
from glmc_ray.methods.ride import RIDE
from glmc_ray.methods.shike import SHIKE

METHODS = {method.name: method for method in (GLMC, CrossEntropy, BalancedSoftmax, LogitAdjusted, LDAMDRW,
                                               ClassBalanced, RIDE, MDCS, SHIKE, DeiTLT)}


def build_method(cfg, class_counts, run=None) -> Method:
    """cfg: MethodConfig; run: the whole Config, which the multi-expert methods also read (epochs, the experts'
    scale), and whose train.label_smoothing every method applies to its class targets (none without `run`).
    A class without training images is a ValueError naming it (from glmc_ray.core.longtail)."""
    method_class, counts = METHODS[cfg.name], torch.as_tensor(class_counts)
    if issubclass(method_class, ExpertMethod):
        method = method_class(cfg.section, counts, run)
    else:
        method = method_class(cfg.section, counts)
    if run is not None:
        method.label_smoothing = run.train.label_smoothing
    return method


__all__ = ["Batch", "Method", "StepOutput", "METHODS", "build_method"]
