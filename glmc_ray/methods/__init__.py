"""Method registry: `build_method(cfg.method, class_counts)`."""
from __future__ import annotations

import torch

from glmc_ray.methods.base import Batch, Method, StepOutput
from glmc_ray.methods.ce import CrossEntropy
from glmc_ray.methods.glmc import GLMC

METHODS = {"glmc": GLMC, "ce": CrossEntropy}


def build_method(cfg, class_counts) -> Method:
    return METHODS[cfg.name](cfg, torch.as_tensor(class_counts))


__all__ = ["Batch", "Method", "StepOutput", "METHODS", "build_method"]
