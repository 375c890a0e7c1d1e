"""The Selfie pretraining model (SPEC 1-2), split into small named steps.

Shapes: B images, N patches, V visible, M masked, D patch width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfie.config import Config
from selfie.models.attention_pool import AttentionPool
from selfie.models.position import PositionEmbedding
from selfie.models.resnet_v2 import ResNetV2
from selfie.patches import patchify


@dataclass
class SelfieOutput:
    logits: torch.Tensor  # (B, M, M): query j (a masked location) against masked patch k
    targets: torch.Tensor  # (B, M): the right patch for query j is k = j


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), index (B, K) -> (B, K, D)."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


class Selfie(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        m, d = config.model, config.data
        self.patch_size = d.patch_size
        self.patch_net = ResNetV2(m, num_stages=3)  # P: stem + stages 1-3 + BN-ReLU + GAP
        dim = self.patch_net.out_dim
        self.pool = AttentionPool(
            dim, m.attn_heads, m.attn_intermediate, m.attn_layers, m.attn_dropout
        )
        self.position = PositionEmbedding(d.grid, dim, m.position)

    def positions_at(self, index: torch.Tensor) -> torch.Tensor:
        """index (B, K) -> (B, K, D) position embeddings. A gather from the table expanded
        over the batch rather than `table[index]`: the latter's backward accumulates into
        shared rows from several threads, which made runs differ in the last bits."""
        table = self.position()
        return gather_rows(table.expand(index.shape[0], -1, -1), index)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D): every patch of every image through P in one batched call."""
        patches = patchify(images, self.patch_size)
        b, n = patches.shape[:2]
        flat = patches.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        return self.patch_net(flat).reshape(b, n, -1)

    def visible_tokens(self, h: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """h (B, N, D), visible (B, V) -> (B, V, D): A's input, the visible vectors plus
        their positions."""
        return gather_rows(h, visible) + self.positions_at(visible).to(h.dtype)

    def summarize(self, h: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """h (B, N, D), visible (B, V) -> u (B, D): A over the visible vectors plus positions."""
        return self.pool(self.visible_tokens(h, visible))

    def score(self, u: torch.Tensor, h: torch.Tensor, masked: torch.Tensor) -> SelfieOutput:
        """All masked locations at once: logits[b, j, k] = <u_b + pos_{m_j}, h_{b, m_k}>."""
        queries = u[:, None, :] + self.positions_at(masked).to(u.dtype)  # (B, M, D)
        keys = gather_rows(h, masked)  # (B, M, D)
        logits = torch.bmm(queries, keys.transpose(1, 2))  # (B, M, M)
        targets = torch.arange(masked.shape[1], device=masked.device).expand_as(masked)
        return SelfieOutput(logits=logits, targets=targets)

    def forward(
        self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor
    ) -> SelfieOutput:
        h = self.encode_patches(images)
        return self.score(self.summarize(h, visible), h, masked)
