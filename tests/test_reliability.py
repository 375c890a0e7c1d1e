"""Crashes and interruptions: kept checkpoints, fallback past damaged ones, clean stops on
SIGINT/SIGTERM, failed writes, and bitwise-exact resume after SIGKILL (fault injection on real
`selfie` subprocesses)."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfie import checkpoint as ckpt
from selfie import cli
from selfie.checkpoint import checkpoint_path, checkpoint_step, list_checkpoints, load_checkpoint
from selfie.data.sampler import EpochSampler, step_generator
from selfie.engine import StepResult, TrainLoop
from selfie.errors import Interrupted, UserError
from selfie.optim import lr_at, make_sgd
from selfie.runfolder import RunFolder, RunOptions, resume_command
from tests.helpers import open_test_run

# One thread: on a busy 2-core machine torch's default thread pool makes a tiny step 30x
# slower, and a fixed thread count keeps the float reductions in one order whatever the
# machine, so "bitwise" compares like with like.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 120  # seconds for any one subprocess; a hang fails the test rather than CI
STEPS = 20
PRETRAIN = [
    "pretrain",
    "--preset",
    "tiny",
    "--set",
    f"pretrain.steps={STEPS}",
    "--set",
    "pretrain.checkpoint_every=1",
    "--set",
    "pretrain.log_every=2",
]
FINETUNE = [
    "finetune",
    "--preset",
    "tiny",
    "--scratch",
    "--labels",
    "0.5",
    "--set",
    f"finetune.steps={STEPS}",
    "--set",
    "finetune.checkpoint_every=1",
]
TIMING = {"images_per_s", "mean_images_per_s", "train_seconds_this_session"}
posix = pytest.mark.skipif(os.name != "posix", reason="POSIX signals (SIGKILL, preexec_fn)")


# ---------------------------------------------------------------------------------------------
# Subprocess helpers


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and selfie keeps an ignored signal
    # ignored; the SIGINT test needs the terminal's behaviour whatever runs pytest.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "selfie", "-q", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for the process; its exit code and stderr."""
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def _newest_step(folder: Path) -> int:
    found = list_checkpoints(folder / "checkpoints")
    return checkpoint_step(found[-1]) if found else 0


def _wait_for_step(proc: subprocess.Popen[str], folder: Path, step: int) -> int:
    """Poll until a checkpoint at `step` or later exists; the newest step seen."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        newest = _newest_step(folder)
        if newest >= step:
            return newest
        if proc.poll() is not None:
            pytest.fail(f"selfie exited ({proc.returncode}) before step {step}: {_finish(proc)}")
        time.sleep(0.01)  # a tiny step takes ~50 ms; polling faster steals the child's CPU
    proc.kill()
    pytest.fail(f"no checkpoint at step {step} after {TIMEOUT} s")


def _stop_at(proc: subprocess.Popen[str], folder: Path, step: int, signum: int) -> str:
    """Send `signum` once the run has saved `step`; its stderr after it exited."""
    _wait_for_step(proc, folder, step)
    proc.send_signal(signum)
    code, err = _finish(proc)
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum
    assert code == expected, err
    return err


class Reference:
    """An uninterrupted run, started at once and waited for when first needed, so it runs
    beside the interrupted one (most of each process's time is importing torch)."""

    def __init__(self, folder: Path, args: list[str]) -> None:
        self.folder, self.proc, self.done = folder, _start(*args, "--out", str(folder)), False

    def get(self) -> Path:
        if not self.done:
            code, err = _finish(self.proc)
            assert code == 0, err
            self.done = True
        return self.folder

    def close(self) -> None:
        """Stop it if the test that wanted it failed first."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    reference = Reference(tmp_path_factory.mktemp("reference") / "run", PRETRAIN)
    yield reference
    reference.close()


@pytest.fixture
def finetune_reference(tmp_path: Path) -> Iterator[Reference]:
    reference = Reference(tmp_path / "reference", FINETUNE)
    yield reference
    reference.close()


# ---------------------------------------------------------------------------------------------
# Comparisons


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Bitwise: every tensor torch.equal with the same dtype, everything else ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _records(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _summary(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in TIMING}


def _assert_same_run(a: Path, b: Path) -> None:
    """Final checkpoints equal bit for bit (weights, optimizer, torch RNG, log window), metrics
    equal but for timing, summaries equal but for timing; no temp file left."""
    state_a = load_checkpoint(checkpoint_path(a / "checkpoints", STEPS))
    state_b = load_checkpoint(checkpoint_path(b / "checkpoints", STEPS))
    # Python's and numpy's generators start from OS entropy in every process (selfie draws
    # from neither), so two separate runs differ there; test_rng_states_round_trip checks
    # that a checkpoint carries them.
    for state in (state_a, state_b):
        del state["rng_python"], state["rng_numpy"]
    _assert_equal(state_a, state_b, "checkpoint")
    assert _records(a) == _records(b)
    assert _summary(a) == _summary(b)
    assert not list((b / "checkpoints").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Subprocess fault injection (slow: each process spends several seconds importing torch)


@pytest.mark.slow
@posix
def test_sigkill_at_three_steps_resumes_bitwise(tmp_path: Path, pretrain_reference: Reference):
    """Killed with SIGKILL at three steps and resumed each time, a pretraining run ends with
    the uninterrupted run's weights, optimizer state and metrics, bit for bit."""
    out = tmp_path / "run"
    proc = _start(*PRETRAIN, "--out", str(out))
    resumed_from = []
    for target in (3, 9, 15):
        _stop_at(proc, out, target, signal.SIGKILL)
        resumed_from.append(_newest_step(out))
        assert resumed_from[-1] < STEPS  # killed mid-run, not after it
        proc = _start("pretrain", "--resume", "--out", str(out))
    code, err = _finish(proc)
    assert code == 0, err
    assert resumed_from == sorted(set(resumed_from))  # three different steps
    assert [checkpoint_step(p) for p in list_checkpoints(out / "checkpoints")] == [18, 19, 20]
    _assert_same_run(pretrain_reference.get(), out)


@pytest.mark.slow
@posix
def test_sigterm_saves_and_says_how_to_resume(tmp_path: Path, pretrain_reference: Reference):
    """SIGTERM: the step finishes, its checkpoint is saved, exit code 143 and one stderr line
    with the step and the resume command; that command completes the run exactly."""
    out = tmp_path / "run"
    proc = _start(*PRETRAIN, "--out", str(out))
    err = _stop_at(proc, out, 5, signal.SIGTERM)
    command = f"selfie pretrain --resume --out {out}"
    lines = [line for line in err.splitlines() if "resume with:" in line]
    assert len(lines) == 1 and lines[0].endswith(command), err
    assert "Traceback" not in err
    reached = int(lines[0].split(" at step ")[1].split("/")[0])
    assert 5 <= reached < STEPS
    assert _newest_step(out) == reached
    assert load_checkpoint(checkpoint_path(out / "checkpoints", reached))["step"] == reached
    proc = _start(*command.split()[1:])
    code, err = _finish(proc)
    assert code == 0, err
    _assert_same_run(pretrain_reference.get(), out)


@pytest.mark.slow
@posix
def test_sigint_saves_and_exits_130(tmp_path: Path):
    """Ctrl-C (SIGINT): like SIGTERM, with exit code 130 and no traceback."""
    out = tmp_path / "run"
    proc = _start(*PRETRAIN, "--out", str(out))
    err = _stop_at(proc, out, 4, signal.SIGINT)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = [line for line in err.splitlines() if "resume with:" in line]
    assert line.startswith("selfie: SIGINT at step ")
    reached = int(line.split(" at step ")[1].split("/")[0])
    assert _newest_step(out) == reached < STEPS


@pytest.mark.slow
@posix
def test_finetune_sigkill_resume_same_test_acc(tmp_path: Path, finetune_reference: Reference):
    """A finetuning run killed with SIGKILL and resumed ends with the same test accuracy and
    the same weights, bit for bit, as the uninterrupted run."""
    out = tmp_path / "run"
    proc = _start(*FINETUNE, "--out", str(out))
    _stop_at(proc, out, 7, signal.SIGKILL)
    assert _newest_step(out) < STEPS
    code, err = _finish(_start("finetune", "--resume", "--out", str(out)))
    assert code == 0, err
    ref = finetune_reference.get()
    assert _summary(out)["test_acc"] == _summary(ref)["test_acc"]
    _assert_same_run(ref, out)


# ---------------------------------------------------------------------------------------------
# In-process faults on a small loop (fast): the same TrainLoop on a linear regression


def _loop(
    path: Path,
    steps: int = 9,
    *,
    resume: bool = False,
    every: int = 3,
    keep: int = 3,
    hook: Any = None,
) -> tuple[TrainLoop, nn.Module]:
    """A TrainLoop whose randomness is all seeded (data order and jitter pure in the step,
    dropout from the global RNG that checkpoints carry). `hook(step, loop)` runs in each step."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    optimizer = make_sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g)
    sampler = EpochSampler(40, 8, seed=0)
    loop: TrainLoop

    def step_fn(step: int) -> StepResult:
        if hook is not None:
            hook(step, loop)
        idx = sampler.batch(step)
        jitter = 0.01 * torch.randn(8, 5, generator=step_generator(0, step, "cpu"))
        loss = F.mse_loss(model(F.dropout(x[idx] + jitter, 0.2)), y[idx])
        return StepResult(loss)

    run = open_test_run(path, resume)
    loop = TrainLoop(
        model=model,
        optimizer=optimizer,
        step_fn=step_fn,
        lr_fn=lambda s: lr_at(s, 0.1, 2, steps),
        steps=steps,
        batch_size=8,
        run=run,
        log_every=2,
        checkpoint_every=every,
        kind="pretrain",
        config={"name": "test"},
        device=torch.device("cpu"),
        progress=False,
        keep_checkpoints=keep,
    )
    return loop, model


def _steps_on_disk(path: Path) -> list[int]:
    return [checkpoint_step(p) for p in list_checkpoints(path / "checkpoints")]


@pytest.mark.parametrize(("keep", "kept"), [(1, [10]), (3, [8, 9, 10]), (20, list(range(1, 11)))])
def test_keeps_the_last_k_checkpoints(tmp_path: Path, keep: int, kept: list[int]):
    """Only the newest `keep_checkpoints` stay on disk; the final one always does."""
    _loop(tmp_path, 10, every=1, keep=keep)[0].run_steps()
    assert _steps_on_disk(tmp_path) == kept


def test_keep_checkpoints_must_be_positive(tmp_path: Path):
    with pytest.raises(UserError, match="at least 1"):
        _loop(tmp_path, keep=0)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    """One bit-rot byte inside the tensor data: torch.load alone would not notice."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Payload:
    """Code riding in a pickle; it must never be unpickled."""


def _pickle_payload(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.save({**state, "payload": Payload()}, path)


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_a_byte, _pickle_payload, lambda p: p.write_bytes(b"")],
    ids=["truncated", "bit-flip", "pickle-payload", "empty"],
)
def test_damaged_newest_checkpoint_falls_back(tmp_path: Path, caplog, damage):
    """A damaged newest checkpoint is skipped with a warning naming it; the run resumes from
    the one before and still ends equal to the uninterrupted run."""
    whole, whole_model = _loop(tmp_path / "whole")
    whole.run_steps()
    _loop(tmp_path / "split", 6, every=3)[0].run_steps()
    newest = checkpoint_path(tmp_path / "split" / "checkpoints", 6)
    damage(newest)
    loop, model = _loop(tmp_path / "split", resume=True)
    with caplog.at_level(logging.WARNING):
        start = loop.restore()
    assert start == 3
    assert any(str(newest) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    loop.run_steps(start)
    assert torch.equal(whole_model.weight, model.weight)
    assert _records(tmp_path / "whole") == _records(tmp_path / "split")


def test_no_readable_checkpoint_refuses(tmp_path: Path):
    """All checkpoints damaged: resuming refuses (it would silently restart from step 0)."""
    _loop(tmp_path, 6)[0].run_steps()
    for path in list_checkpoints(tmp_path / "checkpoints"):
        _truncate(path)
    with pytest.raises(UserError, match=r"none of the 2 checkpoints .* is readable"):
        _loop(tmp_path, resume=True)[0].restore()


def test_resume_before_the_first_checkpoint_starts_over_cleanly(tmp_path: Path):
    """A run killed before its first save restarts at step 0 without duplicate log lines."""
    _loop(tmp_path / "whole")[0].run_steps()
    loop, _ = _loop(tmp_path / "split")
    loop.run.log({"step": 2, "loss": 9.0})  # logged, then killed before the step-3 save
    loop, _ = _loop(tmp_path / "split", resume=True)
    assert loop.restore() == 0
    loop.run_steps()
    assert _records(tmp_path / "whole") == _records(tmp_path / "split")


def test_stray_temp_file_is_removed_on_resume(tmp_path: Path):
    """A SIGKILL mid-save leaves .step_N.pt.tmp; the resume removes it."""
    _loop(tmp_path, 6)[0].run_steps()
    stray = tmp_path / "checkpoints" / ".step_0000009.pt.tmp"
    stray.write_bytes(b"half a checkpoint")
    assert _loop(tmp_path, resume=True)[0].restore() == 6
    assert not stray.exists()


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_written(obj: Any, f: Any) -> None:
    f.write(b"PK\x03\x04 half of a checkpoint")
    _enospc()


@pytest.mark.parametrize(
    ("target", "fake"),
    [("torch.save", _half_written), ("os.fsync", _enospc), ("os.replace", _enospc)],
)
def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, target, fake):
    """A full disk mid-save (while writing, syncing or renaming): a one-line UserError naming
    the file and the fix, the previous checkpoint intact and loadable, no temp file left."""

    def fill_the_disk(step: int, loop: TrainLoop) -> None:
        if step == 4:  # after the step-3 save: the step-6 one fails
            monkeypatch.setattr(target, fake)

    loop, _ = _loop(tmp_path, hook=fill_the_disk)
    with pytest.raises(UserError) as info:
        loop.run_steps()
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("disk full while saving ")
    assert "step_0000006.pt at step 6 (step_0000003.pt is kept)" in message
    assert message.endswith(f"free space and run again: selfie pretrain --resume --out {tmp_path}")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000003.pt"]
    assert load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 3))["step"] == 3


@pytest.fixture
def one_thread():
    """See ENV; put back afterwards, so other tests run as they would alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_failed_save_through_the_cli_is_one_line_exit_2(tmp_path: Path, monkeypatch, capsys):
    """The same through `selfie pretrain`: exit 2, one stderr line, and --resume then finishes."""
    real_save, calls = torch.save, []

    def save(obj: Any, f: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            _enospc()
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    out = str(tmp_path / "run")
    args = ["-q", "pretrain", "--preset", "tiny", "--out", out, "--set", "pretrain.steps=4"]
    code = cli.main([*args, "--set", "pretrain.checkpoint_every=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "disk full while saving" in err and f"--resume --out {out}" in err
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main(["-q", "pretrain", "--resume", "--out", out]) == 0
    assert _steps_on_disk(tmp_path / "run") == [2, 4]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    """A NaN loss stops the run naming the step; the checkpoints before it stay and load."""

    def poison(step: int, loop: TrainLoop) -> None:
        if step == 7:
            for p in loop.model.parameters():
                p.data.fill_(float("nan"))

    loop, _ = _loop(tmp_path, hook=poison)
    with pytest.raises(UserError, match="loss is nan at step 7"):
        loop.run_steps()
    assert _steps_on_disk(tmp_path) == [3, 6]
    state = load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 6))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_weights_are_never_saved(tmp_path: Path):
    """A finite loss with an infinite update (here an infinite LR) leaves non-finite weights:
    the save refuses them, so the newest checkpoint stays a good one."""

    def blow_up(step: int, loop: TrainLoop) -> None:
        if step == 5:  # the update of step 5 is saved as checkpoint 6
            loop.optimizer.param_groups[0]["lr"] = float("inf")

    loop, _ = _loop(tmp_path, hook=blow_up)
    with pytest.raises(UserError, match="non-finite at step 6"):
        loop.run_steps()
    assert _steps_on_disk(tmp_path) == [3]


@pytest.fixture
def default_signal_handlers():
    """A shell starts background jobs with SIGINT ignored, and the loop rightly leaves an
    ignored signal ignored: give the in-process test the handlers an interactive run has."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@posix
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.usefixtures("default_signal_handlers")
def test_signal_finishes_the_step_saves_and_restores_handlers(tmp_path: Path, monkeypatch, signum):
    """In-process: a signal during step 4 lets it finish, saves step 5, raises Interrupted with
    exit code 128 + signal; a second signal while saving changes nothing; the previous
    handlers are back afterwards."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    real_save = ckpt.atomic_save

    def save_under_fire(obj: Any, path: Path) -> None:
        os.kill(os.getpid(), signum)  # the impatient second Ctrl-C
        real_save(obj, path)

    def send(step: int, loop: TrainLoop) -> None:
        if step == 4:
            os.kill(os.getpid(), signum)
            monkeypatch.setattr(ckpt, "atomic_save", save_under_fire)

    loop, _ = _loop(tmp_path, hook=send)
    with pytest.raises(Interrupted) as info:
        loop.run_steps()
    assert info.value.exit_code == 128 + signum
    name = signal.Signals(signum).name
    assert str(info.value) == (
        f"{name} at step 5/9: stopped after saving {checkpoint_path(tmp_path / 'checkpoints', 5)}"
        f"; resume with: selfie pretrain --resume --out {tmp_path}"
    )
    assert _steps_on_disk(tmp_path) == [3, 5]
    assert {s: signal.getsignal(s) for s in before} == before
    resumed, _ = _loop(tmp_path, resume=True)
    assert resumed.restore() == 5


def test_loop_outside_the_main_thread_runs_without_signal_handlers(tmp_path: Path):
    """signal.signal only works in the main thread: elsewhere the loop runs without them."""
    errors: list[BaseException] = []

    def train() -> None:
        try:
            _loop(tmp_path, 6)[0].run_steps()
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join(timeout=60)
    assert not errors and _steps_on_disk(tmp_path) == [3, 6]


def test_resume_hint_follows_the_run_options(tmp_path: Path):
    """The resume command repeats the options a resume does not read back from the run."""
    opts = RunOptions(out=tmp_path / "my run", data_dir="data/c10", device="cpu", bf16=True)
    assert resume_command("pretrain", opts) == (
        f"selfie pretrain --resume --out '{tmp_path}/my run' --data-dir data/c10 --device cpu "
        "--bf16"
    )
    custom = RunOptions(out=tmp_path, resume_hint="selfie experiment --preset tiny --labels 10")
    assert resume_command("finetune", custom) == custom.resume_hint


def test_torn_last_metrics_line_is_skipped(tmp_path: Path, caplog):
    """A power cut mid-append leaves half a line; reading skips it with a warning."""
    run = RunFolder(tmp_path)
    run.log({"step": 2, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        assert run.metrics() == [{"step": 2, "loss": 1.0}]
    assert "cut short" in caplog.text


def test_rng_states_round_trip(tmp_path: Path):
    """A checkpoint carries torch's, Python's and numpy's global generators: after a restore
    each draws what it drew after the save."""
    loop, _ = _loop(tmp_path, 3)
    loop.run_steps()
    after = (torch.rand(3), random.random(), np.random.rand(3))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    assert _loop(tmp_path, 3, resume=True)[0].restore() == 3
    again = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(after[0], again[0]) and after[1] == again[1]
    assert (after[2] == again[2]).all()
