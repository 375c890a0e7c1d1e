"""Any folder of images as an ImageSet (`--dataset folder --data-dir DIR`), decoded in parallel.

The rules, in the order they apply:

Files. Every file under the folder, at any depth, whose name ends in .png .jpg .jpeg .bmp
.gif or .webp (any case). Names starting with "." (files and folders) are skipped, other
files are ignored, and symlinked folders are not followed. Files are taken in sorted order
of their path relative to the split folder, so the same folder always gives the same order.
The list of a large tree is saved and reused while the tree is unchanged (selfie.data.filelist).

Splits. If the folder has a `train/` sub-folder, that is the training split and `test/` (or,
failing that, `val/`) is the test split. Without `train/`, the whole folder is scanned (a
`test/` or `val/` without `train/` is an error, since it would otherwise become a class).
Where there is no test folder, the test split is held out of the training images: within
each class, every 10th file in sorted order (the 10th, 20th, ...), so it never changes from
run to run and the two splits never share a file. Pretraining reads the test split for its
held-out pretext accuracy, so a plain folder of images works without any set-up.

Labels. When every image of a split folder sits inside a first-level sub-folder, the sorted
names of those sub-folders are the classes, and an image at any depth below takes the label
of its first-level folder. Otherwise the split is unlabelled: one class "unlabelled", label 0
(if class folders exist beside loose images, a warning says their labels were dropped).
Test labels are looked up by name among the training split's classes.

Unlabelled folders (`--unlabelled-dir`, `load_unlabelled`): every image at any depth, with
no split and no labels (one class "unlabelled"), decoded by the same rules.

Pixels. The first frame of each file is decoded with Pillow, turned upright by its EXIF
orientation, converted to RGB (palette via RGBA or RGB; greyscale repeated; CMYK by Pillow's
conversion; 16-bit greyscale keeps its top 8 bits; any alpha is composited over black, so
colours hidden under transparent pixels never reach the model), and the largest centred
square is resized to image_size x image_size with Pillow's antialiased bilinear filter: the
same as resizing the shorter side to image_size and centre-cropping, without rounding an
intermediate size.

Bad files. A file that does not decode, or whose header declares more than MAX_PIXELS pixels
(a decompression bomb: a small file that would expand to gigabytes), is skipped; one logging
warning gives the count and the first few files with the reason. If no file decodes, that is
a UserError.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from selfie.data import ImageSet
from selfie.data.filelist import EXTENSIONS, list_images
from selfie.errors import UserError

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # 64 megapixels: an 8000x8000 photo passes, a bomb does not
HOLD_OUT_EVERY = 10  # without a test folder, every 10th image of each class is a test image
UNLABELLED = "unlabelled"
SERIAL_BELOW = 256  # fewer images than this decode in-process: starting workers costs more
CHUNK = 64  # images per worker task: 64 x 3 x 224 x 224 bytes is 9.6 MB to send back
SHOWN = 5  # bad files named in the warning


@dataclass(frozen=True)
class FolderLayout:
    """What `scan_folder` found: the files of each split with their labels, before decoding."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]  # split -> [(path, label)], in sorted order
    split_folders: bool  # True when root holds train/ (and maybe test/ or val/)
    held_out: bool  # True when the test split was held out of the training images
    ignored: int  # files that are not images by their extension
    notes: tuple[str, ...] = ()  # layout warnings, e.g. labels dropped
    # split -> its files as names() gives them, when the scan has them at hand
    relative: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    def split_root(self, split: str) -> Path:
        """The folder the files of `split` lie under (their names are relative to it): test/
        or val/ for a test split of its own, else the training folder."""
        train = self.root / "train" if self.split_folders else self.root
        own = None if split == "train" or self.held_out else own_test_folder(self.root)
        return own or train

    def names(self, split: str) -> list[str]:
        """The files of `split` as "/"-joined paths relative to split_root(split)."""
        if split in self.relative:
            return self.relative[split]
        root = self.split_root(split)
        return [p.relative_to(root).as_posix() for p, _ in self.files[split]]


@dataclass
class Decoded:
    """The result of `decode_images` over N files."""

    images: np.ndarray  # uint8 (K, 3, S, S): the K files that decoded, in file order
    ok: np.ndarray  # bool (N,): which files decoded
    sizes: list[tuple[int, int] | None]  # (width, height) as stored, None if unreadable
    errors: list[tuple[Path, str]] = field(default_factory=list)  # (file, why) for bad ones


def _class_names(folder: Path, rels: list[str], notes: list[str]) -> list[str]:
    """Each image's class (`rels`: paths relative to `folder`): its first-level sub-folder, or
    UNLABELLED if any image is loose."""
    rel = [r.split("/", 1) for r in rels]
    loose = sum(len(parts) == 1 for parts in rel)
    if loose == 0:
        return [parts[0] for parts in rel]
    if loose < len(rel):
        notes.append(
            f"{folder} holds {loose} images directly beside class sub-folders, so its labels "
            "were dropped (one class 'unlabelled'); move those images into a class folder "
            "to keep the labels"
        )
    return [UNLABELLED] * len(rel)


def own_test_folder(root: Path) -> Path | None:
    """root/test, or failing that root/val: the test split's own folder, if there is one."""
    return next((root / n for n in ("test", "val") if (root / n).is_dir()), None)


def scan_folder(root: str | Path) -> FolderLayout:
    """Find the images, the splits and the labels under `root`, without decoding anything."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"image folder {root} does not exist or is not a folder; point --data-dir at a "
            f"folder of images ({' '.join(EXTENSIONS)}), with one sub-folder per class for labels"
        )
    train_dir = root / "train"
    test_dir = own_test_folder(root)
    split_folders = train_dir.is_dir()
    if not split_folders and test_dir is not None:
        raise UserError(
            f"{root} has a {test_dir.name}/ folder but no train/ folder; add train/ beside it, "
            f"or move {test_dir.name}/ out if it is meant to be a class"
        )
    source = train_dir if split_folders else root
    rels, ignored = list_images(source)
    paths = [source / r for r in rels]
    if not paths:
        raise UserError(
            f"no images found under {source} (looked for {' '.join(EXTENSIONS)} at any depth); "
            "point --data-dir at the folder that holds them"
        )
    notes: list[str] = []
    names = _class_names(source, rels, notes)
    classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    train = [(p, index[n]) for p, n in zip(paths, names, strict=True)]

    if split_folders and test_dir is not None:
        test_rels, test_ignored = list_images(test_dir)
        test_paths = [test_dir / r for r in test_rels]
        ignored += test_ignored
        test_names = _class_names(test_dir, test_rels, notes)
        if classes == (UNLABELLED,):
            test_names = [UNLABELLED] * len(test_paths)  # no labels to match: all class 0
        unknown = sorted(set(test_names) - set(classes))
        if UNLABELLED in unknown:
            raise UserError(
                f"{test_dir} has images outside class sub-folders while {train_dir} has "
                "classes; put every test image in the sub-folder of its class"
            )
        if unknown:
            raise UserError(
                f"{test_dir} has images in {', '.join(map(repr, unknown[:5]))}, which is not a "
                f"class folder of {train_dir}; give both splits the same class sub-folders"
            )
        test = [(p, index[n]) for p, n in zip(test_paths, test_names, strict=True)]
        relative = {"train": rels, "test": test_rels}
    else:
        # Hold out every HOLD_OUT_EVERY-th file of each class, counted in sorted order.
        seen = [0] * len(classes)
        test_flags = []
        for _, label in train:
            seen[label] += 1
            test_flags.append(seen[label] % HOLD_OUT_EVERY == 0)
        test = [item for item, t in zip(train, test_flags, strict=True) if t]
        train = [item for item, t in zip(train, test_flags, strict=True) if not t]
        relative = {
            "train": [r for r, t in zip(rels, test_flags, strict=True) if not t],
            "test": [r for r, t in zip(rels, test_flags, strict=True) if t],
        }
    return FolderLayout(
        root=root,
        classes=classes,
        files={"train": train, "test": test},
        split_folders=split_folders,
        held_out=test_dir is None,
        ignored=ignored,
        notes=tuple(notes),
        relative=relative,
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB"; alpha is composited over black (see the module docstring)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode.startswith("I"):  # 16- or 32-bit greyscale; Pillow's convert would clip at 255
        grey = np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8
        im = Image.fromarray(grey.astype(np.uint8), mode="L")
    bands = im.getbands()
    if "A" in bands or "a" in bands or "transparency" in im.info:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


class TooManyPixels(ValueError):
    """The header declares more than the pixel limit: a decompression bomb, or near enough."""

    def __init__(self, size: tuple[int, int], max_pixels: int) -> None:
        w, h = size
        super().__init__(
            f"{w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} (a decompression bomb?)"
        )
        self.size = size


@contextmanager
def open_image(path: str, max_pixels: int) -> Iterator[Image.Image]:
    """`path` opened by Pillow (nothing decoded yet), once its header passed the pixel limit.

    Raises TooManyPixels for more than max_pixels pixels; Pillow's own bomb warning, between
    its limit and twice it, is raised as an error too. Anything else a damaged file raises
    passes through.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            w, h = opened.size
            if w * h > max_pixels:  # checked on the header, before any pixel is decoded
                raise TooManyPixels((w, h), max_pixels)
            yield opened


def upright_size(opened: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, read from the header only."""
    w, h = opened.size
    rotated = opened.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    return (h, w) if rotated else (w, h)


def upright_rgb(
    opened: Image.Image, need: tuple[int, int] | None = None
) -> tuple[Image.Image, float]:
    """Decode an `open_image` upright and in RGB (module docstring); returns (image, scale).

    need: the smallest upright (width, height) the caller can use. A JPEG is then decoded at
    1/2, 1/4 or 1/8 scale when that still gives at least `need`, which saves most of the
    decoding time of a large photo; scale is the decoded size over the stored one (1 for
    every other format), so a box chosen on `upright_size` maps to the result times scale.
    """
    scale = 1.0
    if need is not None:
        stored_w = opened.size[0]
        w, h = need if upright_size(opened) == opened.size else need[::-1]  # to stored axes
        drafted = opened.draft("RGB", (max(1, w), max(1, h)))  # None where it does not apply
        if drafted is not None:  # (mode, (0, 0, stored_w / k, stored_h / k)) for 1/k scale
            scale = drafted[1][2] / stored_w
    return _to_rgb(ImageOps.exif_transpose(opened)), scale


def _decode_one(
    path: str, size: int, keep: bool, max_pixels: int, crop: str | None = None
) -> tuple[np.ndarray | None, tuple[int, int] | None, str | None]:
    """One file -> (uint8 (3, size, size) or None, stored (w, h) or None, error or None).
    crop None: the centred square (module docstring); else one of crops.CROPS without a
    flip (for the streamed datasets' evaluation crop), the stored size then left None."""
    stored = None
    try:
        if crop is not None:
            from selfie.data.crops import decode_crop  # crops imports this module

            cropped = decode_crop(path, crop, size, False, max_pixels)
            return (cropped if keep else None), None, None
        with open_image(path, max_pixels) as opened:
            stored = opened.size
            rgb, _ = upright_rgb(opened, (size, size))
            w, h = rgb.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            square = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
            pixels = np.asarray(square).transpose(2, 0, 1) if keep else None  # (3, S, S)
    except TooManyPixels as err:
        return None, err.size, str(err)
    except Exception as err:  # a damaged file can fail with almost any exception type
        return None, stored, f"{type(err).__name__}: {err}"
    return (np.ascontiguousarray(pixels) if keep else None), stored, None


def _decode_chunk(
    paths: list[str], size: int, keep: bool, max_pixels: int, crop: str | None = None
) -> list[tuple[np.ndarray | None, tuple[int, int] | None, str | None]]:
    # A module-level function, so worker processes can receive it by reference.
    return [_decode_one(p, size, keep, max_pixels, crop) for p in paths]


def default_workers() -> int:
    """The CPUs this process may run on (cgroup/affinity aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_context() -> multiprocessing.context.BaseContext:
    # fork on Linux: workers start in milliseconds without importing torch again (the same
    # choice as torch's DataLoader); spawn elsewhere, where fork is unsafe (macOS) or absent.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def decode_images(
    paths: Sequence[Path],
    size: int,
    workers: int | None = None,
    keep: bool = True,
    crop: str | None = None,
) -> Decoded:
    """Decode `paths` to uint8 (K, 3, size, size), skipping (and recording) bad files.

    workers None: serial below SERIAL_BELOW files, else one process per CPU; 1: serial;
    n >= 2: n worker processes whatever the count. keep False checks the files but keeps no
    pixels (images is then (0, 3, size, size)). The serial and parallel paths run the same
    per-file code, so they give identical pixels. crop: see `_decode_one` (None: the
    centred square every in-memory folder split is decoded with).
    """
    n = len(paths)
    if workers is None:
        workers = 1 if n < SERIAL_BELOW else default_workers()
    # Preallocated once, filled in file order; bad files leave no gap (`filled` only advances
    # on success), so out[:filled] is the contiguous result and nothing is copied afterwards.
    out = np.empty((n if keep else 0, 3, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    sizes: list[tuple[int, int] | None] = []
    errors: list[tuple[Path, str]] = []
    names = [str(p) for p in paths]
    step = max(1, min(CHUNK, -(-n // (4 * max(workers, 1)))))  # >= 4 tasks per worker
    chunks = [names[i : i + step] for i in range(0, n, step)]
    args = (size, keep, MAX_PIXELS, crop)
    filled = 0

    def take(results: list[tuple[np.ndarray | None, tuple[int, int] | None, str | None]]) -> None:
        nonlocal filled
        for pixels, stored, error in results:
            i = len(sizes)
            sizes.append(stored)
            if error is not None:
                errors.append((Path(paths[i]), error))
                continue
            ok[i] = True
            if pixels is not None:  # None when keep is False
                out[filled] = pixels
                filled += 1

    if workers <= 1 or n <= 1:
        for chunk in chunks:
            take(_decode_chunk(chunk, *args))
    else:
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=worker_context()) as pool:
            # map yields results in submission order, so file i lands in slot i.
            for results in pool.map(_decode_chunk, chunks, *map(repeat, args)):
                take(results)
    return Decoded(images=out[:filled], ok=ok, sizes=sizes, errors=errors)


def describe_errors(errors: list[tuple[Path, str]], root: Path, shown: int = SHOWN) -> str:
    """ "a.jpg (why); b.png (why) and 3 more", paths relative to root."""

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    text = "; ".join(f"{rel(p)} ({why})" for p, why in errors[:shown])
    return text + (f" and {len(errors) - shown} more" if len(errors) > shown else "")


def load_folder(
    root: str | Path, image_size: int, split: str, *, workers: int | None = None
) -> ImageSet:
    """Split "train" or "test" of an image folder: uint8 (N, 3, image_size, image_size).

    See the module docstring for the rules. Files that do not decode are skipped, with one
    warning naming the count and the first few; memory is N x 3 x image_size^2 bytes.
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use train or test")
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    layout = scan_folder(root)
    for note in layout.notes:
        log.warning(note)
    files = layout.files[split]
    if not files:  # only the test split can be empty: a class has >= 1 training image
        raise UserError(
            f"{layout.root} has no test images: there is no test/ folder and no class has "
            f"{HOLD_OUT_EVERY} images to hold out one in {HOLD_OUT_EVERY}; add a test/ folder "
            "beside train/ with the same class sub-folders"
        )
    root, names = layout.split_root(split), layout.names(split)
    return _decode_split(files, layout.classes, image_size, root, split, workers, names)


def unlabelled_names(root: str | Path) -> list[str]:
    """Every image file under `root`, at any depth, in sorted order (`--unlabelled-dir`), as
    "/"-joined paths relative to it: class folders, train/ and test/ folders are not told
    apart, their images all count."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"--unlabelled-dir {root} does not exist or is not a folder; point it at a folder "
            f"of images ({' '.join(EXTENSIONS)}, found at any depth)"
        )
    names, _ = list_images(root)
    if not names:
        raise UserError(
            f"no images found under {root} (looked for {' '.join(EXTENSIONS)} at any depth); "
            "point --unlabelled-dir at the folder that holds them"
        )
    return names


def load_unlabelled(root: str | Path, image_size: int, *, workers: int | None = None) -> ImageSet:
    """Every image under `root` (`unlabelled_names`), decoded as `load_folder` decodes, as
    one class UNLABELLED."""
    names = unlabelled_names(root)
    files = [(Path(root) / n, 0) for n in names]
    return _decode_split(files, (UNLABELLED,), image_size, Path(root), "unlabelled", workers, names)


def _decode_split(
    files: list[tuple[Path, int]],
    classes: tuple[str, ...],
    image_size: int,
    split_root: Path,
    split: str,
    workers: int | None,
    names: list[str],
) -> ImageSet:
    """Decode `files` ((path, label), under split_root, there called `names`) into an
    ImageSet, skipping (and naming, in one warning) the files that do not decode."""
    t0 = time.perf_counter()
    paths = [p for p, _ in files]
    decoded = decode_images(paths, image_size, workers)
    if decoded.errors:
        log.warning(
            "skipped %d of %d image files in %s that did not decode: %s",
            len(decoded.errors),
            len(paths),
            split_root,
            describe_errors(decoded.errors, split_root),
        )
    if not decoded.ok.any():
        raise UserError(
            f"none of the {len(paths)} image files of the {split} split under {split_root} "
            f"decoded (first: {describe_errors(decoded.errors, split_root, 1)}); check that "
            "they are images Pillow can read"
        )
    labels = np.array([label for _, label in files], dtype=np.int64)[decoded.ok]  # (N,)
    kept = tuple(name for name, ok in zip(names, decoded.ok, strict=True) if ok)
    log.info(
        "%s %s split: %d images, %d classes, %dx%d, decoded in %.1f s",
        split_root,
        split,
        len(labels),
        len(classes),
        image_size,
        image_size,
        time.perf_counter() - t0,
    )
    return ImageSet(
        images=torch.from_numpy(decoded.images),
        labels=torch.from_numpy(labels),
        classes=classes,
        names=kept,
    )


__all__ = [
    "EXTENSIONS",
    "MAX_PIXELS",
    "Decoded",
    "FolderLayout",
    "TooManyPixels",
    "decode_images",
    "load_folder",
    "load_unlabelled",
    "open_image",
    "own_test_folder",
    "scan_folder",
    "unlabelled_names",
    "upright_rgb",
    "upright_size",
]
