"""A, the attention pooling network (SPEC 2): a learned u0 prepended to the sequence, 3
post-LN BERT blocks, and the output at u0's position is the summary u.

The blocks are PyTorch's own `nn.TransformerEncoderLayer` (norm_first=False is BERT's post-LN
layout, activation GELU, dropout on the attention weights and on each sublayer's output).
One difference from BERT: PyTorch also applies dropout after the GELU inside the
feed-forward sublayer.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionPool(nn.Module):
    def __init__(
        self, dim: int, heads: int, intermediate: int, layers: int, dropout: float
    ) -> None:
        super().__init__()
        self.u0 = nn.Parameter(torch.randn(dim) * 0.02)  # SPEC 7: one vector shared by all
        block = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=intermediate,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, V, D) tokens (vectors already plus positions) -> (B, D) summary u."""
        u0 = self.u0.expand(tokens.shape[0], 1, -1).to(tokens.dtype)
        return self.encoder(torch.cat([u0, tokens], dim=1))[:, 0]
