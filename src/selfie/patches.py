"""Cut images into a grid of square patches, and draw the visible/masked split per image.

Shapes: B images, C channels, H = W image size, S patch size, G = H / S grid side,
N = G * G patches (row-major), V visible, M = N - V masked.
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C, S, S), patches in row-major grid order."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide image size {h}x{w}")
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, patch_size, patch_size)


def unpatchify(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, N, C, S, S) -> (B, C, G*S, G*S); the inverse of `patchify` on a square grid."""
    b, _, c, s, _ = patches.shape
    x = patches.reshape(b, grid, grid, c, s, s).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, grid * s, grid * s)


def sample_masks(
    batch: int,
    num_patches: int,
    num_visible: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw an independent random split for each image.

    Returns (visible, masked) index tensors of shapes (B, V) and (B, N - V), each sorted,
    disjoint, and together a permutation of range(N) in every row.
    """
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    order = noise.argsort(dim=1)
    visible = order[:, :num_visible].sort(dim=1).values
    masked = order[:, num_visible:].sort(dim=1).values
    return visible, masked
