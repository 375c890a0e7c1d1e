"""Learned position embeddings for a G x G patch grid (SPEC 2).

"cell": one vector per cell (the 4x4 grid of 32-px images, 16 vectors).
"rowcol": G row vectors + G column vectors, summed (the 7x7 grid of 224-px images; fewer
parameters, better regularised).
"""

from __future__ import annotations

import torch
from torch import nn


class PositionEmbedding(nn.Module):
    def __init__(self, grid: int, dim: int, kind: str = "cell") -> None:
        super().__init__()
        self.grid, self.kind = grid, kind
        if kind == "cell":
            self.cell = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        elif kind == "rowcol":
            self.row = nn.Parameter(torch.randn(grid, dim) * 0.02)
            self.col = nn.Parameter(torch.randn(grid, dim) * 0.02)
        else:
            raise ValueError(f"unknown position embedding '{kind}'")

    def forward(self) -> torch.Tensor:
        """The (N, D) table, row-major like `patchify`."""
        if self.kind == "cell":
            return self.cell
        return (self.row[:, None, :] + self.col[None, :, :]).flatten(0, 1)
