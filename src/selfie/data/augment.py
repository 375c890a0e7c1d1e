"""Batched augmentation and normalisation on uint8 image tensors, on any device.

Images stay uint8 (B, C, H, W) until the last step, so a batch moves to the accelerator as a
quarter of the bytes of float32, and every op here is one batched tensor op (no loop over
images), so it runs at the same speed on the CPU or a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_STATS_CHUNK = 2048  # images per chunk: 2048 x 3 x 32 x 32 as int64 is 50 MB


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) -> per-channel mean and std, each float32 (C,), in [0, 1] units.

    The std is the population std over all N*H*W pixels of a channel (the usual CIFAR-10
    figures 0.2470, 0.2435, 0.2616). Sums of x and x^2 are taken in int64, chunk by chunk:
    exact, and a float copy of all 50,000 CIFAR images (600 MB) is never made.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"need a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.int64, device=images.device)
    total_sq = torch.zeros(c, dtype=torch.int64, device=images.device)
    for chunk in images.split(_STATS_CHUNK):
        x = chunk.to(torch.int64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    # float64 on the CPU for the last step: some accelerators (MPS) have no float64.
    count = images.numel() // c
    mean = total.cpu().double() / count
    var = (total_sq.cpu().double() / count - mean * mean).clamp_min(0)
    # A channel that never varies (solid test images, a grey scan) would divide by zero:
    # its std is floored at one grey level, which leaves it at 0 after normalising.
    return (
        (mean / 255).float().to(images.device),
        (var.sqrt() / 255).clamp_min(1 / 255).float().to(images.device),
    )


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 (x / 255 - mean) / std, with mean and std of shape (C,).

    Only uint8 is accepted: a float batch would be ambiguous (0..1 or 0..255?), and dividing
    an already-scaled batch by 255 again fails silently.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    mean = mean.to(images.device, torch.float32).view(-1, 1, 1)
    std = std.to(images.device, torch.float32).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def pad_crop_flip(
    images: torch.Tensor,
    pad: int,
    flip: bool,
    generator: torch.Generator | None = None,
    mode: str = "zero",
) -> torch.Tensor:
    """Pad by `pad`, crop a random HxW window per image, mirror half of them if `flip`.
    The padding is zeros (mode "zero", the paper's) or the image mirrored at its edges (mode
    "reflect": no black border to give a crop's offset away).

    (B, C, H, W) -> (B, C, H, W), same dtype and device. The window offsets (oy, ox) are
    uniform in [0, 2 * pad]; each image is mirrored left-right with probability 1/2. Crop
    and mirror are one gather: output pixel (i, j) of image b reads padded pixel
    (oy[b] + i, ox[b] + j), with the column order reversed for mirrored images. Random
    numbers come from `generator` (on the images' device), so a seed reproduces the batch.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return images
    b, c, h, w = images.shape
    device = images.device
    fill = {"zero": "constant", "reflect": "reflect"}[mode]
    padded = F.pad(images, (pad, pad, pad, pad), mode=fill) if pad else images  # (B, C, H+2p, W+2p)

    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    rows = oy[:, None] + torch.arange(h, device=device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=device)  # (B, W)
    if flip:
        mirrored = torch.rand(b, generator=generator, device=device) < 0.5  # (B,)
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)

    # Flat index into each padded plane, shared by all channels: (B, H*W) -> (B, C, H*W).
    flat_idx = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(b, 1, h * w)
    out = padded.reshape(b, c, -1).gather(2, flat_idx.expand(b, c, h * w))
    return out.reshape(b, c, h, w)
