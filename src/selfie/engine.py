"""The training loop. It knows nothing about Selfie: a step function turns a step number into
a loss and metrics; the loop sets the learning rate, steps the optimizer, logs, checkpoints
and resumes, and stops cleanly on SIGINT/SIGTERM. Callbacks (an evaluation every N steps) add
their figures to the logged records. What goes to disk and back (checkpoints, RNG states) is
`trainstate.Checkpointer`'s.

Under torchrun (see selfie.distributed) every rank runs the same loop on its share of the
batch: metrics are averaged over ranks every step (so every rank holds the same log window
and stops on the same non-finite loss), a signal received by any rank stops all of them after
the same step, and rank 0 alone logs, shows progress and writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import shlex
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from selfie import distributed
from selfie.config import OptimConfig
from selfie.device import autocast
from selfie.errors import Interrupted, UserError
from selfie.optim import lr_at, make_sgd
from selfie.runfolder import RunFolder, RunOptions, resume_command
from selfie.trainstate import Checkpointer, LogWindow

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, e.g. accuracy


class StopSignals:
    """While active (in the main thread), SIGINT and SIGTERM only record that a stop was asked
    for; the loop polls `signum` between steps. Python runs signal handlers only in the main
    thread and `signal.signal` raises elsewhere, so in other threads this does nothing. A
    signal the process was started ignoring stays ignored (a shell starts background jobs
    with SIGINT ignored, so that a Ctrl-C in the terminal leaves them alone). The previous
    handlers are put back on exit, whatever happened."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: stopping after the current step and its checkpoint",
                signal.Signals(signum).name,
            )
        else:  # a second Ctrl-C must not cut a checkpoint write short
            log.warning("already stopping; the checkpoint is being saved, please wait")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                previous = signal.getsignal(s)
                if previous is not signal.SIG_IGN:
                    self._previous[s] = previous
                    signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            # getsignal gives None for a handler installed outside Python: the default then.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


@dataclass(frozen=True)
class Callback:
    """`fn(step)` at the first logging step at or after each multiple of `every` (at each
    multiple when `every` is a multiple of log_every), and after the last step; the metrics
    it returns (say an evaluation's accuracy) join that step's record in metrics.jsonl. The
    loop calls it on every rank: under torchrun it computes where it likes (rank 0's figures
    are the ones logged) and must not draw from the global RNGs, so that training and resume
    stay exact."""

    every: int
    fn: Callable[[int], dict[str, float]]


@dataclass
class TrainLoop:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    # Runs the forward pass of step `step`: called as step_fn(step), or with accum > 1 as
    # step_fn(step, micro) for each micro-batch micro = 0 .. accum - 1.
    step_fn: Callable[..., StepResult]
    lr_fn: Callable[[int], float]
    steps: int
    batch_size: int  # images per step over all ranks (the global batch), for images/s
    run: RunFolder
    log_every: int
    checkpoint_every: int
    kind: str  # "pretrain" or "finetune", recorded in checkpoints
    config: dict[str, Any]  # recorded in checkpoints
    device: torch.device
    bf16: bool = False
    fp16: bool = False  # float16 autocast with a GradScaler, for GPUs without bfloat16
    # Micro-batches per step: each one's loss is divided by `accum` and back-propagated (inside
    # DDP's no_sync but for the last), so the step's gradient is that of the mean over them.
    accum: int = 1
    progress: bool = True
    # Metric sums of the steps since the last log line; saved in checkpoints so that a resumed
    # run logs the same averages as an uninterrupted one.
    window: dict[str, float] = field(default_factory=dict)
    window_count: int = 0
    # The newest checkpoints kept on disk (the final one always is); older ones are deleted
    # after each successful save. More than one, so that a newest one damaged after its write
    # (a disk error, a bad copy) still leaves one to resume from.
    keep_checkpoints: int = 3
    # The command that continues this run, quoted in the messages of an interrupted or failed
    # run. Empty: `selfie <kind> --resume --out <run>` with the run's options (see
    # runfolder.resume_command); the experiment runner passes its own command line.
    resume_hint: str = ""
    # Run at logging steps that are multiples of their `every`, and at the last step; what
    # they return joins that step's record (see Callback).
    callbacks: Sequence[Callback] = ()

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise UserError(f"keep_checkpoints must be at least 1, not {self.keep_checkpoints}")
        if self.accum < 1:
            raise UserError(f"accum must be at least 1, not {self.accum}")
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.fp16 else None
        if not self.resume_hint:
            if self.run.options is not None:
                self.resume_hint = resume_command(self.kind, self.run.options)
            else:
                self.resume_hint = shlex.join(
                    ["selfie", self.kind, "--resume", "--out", str(self.run.path)]
                )
        for callback in self.callbacks:
            if callback.every < 1:
                raise UserError(f"a callback's interval must be at least 1, not {callback.every}")
        self.state = Checkpointer(
            model=self.model,
            optimizer=self.optimizer,
            run=self.run,
            kind=self.kind,
            config=self.config,
            device=self.device,
            resume_hint=self.resume_hint,
            scaler=self.scaler,
            keep_checkpoints=self.keep_checkpoints,
        )

    def save(self, step: int) -> Path:
        """Checkpoint `step` (see Checkpointer.save)."""
        return self.state.save(step, LogWindow(dict(self.window), self.window_count))

    def restore(self) -> int:
        """Load the newest readable checkpoint (see Checkpointer.restore); returns the step to
        continue from."""
        step, window = self.state.restore(self.steps, self.log_every)
        self.window, self.window_count = dict(window.sums), window.count
        return step

    def _due(self, callback: Callback, done: int) -> bool:
        """At logging step `done`: whether a multiple of callback.every lies in the steps
        since the previous logging step, or this is the last step. A pure function of the
        step, so a resumed run calls back where the uninterrupted one did."""
        previous = (done - 1) // self.log_every * self.log_every  # the previous log step
        return done // callback.every > previous // callback.every or done == self.steps

    def run_steps(self, start_step: int = 0) -> dict[str, float]:
        """Train from `start_step` to `self.steps`; returns the last logged metrics.

        On SIGINT or SIGTERM the current step is finished and checkpointed, then Interrupted
        (exit code 130 or 143) is raised with the step reached and the command to resume."""
        self.model.train()
        bar = tqdm(
            total=self.steps,
            initial=start_step,
            desc=self.kind,
            disable=not (self.progress and distributed.is_main()),
            dynamic_ncols=True,
        )
        try:
            with StopSignals() as stop:
                return self._steps(start_step, bar, stop)
        finally:
            bar.close()

    def _train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; the loss and metrics averaged over
        micro-batches and ranks. A non-finite loss on any rank stops every rank before the
        optimizer step, so the weights stay those of the last good step."""
        self.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        names: list[str] = []
        for micro in range(self.accum):
            # Gradients stay on this rank until the last micro-batch, then all-reduce once.
            with distributed.no_sync(self.model, active=micro < self.accum - 1):
                with autocast(self.device, self.bf16, self.fp16):
                    result = self.step_fn(step) if self.accum == 1 else self.step_fn(step, micro)
                loss = result.loss if self.accum == 1 else result.loss / self.accum
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            names = ["loss", *result.metrics]
            parts = [result.loss, *result.metrics.values()]
            values = torch.stack([v.detach().float() for v in parts])
            total = values if total is None else total + values
        assert total is not None
        mean = distributed.all_reduce_mean(total if self.accum == 1 else total / self.accum)
        numbers = dict(zip(names, mean.tolist(), strict=True))
        if not math.isfinite(numbers["loss"]):
            raise UserError(
                f"loss is {numbers['loss']} at step {step}; stopped (the last good "
                f"checkpoint is kept in {self.run.checkpoints}); lower the learning rate"
            )
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips the step if the scaled gradients overflowed, and adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return numbers

    def _steps(self, start_step: int, bar: tqdm, stop: StopSignals) -> dict[str, float]:
        main = distributed.is_main()
        # A run resumed from its final checkpoint trains no step: its last record stands.
        last: dict[str, float] = (self.run.metrics()[-1:] or [{}])[0] if main else {}
        window_start, timed_steps = time.perf_counter(), 0
        for step in range(start_step, self.steps):
            lr = self.lr_fn(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for name, value in self._train_step(step).items():
                self.window[name] = self.window.get(name, 0.0) + value
            self.window_count += 1
            timed_steps += 1
            done = step + 1
            bar.update(1)
            if done % self.log_every == 0 or done == self.steps:
                elapsed = time.perf_counter() - window_start
                last = {k: total / self.window_count for k, total in self.window.items()}
                last |= {"lr": lr, "images_per_s": timed_steps * self.batch_size / elapsed}
                for callback in self.callbacks:
                    if self._due(callback, done):
                        last |= callback.fn(done)
                if main:
                    self.run.log({"step": done, **last})
                bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k != "lr"})
                if main and not self.progress:
                    log.info(
                        "step %d/%d %s",
                        done,
                        self.steps,
                        " ".join(f"{k}={v:.4g}" for k, v in last.items()),
                    )
                if done % self.log_every == 0:  # not at a final partial window: a resume
                    self.window, self.window_count = {}, 0  # with more steps continues it
                window_start, timed_steps = time.perf_counter(), 0
            saved = None
            if done % self.checkpoint_every == 0 or done == self.steps:
                saved = self.save(done)
            # Every rank stops after the same step if any received a signal (torchrun passes
            # a SIGTERM to all, but not at the same instant).
            signum = int(distributed.all_reduce_max(torch.tensor(stop.signum or 0)))
            if signum:
                # Checked after the scheduled save, so a signal during it costs no second one.
                saved = saved or self.save(done)
                name = signal.Signals(signum).name
                raise Interrupted(
                    f"{name} at step {done}/{self.steps}: stopped after saving {saved}; "
                    f"resume with: {self.resume_hint}",
                    signum,
                )
        return last


def train_recipe(
    *,
    model: nn.Module,
    trained: nn.Module,
    step_fn: Callable[..., StepResult],
    recipe: OptimConfig,
    batch_size: int,
    run: RunFolder,
    kind: str,
    config: dict[str, Any],
    device: torch.device,
    opts: RunOptions,
    callbacks: Sequence[Callback] = (),
) -> tuple[dict[str, float], float]:
    """Train `trained` (the plain `model`, or it wrapped in DDP / torch.compile) with the
    recipe of SPEC 4: SGD with Nesterov momentum and weight decay, linear warm-up then cosine
    decay, the recipe's steps and logging/checkpoint cadence; precision, accumulation,
    progress and resume from the run options. Returns the last logged metrics and the
    seconds this session trained."""
    loop = TrainLoop(
        model=trained,
        optimizer=make_sgd(model, recipe.lr, recipe.momentum, recipe.weight_decay),
        step_fn=step_fn,
        lr_fn=lambda s: lr_at(s, recipe.lr, recipe.warmup_steps, recipe.steps),
        steps=recipe.steps,
        batch_size=batch_size,
        run=run,
        log_every=recipe.log_every,
        checkpoint_every=recipe.checkpoint_every,
        kind=kind,
        config=config,
        device=device,
        bf16=opts.bf16,
        fp16=opts.fp16,
        accum=opts.accum,
        progress=opts.progress,
        callbacks=callbacks,
    )
    start = loop.restore() if opts.resume else 0
    t0 = time.perf_counter()
    try:
        last = loop.run_steps(start)
    finally:
        run.close()
    return last, time.perf_counter() - t0
