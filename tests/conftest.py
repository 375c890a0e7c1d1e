"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CIFAR_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.fixture
def cifar_root() -> Path:
    """The real CIFAR-10 copy beside the repository (read-only); skip where it is absent,
    except in CI (the CI variable set), where a missing copy is a failure, not a skip."""
    if not (CIFAR_ROOT / "cifar-10-batches-py").is_dir():
        reason = f"real CIFAR-10 not found at {CIFAR_ROOT} (the shared data folder is absent)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the real-data tests")
        pytest.skip(reason)
    return CIFAR_ROOT


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads cost more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
