"""Labelled subsets of the training set (SPEC 5): class-balanced, seeded, saved as JSON.

An *amount* of labelled data is either a fraction of the training set (float in (0, 1]) or a
number of images per class (int >= 1). Both become a count for each class
(`per_class_counts`), balanced wherever the classes allow it (SPEC 7): CIFAR-10 at 8% is 400
images of each of the 10 classes; 100% is every labelled image, however unequal the classes.

Index tensors are int64 (K,) positions into the full training split, always sorted, so a
subset saved with the results can be compared by eye and reloaded exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfie.data.sampler import derive_seed
from selfie.errors import UserError

# Random streams of derive_seed(seed, stream): 1 is the epoch order (sampler.py).
SUBSET_STREAM = 3
VALIDATION_STREAM = 4
SHOWN = 5  # names quoted in a subset file's error

_COUNT = re.compile(r"\d+")
_FRACTION = re.compile(r"\d*\.\d+|\d+\.\d*")
_PERCENT = re.compile(r"(\d*\.\d+|\d+\.?\d*)%")
_FORMS = (
    'a fraction in (0, 1] such as "0.08" or "1.0", a percentage such as "5%", '
    'or a whole number of images per class such as "400"'
)


def parse_amount(text: str) -> float | int:
    """ "0.08", "1.0", "5%" -> fraction (float); "400" -> images per class (int)."""
    s = text.strip()
    if _COUNT.fullmatch(s):
        count = int(s)
        if count < 1:
            raise UserError(f"labelled amount {text!r} is zero images per class; use {_FORMS}")
        return count
    if _PERCENT.fullmatch(s):
        fraction = float(s[:-1]) / 100
    elif _FRACTION.fullmatch(s):
        fraction = float(s)
    else:
        raise UserError(f"cannot read labelled amount {text!r}; use {_FORMS}")
    if not 0 < fraction <= 1:
        raise UserError(f"labelled amount {text!r} is outside (0, 1]; use {_FORMS}")
    return fraction


def amount_label(amount: float | int) -> str:
    """A filesystem-safe name: 0.08 -> "frac0.08", 1.0 -> "frac1", 400 -> "400pc"."""
    if isinstance(amount, int):
        return f"{amount}pc"
    return f"frac{amount:.10g}"


def subset_label(path: str | Path) -> str:
    """A filesystem-safe cell name: "lists/1percent.txt" -> "file-1percent.txt"."""
    return "file-" + re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).name)


def _class_sizes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class, int64 (num_classes,), after checking every label is a class."""
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        bad = low if low < 0 else high
        if low < 0 or high >= num_classes:
            raise UserError(
                f"label {bad} is outside 0..{num_classes - 1} for {num_classes} classes; "
                "check the dataset's labels or num_classes"
            )
    return torch.bincount(labels.long(), minlength=num_classes)


def per_class_counts(labels: torch.Tensor, amount: float | int, num_classes: int) -> torch.Tensor:
    """Images to draw from each class, int64 (num_classes,).

    - 1.0 (100%): every image of every class.
    - A fraction f < 1: each class gets round(f * N / C) images, N the images and C the
      classes present, so the subset holds about f of the dataset and is balanced wherever
      every class can supply that many; a smaller class gives all it has and the others are
      not topped up (the subset then holds a little less than f). CIFAR-10 (5,000 per class)
      at 5% -> 250 each, 8% -> 400, 20% -> 1,000; ImageNet (732 to 1,300 per class) at 5% -> 64.
    - A whole number k: k images of every class (an error if a class has fewer).
    """
    sizes = _class_sizes(labels, num_classes)
    if isinstance(amount, int):
        smallest = int(sizes.argmin())
        if amount > int(sizes[smallest]):
            size = int(sizes[smallest])
            raise UserError(
                f"{amount} labelled images per class asked for, but class {smallest} has only "
                f"{size} images; ask for at most {size} per class"
            )
        return torch.full_like(sizes, amount)
    if amount >= 1:
        return sizes
    present = int((sizes > 0).sum())
    each = round(amount * int(sizes.sum()) / max(present, 1))
    if each < 1:
        raise UserError(
            f"labelled fraction {amount:g} of {int(sizes.sum())} images in {present} classes is "
            "less than one image per class; ask for a larger fraction"
        )
    return torch.clamp(sizes, max=each)


def _first_per_class(labels: torch.Tensor, take: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Positions of `take[c]` uniformly drawn items of each class c, sorted.

    labels: int64 (N,) in 0..C-1; take: int64 (C,), take[c] <= size of class c.
    One random permutation, then a stable sort by label: within each class the order is a
    uniform permutation of that class, and its first take[c] items are a uniform draw
    without replacement. Vectorised over images; nothing loops over classes either.
    """
    n = labels.numel()
    perm = torch.randperm(n, generator=g)
    sorted_labels, order = torch.sort(labels[perm], stable=True)
    grouped = perm[order]  # (N,) positions, grouped by class, random within a class
    sizes = torch.bincount(labels, minlength=take.numel())
    starts = torch.cumsum(sizes, 0) - sizes  # (C,) where each class begins in `grouped`
    rank = torch.arange(n) - starts[sorted_labels]  # (N,) rank within its class
    chosen = grouped[rank < take[sorted_labels]]
    return torch.sort(chosen).values


def balanced_subset(
    labels: torch.Tensor, amount: float | int, num_classes: int, seed: int
) -> torch.Tensor:
    """Sorted int64 indices into `labels`: per_class_counts images of every class."""
    take = per_class_counts(labels, amount, num_classes)
    g = torch.Generator().manual_seed(derive_seed(seed, SUBSET_STREAM))
    return _first_per_class(labels.long(), take, g)


def split_validation(
    labels: torch.Tensor, indices: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tuning split (SPEC 5): hold out round(fraction * n_c) images of each class c in
    `indices` (at least one when fraction > 0, never the whole class).

    Returns (train_indices, val_indices): sorted, disjoint, their union is `indices`.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"validation fraction {fraction:g} is outside [0, 1); use e.g. 0.1")
    indices = indices.long()
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError("indices contain duplicates")
    sub_labels = labels[indices].long()
    if sub_labels.numel() and int(sub_labels.min()) < 0:
        raise UserError(f"label {int(sub_labels.min())} is negative; labels must be 0..C-1")
    sizes = torch.bincount(sub_labels)  # (C,) images of each class in the subset
    held = _held_out_counts(sizes, fraction)
    g = torch.Generator().manual_seed(derive_seed(seed, VALIDATION_STREAM))
    val_mask = torch.zeros(indices.numel(), dtype=torch.bool)
    val_mask[_first_per_class(sub_labels, held, g)] = True
    return torch.sort(indices[~val_mask]).values, torch.sort(indices[val_mask]).values


def _held_out_counts(sizes: torch.Tensor, fraction: float) -> torch.Tensor:
    """Validation images per class, int64 (C,); 0 for classes absent from the subset."""
    if fraction == 0:
        return torch.zeros_like(sizes)
    present = sizes > 0
    too_small = torch.nonzero(present & (sizes < 2)).flatten()
    if too_small.numel():
        c = int(too_small[0])
        raise UserError(
            f"class {c} has only {int(sizes[c])} labelled image; a validation split needs at "
            "least 2 per class (one to train on, one to validate); use more labelled data"
        )
    # torch.round rounds half to even, like Python's round.
    held = torch.round(sizes.double() * fraction).long().clamp(min=1)
    held = torch.minimum(held, sizes - 1)
    return torch.where(present, held, torch.zeros_like(held))


@dataclass(frozen=True)
class FileSubset:
    """The labelled images a subset file lists (`--subset-file`)."""

    indices: torch.Tensor  # int64 (K,): sorted positions into the training split
    record: dict[str, Any]  # {"path", "sha256", "lines"}: saved with the results


def read_subset_file(path: str | Path, names: Sequence[str] | None, dataset: str) -> FileSubset:
    """The training images a subset file names, one per line: a bare file name (the format of
    the 1% and 10% ImageNet lists published with SimCLR, `n01440764_10026.JPEG`) or a path
    relative to the split folder (`n01440764/n01440764_10026.JPEG`). Blank lines are skipped
    and a name listed twice counts once. `names`: the split's files (BatchSource.names).

    A name that matches no training file, or a bare name that matches several (the same file
    name in two class folders), is an error naming the first few.
    """
    path = Path(path)
    if names is None:
        raise UserError(
            f"--subset-file: the {dataset} data has no file names to match (only image folders "
            "and imagenet224 do); use --labels"
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"--subset-file {path}: cannot read it ({e.strerror})") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--subset-file {path} is not UTF-8 text, one file name a line") from None
    wanted = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not wanted:
        raise UserError(f"--subset-file {path} names no images (one file name a line)")
    by_path = {name: i for i, name in enumerate(names)}
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_name.setdefault(posixpath.basename(name), []).append(i)
    chosen, missing, ambiguous = [], [], []
    for entry in wanted:
        if "/" in entry:
            at = by_path.get(posixpath.normpath(entry))
            found = [] if at is None else [at]
        else:
            found = by_name.get(entry, [])
        if len(found) == 1:
            chosen.append(found[0])
        elif found:
            ambiguous.append(f"{entry} ({', '.join(names[i] for i in found[:2])})")
        else:
            missing.append(entry)
    if missing:
        raise UserError(
            f"--subset-file {path}: {len(missing)} of its {len(wanted)} names are not among the "
            f"{len(names)} training images (first: {', '.join(missing[:SHOWN])}); names are "
            "file names or paths relative to the training split's folder, and files that do "
            "not decode are left out of it"
        )
    if ambiguous:
        raise UserError(
            f"--subset-file {path}: {len(ambiguous)} bare names match several training files "
            f"(first: {'; '.join(ambiguous[:SHOWN])}); give their paths relative to the "
            "training split's folder instead"
        )
    record = {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "lines": len(wanted)}
    return FileSubset(torch.sort(torch.tensor(chosen, dtype=torch.int64)).values, record)


def class_counts(labels: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images of each class among `indices`, int64 (num_classes,)."""
    return torch.bincount(labels[indices].long(), minlength=num_classes)


def save_indices(path: Path, meta: dict[str, Any] | None = None, **arrays: torch.Tensor) -> None:
    """Write {name: [int, ...]} as JSON, one list per line, after the entries of `meta` (any
    JSON values); atomic, like runfolder.write_json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"  {json.dumps(name)}: {json.dumps(value)}" for name, value in (meta or {}).items()]
    lines += [
        f"  {json.dumps(name)}: {json.dumps(t.long().tolist())}" for name, t in arrays.items()
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(tmp, path)


def load_indices(path: Path) -> dict[str, torch.Tensor]:
    """Read what save_indices wrote: {name: int64 (K,)}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"index file {path} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"index file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"index file {path} must hold {{name: [int, ...]}}")
    lists = {k: v for k, v in data.items() if isinstance(v, list)}  # others: save_indices' meta
    if not lists or not all(all(isinstance(i, int) for i in v) for v in lists.values()):
        raise UserError(f"index file {path} must hold {{name: [int, ...]}}")
    return {name: torch.tensor(v, dtype=torch.int64) for name, v in lists.items()}
