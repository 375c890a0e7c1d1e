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

    def sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, V, D) -> (B, 1 + V, D): u0 prepended to the tokens."""
        u0 = self.u0.expand(tokens.shape[0], 1, -1).to(tokens.dtype)
        return torch.cat([u0, tokens], dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, V, D) tokens (vectors already plus positions) -> (B, D) summary u."""
        return self.encoder(self.sequence(tokens))[:, 0]

    def last_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, V, D) tokens -> (B, 1 + V): the attention weights of u0's query over the
        sequence [u0, tokens] in the last block, averaged over heads (eval mode: no dropout).

        The blocks before the last run as the encoder runs them; the last block's own
        self-attention (`self_attn`, an nn.MultiheadAttention) is then called once more on
        that block's input with need_weights=True. In the post-LN layout (norm_first=False)
        attention reads the block's input directly, so these are the weights the block's
        forward pass used."""
        x = self.sequence(tokens)
        layers = list(self.encoder.layers)
        for layer in layers[:-1]:
            x = layer(x)
        attn = layers[-1].self_attn
        _, weights = attn(x, x, x, need_weights=True, average_attn_weights=True)
        return weights[:, 0]  # (B, 1 + V): row 0 is u0's query
