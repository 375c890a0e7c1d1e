"""Finetuning on a labelled subset, from Selfie-pretrained weights or from scratch (SPEC 2, 4, 5).

The test split is loaded only after training, for the final evaluation, and only by runs
that train on the whole labelled subset. Tuning runs (`validation=True`) hold out 10% of
the subset and report `val_acc`; they never load the test split at all.

Under torchrun each rank trains on its rows of the global batch (see selfie.distributed);
rank 0 alone writes the run folder and evaluates.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from selfie import distributed
from selfie.checkpoint import export_safetensors, load_weights
from selfie.config import Config
from selfie.data.augment import normalize
from selfie.data.crops import FINETUNE
from selfie.data.sampler import step_generator
from selfie.data.source import BatchSource, TrainPlan, data_facts, open_source
from selfie.data.subsets import (
    balanced_subset,
    class_counts,
    per_class_counts,
    read_subset_file,
    save_indices,
    split_validation,
)
from selfie.device import check_precision, place
from selfie.engine import StepResult, train_recipe
from selfie.errors import UserError
from selfie.evaluation import evaluate
from selfie.losses import top1_accuracy
from selfie.models.classifier import HEADS, build_classifier, transfer_pretrained
from selfie.runfolder import RunOptions, open_run, resolve_config

log = logging.getLogger(__name__)

EVAL_BATCH = 500  # images per forward pass when evaluating


@dataclass(frozen=True)
class FinetuneSpec:
    """What one finetuning run trains: which labels, which head, from which weights."""

    # A fraction of the training set or images per class (see subsets); None with subset_file.
    labels: float | int | None
    head: str = "resnet50"
    init: str | None = None  # pretrained weights (run folder, .safetensors or .pt); None: scratch
    validation: bool = False  # hold out finetune.val_fraction of the subset; report val_acc
    subset_file: str | None = None  # the labelled images named in a file, instead of `labels`

    def __post_init__(self) -> None:
        if (self.labels is None) == (self.subset_file is None):
            raise UserError("give one of --labels and --subset-file")

    @property
    def arm(self) -> str:
        return "scratch" if self.init is None else "pretrained"


def _labelled_subset(
    spec: FinetuneSpec, train: BatchSource, config: Config, stored: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
    """The labelled subset (sorted int64 (K,) positions in the training split), the count of
    each class in it, and for a subset file its record (path, sha256); a resumed run's file
    must be the one it started with."""
    d = config.data
    if spec.labels is not None:
        subset = balanced_subset(
            train.labels, spec.labels, d.num_classes, config.finetune.subset_seed
        )
        return subset, per_class_counts(train.labels, spec.labels, d.num_classes), None
    assert spec.subset_file is not None
    listed = read_subset_file(spec.subset_file, train.names, d.dataset)
    before = stored.get("subset_file")
    if before is not None and before["sha256"] != listed.record["sha256"]:
        raise UserError(
            f"--resume: {spec.subset_file} changed since the run started (sha256 "
            f"{before['sha256'][:12]}..., now {listed.record['sha256'][:12]}...); restore it"
        )
    return listed.indices, class_counts(train.labels, listed.indices, d.num_classes), listed.record


def finetune(config: Config | None, spec: FinetuneSpec | None, opts: RunOptions) -> dict[str, Any]:
    """Train a classifier on the labelled subset; returns the summary (also in summary.json).

    With opts.resume, `config` and `spec` may be None: the run's own are used. Under torchrun
    every rank returns rank 0's summary.
    """
    config, stored = resolve_config(config, opts)
    if opts.resume:
        spec = FinetuneSpec(**stored["finetune"])
    if spec is None:
        raise UserError("finetune needs --labels and --init or --scratch")
    if spec.head not in HEADS:
        raise UserError(f"unknown head '{spec.head}'; choose one of: {', '.join(HEADS)}")
    f, d = config.finetune, config.data
    info = distributed.init_from_env(opts.device)
    device = info.device
    check_precision(device, opts.bf16, opts.fp16)
    distributed.check_sync_bn(device, opts.sync_bn)
    # Rank 0 first: it alone downloads; the others then find the files.
    train = distributed.main_first(
        lambda: open_source(d, "train", opts.data_dir, download=opts.download, workers=opts.workers)
    )
    if len(train.classes) != d.num_classes:
        raise UserError(
            f"the data has {len(train.classes)} classes but data.num_classes is "
            f"{d.num_classes}; add --set data.num_classes={len(train.classes)}"
        )

    subset, per_class, listed = _labelled_subset(spec, train, config, stored)
    train_idx, val_idx = (
        split_validation(train.labels, subset, f.val_fraction, f.subset_seed)
        if spec.validation
        else (subset, subset[:0])
    )
    batch_size = min(f.batch_size, len(train_idx))
    if batch_size < f.batch_size and info.is_main:
        log.warning("batch size lowered to %d, the number of labelled images", batch_size)
    distributed.split_batch(batch_size, info.world_size, opts.accum)

    torch.manual_seed(f.seed)  # the scratch arm's initialisation depends on the seed too
    model = build_classifier(config, spec.head)
    if spec.init is not None:
        transfer_pretrained(model, spec.head, load_weights(spec.init), str(spec.init))
    model = place(model, device)
    distributed.seed_other_ranks(f.seed, info.rank)
    trained = distributed.prepare_model(model, info, sync_bn=opts.sync_bn, compile=opts.compile)

    meta = {"subset_file": listed} if listed else {}
    run = open_run(
        config,
        opts,
        {"finetune": asdict(spec), "data": data_facts(train), **meta},
        on_open=lambda r: save_indices(
            r.path / "subset.json", meta, train=train_idx, val=val_idx, labelled_per_class=per_class
        ),
    )

    shares = tuple(info.rows(batch_size, micro, opts.accum) for micro in range(opts.accum))
    plan = TrainPlan(batch_size, f.seed, f.steps, shares, pool=train_idx, crop=FINETUNE)
    batches = train.train_batches(plan, device)  # draws from the labelled images only
    mean, std = train.mean.to(device), train.std.to(device)

    def step_fn(step: int, micro: int = 0) -> StepResult:
        # Augmentation is drawn for the whole global batch, then cut to this micro-batch of
        # this rank's share: every row is augmented as in the single-process run.
        g = step_generator(f.seed, step, device)
        x, y = batches.get(step, info.rows(batch_size, micro, opts.accum), g)
        x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
        logits = trained(x)
        return StepResult(F.cross_entropy(logits.float(), y), {"acc": top1_accuracy(logits, y)})

    last, seconds = train_recipe(
        model=model,
        trained=trained,
        step_fn=step_fn,
        recipe=f,
        batch_size=batch_size,
        run=run,
        kind="finetune",
        config=config.to_dict(),
        device=device,
        opts=opts,
    )
    batches.close()

    def finish() -> dict[str, Any]:
        """Export, evaluate and write the summary: rank 0's work, on the plain model."""
        export_safetensors(model, run.path / "model.safetensors")
        precision = {"bf16": opts.bf16, "fp16": opts.fp16}
        summary: dict[str, Any] = {
            "kind": "finetune",
            "preset": config.name,
            **asdict(spec),
            "arm": spec.arm,
            "seed": f.seed,
            "lr": f.lr,
            "steps": f.steps,
            "labelled_per_class": per_class.tolist(),  # the subset's count of each class
            **meta,  # the subset file's path and sha256
            "train_images": len(train_idx),
            "fraction": len(subset) / len(train),
            "final_loss": last.get("loss"),
            "final_train_acc": last.get("acc"),
            "train_seconds_this_session": seconds,
            "device": str(device),
            "processes": info.world_size,
            "compile": opts.compile,
            **precision,
        }
        if spec.validation:
            summary["val_images"] = len(val_idx)
            val = train.eval_batches(device, EVAL_BATCH, val_idx)
            summary["val_acc"] = evaluate(model, val, mean, std, **precision)
        else:
            # The test split's first use: after training, for the final figure only.
            test = open_source(d, "test", opts.data_dir, workers=opts.workers)
            summary["test_images"] = len(test)
            summary["test_acc"] = evaluate(
                model, test.eval_batches(device, EVAL_BATCH), mean, std, **precision
            )
        run.write_summary(summary)
        return summary

    return distributed.broadcast_object(distributed.on_main(finish) or {})
