"""`selfie data check`: real CIFAR-10, fake CIFAR folders with faults, image folders, a
miniature ImageNet class-folder tree."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfie import cli
from selfie.data import check as check_module
from selfie.data.check import OFFICIAL, REBUILT, check_cifar10
from selfie.data.download import md5sum
from tests.helpers import CORRUPT, write_fake_imagenet

ROWS = 20  # rows per fake batch: 2 of each class


def run_check(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["-q", "data", "check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def problems(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("problem: ")]


def write_fake_cifar(root: Path) -> Path:
    """Official-format batches of ROWS images each, with balanced labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [r % 10 for r in range(ROWS)],
            b"data": rng.integers(0, 256, (ROWS, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"class{i}".encode() for i in range(10)]
    meta = {b"num_cases_per_batch": ROWS, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake CIFAR folder that passes every check: ROWS-row batches, its md5s known."""
    folder = write_fake_cifar(tmp_path)
    monkeypatch.setattr(check_module, "ROWS_PER_BATCH", ROWS)
    sums = {p.name: md5sum(p) for p in folder.iterdir()}
    monkeypatch.setitem(check_module.KNOWN_MD5, REBUILT, sums)
    return tmp_path


def test_real_cifar10_passes_and_matches_the_rebuilt_md5s(
    cifar_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_check(["--dataset", "cifar10", "--data-dir", str(cifar_root)], capsys)
    assert code == 0, err
    assert "md5: all 7 files match the known rebuilt copy" in out
    assert "train: 50,000 images" in out and "test: 10,000 images" in out
    assert "5,000, 5,000" in out and "1,000, 1,000" in out
    assert out.rstrip().endswith("ok: no problems found")


def test_fake_cifar_passes(fake_cifar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_check(["--dataset", "cifar10", "--data-dir", str(fake_cifar)], capsys)
    assert code == 0, err
    assert "files: 7 of 7 present" in out and "known rebuilt copy" in out
    assert "classes: class0, class1" in out


def test_md5_of_the_official_release_is_reported_as_such(
    fake_cifar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = check_module.KNOWN_MD5
    monkeypatch.setitem(known, OFFICIAL, known[REBUILT])
    monkeypatch.setitem(known, REBUILT, {})
    result = check_cifar10(fake_cifar)
    assert result.problems == []
    assert f"md5: all 7 files match {OFFICIAL}" in result.report


def test_truncated_batch_is_named(fake_cifar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = fake_cifar / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    code, _, err = run_check(["--dataset", "cifar10", "--data-dir", str(fake_cifar)], capsys)
    assert code == 2
    lines = problems(err)
    assert any("data_batch_3" in line and "truncated" in line for line in lines)
    assert any("data_batch_3: md5" in line for line in lines)
    assert all("data_batch_3" in line for line in lines)  # nothing else is blamed
    assert err.splitlines()[-1].startswith("selfie: error: data check found")


def test_missing_file_is_named(fake_cifar: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (fake_cifar / "cifar-10-batches-py" / "test_batch").unlink()
    code, out, err = run_check(["--dataset", "cifar10", "--data-dir", str(fake_cifar)], capsys)
    assert code == 2
    assert problems(err) == [
        f"problem: {fake_cifar / 'cifar-10-batches-py' / 'test_batch'} is missing; "
        "download CIFAR-10 again (see --download)"
    ]
    assert "files: 6 of 7 present" in out


def test_wrong_counts_unknown_md5s_and_unbalanced_labels(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)  # 20 rows, not 10,000, and md5s nobody knows
    batch = {b"labels": [0] * ROWS, b"data": np.zeros((ROWS, 3072), np.uint8)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    found = check_cifar10(tmp_path).problems
    assert sum("matches neither the official file nor the known rebuilt" in p for p in found) == 7
    assert any("data_batch_1: 20 images, expected 10,000" in p for p in found)
    assert any(p.startswith("train split: 100 images, expected 50,000") for p in found)
    assert any(p.startswith("test split: images per class [20, 0,") for p in found)


def test_batch_folder_itself_points_at_its_parent(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)
    (found,) = check_cifar10(folder).problems
    assert "point --data-dir at its parent" in found and str(tmp_path) in found


def test_folder_report_and_undecodable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, size in (("cat", (48, 36)), ("dog", (20, 20))):
        for i in range(10):
            path = tmp_path / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (i, i, i)).save(path)
    code, out, err = run_check(["--dataset", "folder", "--data-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert "classes (2): cat, dog" in out
    assert "train: 18 images (cat 9, dog 9)" in out and "test: 2 images (cat 1, dog 1)" in out
    assert "shorter side 20..36 px" in out and "10 under 32 px will be upscaled" in out

    (tmp_path / "dog" / "5.png").write_bytes(b"garbage")
    code, out, err = run_check(["--dataset", "folder", "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    (line,) = problems(err)
    assert str(tmp_path / "dog" / "5.png") in line and "does not decode" in line
    assert "undecodable: 1 files" in out


def test_folder_needs_an_existing_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_check(["--dataset", "folder"], capsys)
    assert code == 2 and "--data-dir" in err
    code, _, err = run_check(["--dataset", "folder", "--data-dir", str(tmp_path / "no")], capsys)
    assert code == 2 and "does not exist" in problems(err)[0]


def test_digits_is_fine(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_check(["--dataset", "digits"], capsys)
    assert code == 0 and "train: 1,437 images, test: 360" in out


def test_imagenet224_counts_files_per_split_and_decodes_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_fake_imagenet(tmp_path / "imagenet")
    code, out, err = run_check(["--dataset", "imagenet224", "--data-dir", str(root)], capsys)
    assert code == 0, err  # files are counted by name: the corrupt one is not opened
    assert "classes (3): ant, bee, cat" in out
    assert "train: 19 image files (3 classes, 6-7 per class)" in out
    assert "test: 6 image files (3 classes, 2 per class)" in out and "--decode" in out

    args = ["--dataset", "imagenet224", "--data-dir", str(root), "--decode"]
    code, out, err = run_check(args, capsys)
    assert code == 2
    (line,) = problems(err)
    assert str(root / CORRUPT) in line and "does not decode" in line
    assert "train: 18 images" in out and "under 224 px will be upscaled" in out


def test_imagenet224_needs_train_and_class_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_check(["--dataset", "imagenet224"], capsys)
    assert code == 2 and "--data-dir" in err
    flat = tmp_path / "flat"  # loose images: no train/, no classes
    flat.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8)).save(flat / f"{i}.png")
    code, _, err = run_check(["--dataset", "imagenet224", "--data-dir", str(flat)], capsys)
    assert code == 2
    assert any("no train/ folder" in p for p in problems(err))
    assert any("no class sub-folders" in p for p in problems(err))
