"""Image folders: layout rules, colour modes, resize and crop, bad files, parallel decoding."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfie import cli
from selfie.data import folder as folder_module
from selfie.data import load_dataset
from selfie.data.folder import decode_images, load_folder, scan_folder
from selfie.errors import UserError


def save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def colours(data: torch.Tensor) -> list[tuple[int, ...]]:
    """The colour of pixel (0, 0) of each image of a uint8 (N, 3, H, W) batch."""
    return [tuple(int(v) for v in data[i, :, 0, 0]) for i in range(len(data))]


# --- layout ---------------------------------------------------------------------------------


def test_class_folders_give_labels_and_every_tenth_image_is_held_out(tmp_path: Path) -> None:
    # Image i of class c is solid (c * 100, i * 10, 0): its colour says which file it was.
    for c, name in enumerate(["dog", "cat"]):
        for i in range(12):
            sub = "nested/deeper/" if i == 11 else ""  # any depth below the class folder
            save(tmp_path / name / f"{sub}{i:02d}.png", solid((c * 100, i * 10, 0)))
    train = load_folder(tmp_path, 8, "train")
    test = load_folder(tmp_path, 8, "test")
    assert train.classes == test.classes == ("cat", "dog")  # sorted folder names
    assert train.images.shape == (22, 3, 8, 8) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous()
    assert torch.bincount(train.labels).tolist() == [11, 11]
    # The 10th file of each class in sorted order (index 9) is the test split, only there.
    assert colours(test.images) == [(100, 90, 0), (0, 90, 0)]
    assert test.labels.tolist() == [0, 1]
    assert (100, 90, 0) not in colours(train.images)
    for colour, label in zip(colours(train.images), train.labels.tolist(), strict=True):
        assert train.classes[label] == ("cat" if colour[0] == 100 else "dog")


def test_train_and_test_folders_are_the_splits(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for c, name in enumerate(["a", "b"]):
            for i in range(n):
                save(tmp_path / split / name / f"{i}.png", solid((c * 100, i, 0)))
    train, test = load_folder(tmp_path, 8, "train"), load_folder(tmp_path, 8, "test")
    assert train.classes == test.classes == ("a", "b")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.labels.tolist() == [0, 0, 1, 1]
    assert colours(test.images)[2] == (100, 0, 0)  # test/b/0.png, label 1


def test_val_folder_is_the_test_split_and_test_labels_follow_train_classes(
    tmp_path: Path,
) -> None:
    for name in ("a", "b", "c"):
        save(tmp_path / "train" / name / "0.png", solid((1, 2, 3)))
    save(tmp_path / "val" / "c" / "0.png", solid((1, 2, 3)))  # only class c in val/
    assert load_folder(tmp_path, 8, "test").labels.tolist() == [2]
    save(tmp_path / "val" / "zebra" / "0.png", solid((1, 2, 3)))
    with pytest.raises(UserError, match="'zebra'"):
        load_folder(tmp_path, 8, "test")


def test_loose_test_images_with_labelled_train_are_refused(tmp_path: Path) -> None:
    save(tmp_path / "train" / "a" / "0.png", solid((1, 2, 3)))
    save(tmp_path / "test" / "0.png", solid((1, 2, 3)))
    with pytest.raises(UserError, match="class sub-folders"):
        load_folder(tmp_path, 8, "test")


def test_loose_images_are_unlabelled(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / f"{i}.jpg", solid((i, i, i)))
    data = load_folder(tmp_path, 8, "train")
    assert data.classes == ("unlabelled",)
    assert data.labels.tolist() == [0, 0, 0]


def test_loose_images_beside_class_folders_drop_labels_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(tmp_path / "stray.png", solid((1, 2, 3)))
    save(tmp_path / "cat" / "0.png", solid((1, 2, 3)))
    with caplog.at_level(logging.WARNING):
        data = load_folder(tmp_path, 8, "train")
    assert data.classes == ("unlabelled",) and len(data) == 2
    assert "labels were dropped" in caplog.text


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    save(tmp_path / "a" / "0.PNG", solid((1, 2, 3)))  # extensions match in any case
    save(tmp_path / "a" / ".hidden.png", solid((1, 2, 3)))
    save(tmp_path / ".cache" / "x.png", solid((1, 2, 3)))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    layout = scan_folder(tmp_path)
    assert [p.name for p, _ in layout.files["train"]] == ["0.PNG"]
    assert layout.classes == ("a",) and layout.ignored == 1


@pytest.mark.parametrize("make", ["missing", "empty", "text-only"])
def test_missing_or_empty_folder_is_a_user_error(tmp_path: Path, make: str) -> None:
    root = tmp_path / "images"
    if make != "missing":
        root.mkdir()
    if make == "text-only":
        (root / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="images") as err:
        load_folder(root, 8, "train")
    assert str(root) in str(err.value) and "--data-dir" in str(err.value)


def test_test_folder_without_train_folder_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "test" / "a" / "0.png", solid((1, 2, 3)))
    with pytest.raises(UserError, match="no train/ folder"):
        load_folder(tmp_path, 8, "train")


def test_too_few_images_to_hold_out_asks_for_a_test_folder(tmp_path: Path) -> None:
    for i in range(9):
        save(tmp_path / "a" / f"{i}.png", solid((1, 2, 3)))
    assert len(load_folder(tmp_path, 8, "train")) == 9
    with pytest.raises(UserError, match="add a test/ folder"):
        load_folder(tmp_path, 8, "test")


def test_load_dataset_dispatches_folder_and_needs_data_dir(tmp_path: Path) -> None:
    save(tmp_path / "a.png", solid((1, 2, 3), (40, 30)))
    data = load_dataset("folder", "train", tmp_path, 16)
    assert data.images.shape == (1, 3, 16, 16)
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("folder", "train", None, 16)


# --- pixels ---------------------------------------------------------------------------------


def test_colour_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    save(tmp_path / "0_grey.png", Image.new("L", (8, 8), 77))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (4, 0, 8, 8))  # right half: green but fully transparent
    save(tmp_path / "1_rgba.png", rgba)
    palette = solid((10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    save(tmp_path / "2_palette.gif", palette)
    save(tmp_path / "3_cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)
    grey16 = Image.fromarray(np.full((8, 8), 0x4D00, dtype=np.uint16))  # mode I;16
    save(tmp_path / "4_grey16.png", grey16)
    save(
        tmp_path / "5_half_alpha.webp",
        Image.new("RGBA", (8, 8), (200, 100, 50, 128)),
        lossless=True,
    )
    save(tmp_path / "6_bitmap.bmp", solid((5, 6, 7)))

    data = load_folder(tmp_path, 8, "train")
    assert data.images.shape == (7, 3, 8, 8)
    grey, rgba_out, pal, cmyk, g16, half, bmp = (data.images[i] for i in range(7))
    assert grey.flatten(1).unique(dim=1).flatten().tolist() == [77, 77, 77]
    assert rgba_out[:, :, :4].flatten(1).unique(dim=1).flatten().tolist() == [255, 0, 0]
    assert int(rgba_out[:, :, 4:].max()) == 0  # transparent -> black, not the hidden green
    assert colours(pal[None]) == [(10, 200, 30)]
    assert np.abs(cmyk[:, 0, 0].numpy().astype(int) - [255, 0, 0]).max() <= 3  # JPEG noise
    assert colours(g16[None]) == [(0x4D, 0x4D, 0x4D)]  # top 8 bits, not clipped to 255
    assert np.abs(half[:, 0, 0].numpy().astype(int) - [100, 50, 25]).max() <= 1  # over black
    assert colours(bmp[None]) == [(5, 6, 7)]


@pytest.mark.parametrize(("w", "h"), [(64, 32), (32, 64)])
def test_non_square_image_is_resized_and_centre_cropped(tmp_path: Path, w: int, h: int) -> None:
    # Red and blue strips outside the centred square, which is green: only green survives. The
    # strips stop 4 px short of the square, beyond the reach of the 2x-downscaling filter.
    m = max(w, h) // 4 - 4
    image = solid((0, 255, 0), (w, h))
    first, last = ((0, 0, m, h), (w - m, 0, w, h)) if w > h else ((0, 0, w, m), (0, h - m, w, h))
    image.paste((255, 0, 0), first)
    image.paste((0, 0, 255), last)
    save(tmp_path / "wide.png", image)
    out = load_folder(tmp_path, 16, "train").images[0]
    assert out.shape == (3, 16, 16)
    assert out.flatten(1).unique(dim=1).flatten().tolist() == [0, 255, 0]

    # On a textured image: equal to resizing the shorter side to 16 and cropping the centre
    # (torchvision's Resize + CenterCrop), here with whole-pixel sizes so both are exact.
    textured = noise(w, h, seed=1)
    save(tmp_path / "wide.png", textured)
    rw, rh = w * 16 // min(w, h), h * 16 // min(w, h)
    left, top = (rw - 16) // 2, (rh - 16) // 2
    resized = textured.resize((rw, rh), Image.Resampling.BILINEAR)
    expected = np.asarray(resized.crop((left, top, left + 16, top + 16))).transpose(2, 0, 1)
    got = load_folder(tmp_path, 16, "train").images[0].numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


# --- bad files ------------------------------------------------------------------------------


def test_corrupt_file_is_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(tmp_path / "good.png", solid((1, 2, 3)))
    (tmp_path / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    truncated = save(tmp_path / "truncated.png", noise(32, 32, seed=0))
    truncated.write_bytes(truncated.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        data = load_folder(tmp_path, 8, "train")
    assert len(data) == 1 and colours(data.images) == [(1, 2, 3)]
    assert "skipped 2 of 3 image files" in caplog.text
    assert "broken.jpg" in caplog.text and "truncated.png" in caplog.text


def test_image_over_the_pixel_limit_is_skipped_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(folder_module, "MAX_PIXELS", 100)
    save(tmp_path / "small.png", solid((1, 2, 3), (10, 10)))  # exactly 100 pixels: allowed
    save(tmp_path / "bomb.png", solid((1, 2, 3), (11, 10)))
    with caplog.at_level(logging.WARNING):
        assert len(load_folder(tmp_path, 8, "train")) == 1
    assert "bomb.png (11x10 is 110 pixels, over the limit of 100" in caplog.text
    # Parallel workers get the same limit (it is passed to them, not read from their globals).
    decoded = decode_images([tmp_path / "small.png", tmp_path / "bomb.png"], 8, workers=2)
    assert decoded.ok.tolist() == [True, False] and "pixels" in decoded.errors[0][1]


def test_nothing_decodes_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="none of the 1 image files"):
        load_folder(tmp_path, 8, "train")


def test_parallel_decode_equals_serial(tmp_path: Path) -> None:
    for i in range(40):
        w, h = 20 + i % 7 * 5, 30 - i % 3 * 4
        save(tmp_path / f"c{i % 3}" / f"{i:02d}.png", noise(w, h, seed=i))
    save(tmp_path / "c1" / "grey.jpg", Image.new("L", (40, 30), 99))
    (tmp_path / "c2" / "05_bad.png").write_bytes(b"junk")  # a gap in the middle of a chunk
    serial = load_folder(tmp_path, 16, "train", workers=1)
    parallel = load_folder(tmp_path, 16, "train", workers=2)
    # 14 files per class, the 10th of each held out: 39 training files, 1 of them junk.
    assert len(serial) == 38
    assert torch.equal(serial.images, parallel.images)
    assert torch.equal(serial.labels, parallel.labels)
    assert serial.classes == parallel.classes == ("c0", "c1", "c2")


# --- end to end -----------------------------------------------------------------------------


def test_pretrain_on_a_folder_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    for i in range(20):  # 18 for training (>= the tiny batch of 16), 2 held out
        save(images / f"{i:02d}.jpg", noise(40, 36, seed=i))
    out = tmp_path / "run"
    args = ["-q", "pretrain", "--preset", "tiny", "--set", "data.dataset='folder'"]
    code = cli.main([*args, "--data-dir", str(images), "--steps", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["config"]["data"]["dataset"] == "folder"
    assert (out / "model.safetensors").exists()


def test_labelled_amounts_on_unequal_classes_through_finetune(tmp_path: Path, capsys) -> None:
    """A folder with train/ classes of 30, 60 and 90 images: --labels 1.0 trains on all 180,
    --labels 0.1 on 6 of each class (10% of 180, split evenly); summary.json and subset.json
    record every class's count."""
    from tests.helpers import run_cli

    for c, (name, count) in enumerate((("ant", 30), ("bee", 60), ("cat", 90))):
        for i in range(count):
            save(tmp_path / "data" / "train" / name / f"{i}.png", noise(32, 32, 1000 * c + i))
        save(tmp_path / "data" / "test" / name / "0.png", noise(32, 32, 99_000 + c))
    common = ["finetune", "--preset", "tiny", "--dataset", "folder", "--scratch"]
    common += ["--data-dir", str(tmp_path / "data"), "--set", "data.num_classes=3", "--steps", "2"]
    for amount, counts in (("1.0", [30, 60, 90]), ("0.1", [6, 6, 6])):
        out = tmp_path / f"run{amount}"
        code, _, err = run_cli([*common, "--labels", amount, "--out", str(out)], capsys)
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["train_images"] == sum(counts)
        assert summary["labelled_per_class"] == counts
        assert json.loads((out / "subset.json").read_text())["labelled_per_class"] == counts


def _named_folder(root: Path, per_class: int = 4) -> Path:
    """train/<class>/<class>_<i>.png for ant, bee, cat (file names unique across classes),
    and one test image per class."""
    for c, name in enumerate(("ant", "bee", "cat")):
        for i in range(per_class):
            save(root / "train" / name / f"{name}_{i}.png", noise(32, 32, 100 * c + i))
        save(root / "test" / name / "t.png", noise(32, 32, 999 + c))
    return root


def test_subset_file_selects_the_named_images_through_finetune(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Bare names and relative paths pick exactly those training images, and training draws
    from them alone (with --validation, from their 90% part alone); subset.json and
    summary.json record them, the count of each class, and the file's path and sha256."""
    from selfie.data import source
    from tests.helpers import run_cli

    drawn: list[int] = []  # the training positions of every image of every step's batch
    real_get = source.MemoryBatches.get

    def get(self, step, rows, generator):
        drawn.extend(self.pool[self.sampler.batch(step)].tolist())
        return real_get(self, step, rows, generator)

    monkeypatch.setattr(source.MemoryBatches, "get", get)

    data = _named_folder(tmp_path / "data")
    listed = tmp_path / "pick.txt"
    # Six images: a batch of 5 crashes torch 2.13's channels_last backward on 2 threads.
    listed.write_text("ant_0.png\nant_3.png\nbee/bee_1.png\ncat_2.png\ncat/cat_0.png\nant_1.png\n")
    out = tmp_path / "run"
    args = ["finetune", "--preset", "tiny", "--dataset", "folder", "--scratch", "--data-dir"]
    args += [str(data), "--set", "data.num_classes=3", "--steps", "2", "--out", str(out)]
    code, _, err = run_cli([*args, "--subset-file", str(listed)], capsys)
    assert code == 0, err
    names = load_folder(data, 32, "train").names
    assert names is not None
    subset = json.loads((out / "subset.json").read_text())
    chosen = [names[i] for i in subset["train"]]
    assert chosen == [
        "ant/ant_0.png",
        "ant/ant_1.png",
        "ant/ant_3.png",
        "bee/bee_1.png",
        "cat/cat_0.png",
        "cat/cat_2.png",
    ]
    record = {"path": str(listed), "sha256": hashlib.sha256(listed.read_bytes()).hexdigest()}
    record["lines"] = 6
    assert subset["subset_file"] == record and subset["labelled_per_class"] == [3, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["subset_file"] == record and summary["labels"] is None
    assert summary["train_images"] == 6 and summary["labelled_per_class"] == [3, 1, 2]
    assert set(drawn) == set(subset["train"])  # 2 steps of 6: each named image, none else

    drawn.clear()
    tune, listed_for_tuning = tmp_path / "tune", tmp_path / "tune.txt"
    listed_for_tuning.write_text(
        "".join(
            f"{n}.png\n" for n in ["ant_0", "ant_1", "ant_2", "bee_0", "bee_1", "cat_0", "cat_1"]
        )
    )
    code, _, err = run_cli(
        [*args[:-1], str(tune), "--subset-file", str(listed_for_tuning), "--validation"], capsys
    )
    assert code == 0, err
    split = json.loads((tune / "subset.json").read_text())
    assert len(split["val"]) == 3 and len(split["train"]) == 4  # one of each class held out
    assert sorted(names[i].split("/")[1] for i in split["train"] + split["val"]) == sorted(
        listed_for_tuning.read_text().split()
    )
    assert set(drawn) == set(split["train"])  # never a validation image

    # A list naming an image the data does not have: one line naming it, no run folder.
    listed.write_text("ant_0.png\ndog_9.png\n")
    code, _, err = run_cli(
        [*args[:-1], str(tmp_path / "bad"), "--subset-file", str(listed)], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "1 of its 2 names" in err and "dog_9.png" in err
    assert not (tmp_path / "bad").exists()


def test_subset_file_on_a_dataset_without_file_names_is_refused(tmp_path: Path, capsys) -> None:
    from tests.helpers import run_cli

    listed = tmp_path / "pick.txt"
    listed.write_text("0.png\n")
    out = tmp_path / "run"
    args = ["finetune", "--preset", "tiny", "--scratch", "--subset-file", str(listed)]
    code, _, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the digits data has no file names" in err and not out.exists()
    code, _, err = run_cli([*args, "--labels", "3", "--out", str(out)], capsys)
    assert code == 2 and "not allowed with argument" in err  # one or the other


def test_pretraining_from_an_unlabelled_flat_folder(tmp_path: Path, capsys) -> None:
    """--unlabelled-dir: every image at any depth, any size and mode, no class folders; the
    held-out pretext accuracy is still measured on the dataset's test split (the digits'
    360); the folder is recorded and a resume reads it back, to the same weights."""
    import torch as t

    from tests.helpers import run_cli

    pool = tmp_path / "pool"
    for i in range(20):
        sub = ("", "holiday/", "holiday/day2/")[i % 3]
        image = noise(40 + i, 30 + 2 * i, seed=i).convert(("RGB", "L", "RGBA")[i % 3])
        save(pool / f"{sub}{i:02d}.{('png', 'jpg')[i % 3 == 1]}", image)
    out = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--steps", "4", "--out", str(out)]
    code, _, err = run_cli([*args, "--unlabelled-dir", str(pool)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 20 and summary["unlabelled_dir"] == str(pool)
    assert summary["heldout_images"] == 360
    assert json.loads((out / "config.json").read_text())["run"]["unlabelled_dir"] == str(pool)

    final = t.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
    (out / "checkpoints" / "step_0000004.pt").unlink()
    (out / "summary.json").unlink()
    code, _, err = run_cli(["pretrain", "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["train_images"] == 20
    again = t.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
    assert all(t.equal(again[k], final[k]) for k in final)
    # Resuming on another pool is refused.
    code, _, err = run_cli(
        ["pretrain", "--resume", "--out", str(out), "--unlabelled-dir", str(tmp_path)], capsys
    )
    assert code == 2 and "drop --unlabelled-dir" in err


def test_unlabelled_folder_holding_the_test_images_is_refused(tmp_path: Path, capsys) -> None:
    from tests.helpers import run_cli

    data = _named_folder(tmp_path / "data")
    args = ["pretrain", "--preset", "tiny", "--dataset", "folder", "--data-dir", str(data)]
    args += ["--set", "data.num_classes=3", "--out", str(tmp_path / "run")]
    for pool in (data, data / "test" / "ant"):
        code, _, err = run_cli([*args, "--unlabelled-dir", str(pool)], capsys)
        assert code == 2 and "must not see the test images" in err, err
    assert not (tmp_path / "run").exists()
