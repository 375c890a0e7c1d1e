"""Selfie pretraining: assembles data, masks, model, loss and the training loop.

The same code runs in one process or under torchrun (see selfie.distributed): each rank trains
on its rows of the global batch, drawn exactly as the single process draws them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from selfie import distributed, knn, plots
from selfie.checkpoint import export_safetensors
from selfie.config import Config
from selfie.data.augment import normalize
from selfie.data.crops import PRETRAIN
from selfie.data.sampler import step_generator
from selfie.data.source import (
    BatchSource,
    TrainBatches,
    TrainPlan,
    data_facts,
    open_source,
    open_unlabelled,
)
from selfie.device import autocast, check_precision, place
from selfie.engine import Callback, StepResult, train_recipe
from selfie.errors import UserError
from selfie.losses import selfie_loss, top1_accuracy
from selfie.models.selfie import Selfie
from selfie.patches import sample_masks
from selfie.runfolder import RunOptions, open_run, resolve_config

log = logging.getLogger(__name__)

HELDOUT_IMAGES = 2000  # held-out images the pretext accuracy is measured on


def make_batch(
    images: torch.Tensor,
    batch_size: int,
    config: Config,
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator,
    rows: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `rows` of a global batch of `batch_size` images, already augmented (SPEC 3), as
    uint8 (R, C, H, W) on the device -> normalized channels_last images, visible (R, V) and
    masked (R, M) indices; masks drawn from `generator`.

    The masks are drawn for all B images, always in the same order, and only then cut to
    `rows` (a rank's share of the global batch, or a micro-batch): every row gets exactly
    the mask the single-process run gives it."""
    d = config.data
    n_vis = config.pretrain.num_visible(d.num_patches)
    visible, masked = sample_masks(batch_size, d.num_patches, n_vis, generator, images.device)
    x = normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
    return x, visible[rows], masked[rows]


def train_plan(config: Config, info: distributed.DistInfo, accum: int = 1) -> TrainPlan:
    """Pretraining's batches: all training images, this process's micro-batch rows."""
    p = config.pretrain
    shares = tuple(info.rows(p.batch_size, micro, accum) for micro in range(accum))
    return TrainPlan(p.batch_size, p.seed, p.steps, shares, crop=PRETRAIN)


def make_step_fn(
    model: nn.Module,
    config: Config,
    batches: TrainBatches,
    mean: torch.Tensor,
    std: torch.Tensor,
    info: distributed.DistInfo,
    accum: int = 1,
) -> Callable[..., StepResult]:
    """The pretraining step for TrainLoop: step_fn(step, micro) runs `model` on micro-batch
    `micro` of this rank's share of the step's global batch (`batches`, made from
    `train_plan`; crops and masks pure in (seed, step)) and returns the loss, the mean over
    its rows."""
    p = config.pretrain

    def step_fn(step: int, micro: int = 0) -> StepResult:
        g = step_generator(p.seed, step, mean.device)
        rows = info.rows(p.batch_size, micro, accum)
        images, _ = batches.get(step, rows, g)  # in-memory: augmented from g before the masks
        x, visible, masked = make_batch(images, p.batch_size, config, mean, std, g, rows)
        out = model(x, visible, masked)
        loss = selfie_loss(out.logits, out.targets)
        return StepResult(loss, {"pretext_acc": top1_accuracy(out.logits, out.targets)})

    return step_fn


@torch.no_grad()
def pretext_accuracy(
    model: Selfie,
    config: Config,
    source: BatchSource,
    indices: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    bf16: bool = False,
    batch_size: int = 256,
    augment: bool = True,
    seed: int = 1234,
    fp16: bool = False,
) -> float:
    """Top-1 pretext accuracy on held-out images (`indices` of `source`) in eval mode, with
    fixed masks and (if `augment`) the training augmentation, both drawn from `seed`."""
    was_training = model.training
    model.eval()
    device = mean.device
    g = step_generator(seed, 0, device, stream=2)
    correct, total = 0.0, 0
    for images, _ in source.eval_batches(device, batch_size, indices, g if augment else None):
        x, vis, masked = make_batch(images, len(images), config, mean, std, g)
        with autocast(device, bf16, fp16):
            out = model(x, vis, masked)
        correct += float(top1_accuracy(out.logits, out.targets)) * out.targets.numel()
        total += out.targets.numel()
    model.train(was_training)
    return correct / max(total, 1)


def _unlabelled_dir(opts: RunOptions, stored: dict[str, Any]) -> str | None:
    """--unlabelled-dir, or on resume the run's own (a different one is refused)."""
    if not opts.resume:
        return opts.unlabelled_dir
    own = stored.get("unlabelled_dir")
    if opts.unlabelled_dir is not None and opts.unlabelled_dir != own:
        pool = own or "the dataset's training split"
        raise UserError(
            f"--resume: the run pretrains on {pool}, not on "
            f"--unlabelled-dir {opts.unlabelled_dir}; drop --unlabelled-dir to continue it"
        )
    return own


def pretrain(config: Config | None, opts: RunOptions) -> dict[str, Any]:
    """Pretrain P and A on the training images (labels unused); returns the summary (on every
    rank under torchrun)."""
    config, stored = resolve_config(config, opts)
    unlabelled = _unlabelled_dir(opts, stored)
    info = distributed.init_from_env(opts.device)
    device = info.device
    check_precision(device, opts.bf16, opts.fp16)
    distributed.check_sync_bn(device, opts.sync_bn)
    d, p = config.data, config.pretrain
    distributed.split_batch(p.batch_size, info.world_size, opts.accum)
    # Rank 0 first: it alone downloads; the others then find the files. The held-out pretext
    # accuracy is measured on the labelled dataset's test split, also with --unlabelled-dir.
    train, heldout = distributed.main_first(
        lambda: (
            open_unlabelled(d, unlabelled, opts.data_dir, workers=opts.workers)
            if unlabelled is not None
            else open_source(
                d, "train", opts.data_dir, download=opts.download, workers=opts.workers
            ),
            open_source(d, "test", opts.data_dir, download=opts.download, workers=opts.workers),
        )
    )
    if p.batch_size > len(train):
        what = "unlabelled" if unlabelled is not None else "training"
        raise UserError(
            f"batch size {p.batch_size} exceeds the {len(train)} {what} images; lower --batch-size"
        )
    run = open_run(config, replace(opts, unlabelled_dir=unlabelled), {"data": data_facts(train)})
    if info.is_main:
        log.info("config: %s", json.dumps(config.to_dict()))

    batches = train.train_batches(train_plan(config, info, opts.accum), device)
    mean, std = train.mean.to(device), train.std.to(device)
    torch.manual_seed(p.seed)  # the same initial weights on every rank
    model = place(Selfie(config), device)
    distributed.seed_other_ranks(p.seed, info.rank)
    trained = distributed.prepare_model(model, info, sync_bn=opts.sync_bn, compile=opts.compile)
    n, n_vis = d.num_patches, p.num_visible(d.num_patches)
    callbacks = []
    if p.eval_every and knn.has_labels(train):
        monitor = knn.KnnMonitor(model.patch_net, train, p.seed, device, opts.bf16)
        callbacks.append(Callback(p.eval_every, monitor))

    last, train_seconds = train_recipe(
        model=model,
        trained=trained,
        step_fn=make_step_fn(trained, config, batches, mean, std, info, opts.accum),
        recipe=p,
        batch_size=p.batch_size,
        run=run,
        kind="pretrain",
        config=config.to_dict(),
        device=device,
        opts=opts,
        callbacks=callbacks,
    )
    batches.close()

    def finish() -> dict[str, Any]:
        """Export, evaluate on held-out images and write the summary: rank 0's work, on the
        plain model (no DDP, and no compiled graph to build for another shape)."""
        export_safetensors(model, run.path / "model.safetensors")
        held_idx = heldout.spread(HELDOUT_IMAGES)
        precision = {"bf16": opts.bf16, "fp16": opts.fp16}
        held = pretext_accuracy(model, config, heldout, held_idx, mean, std, **precision)
        held_plain = pretext_accuracy(
            model, config, heldout, held_idx, mean, std, augment=False, **precision
        )
        records = run.metrics()
        summary = {
            "kind": "pretrain",
            "preset": config.name,
            "steps": p.steps,
            "train_images": len(train),  # the unlabelled images pretrained on
            "unlabelled_dir": unlabelled,  # None: the training split of the dataset
            "masked_per_image": n - n_vis,
            "chance_pretext_acc": 1.0 / (n - n_vis),
            "final_loss": last.get("loss"),
            "final_pretext_acc": last.get("pretext_acc"),
            "final_knn_acc": last.get("knn_acc"),  # the kNN monitor (None when off)
            "heldout_pretext_acc": held,  # with the training augmentation
            "heldout_pretext_acc_unaugmented": held_plain,
            "heldout_images": len(held_idx),
            "mean_images_per_s": sum(r["images_per_s"] for r in records) / max(1, len(records)),
            "train_seconds_this_session": train_seconds,
            "device": str(device),
            "processes": info.world_size,
            "compile": opts.compile,
            **precision,
        }
        run.write_summary(summary)
        plots.pretext_curve(
            records,
            summary["chance_pretext_acc"],
            run.path / "pretext.png",
            class_chance=1.0 / len(train.classes),
        )
        return summary

    return distributed.broadcast_object(distributed.on_main(finish) or {})
