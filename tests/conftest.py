"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CIFAR_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.fixture
def cifar_root() -> Path:
    """The real CIFAR-10 copy beside the repository (read-only); skip where it is absent."""
    if not (CIFAR_ROOT / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR_ROOT} (the shared data folder is absent)")
    return CIFAR_ROOT


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads cost more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
