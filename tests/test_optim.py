"""The optimizer and the learning-rate schedule (SPEC 4)."""

import itertools

import pytest
import torch
from torch import nn

from selfie.optim import lr_at, make_sgd

PEAK, WARMUP, TOTAL = 0.2, 100, 1000


def test_warmup_is_linear_and_reaches_the_peak():
    """Warm-up climbs by peak / warmup each step and is at the peak on step warmup - 1."""
    lrs = [lr_at(s, PEAK, WARMUP, TOTAL) for s in range(WARMUP)]
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(PEAK * (s + 1) / WARMUP)
    assert lrs[-1] == pytest.approx(PEAK)
    assert lrs[0] > 0  # step 0 already trains


def test_cosine_decay_is_monotone_and_ends_near_zero():
    """After warm-up the LR starts at the peak, never rises, and is about 0 at the last step."""
    lrs = [lr_at(s, PEAK, WARMUP, TOTAL) for s in range(WARMUP, TOTAL)]
    assert lrs[0] == pytest.approx(PEAK)
    assert all(b < a for a, b in itertools.pairwise(lrs))
    assert 0 <= lrs[-1] < 1e-3 * PEAK


def test_cosine_midpoint_is_half_the_peak():
    """Half-way through the decay the LR is exactly peak / 2."""
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert lr_at(mid, PEAK, WARMUP, TOTAL) == pytest.approx(PEAK / 2)


def test_make_sgd_is_nesterov_with_weight_decay():
    """SGD with Nesterov momentum 0.9 and the given weight decay on every parameter."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = make_sgd(model, lr=0.05, momentum=0.9, weight_decay=3e-4)
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups
    assert group["nesterov"] is True
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 3e-4
    assert group["lr"] == 0.05
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_a_real_run_uses_the_recipe(tmp_path, kind):
    """The optimizer as a run wires it: the checkpoint's SGD is Nesterov with the preset's
    momentum and weight decay, and every logged LR is the schedule's at that step."""
    from selfie import cli
    from selfie.checkpoint import list_checkpoints, load_checkpoint
    from selfie.config import get_preset
    from selfie.runfolder import RunFolder

    out = tmp_path / kind
    args = ["-q", kind, "--preset", "tiny", "--device", "cpu", "--out", str(out)]
    section = f"{kind}.log_every=1"
    extra = ["--labels", "5", "--scratch"] if kind == "finetune" else []
    assert cli.main([*args, *extra, "--set", section]) == 0
    recipe = getattr(get_preset("tiny"), kind)
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert state["step"] == recipe.steps
    for group in state["optimizer"]["param_groups"]:
        assert group["nesterov"] is True
        assert group["momentum"] == recipe.momentum == 0.9
        assert group["weight_decay"] == recipe.weight_decay == 1e-4
    records = RunFolder(out, resume=True).metrics()
    assert [r["step"] for r in records] == list(range(1, recipe.steps + 1))
    for r in records:  # record `step` is logged after 0-based step `step - 1` trained
        expected = lr_at(r["step"] - 1, recipe.lr, recipe.warmup_steps, recipe.steps)
        assert r["lr"] == pytest.approx(expected, rel=1e-12)
    assert records[0]["lr"] == pytest.approx(recipe.lr / recipe.warmup_steps)
