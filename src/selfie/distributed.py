"""torchrun / DistributedDataParallel set-up, and collectives that are no-ops in one process.

`torchrun --nproc_per_node=N -m selfie pretrain ...` starts N processes with RANK, LOCAL_RANK
and WORLD_SIZE in their environment; `init_from_env` joins them into one process group (nccl
on GPUs, gloo on the CPU). Without those variables nothing here does anything: a plain
`selfie pretrain` is one process, as before.

How the work is split (see also TrainLoop and pretrain.make_batch):

- The preset's batch size is the *global* batch. Each of the W ranks trains on a contiguous
  share of B / W rows of it (an error if W does not divide B), and with `--accum K` it cuts its
  share into K micro-batches whose gradients add up before the optimizer step. Accumulation is
  explicit only (no automatic choice from a memory limit): the numbers a run trains with are
  then always the ones on its command line.
- Every rank draws the whole global batch's indices, augmentation and masks from
  (seed, step), exactly as the single process does, and keeps its own rows. The union over
  ranks is therefore exactly the single-process batch, each rank's randomness differs from the
  others' and is reproducible from the seed, and a run resumed on another number of processes
  continues the same data order.
- Each rank's loss is the mean over its rows; DDP averages the gradients, which is the gradient
  of the global mean because the shares are equal. BatchNorm normalises over each rank's (or
  micro-batch's) rows unless `--sync-bn`.
- Rank 0 alone writes the run folder, logs and evaluates; an error it meets is raised on every
  rank (`on_main`), so no rank waits for a rank that has stopped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from selfie.data.sampler import derive_seed
from selfie.device import resolve_device
from selfie.errors import UserError

T = TypeVar("T")

# Device types on which torch's SyncBatchNorm runs (its forward raises on the others).
SYNC_BN_DEVICES = ("cuda", "xpu", "hpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, global_batch: int, micro: int = 0, accum: int = 1) -> slice:
        """The rows of a global batch that micro-batch `micro` of `accum` on this rank trains
        on: rank r holds rows [r B/W, (r+1) B/W), cut into `accum` equal parts."""
        per_rank, per_micro = split_batch(global_batch, self.world_size, accum)
        start = self.rank * per_rank + micro * per_micro
        return slice(start, start + per_micro)


def split_batch(global_batch: int, world_size: int, accum: int = 1) -> tuple[int, int]:
    """(images per rank, images per micro-batch), or a UserError saying how to fix it."""
    if accum < 1:
        raise UserError(f"--accum must be at least 1, not {accum}")
    if global_batch % world_size:
        raise UserError(
            f"batch size {global_batch} does not split evenly over {world_size} processes; "
            f"choose a multiple of {world_size} (--batch-size) or another --nproc_per_node"
        )
    per_rank = global_batch // world_size
    if per_rank % accum:
        raise UserError(
            f"each of the {world_size} processes trains on {per_rank} images per step, which "
            f"--accum {accum} does not divide; choose an --accum that divides {per_rank}"
        )
    return per_rank, per_rank // accum


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def launched_by_torchrun() -> bool:
    """True in a process torchrun started with more than one process in the job."""
    return (_env_int("WORLD_SIZE") or 1) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank from torchrun's variables, before any process group exists."""
    return _env_int("RANK") or 0


def _device_for(name: str, local_rank: int) -> torch.device:
    """Under torchrun each process takes accelerator LOCAL_RANK; `name` only picks the kind."""
    device = resolve_device(name)
    if device.type == "cpu":
        return device
    if name not in ("auto", device.type):
        raise UserError(
            f"--device {name}: under torchrun each process uses device {local_rank} of its "
            f"node (LOCAL_RANK); pass --device {device.type} or auto"
        )
    # Only CUDA is known to take one device per process here; other accelerators run as one.
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {count} GPUs are visible on this node; "
                f"use --nproc_per_node={count} or fewer"
            )
        device = torch.device(device.type, local_rank)
        torch.cuda.set_device(device)
    return device


def init_from_env(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (once per process; later calls return the same group).
    Without torchrun's variables: rank 0 of 1 on `device`, and no process group."""
    world = _env_int("WORLD_SIZE") or 1
    if not launched_by_torchrun():
        return DistInfo(0, 0, 1, resolve_device(device))
    rank, local_rank = env_rank(), _env_int("LOCAL_RANK") or 0
    placed = _device_for(device, local_rank)
    if not is_initialized():
        backend = "nccl" if placed.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank, local_rank, world, placed)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return not is_initialized() or dist.get_rank() == 0


def _comm_device() -> torch.device:
    """Where collective tensors must live: nccl reduces on this process's GPU, gloo on CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (a new tensor on the input's device); the input itself alone."""
    if not is_initialized():
        return tensor
    t = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return tensor
    t = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(tensor.device)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled in memory between our own processes only)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only (writing the run folder, evaluating); None on the others.

    Every rank waits for rank 0 to finish, and an error there is raised on every rank (the
    same UserError message; for a bug, its type and text), so that no rank blocks forever in
    its next collective waiting for a rank that has stopped."""
    if not is_initialized():
        return fn()
    result: T | None = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as e:
            error = e
    message = broadcast_object(None if error is None else _describe(error))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result


def _describe(error: BaseException) -> str:
    if isinstance(error, UserError):
        return str(error)
    return f"rank 0 failed ({type(error).__name__}: {error})"


def main_first(fn: Callable[[], T]) -> T:
    """`fn` on rank 0, then on the other ranks: they find what rank 0 downloaded or
    extracted, and never race it for the same files."""
    first = on_main(fn)
    if is_main():
        return first  # type: ignore[return-value]  # on rank 0 on_main returns fn()'s value
    return fn()


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def seed_other_ranks(seed: int, rank: int) -> None:
    """Give ranks > 0 their own global-RNG stream (dropout), after the model is built from the
    same seed everywhere. Rank 0 keeps the seed's own stream, so a single process draws
    exactly what it always did."""
    if rank > 0:
        torch.manual_seed(derive_seed(seed, 3, rank))


def check_sync_bn(device: torch.device, sync_bn: bool) -> None:
    """Refuse --sync-bn where torch's SyncBatchNorm cannot run (its forward raises on the CPU),
    even in a single process, so that a CPU rehearsal of a GPU command fails early."""
    if sync_bn and device.type not in SYNC_BN_DEVICES:
        raise UserError(
            f"--sync-bn: torch's SyncBatchNorm runs on GPUs only, not on {device.type}; "
            "drop --sync-bn (each process then normalises over its own share of the batch)"
        )


def prepare_model(model: nn.Module, info: DistInfo, *, sync_bn: bool, compile: bool) -> nn.Module:
    """The module the training loop calls: `model` (already on info.device), with BatchNorm
    synchronised across ranks if asked, in DDP when there is more than one rank, compiled if
    asked. Its parameters are `model`'s own, so an optimizer built on `model` trains it, and
    checkpoint.unwrap(result) is `model`."""
    check_sync_bn(info.device, sync_bn)
    if sync_bn and info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.world_size > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    if compile:
        # After DDP, so that DDP's optimizer splits the graph at its gradient buckets.
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    while model is not None:
        if isinstance(model, DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)  # type: ignore[assignment]
    return None


@contextlib.contextmanager
def no_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """While `active`, DDP keeps the gradients of the forward and backward passes inside on
    this rank (accumulating micro-batches); the last micro-batch's backward all-reduces them
    all at once. A no-op for a model outside DDP."""
    ddp = _find_ddp(model) if active else None
    with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
        yield


def launch_prefix() -> list[str]:
    """The start of a command line that runs selfie as this process was: `selfie`, or under
    torchrun `torchrun --nproc_per_node=N -m selfie` (multi-node: with --nnodes and a
    placeholder for the rendezvous options, which the processes cannot see)."""
    if not launched_by_torchrun():
        return ["selfie"]
    world = _env_int("WORLD_SIZE") or 1
    local = _env_int("LOCAL_WORLD_SIZE") or world
    parts = ["torchrun"]
    if local != world:
        parts += [f"--nnodes={world // local}", "..."]
    return [*parts, f"--nproc_per_node={local}", "-m", "selfie"]
