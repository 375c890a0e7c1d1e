"""Weighted k-nearest-neighbour classification of frozen features, and the kNN monitor that
pretraining runs every `pretrain.eval_every` steps.

The weighting is that of the kNN monitor of InstDisc (Wu et al. 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination") as DINO's `eval_knn.py` uses it:
features are L2-normalised, a query's k most cosine-similar bank features vote for their
classes with weight exp(s / T), T = 0.07, and the class with the largest total wins.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from selfie import distributed
from selfie.data.sampler import derive_seed
from selfie.data.source import BatchSource
from selfie.evaluation import features

log = logging.getLogger(__name__)

TEMPERATURE = 0.07  # InstDisc's and DINO's T
MONITOR_K = 20
MONITOR_STREAM = 7  # derive_seed(seed, MONITOR_STREAM): the monitor's fixed sample
MONITOR_BANK = 2000  # labelled training images the queries are compared with, at most
MONITOR_QUERIES = 1000  # other training images classified, at most
CHUNK = 1024  # queries per similarity matrix


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """bank (N, D) with int64 (N,) labels, queries (Q, D) -> int64 (Q,) predicted classes by
    the weighted vote of each query's min(k, N) nearest bank features (module docstring)."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for part in queries.float().split(CHUNK):
        sims = F.normalize(part, dim=1) @ bank.T  # (q, N) cosine similarities
        top, idx = sims.topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(part), num_classes, dtype=top.dtype, device=top.device)
        votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    num_classes: int,
) -> float:
    predicted = knn_predict(bank, bank_labels, queries, k, num_classes)
    return float((predicted == query_labels).float().mean()) if len(query_labels) else 0.0


class KnnMonitor:
    """Called by the training loop every `eval_every` steps: the weighted kNN accuracy
    (k = MONITOR_K) of `net`'s features (P on whole images), classifying a fixed sample of
    training images against another fixed sample of training images (the bank), with their
    labels. The samples are drawn once from their own generator, never from the global RNG,
    and `net` runs in eval mode without gradients, so training draws the same random numbers
    with the monitor or without it, and a resumed run logs the same figures.

    Under torchrun rank 0 alone computes (the other ranks return {} at once and wait for it
    at the next step's collective); it reads the plain network, never the DDP wrapper."""

    def __init__(
        self,
        net: nn.Module,
        source: BatchSource,
        seed: int,
        device: torch.device,
        bf16: bool = False,
        batch_size: int = 500,
    ) -> None:
        self.net, self.source, self.device = net, source, device
        self.bf16, self.batch_size = bf16, batch_size
        self.num_classes = len(source.classes)
        g = torch.Generator().manual_seed(derive_seed(seed, MONITOR_STREAM))
        order = torch.randperm(len(source), generator=g)
        queries = min(MONITOR_QUERIES, len(source) // 3)
        self.queries = order[:queries].sort().values
        self.bank = order[queries : queries + MONITOR_BANK].sort().values
        self.mean, self.std = source.mean.to(device), source.std.to(device)

    def _features(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batches = self.source.eval_batches(self.device, self.batch_size, indices)
        return features(self.net, batches, self.mean, self.std, self.bf16)

    def __call__(self, step: int) -> dict[str, float]:
        if not distributed.is_main():
            return {}
        bank, bank_labels = self._features(self.bank)
        queries, query_labels = self._features(self.queries)
        acc = knn_accuracy(bank, bank_labels, queries, query_labels, MONITOR_K, self.num_classes)
        return {"knn_acc": acc}


def has_labels(source: BatchSource) -> bool:
    """A split with at least two classes (an unlabelled folder has one, "unlabelled")."""
    return len(source.classes) > 1
