"""Selfie pretraining: assembles data, masks, model, loss and the training loop."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from selfie import plots
from selfie.checkpoint import export_safetensors
from selfie.config import Config
from selfie.data import load_dataset
from selfie.data.augment import channel_stats, normalize, pad_crop_flip
from selfie.data.sampler import EpochSampler, step_generator
from selfie.device import place, resolve_device
from selfie.engine import StepResult, TrainLoop
from selfie.errors import UserError
from selfie.losses import selfie_loss, top1_accuracy
from selfie.models.selfie import Selfie
from selfie.optim import lr_at, make_sgd
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 (B, C, H, W) on the device -> normalized channels_last images, visible (B, V)
    and masked (B, M) indices; augmentation (SPEC 3) and masks drawn from `generator`."""
    d = config.data
    if augment:
        images = pad_crop_flip(images, d.pad, d.flip, generator)
    x = normalize(images, mean, std).contiguous(memory_format=torch.channels_last)
    n_vis = config.pretrain.num_visible(d.num_patches)
    visible, masked = sample_masks(len(x), d.num_patches, n_vis, generator, x.device)
    return x, visible, masked


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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, vis, masked)
        correct += float(top1_accuracy(out.logits, out.targets)) * out.targets.numel()
        total += out.targets.numel()
    model.train(was_training)
    return correct / max(total, 1)


def pretrain(config: Config | None, opts: RunOptions) -> dict[str, Any]:
    """Pretrain P and A on the training images (labels unused); returns the summary."""
    config, _ = resolve_config(config, opts)
    device = resolve_device(opts.device)
    train = load_dataset(
        config.data.dataset, "train", opts.data_dir, config.data.image_size, opts.download
    )
    heldout = load_dataset(config.data.dataset, "test", opts.data_dir, config.data.image_size)
    p = config.pretrain
    if p.batch_size > len(train):
        raise UserError(
            f"batch size {p.batch_size} exceeds the {len(train)} training images; "
            "lower --batch-size"
        )
    run = open_run(config, opts)
    log.info("config: %s", json.dumps(config.to_dict()))

    images = train.images.to(device)  # uint8, once; augmentation runs there, batched
    mean, std = (t.to(device) for t in channel_stats(train.images))
    torch.manual_seed(p.seed)
    model = place(Selfie(config), device)
    optimizer = make_sgd(model, p.lr, p.momentum, p.weight_decay)
    sampler = EpochSampler(len(train), p.batch_size, p.seed)
    n, n_vis = config.data.num_patches, p.num_visible(config.data.num_patches)

    def step_fn(step: int) -> StepResult:
        g = step_generator(p.seed, step, device)
        x, visible, masked = make_batch(
            images[sampler.batch(step).to(device)], config, mean, std, g
        )
        out = model(x, visible, masked)
        loss = selfie_loss(out.logits, out.targets)
        return StepResult(loss, {"pretext_acc": top1_accuracy(out.logits, out.targets)})

    loop = TrainLoop(
        model=model,
        optimizer=optimizer,
        step_fn=step_fn,
        lr_fn=lambda s: lr_at(s, p.lr, p.warmup_steps, p.steps),
        steps=p.steps,
        batch_size=p.batch_size,
        run=run,
        log_every=p.log_every,
        checkpoint_every=p.checkpoint_every,
        kind="pretrain",
        config=config.to_dict(),
        device=device,
        bf16=opts.bf16,
        progress=opts.progress,
    )
    start = loop.restore() if opts.resume else 0
    t0 = time.perf_counter()
    last = loop.run_steps(start)
    train_seconds = time.perf_counter() - t0
    export_safetensors(model, run.path / "model.safetensors")

    held_images = heldout.images[:2000].to(device)
    held = pretext_accuracy(model, config, held_images, mean, std, opts.bf16)
    held_plain = pretext_accuracy(model, config, held_images, mean, std, opts.bf16, augment=False)
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
        "bf16": opts.bf16,
    }
    run.write_summary(summary)
    plots.pretext_curve(records, summary["chance_pretext_acc"], run.path / "pretext.png")
    return summary
