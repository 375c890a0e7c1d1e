"""torchrun / DDP: the split of the global batch, a 2-process gloo step equal to the single
process on the whole batch, gradient accumulation, and `torchrun -m selfie pretrain` end to
end with resume (slow: each torchrun starts three Python processes)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from selfie import cli, distributed
from selfie.checkpoint import checkpoint_step, list_checkpoints, load_checkpoint
from selfie.config import Config, apply_overrides, get_preset
from selfie.data.augment import channel_stats
from selfie.data.sampler import EpochSampler, step_generator
from selfie.device import place
from selfie.distributed import DistInfo
from selfie.engine import StepResult, TrainLoop
from selfie.errors import UserError
from selfie.models.selfie import Selfie
from selfie.optim import make_sgd
from selfie.pretrain import make_batch, make_step_fn
from selfie.runfolder import RunFolder, RunOptions, resume_command
from tests.helpers import assert_pretrain_refused, memory_batches

CPU = torch.device("cpu")
WORLD, STEP = 2, 3  # two ranks; an arbitrary step of the run
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _config() -> Config:
    # Dropout off: each rank draws its own dropout, so with it no two runs could compare.
    return apply_overrides(get_preset("tiny"), ["model.attn_dropout=0.0"])


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)


def _model(config: Config) -> Selfie:
    torch.manual_seed(0)
    return place(Selfie(config), CPU)


def _loss_and_grads(
    model: nn.Module, config: Config, parts: list[tuple[DistInfo, int, int]]
) -> tuple[float, list[torch.Tensor]]:
    """Single process: the mean loss over `parts` (info, micro, accum), each a separate
    forward pass (so BatchNorm normalises each part over its own rows, as a rank does), and
    the gradient of that mean."""
    images = _images()
    mean, std = channel_stats(images)
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for info, micro, accum in parts:
        batches = memory_batches(images, config, info, accum)
        loss = make_step_fn(model, config, batches, mean, std, info, accum)(STEP, micro).loss
        total = total + loss / len(parts)
    total.backward()
    return float(total.detach()), [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------------------
# The split of the global batch (fast, one process)


def test_no_torchrun_variables_means_one_process(monkeypatch):
    """Without torchrun's variables: rank 0 of 1, no process group, no-op collectives."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_from_env("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.device) == (0, 0, 1, CPU)
    assert not distributed.is_initialized() and distributed.is_main()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(t) is t
    assert distributed.on_main(lambda: 5) == 5 and distributed.broadcast_object("x") == "x"
    assert info.rows(16) == slice(0, 16)


def test_ranks_and_micro_batches_cover_the_global_batch_in_order():
    """Rank r, micro-batch m: contiguous rows whose concatenation is exactly the batch."""
    rows = [DistInfo(r, r, 4, CPU).rows(48, micro, accum=3) for r in range(4) for micro in range(3)]
    assert torch.cat([torch.arange(48)[s] for s in rows]).tolist() == list(range(48))
    assert {s.stop - s.start for s in rows} == {4}


@pytest.mark.parametrize(
    ("batch", "world", "accum", "needle"),
    [(10, 4, 1, "does not split evenly over 4 processes"), (16, 2, 3, "--accum 3 does not")],
)
def test_uneven_split_is_a_user_error(batch, world, accum, needle):
    with pytest.raises(UserError, match=needle):
        distributed.split_batch(batch, world, accum)


def test_a_share_sees_exactly_the_single_process_rows():
    """Augmentation and masks are drawn for the whole global batch, then cut: any share of
    rows equals those rows of the single-process batch (crops, flips and masks included)."""
    config = replace(get_preset("tiny"), data=replace(get_preset("tiny").data, flip=True))
    images = _images()[:16]
    mean, std = channel_stats(images)
    batches = memory_batches(images, config, DistInfo(0, 0, 1, CPU))

    def batch(rows: slice) -> tuple[torch.Tensor, ...]:
        g = step_generator(0, STEP, CPU)
        x, _ = batches.get(STEP, rows, g)
        return make_batch(x, 16, config, mean, std, g, rows)

    whole = batch(slice(0, 16))
    for rows in (slice(0, 8), slice(8, 16), slice(4, 8)):
        for a, b in zip(whole, batch(rows), strict=True):
            assert torch.equal(a[rows], b)


def _linear_loop(path: Path, accum: int) -> nn.Linear:
    """A BatchNorm-free model, where accumulation is exactly the big batch's gradient."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 1, generator=g)
    sampler, info = EpochSampler(32, 8, seed=0), DistInfo(0, 0, 1, CPU)

    def step_fn(step: int, micro: int = 0) -> StepResult:
        idx = sampler.batch(step)[info.rows(8, micro, accum)]
        return StepResult(F.mse_loss(model(x[idx]), y[idx]))

    run = RunFolder(path)
    run.write_config({}, {})
    TrainLoop(
        model=model,
        optimizer=make_sgd(model, 0.1, 0.9, 1e-4),
        step_fn=step_fn,
        lr_fn=lambda s: 0.1,
        steps=6,
        batch_size=8,
        run=run,
        log_every=2,
        checkpoint_every=6,
        kind="pretrain",
        config={},
        device=CPU,
        accum=accum,
        progress=False,
    ).run_steps()
    return model


def test_accumulation_equals_the_whole_batch(tmp_path: Path):
    """--accum 4 (micro-batches of 2) trains the weights of batch 8 in one pass, up to float
    rounding, and logs the same mean loss."""
    one, four = _linear_loop(tmp_path / "a", 1), _linear_loop(tmp_path / "b", 4)
    torch.testing.assert_close(one.weight, four.weight, rtol=1e-5, atol=1e-6)
    losses = [[r["loss"] for r in RunFolder(tmp_path / p, resume=True).metrics()] for p in "ab"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--accum", "3"], "--accum 3 does not divide"),
        (["--sync-bn"], "SyncBatchNorm runs on GPUs only"),
    ],
)
def test_bad_distributed_flags_are_one_line_errors(tmp_path: Path, capsys, flags, needle):
    assert_pretrain_refused(tmp_path, capsys, flags, needle)


def test_resume_hint_under_torchrun(tmp_path: Path, monkeypatch):
    """Interrupted under torchrun, the run names a torchrun command with its process counts
    and repeats the options a resume does not read back."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    opts = RunOptions(out=tmp_path, accum=2, sync_bn=True, fp16=True)
    assert resume_command("pretrain", opts) == (
        f"torchrun --nnodes=2 ... --nproc_per_node=4 -m selfie pretrain --resume --out {tmp_path} "
        "--fp16 --sync-bn --accum 2"
    )


def test_commands_that_write_shared_files_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["experiment", "--preset", "tiny", "--labels", "5"]) == 2
    assert "does not run under torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Two gloo processes (torch.multiprocessing): one DDP step against the single process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: one step of each case through DDP, saving (on rank 0) the rank-mean
    loss and the all-reduced gradients."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    info = distributed.init_from_env("cpu")
    try:
        config = _config()
        images = _images()
        mean, std = channel_stats(images)
        model = _model(config)
        ddp = distributed.prepare_model(model, info, sync_bn=False, compile=False)
        results = {}
        # Eval first, while the BatchNorm running statistics are the initial ones everywhere.
        for case, train, accum in (("eval", False, 1), ("train", True, 1), ("accum", True, 2)):
            ddp.train(train)
            batches = memory_batches(images, config, info, accum)
            step_fn = make_step_fn(ddp, config, batches, mean, std, info, accum)
            model.zero_grad(set_to_none=True)
            losses = []
            for micro in range(accum):
                with distributed.no_sync(ddp, active=micro < accum - 1):
                    loss = step_fn(STEP, micro).loss
                    (loss / accum).backward()
                losses.append(loss.detach())
            mean_loss = distributed.all_reduce_mean(torch.stack(losses).mean())
            results[case] = (float(mean_loss), [p.grad.clone() for p in model.parameters()])
        if info.is_main:
            torch.save(results, out)
        # Leave together: a rank tearing gloo down while the other still works can abort.
        distributed.barrier()
    finally:
        distributed.destroy()


def test_two_gloo_ranks_equal_one_process(tmp_path: Path):
    """One Selfie step of the tiny preset, DDP over 2 gloo ranks, each holding half of the
    global batch, against the single process on the whole batch:

    - eval mode (BatchNorm on running statistics, no dropout): the single process runs the
      concatenated batch of 16 in one forward pass;
    - train mode: BatchNorm normalises each rank's 8 images over themselves, so the single
      process runs the two halves as two forward passes and averages their losses;
    - train mode with --accum 2: four quarters, the first three inside DDP's no_sync.

    Loss and every gradient agree up to float reduction order: within 1e-4 of the tensor's
    largest entry (measured: at most 6e-6, both with the AVX-512 kernels and with the AVX2
    ones). A tolerance relative to each entry would not hold: an entry that is a sum of many
    terms cancelling to near zero keeps the rounding error of the terms."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ddp = torch.load(out, weights_only=True)
    config = _config()
    halves = [(DistInfo(r, r, WORLD, CPU), 0, 1) for r in range(WORLD)]
    quarters = [(DistInfo(r, r, WORLD, CPU), m, 2) for r in range(WORLD) for m in range(2)]
    model = _model(config).eval()
    expected = {"eval": _loss_and_grads(model, config, [(DistInfo(0, 0, 1, CPU), 0, 1)])}
    model.train()
    expected["train"] = _loss_and_grads(model, config, halves)
    expected["accum"] = _loss_and_grads(model, config, quarters)
    for case, (loss, grads) in expected.items():
        assert ddp[case][0] == pytest.approx(loss, rel=1e-5), case
        for name, a, b in zip(dict(model.named_parameters()), ddp[case][1], grads, strict=True):
            scale = float(b.abs().max())
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale, msg=f"{case}: {name}")
    # The comparison can tell: one train-mode pass over all 16 (BatchNorm over the whole
    # batch, as --sync-bn would give) is another loss.
    whole = _loss_and_grads(model, config, [(DistInfo(0, 0, 1, CPU), 0, 1)])[0]
    assert whole != pytest.approx(expected["train"][0], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# torchrun end to end (slow)


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={WORLD}", "-m", "selfie", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_torchrun_pretrain_writes_one_run_and_resumes_exactly(tmp_path: Path):
    """`torchrun --nproc_per_node=2 -m selfie pretrain --preset tiny` writes one run folder
    (rank 0 only: one config, one metrics line per log step, one summary, checkpoints) and
    prints its summary once; a run that lost its last checkpoint resumes under torchrun to
    the same weights, bit for bit (every rank's dropout state is in the checkpoint)."""
    out = tmp_path / "run"
    done = _torchrun("-q", "pretrain", "--preset", "tiny", "--out", str(out), "--steps", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('"kind": "pretrain"') == 1, done.stdout
    assert json.loads((out / "config.json").read_text())["run"]["world_size"] == WORLD
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == WORLD and summary["steps"] == 4
    found = list_checkpoints(out / "checkpoints")
    assert [checkpoint_step(p) for p in found] == [3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [p.name for p in found]
    final = load_checkpoint(found[-1])
    assert len(final["rng_ranks"]) == WORLD

    shutil.copy(found[-1], tmp_path / "reference.pt")
    found[-1].unlink()  # as if killed after the step-3 checkpoint
    (out / "summary.json").unlink()
    resumed = _torchrun("-q", "pretrain", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    again = load_checkpoint(found[-1])
    reference = load_checkpoint(tmp_path / "reference.pt")
    for key, value in reference["model"].items():
        assert torch.equal(value, again["model"][key]), key
    after = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [2, 4]
    assert after[-1]["loss"] == records[-1]["loss"]
