"""`selfie data check`: verify a dataset folder before training on it.

Each check returns a `CheckResult`: a short human report, and the problems found, one line
each (empty means fine). Nothing here raises for a bad dataset; only a bad request (unknown
dataset, folder dataset without a folder) is a UserError.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from selfie.data import DATASETS, DEFAULT_DATA_DIRS, refuse_data_dir
from selfie.data.cifar10 import FOLDER, META_FILE, TEST_FILES, TRAIN_FILES, read_batch, read_classes
from selfie.data.download import md5sum
from selfie.data.folder import (
    HOLD_OUT_EVERY,
    UNLABELLED,
    FolderLayout,
    decode_images,
    scan_folder,
)
from selfie.errors import UserError

ROWS_PER_BATCH = 10_000  # every CIFAR-10 batch file holds 10,000 images
NUM_CLASSES = 10
SHOWN = 20  # undecodable files listed one a line before "and N more"

OFFICIAL = "the official CIFAR-10 release"
REBUILT = "the known rebuilt copy (same pixels, labels and order; other `filenames` entries)"
# md5 of each file: the official python-version release, and the rebuild described in
# ../shared/data/cifar10/README.md. Either is accepted; the report says which one matched.
KNOWN_MD5: dict[str, dict[str, str]] = {
    OFFICIAL: {
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    REBUILT: {
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        "data_batch_1": "2816f81dcab8aeefa12de52c7bf0ead5",
        "data_batch_2": "8e57e1d6aa2b845fdc2fe5dae3c69011",
        "data_batch_3": "ff44ab901613528022379f805141d3fe",
        "data_batch_4": "5528e3ae2d0151fa22e2e3ce9d66ab10",
        "data_batch_5": "2662b10bb24c00eb1ef66de61f9f8d10",
        "test_batch": "b739ba6c59ca04617f979c6f8d9feac5",
    },
}


@dataclass
class CheckResult:
    report: list[str] = field(default_factory=list)  # what was found, for people
    problems: list[str] = field(default_factory=list)  # one line each; empty = fine

    def problem(self, text: str) -> None:
        self.problems.append(" ".join(text.split()))  # one line, whatever the message held


def check_dataset(
    name: str, data_dir: str | Path | None, image_size: int = 32, decode: bool = False
) -> CheckResult:
    """Check dataset `name` at data_dir (None: the dataset's default folder). `decode`:
    imagenet224 decodes every file too (the other image folders always do)."""
    if name == "cifar10":
        root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIRS["cifar10"]
        return check_cifar10(root)
    if name == "folder":
        if data_dir is None:
            raise UserError("--dataset folder needs --data-dir DIR, the folder of images")
        return check_folder(Path(data_dir), image_size)
    if name == "digits":
        refuse_data_dir(name, data_dir)
        return check_digits()
    if name == "imagenet32":
        if data_dir is None:
            raise UserError("--dataset imagenet32 needs --data-dir DIR, the folder of npz files")
        return check_imagenet32(Path(data_dir))
    if name == "imagenet224":
        if data_dir is None:
            raise UserError(
                "--dataset imagenet224 needs --data-dir DIR, the folder that holds train/ and "
                "val/ with one sub-folder per class"
            )
        return check_imagenet224(Path(data_dir), image_size, decode)
    raise UserError(f"cannot check dataset {name!r}; use one of: {', '.join(DATASETS)}")


def _md5_line(matched: dict[str, list[str]], present: list[str]) -> str:
    for label in (OFFICIAL, REBUILT, *KNOWN_MD5):
        if present and len(matched.get(label, [])) == len(present):
            return f"md5: all {len(present)} files match {label}"
    counts = ", ".join(f"{len(files)} {label}" for label, files in matched.items())
    return f"md5 of {len(present)} files: " + (counts or "none matches a known release")


def check_cifar10(root: str | Path) -> CheckResult:
    """Files present, md5 sums known, batches unpickle safely with the right shapes and
    labels, 50,000 / 10,000 images, 5,000 / 1,000 of each class."""
    root = Path(root)
    folder = root / FOLDER
    result = CheckResult([f"CIFAR-10 at {folder}"])
    if not folder.is_dir():
        if (root / TRAIN_FILES[0]).is_file():
            result.problem(
                f"{folder} not found, but {root} holds the batch files itself; point --data-dir "
                f"at its parent, {root.resolve().parent}"
            )
        else:
            result.problem(
                f"{folder} not found; point --data-dir at the folder that holds {FOLDER}/, or "
                "fetch it with `selfie pretrain --download --data-dir DIR ...`"
            )
        return result

    names = [*TRAIN_FILES, *TEST_FILES, META_FILE]
    present = [n for n in names if (folder / n).is_file()]
    for n in names:
        if n not in present:
            result.problem(f"{folder / n} is missing; download CIFAR-10 again (see --download)")
    result.report.append(f"files: {len(present)} of {len(names)} present")

    # md5 first: it is the one check that notices any changed byte, pixels or not.
    matched: dict[str, list[str]] = {}
    for n in present:
        got = md5sum(folder / n)
        hits = [label for label, table in KNOWN_MD5.items() if table.get(n) == got]
        for label in hits:
            matched.setdefault(label, []).append(n)
        if not hits:
            result.problem(
                f"{folder / n}: md5 {got} matches neither the official file nor the known "
                "rebuilt copy; it was changed or damaged, so delete it and download it again"
            )
    result.report.append(_md5_line(matched, present))

    if META_FILE in present:
        try:
            result.report.append("classes: " + ", ".join(read_classes(folder / META_FILE)))
        except UserError as err:
            result.problem(str(err))

    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        _check_cifar_split(result, folder, split, files, present)
    return result


def _check_cifar_split(
    result: CheckResult, folder: Path, split: str, files: tuple[str, ...], present: list[str]
) -> None:
    labels: list[np.ndarray] = []  # int64 (rows,) per batch that read cleanly
    for n in files:
        if n not in present:
            continue
        try:
            data, batch_labels = read_batch(folder / n)  # uint8 (rows, 3, 32, 32), (rows,)
        except UserError as err:  # unpickling refused or failed, or wrong shapes, dtype, labels
            result.problem(str(err))
            continue
        if len(data) != ROWS_PER_BATCH:
            result.problem(
                f"{folder / n}: {len(data):,} images, expected {ROWS_PER_BATCH:,}; the file "
                "is not a complete CIFAR-10 batch, so download CIFAR-10 again"
            )
        labels.append(batch_labels)
    total = sum(len(x) for x in labels)
    per_class: list[int] = (
        np.bincount(np.concatenate(labels), minlength=NUM_CLASSES).tolist() if labels else []
    )
    result.report.append(
        f"{split}: {total:,} images of 3x32x32 uint8 in {len(labels)} readable batch(es); "
        f"per class: {', '.join(f'{c:,}' for c in per_class)}"
    )
    if len(labels) < len(files):
        return  # missing or unreadable files are reported already; totals would only repeat it
    expected = ROWS_PER_BATCH * len(files)
    if total != expected:
        result.problem(f"{split} split: {total:,} images, expected {expected:,}")
    want = expected // NUM_CLASSES
    if any(c != want for c in per_class):
        result.problem(
            f"{split} split: images per class {per_class}, expected "
            f"{want:,} each; the labels are not those of CIFAR-10"
        )


def check_folder(
    root: str | Path,
    image_size: int = 32,
    decode: bool = True,
    layout: FolderLayout | None = None,
    fate: str = "would be skipped",
) -> CheckResult:
    """Layout, classes and counts per split, files that do not decode, stored image sizes.

    Every file is decoded exactly as `load_folder` would (pixels are not kept), so a file
    reported fine here loads fine in training. decode False counts the files by name only.
    `layout`: the folder's scan_folder, if the caller has it already; `fate`: what training
    does with a file that does not decode.
    """
    root = Path(root)
    result = CheckResult([f"image folder {root}"])
    if layout is None:
        try:
            layout = scan_folder(root)
        except UserError as err:
            result.problem(str(err))
            return result
    held = f"test split held out: every {HOLD_OUT_EVERY}th image of each class"
    result.report.append(
        "layout: "
        + (
            "train/ and test/ (or val/) sub-folders"
            if layout.split_folders and not layout.held_out
            else f"train/ sub-folder, {held}"
            if layout.split_folders
            else f"one folder, {held}"
        )
    )
    if layout.classes == (UNLABELLED,):
        result.report.append("classes: none (no class sub-folders): fine for pretraining only")
    else:
        shown = ", ".join(layout.classes[:SHOWN])
        more = f" and {len(layout.classes) - SHOWN} more" if len(layout.classes) > SHOWN else ""
        result.report.append(f"classes ({len(layout.classes)}): {shown}{more}")
    result.report.extend(f"note: {note}" for note in layout.notes)
    if layout.ignored:
        result.report.append(f"ignored: {layout.ignored} files that are not images by name")

    sizes: list[tuple[int, int]] = []
    bad: list[tuple[Path, str]] = []
    for split, files in layout.files.items():
        if not files:
            result.problem(
                f"{root} has no test images: no test/ folder, and no class has "
                f"{HOLD_OUT_EVERY} images to hold out; add a test/ folder with the same class "
                "sub-folders as the training images"
            )
            continue
        if not decode:
            counts = Counter(label for _, label in files)
            result.report.append(f"{split}: {len(files):,} image files ({_spread(counts)})")
            continue
        decoded = decode_images([p for p, _ in files], image_size, keep=False)
        counts = Counter(label for (_, label), ok in zip(files, decoded.ok, strict=True) if ok)
        per_class = ", ".join(f"{layout.classes[c]} {counts[c]}" for c in sorted(counts)[:SHOWN])
        result.report.append(f"{split}: {int(decoded.ok.sum())} images ({per_class})")
        sizes += [s for s, ok in zip(decoded.sizes, decoded.ok, strict=True) if ok and s]
        bad += decoded.errors
        if not decoded.ok.any():
            result.problem(f"{split} split: none of its {len(files)} image files decodes")

    if sizes:
        short = np.array([min(s) for s in sizes])  # (K,) shorter side of each good image
        common, times = Counter(sizes).most_common(1)[0]
        result.report.append(
            f"sizes: shorter side {short.min()}..{short.max()} px (median {np.median(short):g}),"
            f" most often {common[0]}x{common[1]} ({times} images); "
            f"{int((short < image_size).sum())} under {image_size} px will be upscaled"
        )
    if not decode:
        result.report.append("not decoded (add --decode to decode every file)")
        return result
    result.report.append(f"undecodable: {len(bad)} files")
    for path, why in bad[:SHOWN]:
        result.problem(f"{path}: does not decode and {fate} ({why})")
    if len(bad) > SHOWN:
        result.problem(f"... and {len(bad) - SHOWN} more files under {root} that do not decode")
    return result


def _spread(counts: Counter[int]) -> str:
    """ "1,300 per class" or "732-1,300 per class" over the classes present."""
    low, high = min(counts.values()), max(counts.values())
    per = f"{low:,}" if low == high else f"{low:,}-{high:,}"
    return f"{len(counts):,} classes, {per} per class"


def check_imagenet224(root: Path, image_size: int = 224, decode: bool = False) -> CheckResult:
    """The class-folder tree that `--dataset imagenet224` streams: train/ and val/ (or test/)
    with the same class sub-folders, files and classes counted per split; with `decode`,
    every file decoded as check_folder does (1.33M files for ImageNet: a long job)."""
    try:
        layout = scan_folder(root)
    except UserError as err:
        return CheckResult([f"imagenet224 at {root}"], [str(err)])
    fate = "would train as a black image (left out of evaluation)"
    result = check_folder(root, image_size, decode=decode, layout=layout, fate=fate)
    result.report[0] = f"imagenet224 at {root}"
    if not layout.split_folders:
        result.problem(
            f"{root} has no train/ folder; imagenet224 needs {root}/train/<class>/ and "
            f"{root}/val/<class>/ (or test/)"
        )
    elif layout.held_out:
        result.report.append("note: no val/ or test/ folder: every 10th training image is held out")
    if layout.classes == (UNLABELLED,):
        result.problem(f"{root}/train has no class sub-folders; finetuning needs one per class")
    return result


def check_imagenet32(root: Path) -> CheckResult:
    """Both splits through the loader itself (which checks files, shapes, dtypes and labels
    1..1000), then the class counts. Reads the whole training set: about 4 GB of memory."""
    from selfie.data.imagenet32 import load_imagenet32

    result = CheckResult([f"imagenet32 at {root}"])
    for split in ("train", "test"):
        try:
            data = load_imagenet32(root, train=split == "train")
        except UserError as e:
            result.problem(f"{split}: {e}")
            continue
        counts = torch.bincount(data.labels, minlength=len(data.classes))
        result.report.append(
            f"{split}: {len(data):,} images; {int((counts > 0).sum())} of {len(counts)} "
            f"classes present, {int(counts.min())}-{int(counts.max())} per class"
        )
        if bool((counts == 0).any()):
            result.problem(f"{split}: {int((counts == 0).sum())} classes have no image")
    return result


def check_digits() -> CheckResult:
    """Nothing on disk: the digits ship inside scikit-learn; report their counts."""
    from selfie.data.digits import load_digits

    train, test = load_digits(train=True), load_digits(train=False)
    return CheckResult(
        [
            "digits: built into scikit-learn, nothing on disk to check",
            f"train: {len(train):,} images, test: {len(test):,}, {len(train.classes)} classes",
        ]
    )


__all__ = [
    "CheckResult",
    "check_cifar10",
    "check_dataset",
    "check_folder",
    "check_imagenet32",
    "check_imagenet224",
]
