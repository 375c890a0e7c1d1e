"""ImageNet 32x32 from the official "downsampled ImageNet" npz files (Chrabaszcz et al. 2017).

Layout: root holds train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz, either
directly or inside the folders the official archives unpack to: root/Imagenet32_train_npz/
for the training batches and root/Imagenet32_val_npz/ for val_data.npz (a file directly in
root wins). Each npz holds "data", a uint8 (n, 3072) array whose rows are an image's red,
green and blue 32x32 planes in turn, row-major (so a reshape gives (n, 3, 32, 32)), and
"labels", integers 1..1000 (1-based; returned 0-based); an optional "mean" is ignored.

Class names are the 0-based label numbers as strings, "0".."999": class "k" is official label
k + 1 (the line k + 1 of the archive's map_clsloc.txt gives its WordNet id and name).

Files are read with np.load(allow_pickle=False): nothing in them can run code. The full
training split is 1.28M images, 3.9 GB as uint8, so it is read into one preallocated tensor
a batch at a time rather than concatenated (which would briefly hold two copies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from selfie.data import ImageSet
from selfie.errors import UserError

TRAIN_FILES = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
VAL_FILES = ("val_data.npz",)
TRAIN_FOLDER = "Imagenet32_train_npz"
VAL_FOLDER = "Imagenet32_val_npz"
SIDE = 32
NUM_CLASSES = 1000
CLASSES = tuple(str(i) for i in range(NUM_CLASSES))


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(
        f"ImageNet 32x32 file {path} is corrupt or truncated ({why}); delete it and fetch it "
        "again from the downsampled ImageNet site (image-net.org, 32x32 npz version)"
    )


def _find(root: Path, name: str, folder: str) -> Path | None:
    for path in (root / name, root / folder / name):
        if path.is_file():
            return path
    return None


def _read(path: Path, key: str) -> np.ndarray:
    """One array of an npz file; any failure is a UserError naming the file."""
    try:
        npz = np.load(path, allow_pickle=False)
    except PermissionError as err:
        raise UserError(f"cannot read ImageNet 32x32 file {path}: {err}") from err
    except Exception as err:  # a damaged zip or array header fails with many exception types
        raise _corrupt(path, f"{type(err).__name__}: {err}") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _corrupt(path, "an .npy array, not an npz archive")
    try:
        if key not in npz.files:
            raise _corrupt(path, f"no {key!r} entry (has: {', '.join(npz.files) or 'none'})")
        return np.asarray(npz[key])
    except UserError:
        raise
    except Exception as err:  # a truncated member fails when read, with many exception types
        raise _corrupt(path, f"{type(err).__name__}: {err}") from err
    finally:
        npz.close()


def _read_labels(path: Path) -> np.ndarray:
    labels = _read(path, "labels")
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise _corrupt(path, f"'labels' is not a 1-d integer array ({labels.dtype} {labels.shape})")
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise _corrupt(
            path,
            f"labels run {labels.min()}..{labels.max()}, not 1..{NUM_CLASSES} "
            "(the official files are 1-based)",
        )
    return labels.astype(np.int64) - 1


def load_imagenet32(root: str | Path, train: bool) -> ImageSet:
    """The training (10 batches, ~1.28M) or validation (50,000) images: uint8 (N, 3, 32, 32),
    labels int64 (N,) in 0..999. There is no download: ImageNet needs an account."""
    root = Path(root)
    names, folder = (TRAIN_FILES, TRAIN_FOLDER) if train else (VAL_FILES, VAL_FOLDER)
    paths = []
    for name in names:
        path = _find(root, name, folder)
        if path is None:
            raise UserError(
                f"ImageNet 32x32 not found: {root / name} (or {root / folder / name}) is "
                "missing. There is no automatic download (ImageNet needs an account): get the "
                "32x32 npz files (Imagenet32_train_npz.zip, Imagenet32_val_npz.zip) from "
                "image-net.org, unzip them and point --data-dir at the folder holding "
                f"{names[0]} or {folder}/"
            )
        paths.append(path)

    # Pass 1: labels only (small), to count rows; pass 2: fill one preallocated tensor.
    labels = [_read_labels(p) for p in paths]
    total = sum(len(lab) for lab in labels)
    images = torch.empty((total, 3, SIDE, SIDE), dtype=torch.uint8)
    flat = images.numpy().reshape(total, 3 * SIDE * SIDE)  # a view: writes land in `images`
    start = 0
    for path, lab in zip(paths, labels, strict=True):
        data = _read(path, "data")
        n = len(lab)
        if data.dtype != np.uint8 or data.shape != (n, 3 * SIDE * SIDE):
            raise _corrupt(
                path,
                f"'data' is {data.dtype} {data.shape}, expected uint8 ({n}, {3 * SIDE * SIDE}) "
                "to match its labels",
            )
        flat[start : start + n] = data
        start += n
        del data
    return ImageSet(images=images, labels=torch.from_numpy(np.concatenate(labels)), classes=CLASSES)
