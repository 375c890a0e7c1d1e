"""Shared test fixtures."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TinyRuns:
    """One tiny pretraining run and a finetuning run from it, shared by the tests of
    selfie.use (made once per session: about 30 s on 2 busy cores)."""

    pretrain: Path
    finetune: Path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    from selfie import cli

    root = tmp_path_factory.mktemp("tiny-runs")
    pre, ft = root / "pre", root / "ft"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Monitor at steps 2, 4, 6, so that its records are there to check.
        args = ["-q", "pretrain", "--preset", "tiny", "--device", "cpu", "--out", str(pre)]
        assert cli.main([*args, "--set", "pretrain.eval_every=2"]) == 0
        # Long enough to learn (test accuracy 0.69 against chance 0.10): 60 steps.
        finetune = ["-q", "finetune", "--preset", "tiny", "--device", "cpu", "--out", str(ft)]
        finetune += ["--labels", "20", "--steps", "60", "--init", str(pre)]
        finetune += ["--set", "finetune.lr=0.1", "--set", "finetune.checkpoint_every=60"]
        assert cli.main([*finetune, "--set", "finetune.log_every=20"]) == 0
    finally:
        torch.set_num_threads(before)
    return TinyRuns(pre, ft)
