"""The training loop. It knows nothing about Selfie: a step function turns a step number into
a loss and metrics; the loop sets the learning rate, steps the optimizer, logs, checkpoints
and resumes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from selfie import checkpoint as ckpt
from selfie.errors import UserError
from selfie.runfolder import RunFolder

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, e.g. accuracy


@dataclass
class TrainLoop:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[int], StepResult]  # runs the forward pass for step `step`
    lr_fn: Callable[[int], float]
    steps: int
    batch_size: int  # images per step, for images/s
    run: RunFolder
    log_every: int
    checkpoint_every: int
    kind: str  # "pretrain" or "finetune", recorded in checkpoints
    config: dict[str, Any]  # recorded in checkpoints
    device: torch.device
    bf16: bool = False
    progress: bool = True
    # Metric sums of the steps since the last log line; saved in checkpoints so that a resumed
    # run logs the same averages as an uninterrupted one.
    window: dict[str, float] = field(default_factory=dict)
    window_count: int = 0

    def save(self, step: int) -> None:
        state = {
            "format": ckpt.FORMAT,
            "kind": self.kind,
            "step": step,
            "model": ckpt.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "config": self.config,
            "log_window": {"count": self.window_count, "sums": dict(self.window)},
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        ckpt.atomic_save(state, ckpt.checkpoint_path(self.run.checkpoints, step))

    def restore(self) -> int:
        """Load the newest checkpoint of the run; returns the step to continue from."""
        found = ckpt.list_checkpoints(self.run.checkpoints)
        if not found:
            return 0
        state = ckpt.load_checkpoint(found[-1])
        ckpt.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.window = dict(state["log_window"]["sums"])
        self.window_count = int(state["log_window"]["count"])
        step = int(state["step"])
        # A line logged at a checkpoint that ended a run early is not one the longer run has.
        at_log = step % self.log_every == 0 or step == self.steps
        self.run.truncate_metrics(step if at_log else step - 1)
        log.info("resumed from %s at step %d", found[-1], step)
        return step

    def run_steps(self, start_step: int = 0) -> dict[str, float]:
        """Train from `start_step` to `self.steps`; returns the last logged metrics."""
        self.model.train()
        bar = tqdm(
            total=self.steps,
            initial=start_step,
            desc=self.kind,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        # A run resumed from its final checkpoint trains no step: its last record stands.
        last: dict[str, float] = (self.run.metrics()[-1:] or [{}])[0]
        window_start, timed_steps = time.perf_counter(), 0
        for step in range(start_step, self.steps):
            lr = self.lr_fn(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                result = self.step_fn(step)
            if not torch.isfinite(result.loss):
                bar.close()
                raise UserError(
                    f"loss is {result.loss.item()} at step {step}; stopped (the last good "
                    f"checkpoint is kept in {self.run.checkpoints}); lower the learning rate"
                )
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            self.optimizer.step()
            for name, value in {"loss": result.loss, **result.metrics}.items():
                self.window[name] = self.window.get(name, 0.0) + float(value.detach())
            self.window_count += 1
            timed_steps += 1
            done = step + 1
            bar.update(1)
            if done % self.log_every == 0 or done == self.steps:
                elapsed = time.perf_counter() - window_start
                last = {k: total / self.window_count for k, total in self.window.items()}
                last |= {"lr": lr, "images_per_s": timed_steps * self.batch_size / elapsed}
                self.run.log({"step": done, **last})
                bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k != "lr"})
                if not self.progress:
                    log.info(
                        "step %d/%d %s",
                        done,
                        self.steps,
                        " ".join(f"{k}={v:.4g}" for k, v in last.items()),
                    )
                if done % self.log_every == 0:  # not at a final partial window: a resume
                    self.window, self.window_count = {}, 0  # with more steps continues it
                window_start, timed_steps = time.perf_counter(), 0
            if done % self.checkpoint_every == 0 or done == self.steps:
                self.save(done)
        bar.close()
        return last
