"""Mixed precision: bf16 tracks fp32 on the tiny preset, fp16 is refused on the CPU, and the
fp16 GradScaler's state rides in checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfie import device
from selfie.config import apply_overrides, get_preset
from selfie.data import load_dataset
from selfie.data.augment import channel_stats
from selfie.device import autocast, place
from selfie.distributed import DistInfo
from selfie.engine import StepResult, TrainLoop
from selfie.models.selfie import Selfie
from selfie.optim import lr_at, make_sgd
from selfie.pretrain import make_step_fn, pretrain
from selfie.runfolder import RunFolder, RunOptions
from tests.helpers import assert_pretrain_refused, memory_batches, open_test_run

CPU = torch.device("cpu")
STEPS = 5


def test_bf16_loss_and_gradients_match_fp32_on_the_same_weights():
    """Along 5 fp32 training steps of the tiny preset (its own LR), the bf16 forward pass on
    the same weights, images, crops and masks gives the fp32 loss within 1.5% (measured: at
    most 0.4%) and a gradient pointing the same way (cosine > 0.99)."""
    config = apply_overrides(get_preset("tiny"), ["model.attn_dropout=0.0"])
    p = config.pretrain
    train = load_dataset("digits", "train", None, 32)
    mean, std = channel_stats(train.images)
    torch.manual_seed(0)
    model = place(Selfie(config), CPU)
    optimizer = make_sgd(model, p.lr, p.momentum, p.weight_decay)
    info = DistInfo(0, 0, 1, CPU)
    batches = memory_batches(train.images, config, info)
    step_fn = make_step_fn(model, config, batches, mean, std, info)

    def loss_and_grad(step: int, bf16: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with autocast(CPU, bf16=bf16):
            loss = step_fn(step).loss
        loss.backward()
        return float(loss.detach()), torch.cat([q.grad.flatten() for q in model.parameters()])

    for step in range(STEPS):
        low, low_grad = loss_and_grad(step, bf16=True)
        full, full_grad = loss_and_grad(step, bf16=False)  # the fp32 run continues from these
        assert low == pytest.approx(full, rel=0.015), step
        assert F.cosine_similarity(low_grad, full_grad, dim=0) > 0.99, step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, p.lr, p.warmup_steps, p.steps)
        optimizer.step()


def test_bf16_training_tracks_fp32(tmp_path: Path):
    """Two 5-step pretraining runs of the tiny preset, fp32 and --bf16, on the same images,
    crops, masks and dropout: the loss of each step within 3% (measured: at most 0.6%).

    With the paper's 100-step warm-up and peak LR 0.02: the first steps of the tiny net are
    chaotic at its own 2-step warm-up to 0.05 (even fp32's reduction-order noise of 1e-6
    grows to 1e-2 within 5 steps there), which would measure the chaos, not bf16."""
    config = apply_overrides(
        get_preset("tiny"),
        [
            f"pretrain.steps={STEPS}",
            "pretrain.log_every=1",
            f"pretrain.checkpoint_every={STEPS}",
            "pretrain.warmup_steps=100",
            "pretrain.lr=0.02",
        ],
    )
    losses = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16-{bf16}"
        pretrain(config, RunOptions(out=out, device="cpu", bf16=bf16, progress=False))
        losses[bf16] = [r["loss"] for r in RunFolder(out, resume=True).metrics()]
        assert json.loads((out / "summary.json").read_text())["bf16"] is bf16
    assert len(losses[True]) == STEPS
    assert losses[True] == pytest.approx(losses[False], rel=0.03)
    assert losses[True] != losses[False]  # bf16 did run in bf16


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--fp16"], "--fp16 is for GPUs without bfloat16; on the CPU use --bf16"),
        (["--fp16", "--bf16"], "exclude each other"),
    ],
)
def test_fp16_is_refused_on_the_cpu(tmp_path: Path, capsys, flags, needle):
    """fp16 autocast exists for GPUs without bf16: on the CPU it is a one-line error, and
    nothing is written."""
    assert_pretrain_refused(tmp_path, capsys, flags, needle)


def _fp16_loop(path: Path, steps: int, resume: bool = False) -> TrainLoop:
    """The engine's fp16 path (autocast + GradScaler) on a linear model. The CLI refuses fp16
    on the CPU, but torch runs it there, which is enough to test the scaler's bookkeeping."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    run = open_test_run(path, resume)
    return TrainLoop(
        model=model,
        optimizer=make_sgd(model, 0.01, 0.9, 0.0),
        step_fn=lambda step: StepResult(F.mse_loss(model(x).float(), y)),
        lr_fn=lambda s: 0.01,
        steps=steps,
        batch_size=8,
        run=run,
        log_every=1,
        checkpoint_every=steps,
        kind="pretrain",
        config={},
        device=CPU,
        fp16=True,
        progress=False,
    )


def test_grad_scaler_state_is_checkpointed_and_restored(tmp_path: Path):
    """An fp16 run's checkpoint carries the GradScaler (scale and growth tracker), and a
    resume continues with it rather than with a fresh scale. Here the first steps overflow
    at the initial scale 2^16, are skipped, and halve it."""
    loop = _fp16_loop(tmp_path, 3)
    loop.run_steps()
    assert loop.scaler is not None
    saved = torch.load(tmp_path / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert saved["grad_scaler"] == loop.scaler.state_dict()
    assert saved["grad_scaler"]["scale"] < 2.0**16
    resumed = _fp16_loop(tmp_path, 3, resume=True)
    assert resumed.restore() == 3
    assert resumed.scaler is not None
    assert resumed.scaler.state_dict() == loop.scaler.state_dict()


@pytest.fixture
def fresh_bf16_check():
    """cpu_bf16_emulated and its warning are cached per process: clear them around a test."""
    cached = (device.cpu_bf16_emulated, device._warn_once)  # before a test patches them
    for f in cached:
        f.cache_clear()
    yield
    for f in cached:
        f.cache_clear()


@pytest.mark.parametrize(
    ("flags", "capability", "env", "needle"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", {}, None),  # Zen 4
        ({"avx2", "amx_bf16"}, "AVX512", {"ONEDNN_MAX_CPU_ISA": "ALL"}, None),  # Sapphire Rapids
        ({"avx2", "fma"}, "AVX2", {}, "no avx512_bf16 or amx_bf16"),  # Zen 3
        ({"avx2", "avx512_bf16"}, "AVX2", {}, "AVX2 kernels"),  # ATEN_CPU_CAPABILITY=avx2
        ({"avx512_bf16"}, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2"),
    ],
)
def test_emulated_bf16_is_detected(monkeypatch, fresh_bf16_check, flags, capability, env, needle):
    """Native bf16 needs the instructions and neither PyTorch's nor oneDNN's kernels capped
    below them (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 turn a Zen 4 into a Zen 3)."""
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(device, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(device.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reason = device.cpu_bf16_emulated()
    assert reason is None if needle is None else needle in reason


def test_emulated_bf16_warns_once_and_still_runs(
    tmp_path: Path, monkeypatch, caplog, fresh_bf16_check
):
    """--bf16 where bf16 is emulated: one warning naming the cause and the slow-down, for any
    number of runs in the process; the runs go on in bf16."""
    monkeypatch.setattr(device, "cpu_bf16_emulated", lambda: "this CPU has no avx512_bf16")
    config = apply_overrides(get_preset("tiny"), ["pretrain.steps=2"])
    with caplog.at_level(logging.WARNING, logger="selfie.device"):
        for name in ("a", "b"):
            opts = RunOptions(out=tmp_path / name, device="cpu", bf16=True, progress=False)
            assert pretrain(config, opts)["bf16"] is True
    warnings = [r.getMessage() for r in caplog.records if r.name == "selfie.device"]
    assert len(warnings) == 1, warnings
    assert "emulated" in warnings[0] and "no avx512_bf16" in warnings[0]
    assert device.EMULATED_BF16_SLOWDOWN in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfie.device"):
        device.warn_if_slow_bf16(CPU, bf16=False)  # fp32: nothing to say
    assert not caplog.records
