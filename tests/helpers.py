"""Helpers shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfie import cli
from selfie.config import Config
from selfie.data import ImageSet
from selfie.data.source import MemorySource, TrainBatches
from selfie.distributed import DistInfo
from selfie.pretrain import train_plan
from selfie.runfolder import RunFolder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI in-process (quiet): exit code, stdout, stderr."""
    code = cli.main(["-q", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_pretrain_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    """`selfie pretrain --preset tiny` on the CPU with `flags`: exit 2, one stderr line
    containing `needle`, and no run folder written."""
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--device", "cpu", "--out", str(out), *flags]
    code, _, err = run_cli(args, capsys)
    err = err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def open_test_run(path: Path, resume: bool = False) -> RunFolder:
    """A run folder for engine tests: a fresh one gets a minimal config.json."""
    run = RunFolder(path, resume=resume)
    if not resume:
        run.write_config({"name": "test"}, {})
    return run


def memory_batches(
    images: torch.Tensor, config: Config, info: DistInfo, accum: int = 1
) -> TrainBatches:
    """Pretraining batches of `config` over unlabelled uint8 (N, C, H, W) CPU images."""
    labels = torch.zeros(len(images), dtype=torch.int64)
    source = MemorySource(ImageSet(images, labels, ("x",)), config.data.pad, config.data.flip)
    return source.train_batches(train_plan(config, info, accum), info.device)


FAKE_CLASSES = ("ant", "bee", "cat")
# (width, height, mode, extension) of image i of each class: landscape and portrait JPEGs,
# greyscale, a PNG, one smaller than the crops, one large enough for reduced-scale decoding.
FAKE_IMAGES = (
    (300, 200, "RGB", ".JPEG"),
    (180, 260, "RGB", ".JPEG"),
    (120, 90, "L", ".JPEG"),
    (96, 96, "RGB", ".png"),
    (70, 50, "RGB", ".JPEG"),
    (640, 480, "RGB", ".JPEG"),
)
CORRUPT = Path("train") / "bee" / "bee_9.JPEG"


def write_fake_imagenet(root: Path, val_per_class: int = 2) -> Path:
    """ImageNet's class-folder layout in miniature: train/<class>/ with the FAKE_IMAGES and
    one corrupt file (CORRUPT), val/<class>/ with the first `val_per_class` of them. Class c's
    images are noise over a strong channel c, so a crop's colour tells its class."""
    import numpy as np
    from PIL import Image

    for split, count in (("train", len(FAKE_IMAGES)), ("val", val_per_class)):
        for c, name in enumerate(FAKE_CLASSES):
            for i, (w, h, mode, ext) in enumerate(FAKE_IMAGES[:count]):
                rng = np.random.default_rng([c, i, split == "val"])
                pixels = rng.integers(0, 50, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 200
                path = root / split / name / f"{name}_{i}{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).convert(mode).save(path)
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 a truncated JPEG header")
    return root


# --set overrides that shrink a paper preset's network to the tiny preset's sizes.
TINY_NETWORK = [
    "model.widths=(8,16,32,64)",
    "model.stem_width=8",
    "model.layers=(1,1,1,1)",
    "model.block='basic'",
    "model.attn_heads=1",
    "model.attn_intermediate=20",
]
