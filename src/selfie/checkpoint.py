"""Checkpoints that `torch.load(..., weights_only=True)` can read: tensors and primitives only,
with a format tag, written atomically; and safetensors export of the weights."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from selfie.errors import UserError

FORMAT = "selfie-checkpoint-v1"
_NAME = re.compile(r"step_(\d+)\.pt$")
_TEMP = re.compile(r"^\.step_\d+\.pt\.tmp$")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, so
    state-dict keys never carry their prefixes."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable: without this a power cut can forget the rename on
    some filesystems (ext4 without auto_da_alloc, XFS). A no-op where folders cannot be opened
    (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network, FUSE) refuse fsync on folders; the rename stands
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the
    folder: a crash at any instant leaves either the old file or the new one, never a torn one.
    On any failure (a full disk, an interrupt) the temporary file is removed and `path` is
    untouched; the OSError propagates for the caller to phrase."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never mask the original error (say ENOSPC) with one from the clean-up.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def describe_write_error(e: OSError) -> tuple[str, str]:
    """What went wrong and what to do, for one-line messages: ("disk full", "free space"), or
    the OS's own words (a permission, an I/O error) and a generic fix."""
    if e.errno == errno.ENOSPC:
        return "disk full", "free space"
    if e.errno == getattr(errno, "EDQUOT", None):
        return "disk quota exceeded", "free space"
    return e.strerror or str(e), "fix that"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:07d}.pt"


def checkpoint_step(path: Path) -> int:
    match = _NAME.search(path.name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_NNNNNNN.pt)")
    return int(match.group(1))


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.search(p.name)), key=checkpoint_step)


def prune_checkpoints(folder: Path, newest: int, keep: int) -> list[Path]:
    """Delete the checkpoints older than step `newest` beyond the `keep` newest (counting the
    one at `newest`); returns the deleted paths. Call only once `newest` is safely written.
    Checkpoints after `newest` (left by a run that resumed from an earlier one) are not
    touched: the resumed run overwrites them when it reaches their steps."""
    older = [p for p in list_checkpoints(folder) if checkpoint_step(p) < newest]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def remove_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files of saves that a crash (SIGKILL, power cut) cut short."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _verify_archive(path: Path) -> None:
    """torch.load does not check the zip's CRC-32s, so a flipped bit in a tensor would load as
    silently wrong weights; zipfile checks every member. Raises on any damage."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"checksum mismatch in {bad}")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True (a pickle payload is refused) and check the format tag.
    Any damage (truncation, a flipped bit, a foreign file) is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        _verify_archive(path)
    except Exception as e:  # zipfile raises a zoo of types on damaged headers
        raise UserError(
            f"{path} is not a loadable selfie checkpoint ({type(e).__name__}: truncated or "
            "corrupt); pass a file written by selfie"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        # torch's own message suggests weights_only=False: bad advice for an untrusted file.
        raise UserError(
            f"{path} is not a loadable selfie checkpoint ({type(e).__name__}: truncated, "
            "corrupt, or carrying pickled code, which is refused); pass a file written by selfie"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a selfie checkpoint (no '{FORMAT}' format tag)")
    return state


def export_safetensors(model: nn.Module, path: Path) -> None:
    """The weights alone, in safetensors (no code can ride along), written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    # Serialised here and written by atomic_write, so a full disk is an OSError we can phrase.
    data = safetensors_bytes(tensors, metadata={"format": "selfie-weights-v1"})
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        what, fix = describe_write_error(e)
        raise UserError(
            f"{what} while writing {path}; {fix} and run again with --resume (the training "
            "checkpoints are kept)"
        ) from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a run folder (its model.safetensors, else its newest checkpoint), a
    .safetensors file, or a selfie checkpoint (.pt)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            found = list_checkpoints(path / "checkpoints")
            if not found:
                raise UserError(f"{path} holds no model.safetensors and no checkpoints")
            path = found[-1]
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"weights not found: {path}")
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    state = load_checkpoint(path)
    return dict(state["model"])
