"""Datasets as uint8 image tensors, and the one entry point that picks a dataset by name.

Every dataset but the streamed ones comes back as an `ImageSet`: all images in one uint8
tensor of shape (N, 3, H, W) on the CPU, labels as int64 (N,). A whole CIFAR-10 split is
150 MB as uint8, so holding it in memory and augmenting batches on the training device (see
`augment`) is simpler and faster than a per-image `Dataset`/`DataLoader` pipeline.

ImageNet at 224 px (1.28M images) cannot be held so: STREAMED_DATASETS are decoded from their
files batch by batch (see `stream`). Training code takes either kind through
`source.open_source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from selfie.errors import UserError

SUPPORTED_DATASETS = ("cifar10", "digits", "folder", "imagenet32")  # held in memory
STREAMED_DATASETS = ("imagenet224",)  # decoded from files as batches need them
DATASETS = (*SUPPORTED_DATASETS, *STREAMED_DATASETS)  # every value of data.dataset
SPLITS = ("train", "test")
DEFAULT_DATA_DIRS = {"cifar10": Path("data/cifar10")}


@dataclass(frozen=True)
class ImageSet:
    """A labelled image split held in memory.

    images: uint8 (N, 3, H, W), CPU, contiguous. labels: int64 (N,), values in
    0..len(classes)-1. classes: class names, index = label. names: each image's file, as a
    "/"-joined path relative to its split folder, for datasets read from files (None for the
    others): what `--subset-file` lists are matched against.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Catch loader bugs here, at construction, rather than as a shape error deep in training.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.names is not None and len(self.names) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.names)} names")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def refuse_data_dir(name: str, data_dir: str | Path | None) -> None:
    """The built-in digits read no folder: a --data-dir given with them would be ignored, and
    a user who pointed it at their images would train on digits without knowing."""
    if name == "digits" and data_dir is not None:
        raise UserError(
            f"--data-dir {data_dir}: the dataset is the built-in digits (presets tiny and "
            "digits), which read no folder; add --dataset folder to use the images in that "
            "folder (--dataset cifar10 for CIFAR-10), or drop --data-dir"
        )


def load_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None,
    image_size: int,
    download: bool = False,
) -> ImageSet:
    """Load split "train" or "test" of dataset `name`, checking its images are image_size px.

    data_dir None means the dataset's default folder ("data/cifar10" for CIFAR-10); digits
    ships inside scikit-learn and ignores data_dir and download. "folder" is any folder of
    images (see `selfie.data.folder` for its rules); it needs data_dir and ignores download.
    "imagenet32" is the official downsampled ImageNet 32x32 npz files (see
    `selfie.data.imagenet32`): it needs data_dir, ignores download; "test" is the validation set.
    """
    # Loaders are imported here, not at module top, so `import selfie.data` stays cheap
    # (scikit-learn takes about a second to import) and cifar10/digits can import ImageSet.
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    train = split == "train"
    if name == "cifar10":
        from selfie.data.cifar10 import load_cifar10

        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIRS["cifar10"]
        data = load_cifar10(root=root, train=train, download=download)
    elif name == "digits":
        from selfie.data.digits import load_digits

        refuse_data_dir(name, data_dir)
        data = load_digits(train=train, image_size=image_size)
    elif name == "folder":
        from selfie.data.folder import load_folder

        if data_dir is None:
            raise UserError(
                "dataset 'folder' needs --data-dir DIR, the folder of images (one sub-folder "
                "per class for labels; train/ and test/ sub-folders for fixed splits)"
            )
        data = load_folder(Path(data_dir), image_size=image_size, split=split)
    elif name == "imagenet32":
        from selfie.data.imagenet32 import load_imagenet32

        if data_dir is None:
            raise UserError(
                "dataset 'imagenet32' needs --data-dir DIR, the folder holding the official "
                "32x32 npz files (train_data_batch_1..10.npz, val_data.npz); there is no "
                "download, ImageNet needs an account"
            )
        data = load_imagenet32(Path(data_dir), train=train)
    elif name in STREAMED_DATASETS:
        raise UserError(
            f"dataset {name!r} is streamed from its files, never loaded whole; open it with "
            "selfie.data.source.open_source"
        )
    else:
        raise UserError(f"unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")

    h, w = data.images.shape[-2:]
    if (h, w) != (image_size, image_size):
        raise UserError(
            f"{name} images are {h}x{w} but image_size is {image_size}; "
            f"set image_size to {h} for {name}"
        )
    return data


__all__ = [
    "DATASETS",
    "STREAMED_DATASETS",
    "SUPPORTED_DATASETS",
    "ImageSet",
    "load_dataset",
    "refuse_data_dir",
]
