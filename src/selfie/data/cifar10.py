"""CIFAR-10 from the official "python version" files, optionally downloading them first.

Layout: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}. Each batch is a
pickle dict with b"data", a uint8 (10000, 3072) array whose rows are an image's red, green
and blue 32x32 planes in turn (so a reshape gives (N, 3, 32, 32) without any transpose), and
b"labels", a list of ints 0..9. batches.meta holds b"label_names".
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfie.data import ImageSet
from selfie.data.download import download_file, safe_extract_tar
from selfie.errors import UserError

ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
SIDE = 32

# The only globals a CIFAR-10 pickle refers to (numpy 1 and 2 spellings, protocols 2-5).
# Unpickling anything else could run arbitrary code from a file the user merely pointed at.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(
        f"CIFAR-10 file {path} is corrupt or truncated ({why}); delete it and download it "
        "again (add --download to fetch the official archive)"
    )


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read CIFAR-10 file {path}: {err}; check its permissions") from err
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a damaged pickle can fail with almost any exception type
        raise _corrupt(path, f"{type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise _corrupt(path, f"holds a {type(obj).__name__}, not a dict")
    return obj


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images uint8 (n, 3, 32, 32) and labels int64 (n,)."""
    batch = _unpickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise _corrupt(path, "no b'data' or b'labels' entry")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise _corrupt(path, "b'data' is not a 2-d uint8 array")
    if data.shape[1] != 3 * SIDE * SIDE or labels.shape != (data.shape[0],):
        raise _corrupt(path, f"data {data.shape} and labels {labels.shape} do not match")
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9):
        raise _corrupt(path, "labels are not integers 0..9")
    return data.reshape(-1, 3, SIDE, SIDE), labels.astype(np.int64)


def read_classes(path: Path) -> tuple[str, ...]:
    meta = _unpickle(path)
    names = meta.get(b"label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise _corrupt(path, "no list of 10 b'label_names'")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _download(root: Path) -> None:
    """Fetch the official archive into `root`, check its md5, unpack it, delete the archive."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    try:
        download_file(ARCHIVE_URL, archive, ARCHIVE_MD5)
        safe_extract_tar(archive, root)
    finally:
        archive.unlink(missing_ok=True)


def load_cifar10(root: str | Path, train: bool, download: bool = False) -> ImageSet:
    """The 50,000 training or 10,000 test images: uint8 (N, 3, 32, 32), labels int64 (N,)."""
    folder = Path(root) / FOLDER
    names = [*(TRAIN_FILES if train else TEST_FILES), META_FILE]

    def missing() -> list[Path]:
        return [folder / n for n in names if not (folder / n).is_file()]

    if missing() and download:
        _download(Path(root))
    if gone := missing():
        raise UserError(
            f"CIFAR-10 not found: {gone[0]} is missing; point --data-dir at the folder that "
            f"holds {FOLDER}/, or add --download to fetch it (about 170 MB)"
        )

    classes = read_classes(folder / META_FILE)
    batches = [read_batch(folder / n) for n in names[:-1]]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches])).contiguous()
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return ImageSet(images=images, labels=labels, classes=classes)
