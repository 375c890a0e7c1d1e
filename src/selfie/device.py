"""Which device to train on; the same code runs on CPU and GPU."""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from selfie.errors import UserError

log = logging.getLogger(__name__)

# How much slower bf16 autocast is than fp32 on a CPU without bf16 instructions: measured
# with `python benchmarks/throughput.py --preset cifar10-cpu --reps 4 [--bf16]` on 2 AMD EPYC
# Zen 4 cores running the Zen 3 kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2):
# pretraining 310 img/s in fp32, 28.7 in bf16 (10.8x); supervised 318 and 26.3 (12.1x).
EMULATED_BF16_SLOWDOWN = "about 11x"

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include its native bf16 kernels, as
# prefixes: AVX512_CORE_AMX covers AVX512_CORE_AMX_FP16, AVX10 every AVX10_x level.
_ONEDNN_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")


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


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return set(value.split())
    return set()


@functools.cache
def cpu_bf16_emulated() -> str | None:
    """Why bf16 autocast on this CPU runs without bf16 instructions (then it is much slower
    than fp32), or None where it has them.

    Native needs the instructions (x86: avx512_bf16 or amx_bf16; arm64: bf16) and that
    neither PyTorch's kernels (ATEN_CPU_CAPABILITY) nor oneDNN's (ONEDNN_MAX_CPU_ISA) are
    capped below them."""
    flags = _cpu_flags()
    if platform.machine().lower() in ("arm64", "aarch64"):
        return None if "bf16" in flags else "this CPU has no bf16 instructions"
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return "this CPU has no avx512_bf16 or amx_bf16 instructions"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AMX"):
        return f"PyTorch runs its {capability} kernels here (ATEN_CPU_CAPABILITY)"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(name, "ALL").upper()
        if not isa.startswith(_ONEDNN_BF16_ISAS):
            return f"{name}={isa} keeps oneDNN below its bf16 kernels"
    return None


def warn_if_slow_bf16(device: torch.device, bf16: bool) -> None:
    """Where --bf16 on the CPU is emulated, say so (once per process); it still runs."""
    reason = cpu_bf16_emulated() if bf16 and device.type == "cpu" else None
    if reason is not None:
        _warn_once(reason)


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning(
        "--bf16: bf16 is emulated on this CPU (%s), %s slower than fp32; drop --bf16 here",
        reason,
        EMULATED_BF16_SLOWDOWN,
    )


def check_precision(device: torch.device, bf16: bool, fp16: bool) -> None:
    """Refuse a precision the device cannot train in, before anything is written; warn
    once where bf16 would be emulated."""
    if bf16 and fp16:
        raise UserError("--bf16 and --fp16 exclude each other; choose one")
    if fp16 and device.type == "cpu":
        # fp16 + GradScaler exists for GPUs without bf16; on the CPU bf16 has the same speed-up
        # without the overflow risk, so fp16 there would only be a worse bf16.
        raise UserError("--fp16 is for GPUs without bfloat16; on the CPU use --bf16")
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{torch.cuda.get_device_name(device)} has no bfloat16; use --fp16")
    warn_if_slow_bf16(device, bf16)


def autocast(device: torch.device, bf16: bool = False, fp16: bool = False) -> torch.autocast:
    """Mixed-precision autocast on any device type; disabled when neither flag is set."""
    dtype = torch.float16 if fp16 else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=bf16 or fp16)
