"""Losses and metrics as pure functions on raw logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selfie_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each query over the M masked patches of its image, averaged over
    locations and images. logits (B, M, M), targets (B, M)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max is the target. logits (..., K), targets (...)."""
    return (logits.argmax(dim=-1) == targets).float().mean()
