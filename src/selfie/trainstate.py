"""A training run's state on disk: what a checkpoint holds, how it is written, and how a
run resumes from it exactly (weights, optimizer, every RNG, the log window).

`Checkpointer` is the half of the training loop that touches files: `engine.TrainLoop` calls
`save` after a step and `restore` before the first. Under torchrun every rank calls both;
rank 0 alone writes, and every rank reads the same checkpoint.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfie import checkpoint as ckpt
from selfie import distributed
from selfie.data.sampler import derive_seed
from selfie.errors import UserError
from selfie.runfolder import RunFolder

log = logging.getLogger(__name__)

# Keys a checkpoint needs for an exact resume; one lacking any is treated as unreadable.
_REQUIRED = ("step", "model", "optimizer", "rng_cpu", "log_window")


@dataclass
class LogWindow:
    """Metric sums of the steps since the last log line, saved in checkpoints so that a
    resumed run logs the same averages as an uninterrupted one."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0


def rng_states() -> dict[str, Any]:
    """Every global RNG, in weights_only-loadable types. Only torch's is drawn from today
    (dropout); Python's and numpy's are saved so that a future use cannot break exact resume."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_python": {"version": version, "state": list(internal), "gauss": gauss},
        "rng_numpy": {  # a numpy array would need unpickling: its uint32 keys go as int64
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if "rng_python" in state:
        py = state["rng_python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "rng_numpy" in state:
        n = state["rng_numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))


@dataclass
class Checkpointer:
    model: nn.Module  # the trained module (DDP / compile wrappers are unwrapped on save)
    optimizer: torch.optim.Optimizer
    run: RunFolder
    kind: str  # "pretrain" or "finetune", recorded in checkpoints
    config: dict[str, Any]  # recorded in checkpoints
    device: torch.device
    resume_hint: str  # the command that continues the run, quoted in messages
    scaler: torch.amp.GradScaler | None = None
    keep_checkpoints: int = 3

    def save(self, step: int, window: LogWindow) -> Path:
        """Write the checkpoint of `step`, then delete the ones beyond `keep_checkpoints`.

        Refuses to save non-finite weights (a finite loss can still give infinite gradients),
        so the newest checkpoint is always one worth resuming from. A failed write (a full
        disk) leaves the previous checkpoints as they were and raises a UserError.

        Under torchrun every rank calls this: rank 0 writes, with every rank's RNG state (each
        rank draws its own dropout), and the others wait for it and share its errors."""
        ranks_rng = distributed.all_gather_object(self._local_rng())
        path = distributed.on_main(lambda: self._write(step, window, ranks_rng))
        return path or ckpt.checkpoint_path(self.run.checkpoints, step)

    def _local_rng(self) -> dict[str, torch.Tensor]:
        state = {"rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _write(
        self, step: int, window: LogWindow, ranks_rng: list[dict[str, torch.Tensor]]
    ) -> Path:
        model = ckpt.unwrap(self.model)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise UserError(
                f"the weights became non-finite at step {step}; stopped without saving them "
                f"(the last good checkpoint is kept in {self.run.checkpoints}); lower the "
                "learning rate"
            )
        state = {
            "format": ckpt.FORMAT,
            "kind": self.kind,
            "step": step,
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **rng_states(),
            "config": self.config,
            "log_window": {"count": window.count, "sums": dict(window.sums)},
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if len(ranks_rng) > 1:
            state["rng_ranks"] = ranks_rng
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        path = ckpt.checkpoint_path(self.run.checkpoints, step)
        try:
            ckpt.atomic_save(state, path)
        except OSError as e:
            previous = [p for p in ckpt.list_checkpoints(self.run.checkpoints) if p != path]
            kept = f"{previous[-1].name} is kept" if previous else "no earlier checkpoint exists"
            what, fix = ckpt.describe_write_error(e)
            raise UserError(
                f"{what} while saving {path} at step {step} ({kept}); {fix} and run again: "
                f"{self.resume_hint}"
            ) from None
        ckpt.prune_checkpoints(self.run.checkpoints, step, self.keep_checkpoints)
        return path

    def restore(self, steps: int, log_every: int) -> tuple[int, LogWindow]:
        """Load the newest readable checkpoint of the run into the model, optimizer, scaler
        and RNGs; returns the step to continue from and the log window saved with it. A run
        of `steps` steps logging every `log_every` drops the records logged after it.

        A checkpoint that does not load (truncated, corrupt, foreign, or carrying pickled
        code, which is never unpickled) is skipped with a warning naming it, and the one
        before it is used. If the run has checkpoints but none loads, this refuses with a
        UserError rather than start again from step 0: a restart that only warns is easy to
        miss in a long log and would throw away the run's progress (hours or days), and its
        rotation would then delete the damaged files that a user might still recover. Moving
        them away starts over deliberately. A run with no checkpoint at all (stopped before
        its first save) starts at step 0, and its log lines from before the stop are dropped.
        Temporary files of saves cut short are removed.

        Under torchrun every rank reads the same checkpoint (so the run folder must be on
        storage that every node sees) and they check that they agree on the step.
        """
        if distributed.is_main():
            for stale in ckpt.remove_temp_files(self.run.checkpoints):
                log.info("removed %s, left by a save that was cut short", stale)
        found = ckpt.list_checkpoints(self.run.checkpoints)
        state, path = None, None
        for candidate in reversed(found):
            try:
                state = ckpt.load_checkpoint(candidate)
                missing = [k for k in _REQUIRED if k not in state]
                if missing:
                    raise UserError(f"{candidate} lacks {', '.join(missing)}")
            except UserError as e:
                log.warning("skipping unreadable checkpoint %s: %s", candidate, e)
                state = None
                continue
            path = candidate
            break
        if state is None or path is None:
            if found:
                raise UserError(
                    f"none of the {len(found)} checkpoints in {self.run.checkpoints} is "
                    "readable (see the warnings above); to start the run over, move them out "
                    f"of that folder and run again: {self.resume_hint}"
                )
            # Records logged before the first checkpoint would otherwise appear twice.
            if distributed.is_main():
                self.run.truncate_metrics(0)
            return self._agreed(0), LogWindow()
        if state.get("kind", self.kind) != self.kind:
            raise UserError(f"{path} is a {state['kind']} checkpoint, not a {self.kind} one")
        try:
            ckpt.unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            # Not damage but a different model: resuming from an older file would not help.
            first = str(e).strip().splitlines()[0]
            raise UserError(f"{path} does not fit this run's model ({first})") from None
        step = int(state["step"])
        self._restore_rng(state, step)
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        window = LogWindow(dict(state["log_window"]["sums"]), int(state["log_window"]["count"]))
        if distributed.is_main():
            # A line logged at a checkpoint that ended a run early is not one the longer run
            # has.
            at_log = step % log_every == 0 or step == steps
            self.run.truncate_metrics(step if at_log else step - 1)
            log.info("resumed from %s at step %d", path, step)
        return self._agreed(step), window

    def _restore_rng(self, state: dict[str, Any], step: int) -> None:
        """Every global RNG as saved; under torchrun each rank takes its own torch streams."""
        set_rng_states(state)  # rank 0's torch streams; Python's and numpy's for all
        rank, world = distributed.rank(), distributed.world_size()
        ranks = state.get("rng_ranks", [])
        if world > 1 and len(ranks) == world:
            own = ranks[rank]
        elif rank == 0:
            own = state
        else:
            # Saved by a run on another number of processes: rank 0 continues its stream, the
            # others start their own, reproducibly, from the step.
            torch.manual_seed(derive_seed(step, 4, rank))
            return
        torch.set_rng_state(own["rng_cpu"])
        if "rng_cuda" in own and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["rng_cuda"], self.device)

    def _agreed(self, step: int) -> int:
        """`step`, once every rank is known to resume from it."""
        steps = distributed.all_gather_object(step)
        if len(set(steps)) > 1:
            raise UserError(
                f"the processes found different checkpoints to resume from (steps {steps} by "
                f"rank); put {self.run.path} on storage that every node reads"
            )
        return step
