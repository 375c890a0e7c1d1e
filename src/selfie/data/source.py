"""Where pretraining and finetuning take their batches from: one split of a dataset.

Two kinds of split give batches the same way (the `BatchSource` protocol):

- `MemorySource`: an `ImageSet` held whole in memory (cifar10, digits, folder, imagenet32).
  The training images go to the device once; each step gathers its global batch there and
  augments it with `pad_crop_flip`, drawing from the step's generator before the masks are
  drawn, exactly as the code before this module did, so runs reproduce bitwise.
- `StreamSource` (selfie.data.stream): files decoded batch by batch in DataLoader workers
  (imagenet224), each image cropped and flipped in the worker from its own seed.

Training goes through `source.train_batches(plan, device)`, whose `get(step, rows, generator)`
returns rows `rows` of step `step`'s global batch (EpochSampler over `plan.pool`), augmented,
as uint8 (R, C, S, S) images and int64 (R,) labels on the device. Evaluation goes through
`source.eval_batches(...)`, an iterator of such pairs without augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch

from selfie.config import DataConfig
from selfie.data import STREAMED_DATASETS, ImageSet, load_dataset
from selfie.data.augment import channel_stats, pad_crop_flip
from selfie.data.sampler import EpochSampler
from selfie.errors import UserError

log = logging.getLogger(__name__)

NAMED_DATASETS = ("folder", *STREAMED_DATASETS)  # read from files: images have names

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 (R, C, S, S) and int64 (R,), on the device


@dataclass(frozen=True)
class TrainPlan:
    """What a run trains on, so that a streamed source can decode ahead of the loop."""

    batch_size: int  # B: the global batch, over all processes
    seed: int  # of the data order and the augmentation
    steps: int  # the run's steps: batches are planned from the start step up to here
    # The rows of the global batch this process asks for each step, in the order it asks
    # (one slice per micro-batch; see DistInfo.rows).
    shares: tuple[slice, ...] = (slice(None),)
    pool: torch.Tensor | None = None  # int64 (K,): the images to draw from; None: all
    crop: str = "pretrain"  # the streamed training crop: "pretrain" or "finetune" (crops.py)


class TrainBatches(Protocol):
    def get(self, step: int, rows: slice, generator: torch.Generator) -> Batch:
        """Rows `rows` of step `step`'s augmented global batch, on the device."""
        ...

    def close(self) -> None:
        """Let go of workers and device memory; `get` must not be called afterwards."""
        ...


class BatchSource(Protocol):
    classes: tuple[str, ...]
    labels: torch.Tensor  # int64 (N,), CPU: every image's label (subsets are drawn from them)

    def __len__(self) -> int: ...

    @property
    def names(self) -> Sequence[str] | None:
        """Each image's file as a "/"-joined path relative to the split folder, for datasets
        read from files (folder, imagenet224); None for the others."""
        ...

    @property
    def mean(self) -> torch.Tensor:
        """float32 (C,), CPU, in [0, 1] units: the normalisation's channel mean."""
        ...

    @property
    def std(self) -> torch.Tensor: ...

    def train_batches(self, plan: TrainPlan, device: torch.device) -> TrainBatches: ...

    def eval_batches(
        self,
        device: torch.device,
        batch_size: int,
        indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        """The images at `indices` (None: all) in order, `batch_size` at a time, unaugmented;
        with a `generator`, augmented as pretraining does, drawn from it."""
        ...

    def spread(self, count: int) -> torch.Tensor:
        """Positions of at most `count` images to estimate a held-out figure on."""
        ...


class MemorySource:
    """An ImageSet as a BatchSource; augmentation is pad_crop_flip(pad, flip, pad_mode) on the
    device."""

    def __init__(self, data: ImageSet, pad: int, flip: bool, pad_mode: str = "zero") -> None:
        self.data, self.pad, self.flip, self.pad_mode = data, pad, flip, pad_mode
        self.classes, self.labels = data.classes, data.labels

    def __len__(self) -> int:
        return len(self.data)

    @property
    def names(self) -> Sequence[str] | None:
        return self.data.names

    @cached_property
    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_stats(self.data.images)  # computed once, and only when asked for

    @property
    def mean(self) -> torch.Tensor:
        return self._stats[0]

    @property
    def std(self) -> torch.Tensor:
        return self._stats[1]

    def train_batches(self, plan: TrainPlan, device: torch.device) -> MemoryBatches:
        return MemoryBatches(self, plan, device)

    def eval_batches(
        self,
        device: torch.device,
        batch_size: int,
        indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        images, labels = self.data.images, self.data.labels
        if indices is not None:
            images, labels = images[indices], labels[indices]
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            if generator is not None:  # lazily, so it draws in turn with the caller's masks
                x = pad_crop_flip(x, self.pad, self.flip, generator, self.pad_mode)
            yield x, labels[start : start + batch_size].to(device)

    def spread(self, count: int) -> torch.Tensor:
        return torch.arange(min(count, len(self)))  # the split's own order (CIFAR: shuffled)


class MemoryBatches:
    """Global batch gathered on the device, augmented whole, then cut to the rows asked for:
    every row gets the crop and flip the single-process run gives it."""

    def __init__(self, source: MemorySource, plan: TrainPlan, device: torch.device) -> None:
        pool = torch.arange(len(source)) if plan.pool is None else plan.pool
        self.sampler = EpochSampler(len(pool), plan.batch_size, plan.seed)
        self.source, self.device = source, device
        self.images = source.data.images.to(device)  # uint8, once
        self.labels = source.labels.to(device)
        self.pool = pool.to(device)

    def get(self, step: int, rows: slice, generator: torch.Generator) -> Batch:
        idx = self.pool[self.sampler.batch(step).to(self.device)]  # (B,)
        s = self.source
        x = pad_crop_flip(self.images[idx], s.pad, s.flip, generator, s.pad_mode)
        return x[rows], self.labels[idx[rows]]

    def close(self) -> None:
        del self.images, self.labels  # the device copy; the source keeps the CPU one


def open_source(
    data: DataConfig,
    split: str,
    data_dir: str | Path | None,
    *,
    download: bool = False,
    workers: int | None = None,
) -> BatchSource:
    """Split "train" or "test" of dataset data.dataset at data.image_size: streamed from its
    files (STREAMED_DATASETS; `workers` decoding processes, None: as many as CPUs, at most 8)
    or loaded whole by `load_dataset` and augmented with data.pad and data.flip."""
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: give 0 (decode in this process) or more")
    if data.dataset in STREAMED_DATASETS:
        from selfie.data.stream import open_stream

        return open_stream(
            data.dataset, split, data_dir, data.image_size, flip=data.flip, workers=workers
        )
    if workers is not None and split == "train":
        log.warning(
            "--workers %d: %s is held in memory, not streamed; the flag is for %s",
            workers,
            data.dataset,
            ", ".join(STREAMED_DATASETS),
        )
    images = load_dataset(data.dataset, split, data_dir, data.image_size, download)
    return MemorySource(images, data.pad, data.flip, data.pad_mode)


def train_names(data: DataConfig, data_dir: str | Path | None) -> list[str] | None:
    """The training split's file names (BatchSource.names) from the folder's listing alone,
    before anything is decoded; None for datasets without file names."""
    if data.dataset not in NAMED_DATASETS:
        return None
    if data_dir is None:
        raise UserError(f"dataset {data.dataset!r} needs --data-dir DIR, the folder of images")
    from selfie.data.folder import scan_folder

    return scan_folder(data_dir).names("train")


def open_unlabelled(
    data: DataConfig,
    unlabelled_dir: str | Path,
    data_dir: str | Path | None,
    *,
    workers: int | None = None,
) -> BatchSource:
    """Every image under `unlabelled_dir`, at any depth and without labels (`--unlabelled-dir`),
    as a training split for pretraining: streamed as data.dataset's files are (imagenet224,
    pretraining's crop) or decoded whole as image folders are (centre square at image_size),
    then augmented with data.pad and data.flip. Refused when the folder holds the test split
    of the labelled image folder at `data_dir`: pretraining must not see the test images."""
    from selfie.data import folder

    if data.dataset in NAMED_DATASETS and data_dir is not None:
        _refuse_test_images(Path(unlabelled_dir), Path(data_dir))
    if data.dataset in STREAMED_DATASETS:
        from selfie.data.stream import open_unlabelled_stream

        return open_unlabelled_stream(
            unlabelled_dir, data.image_size, flip=data.flip, workers=workers
        )
    if workers is not None:
        log.warning("--workers %d: unlabelled images are held in memory, not streamed", workers)
    images = folder.load_unlabelled(unlabelled_dir, data.image_size)
    return MemorySource(images, data.pad, data.flip, data.pad_mode)


def _refuse_test_images(unlabelled: Path, data_dir: Path) -> None:
    """The test images of the image folder at data_dir lie in its test/ (or val/) folder, or
    among its training images when held out of them (selfie.data.folder's rules)."""
    from selfie.data.folder import own_test_folder

    if not unlabelled.is_dir() or not data_dir.is_dir():
        return  # the loaders say what is missing
    train = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    own = own_test_folder(data_dir) if train != data_dir else None
    test = (own or train).resolve()
    pool = unlabelled.resolve()
    if pool == test or pool in test.parents or test in pool.parents:
        where = f"its test images ({test})" if own else f"the test images held out of {test}"
        raise UserError(
            f"--unlabelled-dir {unlabelled} overlaps {where}, and pretraining must not see the "
            "test images; point it at a folder without them (e.g. the train/ folder, or a "
            "separate pool)"
        )


def eval_crop(data: DataConfig) -> str | None:
    """How a run's evaluation decoded an image file, for `folder.decode_images(crop=...)`: the
    streamed datasets' evaluation crop (crops.EVAL: shorter side to S * 256 / 224, centre S x
    S), or None, the centred square every in-memory image folder is decoded with."""
    if data.dataset in STREAMED_DATASETS:
        from selfie.data.crops import EVAL

        return EVAL
    return None


def data_facts(source: BatchSource) -> dict[str, Any]:
    """What a run records of its training split (in config.json's "run" section, as "data"),
    so that its model can be used without the data: class names and the normalisation."""
    return {
        "classes": list(source.classes),
        "mean": [float(v) for v in source.mean],
        "std": [float(v) for v in source.std],
    }


__all__ = [
    "BatchSource",
    "MemorySource",
    "TrainBatches",
    "TrainPlan",
    "data_facts",
    "eval_crop",
    "open_source",
    "open_unlabelled",
    "train_names",
]
