"""Streamed datasets: class-folder trees decoded batch by batch in DataLoader worker processes.

`--dataset imagenet224` is ImageNet in the class-folder layout, `ROOT/train/<class>/*.JPEG`
and `ROOT/val/<class>/*.JPEG` (or `test/`): 1.28M training images, far too many to hold in
memory as an ImageSet. Files, splits and labels follow selfie.data.folder's rules
(`scan_folder`: sorted class folder names are the classes); the pixels are decoded only when
a batch needs them, in `workers` processes (default: the CPUs this process may use, at most
MAX_WORKERS), a few batches ahead of the training loop, and pinned for a CUDA device.

Batches. For each step from the start step on, the batch sampler takes the step's global batch
from EpochSampler(len(pool), B, seed).batch(step), exactly as the in-memory datasets do, and
hands the workers only this process's rows (`TrainPlan.shares`, from DistInfo.rows): under
torchrun each rank decodes its own share of the batch and nothing else.

Randomness. The crop and flip of the image at position i of step s's global batch come from
derive_seed(seed, CROP_STREAM, s, i) alone (see crops.py for the crops), so a batch does not
depend on the number of workers or ranks, and a resumed run draws the crops the uninterrupted
run drew. The masks are still drawn from the step's generator, in the training process.

Normalisation. The usual ImageNet channel mean and std (IMAGENET_MEAN, IMAGENET_STD):
measuring them over 1.28M files before training would cost a full pass over the data.

Bad files. A training image that does not decode (or declares more than folder.MAX_PIXELS
pixels) is replaced by a black image with its label, so that one damaged file among a million
does not stop a run of days; a warning names each of the first SHOWN such files, then one gives
the running count at 10, 100, 1000, ... files. An evaluation image that does not decode is
left out of the figure, with the same warnings. `selfie data check` finds such files first.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from selfie.data import folder
from selfie.data.crops import EVAL, PRETRAIN, decode_crop
from selfie.data.sampler import EpochSampler, derive_seed
from selfie.data.source import Batch, TrainPlan
from selfie.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the usual ImageNet figures, RGB, in [0, 1] units
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_WORKERS = 8  # decoding processes per training process, at most
CROP_STREAM = 5  # derive_seed(seed, CROP_STREAM, step, position): a training image's crop
HELDOUT_STREAM = 6  # derive_seed(seed, HELDOUT_STREAM, position): an augmented held-out one
SHOWN = 5  # bad files named one by one

# What a worker is asked for: (file index, crop, seed or -1 for "eval").
Key = tuple[int, str, int]


def default_loader_workers() -> int:
    return min(MAX_WORKERS, folder.default_workers())


class FileImages(Dataset):
    """The files of one split, decoded and cropped on demand by key (see `Key`).

    Paths are kept as one numpy array of UTF-8 bytes relative to the split's root, not a
    list of Python strings: forked workers then share its pages instead of copying them as
    they touch each string's reference count (a 1.28M-file list would be copied per worker).
    """

    def __init__(
        self,
        root: Path,
        files: Sequence[tuple[Path, int]],
        size: int,
        flip: bool,
        names: Sequence[str] | None = None,
    ) -> None:
        """names: the files relative to root, "/"-joined, if the caller has them (cheaper)."""
        self.root = str(root)
        if names is None:
            names = [p.relative_to(root).as_posix() for p, _ in files]
        self.paths = np.array([n.encode() for n in names], dtype=bytes)
        self.labels = np.array([label for _, label in files], dtype=np.int64)  # (N,)
        self.size, self.flip = size, flip
        self.max_pixels = folder.MAX_PIXELS  # read now: workers get the value, not the global

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        return str(Path(self.root) / self.paths[index].decode())

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, str]:
        """(uint8 (3, S, S), label, "" or why the file failed: then the image is black)."""
        index, crop, seed = key
        path = self.path(index)
        rng = None if seed < 0 else np.random.default_rng(seed)
        try:
            pixels = decode_crop(path, crop, self.size, self.flip, self.max_pixels, rng)
        except folder.TooManyPixels as err:
            return self._black(), int(self.labels[index]), f"{path} ({err})"
        except Exception as err:  # a damaged file can fail with almost any exception type
            return self._black(), int(self.labels[index]), f"{path} ({type(err).__name__}: {err})"
        return torch.from_numpy(pixels), int(self.labels[index]), ""

    def _black(self) -> torch.Tensor:
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8)


class StepSampler(Sampler[list[Key]]):
    """For each step from `start` to plan.steps, for each share: the keys of its rows."""

    def __init__(self, plan: TrainPlan, pool: np.ndarray) -> None:
        self.plan, self.pool = plan, pool
        self.sampler = EpochSampler(len(pool), plan.batch_size, plan.seed)
        self.start = 0

    def __iter__(self) -> Iterator[list[Key]]:
        p = self.plan
        for step in range(self.start, p.steps):
            batch = self.pool[self.sampler.batch(step).numpy()]  # (B,) file indices
            for rows in p.shares:
                positions = range(p.batch_size)[rows]
                seeds = [derive_seed(p.seed, CROP_STREAM, step, i) for i in positions]
                yield [(int(batch[i]), p.crop, s) for i, s in zip(positions, seeds, strict=True)]

    def __len__(self) -> int:
        return max(0, self.plan.steps - self.start) * len(self.plan.shares)


class BadFiles:
    """Counts the images that failed to decode and warns without flooding the log: each of the
    first SHOWN distinct files by name, then the running count at 10, 100, 1000, ... failures
    (a bad file fails again in every epoch)."""

    def __init__(self, what: str) -> None:
        self.what, self.count = what, 0
        self.named: set[str] = set()

    def note(self, errors: Sequence[str]) -> None:
        for error in errors:
            if not error:
                continue
            self.count += 1
            if error not in self.named and len(self.named) < SHOWN:
                self.named.add(error)
                log.warning("could not decode %s; %s", error, self.what)
            elif str(self.count).rstrip("0") == "1":  # 10, 100, 1000, ...
                log.warning("%d images failed to decode so far; %s", self.count, self.what)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the training process, which finishes its step,
    saves and then stops them (a forked worker would otherwise run the training loop's own
    handler, or die mid-batch and fail the step). They also exit if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader(
    images: Dataset, batches: Any, workers: int, device: torch.device, persistent: bool
) -> DataLoader:
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {
            "multiprocessing_context": folder.worker_context(),
            "persistent_workers": persistent,
            "prefetch_factor": 2,  # batches decoded ahead per worker
            "worker_init_fn": _ignore_stop_signals,
        }
    return DataLoader(
        images,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        **extra,
    )


class StreamBatches:
    """TrainBatches over a DataLoader whose sampler plans every step's shares in order; a call
    out of that order (the first one, or a resume) restarts the plan at the step asked for."""

    def __init__(
        self, images: FileImages, plan: TrainPlan, device: torch.device, workers: int
    ) -> None:
        pool = np.arange(len(images)) if plan.pool is None else plan.pool.numpy()
        self.plan, self.device = plan, device
        self.sampler = StepSampler(plan, pool)
        self.loader = _loader(images, self.sampler, workers, device, persistent=True)
        self.batches: Iterator[Any] | None = None
        self.expected: tuple[int, int] | None = None  # the (step, share) the loader has next
        self.bad = BadFiles("training goes on with a black image in its place")

    def get(self, step: int, rows: slice, generator: torch.Generator) -> Batch:
        share = self.plan.shares.index(rows)
        if self.batches is None or self.expected != (step, share):
            self.sampler.start = step
            self.batches = iter(self.loader)  # reuses the persistent workers
            for _ in range(share):  # only when a step is entered mid-way
                next(self.batches)
        images, labels, errors = next(self.batches)
        nxt = share + 1
        self.expected = (step, nxt) if nxt < len(self.plan.shares) else (step + 1, 0)
        self.bad.note(errors)
        return (
            images.to(self.device, non_blocking=True),
            labels.to(self.device, non_blocking=True),
        )

    def close(self) -> None:
        self.batches = None  # the iterator's end shuts the workers down
        self.loader = None  # type: ignore[assignment]


class StreamSource:
    """One split of a class-folder tree as a BatchSource (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        files: Sequence[tuple[Path, int]],
        classes: tuple[str, ...],
        image_size: int,
        flip: bool,
        workers: int | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.images = FileImages(root, files, image_size, flip, names)
        self.classes = classes
        self.labels = torch.from_numpy(self.images.labels)
        self.workers = default_loader_workers() if workers is None else workers

    def __len__(self) -> int:
        return len(self.images)

    @property
    def names(self) -> list[str]:
        return [p.decode() for p in self.images.paths]

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(IMAGENET_MEAN)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(IMAGENET_STD)

    def train_batches(self, plan: TrainPlan, device: torch.device) -> StreamBatches:
        return StreamBatches(self.images, plan, device, self.workers)

    def eval_batches(
        self,
        device: torch.device,
        batch_size: int,
        indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        """Centre crops; with a generator, pretraining's crop and flip instead, each image's
        from derive_seed(one seed drawn from the generator now, HELDOUT_STREAM, position)."""
        order = np.arange(len(self)) if indices is None else indices.numpy()
        if generator is None:
            keys: list[Key] = [(int(f), EVAL, -1) for f in order]
        else:
            base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            seeds = [derive_seed(base, HELDOUT_STREAM, i) for i in range(len(order))]
            keys = [(int(f), PRETRAIN, s) for f, s in zip(order, seeds, strict=True)]
        chunks = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        return self._eval(chunks, device)

    def _eval(self, chunks: list[list[Key]], device: torch.device) -> Iterator[Batch]:
        workers = min(self.workers, len(chunks))
        bad = BadFiles("it is left out of the evaluation")
        for images, labels, errors in _loader(self.images, chunks, workers, device, False):
            bad.note(errors)
            ok = torch.tensor([not e for e in errors])
            if not bool(ok.any()):
                continue
            if not bool(ok.all()):
                images, labels = images[ok], labels[ok]
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def spread(self, count: int) -> torch.Tensor:
        """Evenly spaced over the split, which lists its files class by class."""
        n = len(self)
        return torch.arange(n) if n <= count else torch.arange(count) * n // count


def open_stream(
    name: str,
    split: str,
    data_dir: str | Path | None,
    image_size: int,
    *,
    flip: bool,
    workers: int | None = None,
) -> StreamSource:
    """Split "train" or "test" (val/ or test/) of the class-folder tree at data_dir."""
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use train or test")
    if data_dir is None:
        raise UserError(
            f"dataset {name!r} needs --data-dir DIR, the folder that holds train/ and val/, "
            "each with one sub-folder of images per class (ImageNet's usual layout)"
        )
    layout = folder.scan_folder(data_dir)
    if not layout.split_folders:
        raise UserError(
            f"{layout.root} has no train/ folder; dataset {name!r} needs DIR/train/<class>/ "
            "and DIR/val/<class>/ (or DIR/test/<class>/)"
        )
    for note in layout.notes:
        log.warning(note)
    files = layout.files[split]
    if not files:
        raise UserError(f"{layout.root} has no {split} images; add val/ beside train/")
    root = layout.split_root(split)
    log.info(
        "%s %s split: %d image files, %d classes, decoded as they are needed",
        layout.root,
        split,
        len(files),
        len(layout.classes),
    )
    names = layout.names(split)
    return StreamSource(root, files, layout.classes, image_size, flip, workers, names)


def open_unlabelled_stream(
    root: str | Path, image_size: int, *, flip: bool, workers: int | None = None
) -> StreamSource:
    """Every image under `root`, at any depth (`--unlabelled-dir`), as one unlabelled split."""
    names = folder.unlabelled_names(root)
    files = [(Path(root) / n, 0) for n in names]
    log.info("%s: %d unlabelled image files, decoded as they are needed", root, len(files))
    return StreamSource(Path(root), files, (folder.UNLABELLED,), image_size, flip, workers, names)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_WORKERS",
    "FileImages",
    "StreamSource",
    "default_loader_workers",
    "open_stream",
    "open_unlabelled_stream",
]
