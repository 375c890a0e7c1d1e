"""The one evaluation path: a network in eval mode over batches of uint8 images.

Finetuning's test and validation accuracy, `selfie predict`, `selfie embed`, `selfie probe`
and the kNN monitor of pretraining all run their networks through `forward_batches`, so the
images are normalised, laid out and cast exactly as in training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from selfie.data.augment import normalize
from selfie.device import autocast

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 (B, C, H, W) images, int64 (B,) labels


@torch.no_grad()
def forward_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    mean: torch.Tensor,
    std: torch.Tensor,
    bf16: bool = False,
    fp16: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each batch of uint8 (B, C, H, W) images and (B,) labels on the device: the
    model's float32 (B, ...) outputs in eval mode, and the labels. The model's mode is put
    back when the iteration ends (or is abandoned)."""
    was_training = model.training
    model.eval()
    try:
        for images, labels in batches:
            x = normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
            with autocast(images.device, bf16, fp16):
                out = model(x)
            yield out.float(), labels
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    mean: torch.Tensor,
    std: torch.Tensor,
    bf16: bool = False,
    fp16: bool = False,
) -> float:
    """Top-1 accuracy of a classifier over `batches` (a BatchSource's eval_batches)."""
    correct, total = 0, 0
    for logits, labels in forward_batches(model, batches, mean, std, bf16, fp16):
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return correct / max(1, total)


def features(
    model: nn.Module,
    batches: Iterable[Batch],
    mean: torch.Tensor,
    std: torch.Tensor,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All outputs of `model` (a feature extractor) concatenated: float32 (N, D) on the CPU,
    and the (N,) labels."""
    outs, labels = [], []
    for out, y in forward_batches(model, batches, mean, std, bf16):
        outs.append(out.cpu())
        labels.append(y.cpu())
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(outs), torch.cat(labels)
