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


def check_precision(device: torch.device, bf16: bool, fp16: bool) -> None:
    """Refuse a precision the device cannot train in, before anything is written."""
    if bf16 and fp16:
        raise UserError("--bf16 and --fp16 exclude each other; choose one")
    if fp16 and device.type == "cpu":
        # fp16 + GradScaler exists for GPUs without bf16; on the CPU bf16 has the same speed-up
        # without the overflow risk, so fp16 there would only be a worse bf16.
        raise UserError("--fp16 is for GPUs without bfloat16; on the CPU use --bf16")
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16; use --fp16")


def autocast(device: torch.device, bf16: bool = False, fp16: bool = False) -> torch.autocast:
    """Mixed-precision autocast on any device type; disabled when neither flag is set."""
    dtype = torch.float16 if fp16 else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=bf16 or fp16)
