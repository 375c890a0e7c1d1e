"""Selfie pretraining: assembles data, masks, model, loss and the training loop.

The same code runs in one process or under torchrun (see selfie.distributed): each rank trains
on its rows of the global batch, drawn exactly as the single process draws them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from selfie import distributed, plots
from selfie.checkpoint import export_safetensors
from selfie.config import Config
from selfie.data import load_dataset
from selfie.data.augment import channel_stats, normalize, pad_crop_flip
from selfie.data.sampler import EpochSampler, step_generator
from selfie.device import autocast, check_precision, place
from selfie.engine import StepResult, train_recipe
from selfie.errors import UserError
from selfie.losses import selfie_loss, top1_accuracy
from selfie.models.selfie import Selfie
from selfie.patches import sample_masks
from selfie.runfolder import RunOptions, open_run, resolve_config

log = logging.getLogger(__name__)


def make_batch(
    images: torch.Tensor,
    config: Config,
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator,
    augment: bool = True,
    rows: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 (B, C, H, W) on the device -> normalized channels_last images, visible (R, V)
    and masked (R, M) indices of the R images in `rows`; augmentation (SPEC 3) and masks drawn
    from `generator`.

    The random numbers are drawn for all B images, always in the same order, and only then
    cut to `rows` (a rank's share of the global batch, or a micro-batch): every row gets
    exactly the crop, flip and mask the single-process run gives it. Augmenting all B images
    costs a uint8 gather; only the R kept rows are normalised."""
    d = config.data
    if augment:
        images = pad_crop_flip(images, d.pad, d.flip, generator)
    n_vis = config.pretrain.num_visible(d.num_patches)
    visible, masked = sample_masks(len(images), d.num_patches, n_vis, generator, images.device)
    x = normalize(images[rows], mean, std).contiguous(memory_format=torch.channels_last)
    return x, visible[rows], masked[rows]


def make_step_fn(
    model: nn.Module,
    config: Config,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    info: distributed.DistInfo,
    accum: int = 1,
) -> Callable[..., StepResult]:
    """The pretraining step for TrainLoop: step_fn(step, micro) runs `model` on micro-batch
    `micro` of this rank's share of the step's global batch (EpochSampler and
    step_generator, both pure in (seed, step)) and returns the loss, the mean over its rows."""
    p = config.pretrain
    sampler = EpochSampler(len(images), p.batch_size, p.seed)

    def step_fn(step: int, micro: int = 0) -> StepResult:
        g = step_generator(p.seed, step, images.device)
        rows = info.rows(p.batch_size, micro, accum)
        batch = images[sampler.batch(step).to(images.device)]
        x, visible, masked = make_batch(batch, config, mean, std, g, rows=rows)
        out = model(x, visible, masked)
        loss = selfie_loss(out.logits, out.targets)
        return StepResult(loss, {"pretext_acc": top1_accuracy(out.logits, out.targets)})

    return step_fn


@torch.no_grad()
def pretext_accuracy(
    model: Selfie,
    config: Config,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    bf16: bool = False,
    batch_size: int = 256,
    augment: bool = True,
    seed: int = 1234,
    fp16: bool = False,
) -> float:
    """Top-1 pretext accuracy on held-out images in eval mode, with fixed masks and (if
    `augment`) the training augmentation, both drawn from `seed`."""
    was_training = model.training
    model.eval()
    device = images.device
    g = step_generator(seed, 0, device, stream=2)
    correct, total = 0.0, 0
    for start in range(0, len(images), batch_size):
        x, vis, masked = make_batch(
            images[start : start + batch_size], config, mean, std, g, augment
        )
        with autocast(device, bf16, fp16):
            out = model(x, vis, masked)
        correct += float(top1_accuracy(out.logits, out.targets)) * out.targets.numel()
        total += out.targets.numel()
    model.train(was_training)
    return correct / max(total, 1)


def pretrain(config: Config | None, opts: RunOptions) -> dict[str, Any]:
    """Pretrain P and A on the training images (labels unused); returns the summary (on every
    rank under torchrun)."""
    config, _ = resolve_config(config, opts)
    info = distributed.init_from_env(opts.device)
    device = info.device
    check_precision(device, opts.bf16, opts.fp16)
    distributed.check_sync_bn(device, opts.sync_bn)
    d, p = config.data, config.pretrain
    distributed.split_batch(p.batch_size, info.world_size, opts.accum)
    # Rank 0 first: it alone downloads; the others then find the files.
    train, heldout = distributed.main_first(
        lambda: (
            load_dataset(d.dataset, "train", opts.data_dir, d.image_size, opts.download),
            load_dataset(d.dataset, "test", opts.data_dir, d.image_size),
        )
    )
    if p.batch_size > len(train):
        raise UserError(
            f"batch size {p.batch_size} exceeds the {len(train)} training images; "
            "lower --batch-size"
        )
    run = open_run(config, opts)
    if info.is_main:
        log.info("config: %s", json.dumps(config.to_dict()))

    images = train.images.to(device)  # uint8, once; augmentation runs there, batched
    mean, std = (t.to(device) for t in channel_stats(train.images))
    torch.manual_seed(p.seed)  # the same initial weights on every rank
    model = place(Selfie(config), device)
    distributed.seed_other_ranks(p.seed, info.rank)
    trained = distributed.prepare_model(model, info, sync_bn=opts.sync_bn, compile=opts.compile)
    n, n_vis = d.num_patches, p.num_visible(d.num_patches)

    last, train_seconds = train_recipe(
        model=model,
        trained=trained,
        step_fn=make_step_fn(trained, config, images, mean, std, info, opts.accum),
        recipe=p,
        batch_size=p.batch_size,
        run=run,
        kind="pretrain",
        config=config.to_dict(),
        device=device,
        opts=opts,
    )

    def finish() -> dict[str, Any]:
        """Export, evaluate on held-out images and write the summary: rank 0's work, on the
        plain model (no DDP, and no compiled graph to build for another shape)."""
        export_safetensors(model, run.path / "model.safetensors")
        held_images = heldout.images[:2000].to(device)
        precision = {"bf16": opts.bf16, "fp16": opts.fp16}
        held = pretext_accuracy(model, config, held_images, mean, std, **precision)
        held_plain = pretext_accuracy(
            model, config, held_images, mean, std, augment=False, **precision
        )
        records = run.metrics()
        summary = {
            "kind": "pretrain",
            "preset": config.name,
            "steps": p.steps,
            "train_images": len(train),
            "masked_per_image": n - n_vis,
            "chance_pretext_acc": 1.0 / (n - n_vis),
            "final_loss": last.get("loss"),
            "final_pretext_acc": last.get("pretext_acc"),
            "heldout_pretext_acc": held,  # with the training augmentation
            "heldout_pretext_acc_unaugmented": held_plain,
            "heldout_images": min(2000, len(heldout)),
            "mean_images_per_s": sum(r["images_per_s"] for r in records) / max(1, len(records)),
            "train_seconds_this_session": train_seconds,
            "device": str(device),
            "processes": info.world_size,
            **precision,
        }
        run.write_summary(summary)
        plots.pretext_curve(records, summary["chance_pretext_acc"], run.path / "pretext.png")
        return summary

    return distributed.broadcast_object(distributed.on_main(finish) or {})
