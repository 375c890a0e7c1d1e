"""Streamed class-folder datasets (imagenet224): crops, batches, determinism, bad files, and
the paper-imagenet224 preset end to end on a miniature ImageNet tree."""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import selfie.finetune
from selfie.config import DataConfig
from selfie.data import folder, load_dataset, stream
from selfie.data.crops import (
    EVAL,
    FINETUNE,
    PRETRAIN,
    centre_box,
    decode_crop,
    random_resized_box,
    random_square_box,
)
from selfie.data.source import TrainPlan, open_source, open_unlabelled
from selfie.data.stream import IMAGENET_MEAN, StreamSource
from selfie.data.subsets import read_subset_file
from selfie.errors import UserError
from tests.helpers import (
    CORRUPT,
    FAKE_CLASSES,
    FAKE_IMAGES,
    TINY_NETWORK,
    run_cli,
    write_fake_imagenet,
)

CPU = torch.device("cpu")
S = 32  # crop size of the fast tests
DATA = DataConfig(dataset="imagenet224", image_size=S, patch_size=16, pad=0, num_classes=3)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_imagenet(tmp_path_factory.mktemp("imagenet"))


def source(root: Path, split: str = "train", workers: int = 0, size: int = S) -> StreamSource:
    data = DataConfig(dataset="imagenet224", image_size=size, pad=0)
    opened = open_source(data, split, root, workers=workers)
    assert isinstance(opened, StreamSource)
    return opened


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def batches_of(src: StreamSource, steps: range, plan: TrainPlan) -> list[torch.Tensor]:
    got = src.train_batches(plan, CPU)
    try:
        return [
            torch.cat([got.get(s, r, torch.Generator())[0] for r in plan.shares]) for s in steps
        ]
    finally:
        got.close()


# --- crops ----------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", [PRETRAIN, FINETUNE, EVAL])
def test_every_crop_is_uint8_square_for_every_kind_of_file(tree: Path, crop: str) -> None:
    rng = np.random.default_rng(0)
    for i, (*_, ext) in enumerate(FAKE_IMAGES):
        path = tree / "train" / "cat" / f"cat_{i}{ext}"
        for size in (S, 224):
            out = decode_crop(str(path), crop, size, True, folder.MAX_PIXELS, rng)
            assert out.dtype == np.uint8 and out.shape == (3, size, size), (path, size)


def test_eval_crop_is_resize_to_256_then_centre_224(tmp_path: Path) -> None:
    """The centre crop in one resize equals resizing the shorter side to S * 256 / 224 and
    cropping the centre S x S (torchvision's Resize(256) + CenterCrop(224)); whole-pixel
    sizes (S = 56: 128 -> 64, 192 -> 96), so both are exact up to rounding."""
    image = noise(192, 128)
    image.save(tmp_path / "a.png")
    expected = image.resize((96, 64), Image.Resampling.BILINEAR).crop((20, 4, 76, 60))
    got = decode_crop(str(tmp_path / "a.png"), EVAL, 56, True, folder.MAX_PIXELS)
    diff = got.astype(int) - np.asarray(expected).transpose(2, 0, 1).astype(int)
    assert np.abs(diff).max() <= 1
    left, top, right, bottom = centre_box(300, 200, 224)
    assert (right - left, bottom - top) == pytest.approx((175, 175))  # 200 * 224 / 256


def test_random_resized_box_inside_the_image_with_standard_area_and_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, right, bottom = random_resized_box(300, 200, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert 0.08 * 0.9 <= w * h / 60_000 <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # Nothing fits a 1000x10 strip: the centre crop, clamped to a 4/3 ratio: 13 x 10
    # (10 * 4/3 rounded), centred ((1000 - 13) // 2 = 493).
    left, top, right, bottom = random_resized_box(1000, 10, rng)
    assert (right - left, bottom - top) == (round(10 * 4 / 3), 10)
    assert left == (1000 - (right - left)) // 2 and top == 0


def test_pretrain_box_is_the_shorter_side_square_at_a_random_offset() -> None:
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        left, top, right, bottom = random_square_box(300, 200, 224, rng)
        assert (right - left, bottom - top, top) == pytest.approx((200, 200, 0))
        assert 0 <= left <= 100
        starts.add(left)
    assert len(starts) > 20  # 300 -> 336 px resized: 113 whole-pixel offsets
    left, top, right, bottom = random_square_box(180, 260, 224, rng)  # portrait: vertical
    assert (left, right, bottom - top) == pytest.approx((0, 180, 180)) and 0 <= top <= 80


def test_exif_rotated_photo_is_cropped_upright(tmp_path: Path) -> None:
    """A 60x40 image stored on its side with EXIF orientation 6 gives the crops of the
    upright image (the box is chosen on the upright size)."""
    upright = noise(40, 60, seed=3)
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to view
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "stored.png", exif=exif)
    for crop in (EVAL, FINETUNE, PRETRAIN):
        a, b = (
            decode_crop(str(tmp_path / n), crop, 16, True, 10**6, np.random.default_rng(5))
            for n in ("upright.png", "stored.png")
        )
        assert np.array_equal(a, b), crop


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    """A 1600x1200 JPEG decodes at 1/4 scale for a 224 centre crop (1200 -> 300 >= 256) and
    gives nearly the pixels of the full decode."""
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((1600, 1200), Image.Resampling.BICUBIC).save(
        tmp_path / "big.jpg", quality=95
    )
    with folder.open_image(str(tmp_path / "big.jpg"), folder.MAX_PIXELS) as opened:
        # The centre box is 1050 px (1200 * 224 / 256): 224 px across it needs 342 x 256.
        rgb, scale = folder.upright_rgb(opened, (342, 256))
    assert scale == 0.25 and rgb.size == (400, 300)
    fast = decode_crop(str(tmp_path / "big.jpg"), EVAL, 224, True, folder.MAX_PIXELS)
    with Image.open(tmp_path / "big.jpg") as full:
        box = centre_box(1600, 1200, 224)
        slow = np.asarray(full.convert("RGB").resize((224, 224), box=box)).transpose(2, 0, 1)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2


# --- the source -----------------------------------------------------------------------------


def test_labels_follow_class_folders(tree: Path) -> None:
    src = source(tree)
    assert src.classes == FAKE_CLASSES
    assert torch.bincount(src.labels).tolist() == [6, 7, 6]  # bee has the corrupt file too
    assert src.mean.tolist() == pytest.approx(IMAGENET_MEAN)
    plan = TrainPlan(6, 0, 3, crop=FINETUNE)
    got = src.train_batches(plan, CPU)
    for step in range(3):
        images, labels = got.get(step, slice(None), torch.Generator())
        assert images.dtype == torch.uint8 and images.shape == (6, 3, S, S)
        colour = images.float().mean(dim=(2, 3))  # (6, 3)
        tinted = (colour.max(1).values - colour.min(1).values) > 50  # not grey, not black
        assert torch.equal(colour.argmax(1)[tinted], labels[tinted])
    got.close()
    val = source(tree, "test")
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_subset_file_names_streamed_files(tree: Path, tmp_path: Path) -> None:
    """SimCLR's bare file names and relative paths both find files of a streamed tree."""
    src = source(tree)
    listed = tmp_path / "pick.txt"
    listed.write_text("ant_0.JPEG\nbee/bee_3.png\ncat_5.JPEG\n")
    got = read_subset_file(listed, src.names, "imagenet224")
    assert src.names is not None
    assert [src.names[i] for i in got.indices] == [
        "ant/ant_0.JPEG",
        "bee/bee_3.png",
        "cat/cat_5.JPEG",
    ]
    assert src.labels[got.indices].tolist() == [0, 1, 2]


def test_unlabelled_folder_streams_every_image_as_one_class(tree: Path) -> None:
    """--unlabelled-dir on imagenet224: every file under the folder, class folders or not,
    one class, pretraining's crop; a folder holding the labelled tree's val/ is refused."""
    pool = open_unlabelled(DATA, tree / "train", tree, workers=0)
    assert isinstance(pool, StreamSource) and len(pool) == 19  # the corrupt file included
    assert pool.classes == ("unlabelled",) and set(pool.labels.tolist()) == {0}
    plan = TrainPlan(4, 0, 1, crop=PRETRAIN)
    images = batches_of(pool, range(1), plan)[0]
    assert images.shape == (4, 3, S, S) and images.dtype == torch.uint8
    with pytest.raises(UserError, match="must not see the test images"):
        open_unlabelled(DATA, tree, tree)


def test_batches_do_not_depend_on_workers_and_resume_at_any_step(tree: Path) -> None:
    plan = TrainPlan(4, 7, 6, crop=FINETUNE)
    serial = batches_of(source(tree, workers=0), range(6), plan)
    parallel = batches_of(source(tree, workers=2), range(6), plan)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert not torch.equal(serial[0], serial[1])
    resumed = batches_of(source(tree), range(3, 6), plan)  # a fresh process at step 3
    assert all(torch.equal(a, b) for a, b in zip(serial[3:], resumed, strict=True))
    other_seed = batches_of(source(tree), range(1), TrainPlan(4, 8, 6, crop=FINETUNE))
    assert not torch.equal(serial[0], other_seed[0])


def test_ranks_and_micro_batches_decode_their_rows_of_the_same_batch(tree: Path) -> None:
    """Two ranks of two micro-batches each: every process decodes only its rows, and the
    rows together are the single-process batch, crop for crop."""
    whole = batches_of(source(tree), range(2), TrainPlan(8, 0, 2, crop=PRETRAIN))
    for rank in range(2):
        shares = (slice(4 * rank, 4 * rank + 2), slice(4 * rank + 2, 4 * rank + 4))
        plan = TrainPlan(8, 0, 2, shares, crop=PRETRAIN)
        sampled = [len(keys) for keys in source(tree).train_batches(plan, CPU).sampler]
        assert sampled == [2, 2, 2, 2]  # 2 steps x 2 micro-batches of 2 rows
        part = batches_of(source(tree), range(2), plan)
        for step in range(2):
            assert torch.equal(part[step], whole[step][4 * rank : 4 * rank + 4])


def test_sampler_draws_only_from_the_pool(tree: Path) -> None:
    src = source(tree)
    pool = torch.tensor([0, 1, 2, 3, 13, 14])  # ants (0-5) and cats (13-18) only
    got = src.train_batches(TrainPlan(3, 0, 8, pool=pool, crop=FINETUNE), CPU)
    labels = torch.cat([got.get(s, slice(None), torch.Generator())[1] for s in range(8)])
    assert set(labels.tolist()) == {0, 2}


def test_corrupt_file_is_a_black_image_with_one_warning_per_file(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = source(tree)
    bad = int(np.flatnonzero(src.images.paths == str(CORRUPT.relative_to("train")).encode())[0])
    plan = TrainPlan(2, 0, 4, pool=torch.tensor([bad, 0]), crop=PRETRAIN)
    got = src.train_batches(plan, CPU)
    with caplog.at_level(logging.WARNING):
        for step in range(4):  # the bad file is in every batch
            images, labels = got.get(step, slice(None), torch.Generator())
            black = images.flatten(1).amax(1) == 0
            assert black.sum() == 1 and labels[black].tolist() == [1]
    warnings = [r.getMessage() for r in caplog.records if "could not decode" in r.getMessage()]
    assert len(warnings) == 1 and str(tree / CORRUPT) in warnings[0]
    assert "black image" in warnings[0]


def test_eval_batches_are_centre_crops_in_order_and_skip_bad_files(tree: Path) -> None:
    src = source(tree)
    batches = list(src.eval_batches(CPU, 4, indices=torch.arange(len(src))))
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert len(images) == len(src) - 1  # the corrupt file is left out
    good = [i for i in range(len(src)) if src.images.path(i) != str(tree / CORRUPT)]
    assert torch.equal(labels, src.labels[good])
    first = decode_crop(src.images.path(good[5]), EVAL, S, True, folder.MAX_PIXELS)
    assert torch.equal(images[5], torch.from_numpy(first))
    # With a generator: pretraining's crops, the same for the same generator state.
    a, b = (
        torch.cat([x for x, _ in src.eval_batches(CPU, 4, None, torch.Generator().manual_seed(1))])
        for _ in range(2)
    )
    assert torch.equal(a, b) and not torch.equal(a, images)
    # spread: evenly spaced over the split (gaps of n/4, rounded down), so every class of
    # this class-by-class listing is reached; everything when asked for more than there is.
    n, picked = len(src), src.spread(4).tolist()
    assert picked == [i * n // 4 for i in range(4)] and len(set(picked)) == 4
    assert set(src.labels[picked].tolist()) == {0, 1, 2}
    assert src.spread(100).tolist() == list(range(n))


def test_layout_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--data-dir"):
        open_source(DATA, "train", None)
    (tmp_path / "flat").mkdir()
    noise(8, 8).save(tmp_path / "flat" / "a.png")
    with pytest.raises(UserError, match="no train/ folder"):
        open_source(DATA, "train", tmp_path / "flat")
    with pytest.raises(UserError, match="streamed"):
        load_dataset("imagenet224", "train", tmp_path, 224)


# --- end to end -----------------------------------------------------------------------------

SMALL = [  # paper-imagenet224 with a tiny network (the tiny preset's sizes)
    *TINY_NETWORK,
    "model.attn_layers=1",
    "data.num_classes=3",
]
RECIPE = ["batch_size=4", "warmup_steps=1", "log_every=1", "checkpoint_every=2"]


def cli_args(
    command: str, tree: Path, out: Path, steps: int, size: int, patch: int, *extra: str
) -> list[str]:
    sets = [*SMALL, f"data.image_size={size}", f"data.patch_size={patch}", *extra]
    sets += [f"{command}.{r}" for r in RECIPE] + [f"{command}.steps={steps}"]
    args = [command, "--preset", "paper-imagenet224", "--device", "cpu", "--data-dir", str(tree)]
    return [*args, *(x for s in sets for x in ("--set", s)), "--out", str(out)]


def test_paper_imagenet224_pretrains_and_finetunes_on_a_class_folder_tree(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch, one_thread
) -> None:
    """3 pretraining steps at 32 px (2x2 patches of 16), then 3 finetuning steps from them
    with --workers 1; the test split is opened once, after training."""
    pre = tmp_path / "pre"
    code, _, err = run_cli(cli_args("pretrain", tree, pre, 3, 32, 16), capsys)
    assert code == 0, err
    summary = json.loads((pre / "summary.json").read_text())
    assert summary["train_images"] == 19 and summary["heldout_images"] == 6
    assert math.isfinite(summary["final_loss"]) and 0 <= summary["heldout_pretext_acc"] <= 1

    opened: list[tuple[str, int | None]] = []
    real = selfie.finetune.open_source

    def open_and_record(data, split, *args, **kwargs):
        opened.append((split, kwargs.get("workers")))
        return real(data, split, *args, **kwargs)

    monkeypatch.setattr(selfie.finetune, "open_source", open_and_record)
    ft = tmp_path / "ft"
    args = [*cli_args("finetune", tree, ft, 3, 32, 16), "--labels", "5", "--init", str(pre)]
    code, _, err = run_cli([*args, "--workers", "1"], capsys)
    assert code == 0, err
    assert opened == [("train", 1), ("test", 1)]  # --workers reaches the streamed loader
    assert json.loads((ft / "config.json").read_text())["run"]["workers"] == 1
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["train_images"] == 15 and 0 <= summary["test_acc"] <= 1
    assert json.loads((ft / "subset.json").read_text())["train"]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_resume_reproduces_the_uninterrupted_run(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, one_thread
) -> None:
    """Cut after the step-2 checkpoint of 4 and resumed: the same weights, bitwise (the
    crops of steps 3 and 4 are re-derived from the step alone)."""
    out = tmp_path / "run"
    args = cli_args(command, tree, out, 4, 32, 16) + (
        ["--labels", "4", "--scratch"] if command == "finetune" else []
    )
    assert run_cli(args, capsys)[0] == 0
    final = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
    (out / "checkpoints" / "step_0000004.pt").unlink()
    (out / "summary.json").unlink()
    code, _, err = run_cli(
        [command, "--resume", "--out", str(out), "--data-dir", str(tree)], capsys
    )
    assert code == 0, err
    again = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_real_geometry_224_px_and_7x7_patches_of_32(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread
) -> None:
    """The preset's own geometry (224 px, 49 patches of 32, row + column positions): one
    pretraining step and one finetuning step. Widths from 16: torch 2.13's CPU backward of a
    1x1 stride-2 convolution in channels_last crashes with 4 or 8 input channels on maps of
    56 px and more (the finetuning ResNet's stage 2 at 224 px), whatever the data."""
    wider = ("model.widths=(16,32,64,128)", "model.stem_width=16")
    pre = tmp_path / "pre"
    code, _, err = run_cli(cli_args("pretrain", tree, pre, 1, 224, 32, *wider), capsys)
    assert code == 0, err
    assert json.loads((pre / "summary.json").read_text())["masked_per_image"] == 12
    ft = tmp_path / "ft"
    args = [*cli_args("finetune", tree, ft, 1, 224, 32, *wider), "--labels", "2"]
    args += ["--init", str(pre)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err


class _SignalState(torch.utils.data.Dataset):
    """Reports, from the worker, whether SIGINT and SIGTERM are ignored there."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int, str]:
        stops = (signal.SIGINT, signal.SIGTERM)
        return torch.zeros(1), int(all(signal.getsignal(s) == signal.SIG_IGN for s in stops)), ""


def test_workers_leave_stop_signals_to_the_training_process() -> None:
    """A Ctrl-C or SIGTERM reaches the workers too; they ignore it, so the training process
    can finish its step (with their batches) and save before stopping them."""
    (_, ignored, _), *_ = list(stream._loader(_SignalState(), [[0]], 1, CPU, False))
    assert ignored.tolist() == [1]
