"""The one way to open a finished run folder and rebuild its network from config.json.

A run folder is a pretraining run (the Selfie model: P, A, positions) or a finetuning run
(a classifier of head "resnet50" or "attention"). Its weights come from model.safetensors,
else its newest checkpoint, or from the file given (a run's model.safetensors or a
checkpoint inside it); they load with strict key checks, so a file of another architecture
is a one-line error, never a half-loaded network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfie.checkpoint import list_checkpoints, load_weights
from selfie.config import Config, config_from_dict, validate
from selfie.data.source import data_facts, open_source
from selfie.device import place, resolve_device
from selfie.errors import UserError
from selfie.models.classifier import build_classifier
from selfie.models.selfie import Selfie

KINDS = ("pretrain", "finetune")


@dataclass
class TrainedRun:
    """A run folder with its network rebuilt, in eval mode, on `device`."""

    path: Path  # the run folder
    kind: str  # "pretrain" or "finetune"
    config: Config
    head: str | None  # the finetuning head; None for a pretraining run
    model: nn.Module  # Selfie (pretrain) or the classifier (finetune)
    classes: tuple[str, ...]  # the class names of the training data
    mean: torch.Tensor  # float32 (C,) on the device: the normalisation of training
    std: torch.Tensor
    data_dir: str | None  # the data folder the run trained on
    device: torch.device
    weights: Path  # the file the weights came from

    def summary(self) -> dict[str, Any]:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def backbone(self) -> nn.Module:
        """The network whose pooled features `embed` and `probe` use: P for a pretraining run
        (applied to whole images, as finetuning applies the stages it transfers), the
        finetuned network up to its classifier for a finetuning run."""
        if self.kind == "pretrain":
            assert isinstance(self.model, Selfie)
            return self.model.patch_net
        return PooledFeatures(self.model)


class PooledFeatures(nn.Module):
    """A classifier's `features` (its input to the final linear layer) as forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)  # type: ignore[operator]


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(run folder, weights file or None for the folder's own)."""
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run folder (or its model.safetensors)")
    if path.is_dir():
        return path, None
    folder = path.parent
    if folder.name == "checkpoints":  # RUN/checkpoints/step_NNNNNNN.pt
        folder = folder.parent
    return folder, path


def open_trained(
    path: str | Path, device: str = "auto", expect: str | None = None, what: str = ""
) -> TrainedRun:
    """Open the run at `path` (a run folder, its model.safetensors or one of its
    checkpoints) on `device`. `expect` "pretrain" or "finetune" refuses the other kind with
    a message naming `what` (the command) and the kind it needs."""
    folder, weights_file = _locate(Path(path))
    if (folder / "experiment.json").is_file():
        raise UserError(
            f"{folder} is an experiment folder; pass one of its runs: {folder / 'pretrain'} "
            f"(the pretraining run) or a folder under {folder / 'runs'} (a finetuning run)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{folder} holds no config.json, so it is not a selfie run folder; pass the folder "
            "that `selfie pretrain` or `selfie finetune` wrote"
        )
    try:
        saved = json.loads(config_path.read_text())
        config = validate(config_from_dict(saved["config"]))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{config_path} is not a readable run config ({e})") from None
    run_section: dict[str, Any] = saved.get("run", {})
    kind = "finetune" if "finetune" in run_section else "pretrain"
    if expect is not None and kind != expect:
        needs = (
            "a finetuning run (selfie finetune)"
            if expect == "finetune"
            else ("a pretraining run (selfie pretrain)")
        )
        raise UserError(f"{folder} is a {kind} run; `selfie {what}` needs {needs}")
    head = run_section["finetune"].get("head", "resnet50") if kind == "finetune" else None
    model = Selfie(config) if head is None else build_classifier(config, head)
    weights = weights_file or _own_weights(folder)
    state = load_weights(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(
            f"{weights} does not fit the network of {config_path} ({first}); pass the "
            "weights of this run"
        ) from None
    dev = resolve_device(device)
    model = place(model, dev).eval()
    data_dir = run_section.get("data_dir")
    facts = run_section.get("data") or _facts_from_data(config, data_dir)
    return TrainedRun(
        path=folder,
        kind=kind,
        config=config,
        head=head,
        model=model,
        classes=tuple(facts["classes"]),
        mean=torch.tensor(facts["mean"], dtype=torch.float32, device=dev),
        std=torch.tensor(facts["std"], dtype=torch.float32, device=dev),
        data_dir=data_dir,
        device=dev,
        weights=weights,
    )


def _own_weights(folder: Path) -> Path:
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    found = list_checkpoints(folder / "checkpoints")
    if not found:
        raise UserError(
            f"{folder} holds no model.safetensors and no checkpoints: the run has not saved "
            "weights yet"
        )
    return found[-1]


def _facts_from_data(config: Config, data_dir: str | None) -> dict[str, Any]:
    """Runs made before config.json recorded "data": measure them on the training split."""
    return data_facts(open_source(config.data, "train", data_dir))
