"""Checkpoints that `torch.load(..., weights_only=True)` can read: tensors and primitives only,
with a format tag, written atomically; and safetensors export of the weights."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfie.errors import UserError

FORMAT = "selfie-checkpoint-v1"
_NAME = re.compile(r"step_(\d+)\.pt$")


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


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at
    any instant leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:07d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.search(p.name)]
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))  # type: ignore[union-attr]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True (a pickle payload is refused) and check the format tag."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        # torch's own message suggests weights_only=False: bad advice for an untrusted file.
        raise UserError(
            f"{path} is not a loadable selfie checkpoint ({type(e).__name__}: truncated, "
            "corrupt, or carrying pickled code, which is refused); pass a file written by selfie"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a selfie checkpoint (no '{FORMAT}' format tag)")
    return state


def export_safetensors(model: nn.Module, path: Path) -> None:
    """The weights alone, in safetensors (no code can ride along)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "selfie-weights-v1"})
    os.replace(tmp, path)


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
