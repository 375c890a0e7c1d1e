"""Which device to train on; the same code runs on CPU and GPU."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from selfie.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return device


M = TypeVar("M", bound=nn.Module)


def place(model: M, device: torch.device) -> M:
    """Move to `device` in channels_last, the fast layout for convolutions on CPU and GPU."""
    # torch's type stubs omit Module.to's memory_format keyword.
    return model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
