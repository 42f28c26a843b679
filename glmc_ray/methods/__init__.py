"""Method registry: `build_method(cfg.method, class_counts)` builds the method `cfg.method.name` names from its
own config section (`cfg.method.<name>`; CE and Balanced Softmax have none)."""
from __future__ import annotations

import torch

from glmc_ray.methods.balanced_softmax import BalancedSoftmax
from glmc_ray.methods.base import Batch, Method, StepOutput
from glmc_ray.methods.ce import CrossEntropy
from glmc_ray.methods.class_balanced import ClassBalanced
from glmc_ray.methods.glmc import GLMC
from glmc_ray.methods.ldam_drw import LDAMDRW
from glmc_ray.methods.logit_adjusted import LogitAdjusted

METHODS = {method.name: method for method in (GLMC, CrossEntropy, BalancedSoftmax, LogitAdjusted, LDAMDRW,
                                               ClassBalanced)}


def build_method(cfg, class_counts) -> Method:
    """cfg: MethodConfig. A class without training images is a ValueError naming it (from glmc_ray.longtail)."""
    return METHODS[cfg.name](cfg.section, torch.as_tensor(class_counts))


__all__ = ["Batch", "Method", "StepOutput", "METHODS", "build_method"]
