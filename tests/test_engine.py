"""The training loop, deterministic data order, and the run folder."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfie.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from selfie.data.sampler import EpochSampler, step_generator
from selfie.engine import StepResult, TrainLoop
from selfie.errors import UserError
from selfie.optim import lr_at, make_sgd
from selfie.runfolder import RunFolder
from tests.helpers import open_test_run

SEED, ITEMS, BATCH = 0, 40, 8


def _data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(ITEMS, 5, generator=g)
    return x, x @ torch.randn(5, 1, generator=g)


def _loop(path, steps, *, resume=False, step_hook=None, bad_step=None):
    """A TrainLoop on a linear regression whose randomness is all seeded: the data order and a
    per-step input jitter are pure in (seed, step); dropout draws from the global RNG, which a
    checkpoint must carry."""
    torch.manual_seed(SEED)
    model = nn.Linear(5, 1)
    optimizer = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = _data()
    sampler = EpochSampler(ITEMS, BATCH, seed=SEED)

    def step_fn(step):
        if step_hook is not None:
            step_hook(step, optimizer)
        idx = sampler.batch(step)
        jitter = 0.01 * torch.randn(BATCH, 5, generator=step_generator(SEED, step, "cpu"))
        pred = model(F.dropout(x[idx] + jitter, 0.2))
        loss = F.mse_loss(pred, y[idx])
        if step == bad_step:
            loss = loss * float("nan")
        return StepResult(loss, {"abs_err": (pred - y[idx]).abs().mean().detach()})

    run = open_test_run(path, resume)
    loop = TrainLoop(
        model=model,
        optimizer=optimizer,
        step_fn=step_fn,
        lr_fn=lambda s: lr_at(s, 0.1, 3, 10),
        steps=steps,
        batch_size=BATCH,
        run=run,
        log_every=2,
        checkpoint_every=3,
        kind="pretrain",
        config={"name": "test"},
        device=torch.device("cpu"),
        progress=False,
    )
    return loop, model, run


def _records(run):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in run.metrics()]


def test_resume_matches_uninterrupted_run(tmp_path):
    """10 steps in one go equal 6 steps + resume to 10: same weights bit for bit, same metrics."""
    loop, whole, whole_run = _loop(tmp_path / "whole", 10)
    loop.run_steps()
    _loop(tmp_path / "split", 6)[0].run_steps()
    loop, resumed, resumed_run = _loop(tmp_path / "split", 10, resume=True)
    start = loop.restore()
    assert start == 6
    loop.run_steps(start)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["step"] for r in _records(whole_run)] == [2, 4, 6, 8, 10]
    assert _records(resumed_run) == _records(whole_run)


class Crash(Exception):
    """Stands in for a run killed between two steps."""


def test_resume_mid_log_window_matches(tmp_path):
    """A crash after the step-3 checkpoint (between log lines every 2) resumes to equal logs."""

    def crash_at_4(step, optimizer):
        if step == 4:
            raise Crash

    loop, whole, whole_run = _loop(tmp_path / "whole", 10)
    loop.run_steps()
    with pytest.raises(Crash):
        _loop(tmp_path / "split", 10, step_hook=crash_at_4)[0].run_steps()
    loop, resumed, resumed_run = _loop(tmp_path / "split", 10, resume=True)
    start = loop.restore()
    assert start == 3
    loop.run_steps(start)
    assert torch.equal(whole.weight, resumed.weight)
    assert _records(resumed_run) == _records(whole_run)


def test_resume_needs_the_restored_rng(tmp_path):
    """Control for the resume test: with weights restored but the global RNG not, it diverges."""
    loop, whole, _ = _loop(tmp_path / "whole", 10)
    loop.run_steps()
    _loop(tmp_path / "split", 6)[0].run_steps()
    loop, resumed, _ = _loop(tmp_path / "split", 10, resume=True)
    start = loop.restore()
    torch.manual_seed(SEED + 1)  # as if the checkpoint had not carried the RNG state
    loop.run_steps(start)
    assert not torch.equal(whole.weight, resumed.weight)


def test_optimizer_lr_follows_lr_fn(tmp_path):
    """At every step the optimizer runs at lr_fn(step), and the log records that LR."""
    seen = {}

    def hook(step, optimizer):
        seen[step] = [g["lr"] for g in optimizer.param_groups]

    loop, _, run = _loop(tmp_path / "run", 10, step_hook=hook)
    loop.run_steps()
    assert seen == {s: [lr_at(s, 0.1, 3, 10)] for s in range(10)}
    for r in run.metrics():
        assert r["lr"] == lr_at(r["step"] - 1, 0.1, 3, 10)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    """A NaN loss raises a UserError naming its step; the checkpoint before it still loads."""
    loop, model, run = _loop(tmp_path / "run", 10, bad_step=4)
    with pytest.raises(UserError, match="at step 4"):
        loop.run_steps()
    assert list_checkpoints(run.checkpoints) == [checkpoint_path(run.checkpoints, 3)]
    state = load_checkpoint(checkpoint_path(run.checkpoints, 3))
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_records_kind_and_config(tmp_path):
    """A loop checkpoint carries its kind, step and config, and loads with weights_only."""
    loop, _, run = _loop(tmp_path / "run", 3)
    loop.run_steps()
    state = load_checkpoint(checkpoint_path(run.checkpoints, 3))
    assert (state["kind"], state["step"], state["config"]) == ("pretrain", 3, {"name": "test"})


def test_epoch_sampler_epochs_are_permutations():
    """Each epoch's batches cover distinct items with no repeats; epochs are reshuffled."""
    sampler = EpochSampler(20, 6, seed=1)  # 3 batches per epoch, 2 items dropped
    epochs = []
    for e in range(3):
        items = torch.cat([sampler.batch(e * 3 + i) for i in range(3)]).tolist()
        assert len(items) == 18 and len(set(items)) == 18
        assert set(items) <= set(range(20))
        epochs.append(items)
    assert len({tuple(e) for e in epochs}) == 3  # every epoch its own order


def test_epoch_sampler_is_pure_in_seed_and_step():
    """batch(step) is the same from a fresh sampler, whatever was asked before; seeds differ."""
    forward = EpochSampler(20, 6, seed=1)
    in_order = [forward.batch(s).tolist() for s in range(9)]
    backward = EpochSampler(20, 6, seed=1)
    assert [backward.batch(s).tolist() for s in reversed(range(9))] == in_order[::-1]
    assert EpochSampler(20, 6, seed=1).batch(7).tolist() == in_order[7]
    assert EpochSampler(20, 6, seed=2).batch(0).tolist() != in_order[0]


def test_step_generator_is_pure_in_seed_and_step():
    """The per-step generator draws the same numbers for the same (seed, step), others not."""
    a = torch.rand(4, generator=step_generator(0, 5, "cpu"))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 5, "cpu")))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(0, 6, "cpu")))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(1, 5, "cpu")))


def test_run_folder_refuses_an_existing_run(tmp_path):
    """A folder holding a run is not reused without resume or force."""
    RunFolder(tmp_path).write_config({"name": "x"}, {})
    with pytest.raises(UserError, match="already holds a run"):
        RunFolder(tmp_path)
    assert RunFolder(tmp_path, resume=True).read_config()["config"] == {"name": "x"}


def test_run_folder_force_clears_the_old_run(tmp_path):
    """force starts over: old metrics and checkpoints are removed."""
    run = RunFolder(tmp_path)
    run.write_config({"name": "x"}, {})
    run.log({"step": 1, "loss": 1.0})
    run.checkpoints.mkdir()
    checkpoint_path(run.checkpoints, 1).write_bytes(b"")
    forced = RunFolder(tmp_path, force=True)
    assert forced.metrics() == [] and list_checkpoints(forced.checkpoints) == []


def test_resume_without_a_run_is_a_user_error(tmp_path):
    """resume on a folder with no run says so."""
    with pytest.raises(UserError, match="holds no run"):
        RunFolder(tmp_path / "empty", resume=True)


def test_metrics_are_json_lines(tmp_path):
    """Every logged record is one JSON object per line with step, loss, lr and images/s."""
    loop, _, run = _loop(tmp_path / "run", 4)
    loop.run_steps()
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4]
    assert all({"loss", "abs_err", "lr", "images_per_s"} <= r.keys() for r in records)


def test_callbacks_run_at_the_first_log_step_after_each_multiple(tmp_path):
    """every=3 with log_every=2 over 10 steps: at steps 4 (covers 3), 6, 10 (covers 9 and is
    the last); the figures join those records and no others; the weights are those of the
    run without the callback."""
    from selfie.engine import Callback

    calls: list[int] = []

    def monitor(step):
        calls.append(step)
        return {"probe": float(step)}

    plain, plain_model, _ = _loop(tmp_path / "plain", 10)
    plain.run_steps()
    loop, model, run = _loop(tmp_path / "cb", 10)
    loop.callbacks = (Callback(3, monitor),)
    loop.run_steps()
    assert calls == [4, 6, 10]
    assert [(r["step"], r.get("probe")) for r in run.metrics()] == [
        (2, None),
        (4, 4.0),
        (6, 6.0),
        (8, None),
        (10, 10.0),
    ]
    for a, b in zip(plain_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
