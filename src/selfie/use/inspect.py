"""`selfie inspect`: what a pretraining run's model does on a few images (the paper's
Figures 1 and 2, from a real run).

One row per image, with a mask drawn from a fixed seed (the run's visible fraction):
1. the image, its masked locations outlined;
2. the candidates: the image's masked patches, in the order the model scores them;
3. the model's pick for each masked location pasted into the image, outlined green where it
   is the right patch and red where it is another candidate;
4. where u0 attends among the visible patches in A's last block: u0's attention weights
   (averaged over heads) drawn over the visible patches (AttentionPool.last_attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfie import plots
from selfie.data.augment import normalize
from selfie.data.sampler import step_generator
from selfie.errors import UserError
from selfie.models.selfie import Selfie
from selfie.patches import patchify, sample_masks
from selfie.use.images import open_input
from selfie.use.run import TrainedRun, open_trained

MASK_SEED = 2019  # the masks of the figure


@dataclass
class Inspection:
    images: torch.Tensor  # uint8 (B, C, H, W), CPU
    visible: torch.Tensor  # (B, V) patch indices
    masked: torch.Tensor  # (B, M)
    picks: torch.Tensor  # (B, M): for masked location j, the candidate k the model chose
    attention: torch.Tensor  # (B, V): u0's last-block attention over the visible patches
    attention_self: torch.Tensor  # (B,): u0's attention to itself

    @property
    def right(self) -> int:
        return int((self.picks == torch.arange(self.picks.shape[1])).sum())


@torch.no_grad()
def look(run: TrainedRun, images: torch.Tensor, seed: int = MASK_SEED) -> Inspection:
    """The model's picks and u0's attention on uint8 (B, C, H, W) images, eval mode."""
    model = run.model
    assert isinstance(model, Selfie)
    d, p = run.config.data, run.config.pretrain
    g = step_generator(seed, 0, images.device)
    visible, masked = sample_masks(
        len(images), d.num_patches, p.num_visible(d.num_patches), g, images.device
    )
    x = normalize(images, run.mean, run.std).contiguous(memory_format=torch.channels_last)
    h = model.encode_patches(x)
    out = model.score(model.summarize(h, visible), h, masked)
    weights = model.pool.last_attention(model.visible_tokens(h, visible))  # (B, 1 + V)
    return Inspection(
        images=images.cpu(),
        visible=visible.cpu(),
        masked=masked.cpu(),
        picks=out.logits.argmax(-1).cpu(),
        attention=weights[:, 1:].float().cpu(),
        attention_self=weights[:, 0].float().cpu(),
    )


def _box(ax, index: int, grid: int, size: int, color: str, width: float = 2.0) -> None:
    from matplotlib.patches import Rectangle

    r, c = divmod(index, grid)
    ax.add_patch(
        Rectangle((c * size - 0.5, r * size - 0.5), size, size, fill=False, color=color, lw=width)
    )


def draw(result: Inspection, patch_size: int, out: Path, names: list[str]) -> None:
    plt = plots.plt
    n = len(result.images)
    grid = result.images.shape[-1] // patch_size
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    titles = ("masked locations", "candidates (masked patches)", "model's pick", "u0 attends")
    for col, title in enumerate(titles):
        axes[0, col].set_title(title)
    for i in range(n):
        img = result.images[i].permute(1, 2, 0).numpy()  # (H, W, 3)
        patches = patchify(result.images[i : i + 1], patch_size)[0]  # (N, C, S, S)
        masked = result.masked[i].tolist()
        ax = axes[i, 0]
        shown = img.copy()
        for m in masked:
            r, c = divmod(m, grid)
            shown[
                r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size
            ] //= 4
        ax.imshow(shown)
        for m in masked:
            _box(ax, m, grid, patch_size, "yellow")
        ax.set_ylabel(names[i], fontsize=8)
        # The candidates side by side, numbered in scoring order.
        strip = torch.cat([patches[m] for m in masked], dim=2).permute(1, 2, 0).numpy()
        axes[i, 1].imshow(strip)
        for k in range(len(masked)):
            axes[i, 1].text(k * patch_size + 1, 1, str(k), color="yellow", va="top", fontsize=8)
        # Each masked location filled with the candidate the model picked.
        filled = img.copy()
        ax = axes[i, 2]
        for j, m in enumerate(masked):
            k = int(result.picks[i, j])
            r, c = divmod(m, grid)
            tile = patches[masked[k]].permute(1, 2, 0).numpy()
            filled[r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size] = (
                tile
            )
        ax.imshow(filled)
        for j, m in enumerate(masked):
            _box(ax, m, grid, patch_size, "lime" if int(result.picks[i, j]) == j else "red")
        # u0's attention over the visible patches, as a heat map on the patch grid.
        heat = np.full((grid, grid), np.nan)
        for v, w in zip(result.visible[i].tolist(), result.attention[i].tolist(), strict=True):
            heat[divmod(v, grid)] = w
        ax = axes[i, 3]
        ax.imshow(img, alpha=0.5)
        size = grid * patch_size
        extent = (-0.5, size - 0.5, size - 0.5, -0.5)
        weights = result.attention[i]
        ax.imshow(heat, cmap="magma", alpha=0.6, extent=extent, interpolation="nearest")
        for m in masked:
            _box(ax, m, grid, patch_size, "yellow", width=1.0)
        ax.set_xlabel(
            f"visible {float(weights.min()):.2f}-{float(weights.max()):.2f} (bright: more), "
            f"u0 itself {float(result.attention_self[i]):.2f}",
            fontsize=8,
        )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def inspect_run(
    run_path: str | Path,
    out: str | Path,
    data_dir: str | None = None,
    n: int = 8,
    device: str = "auto",
) -> tuple[Inspection, Path]:
    if n < 1:
        raise UserError(f"--n {n}: give at least 1 image")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: give a file name ending in .png")
    run = open_trained(run_path, device, expect="pretrain", what="inspect")
    source = open_input(run, data_dir)
    names: list[str] = []
    chunks: list[torch.Tensor] = []
    for batch in source.batches(run, n, progress=False):
        take = n - len(names)
        names += batch.names[:take]
        chunks.append(batch.images[:take])
        if len(names) >= n:
            break
    if not names:
        raise UserError(f"none of the images of {source.description} decoded")
    result = look(run, torch.cat(chunks))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        draw(result, run.config.data.patch_size, out, names)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); choose another --out") from None
    return result, out
