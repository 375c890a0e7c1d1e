"""SGD with Nesterov momentum and the per-step learning-rate schedule (SPEC 4)."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    `step` counts from 0; step 0 already trains, at peak / warmup_steps.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """L2 weight decay on every parameter: the paper names no exceptions (SPEC 4)."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True
    )
