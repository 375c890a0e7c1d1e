"""The images a trained run is applied to: a folder of files, or a split of its dataset.

Files are decoded as the run's evaluation decoded its test images (`source.eval_crop`:
the centred square resized to the image size for in-memory datasets, the ImageNet
evaluation crop for streamed ones), by the same `folder.decode_images` the image-folder
dataset uses; a file that does not decode becomes an error entry, not a crash.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from selfie.data import folder
from selfie.data.filelist import list_images
from selfie.data.source import MemorySource, eval_crop, open_source
from selfie.errors import UserError
from selfie.use.run import TrainedRun

UNKNOWN = -1  # the label of an image whose class is not known


@dataclass
class ImageBatch:
    names: list[str]  # each decoded image's path (relative to the folder) or split index
    images: torch.Tensor  # uint8 (K, 3, S, S) on the device
    labels: torch.Tensor  # int64 (K,) on the device; UNKNOWN where the class is not known
    errors: list[tuple[str, str]] = field(default_factory=list)  # (name, why) not decoded


@dataclass
class ImageInput:
    """Where the images come from, and how many there are."""

    description: str  # e.g. "the digits test split" or "312 files under photos/"
    total: int
    name_column: str  # "path" or "index"
    _files: list[tuple[str, Path, int]] | None = None  # (name, file, label) for files
    _split: MemorySource | None = None

    def batches(
        self, run: TrainedRun, batch_size: int, progress: bool = True
    ) -> Iterator[ImageBatch]:
        bar = tqdm(total=self.total, desc="images", unit="img", disable=None if progress else True)
        try:
            for batch in self._batches(run, batch_size):
                bar.update(len(batch.names) + len(batch.errors))
                yield batch
        finally:
            bar.close()

    def _batches(self, run: TrainedRun, batch_size: int) -> Iterator[ImageBatch]:
        device = run.device
        if self._split is not None:
            start = 0
            for images, labels in self._split.eval_batches(device, batch_size):
                names = [str(i) for i in range(start, start + len(images))]
                start += len(images)
                yield ImageBatch(names, images, labels)
            return
        files = self._files or []
        crop = eval_crop(run.config.data)
        size = run.config.data.image_size
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            decoded = folder.decode_images([p for _, p, _ in chunk], size, crop=crop)
            ok = decoded.ok.tolist()
            why = iter(reason for _, reason in decoded.errors)
            errors = [
                (name, next(why)) for (name, _, _), good in zip(chunk, ok, strict=True) if not good
            ]
            known = [label for (_, _, label), good in zip(chunk, ok, strict=True) if good]
            yield ImageBatch(
                names=[name for (name, _, _), good in zip(chunk, ok, strict=True) if good],
                images=torch.from_numpy(decoded.images).to(device),
                labels=torch.tensor(known, dtype=torch.int64, device=device),
                errors=errors,
            )


def folder_input(root: str | Path, classes: tuple[str, ...]) -> ImageInput:
    """Every image file under `root` (any depth, folder.EXTENSIONS), sorted. An image inside
    a first-level sub-folder named like one of `classes` takes that label."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist or is not a folder of images")
    rels, _ = list_images(root)
    paths = [root / r for r in rels]
    if not paths:
        raise UserError(
            f"no images found under {root} (looked for {' '.join(folder.EXTENSIONS)} at any "
            "depth); point --data-dir at the folder that holds them"
        )
    index = {c: i for i, c in enumerate(classes)}
    files = []
    for p in paths:
        parts = p.relative_to(root).parts
        label = index.get(parts[0], UNKNOWN) if len(parts) > 1 else UNKNOWN
        files.append((str(p.relative_to(root)), p, label))
    return ImageInput(f"{len(files)} image files under {root}", len(files), "path", _files=files)


def split_input(run: TrainedRun, split: str = "test") -> ImageInput:
    """The run's own dataset split (its data folder from config.json), rows by index; a
    streamed dataset's split goes file by file, rows by path."""
    d = run.config.data
    source = open_source(d, split, run.data_dir)
    what = f"the {d.dataset} {split} split"
    if isinstance(source, MemorySource):
        return ImageInput(what, len(source), "index", _split=source)
    from selfie.data.stream import StreamSource

    assert isinstance(source, StreamSource)
    imgs = source.images
    files = [
        (imgs.paths[i].decode(), Path(imgs.path(i)), int(imgs.labels[i])) for i in range(len(imgs))
    ]
    return ImageInput(what, len(files), "path", _files=files)


def open_input(run: TrainedRun, data_dir: str | None, split: str = "test") -> ImageInput:
    """--data-dir DIR: the images under DIR; none: the run's dataset's `split`."""
    if data_dir is not None:
        return folder_input(data_dir, run.classes)
    return split_input(run, split)
