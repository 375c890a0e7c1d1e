"""ImageNet 32x32 loader on tiny fake official-format npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfie import cli
from selfie.data import ImageSet, load_dataset
from selfie.data.imagenet32 import load_imagenet32
from selfie.errors import UserError
from tests.helpers import TINY_NETWORK

ROW = 3 * 32 * 32


def write_batch(path: Path, data: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, data=data, labels=labels, mean=np.zeros(ROW))


def write_fake_imagenet32(root: Path, rows: int = 3, val_rows: int = 10) -> dict[str, np.ndarray]:
    """train_data_batch_1..10 (`rows` rows each, first pixel = batch number) and val_data."""
    rng = np.random.default_rng(0)
    written = {}
    for k in range(1, 11):
        data = rng.integers(0, 256, (rows, ROW), dtype=np.uint8)
        data[:, 0] = k  # red value of pixel (0, 0) tells the batch
        labels = np.array([(k + r) % 1000 + 1 for r in range(rows)])
        write_batch(root / f"train_data_batch_{k}.npz", data, labels)
        written[f"train_data_batch_{k}"] = data
    data = rng.integers(0, 256, (val_rows, ROW), dtype=np.uint8)
    labels = np.array([1, 1000, *range(2, val_rows)])
    write_batch(root / "val_data.npz", data, labels)
    written["val_data"] = data
    return written


def test_loads_shapes_dtypes_and_labels(tmp_path: Path) -> None:
    written = write_fake_imagenet32(tmp_path)
    train = load_imagenet32(tmp_path, train=True)
    val = load_imagenet32(str(tmp_path), train=False)
    assert isinstance(train, ImageSet)
    assert train.images.shape == (30, 3, 32, 32)
    assert val.images.shape == (10, 3, 32, 32)
    assert train.images.dtype == val.images.dtype == torch.uint8
    assert train.labels.dtype == val.labels.dtype == torch.int64
    assert train.images.is_contiguous()
    assert len(train.classes) == 1000 and train.classes[-1] == "999"
    assert val.labels[:3].tolist() == [0, 999, 1]  # 1-based -> 0-based
    assert torch.equal(val.images.reshape(10, ROW), torch.from_numpy(written["val_data"]))


def test_train_batches_in_numeric_order(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path)
    train = load_imagenet32(tmp_path, train=True)
    # batch_10 comes after batch_9 (and after batch_2), not after batch_1 as a string sort.
    assert train.images[::3, 0, 0, 0].tolist() == list(range(1, 11))
    assert train.labels[::3].tolist() == list(range(1, 11))


def test_pixel_layout(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path)
    data = np.zeros((2, ROW), np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 1, 2, 3  # R, G, B planes
    y, x = 5, 17
    data[1, 1024 + y * 32 + x] = 200  # green at row y, column x
    write_batch(tmp_path / "val_data.npz", data, np.array([1, 2]))
    val = load_imagenet32(tmp_path, train=False)
    assert val.images[0, :, 7, 9].tolist() == [1, 2, 3]
    assert torch.nonzero(val.images[1]).tolist() == [[1, y, x]]


def test_accepts_official_sub_folders(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path / "flat")
    for k in range(1, 11):
        name = f"train_data_batch_{k}.npz"
        (tmp_path / "Imagenet32_train_npz").mkdir(exist_ok=True)
        (tmp_path / "flat" / name).rename(tmp_path / "Imagenet32_train_npz" / name)
    (tmp_path / "Imagenet32_val_npz").mkdir()
    (tmp_path / "flat" / "val_data.npz").rename(tmp_path / "Imagenet32_val_npz" / "val_data.npz")
    assert len(load_imagenet32(tmp_path, train=True)) == 30
    assert len(load_imagenet32(tmp_path, train=False)) == 10


def test_missing_file_names_it_and_says_no_download(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path)
    (tmp_path / "train_data_batch_7.npz").unlink()
    with pytest.raises(UserError, match=r"train_data_batch_7\.npz") as err:
        load_imagenet32(tmp_path, train=True)
    assert "no automatic download" in str(err.value)
    with pytest.raises(UserError, match=r"val_data\.npz"):
        load_imagenet32(tmp_path / "nowhere", train=False)


def test_truncated_npz_names_the_file(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path)
    path = tmp_path / "train_data_batch_4.npz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"train_data_batch_4\.npz"):
        load_imagenet32(tmp_path, train=True)


def test_not_an_npz_names_the_file(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path)
    np.save(tmp_path / "val_data.npy", np.zeros(3))
    (tmp_path / "val_data.npy").rename(tmp_path / "val_data.npz")
    with pytest.raises(UserError, match=r"val_data\.npz"):
        load_imagenet32(tmp_path, train=False)
    (tmp_path / "val_data.npz").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match=r"val_data\.npz"):
        load_imagenet32(tmp_path, train=False)


@pytest.mark.parametrize(
    ("data", "labels"),
    [
        (np.zeros((2, ROW), np.uint8), np.array([0, 5])),
        (np.zeros((2, ROW), np.uint8), np.array([1, 1001])),
        (np.zeros((2, ROW), np.uint8), np.array([1.0, 2.0])),
        (np.zeros((2, 100), np.uint8), np.array([1, 2])),
        (np.zeros((3, ROW), np.uint8), np.array([1, 2])),
        (np.zeros((2, ROW), np.float32), np.array([1, 2])),
    ],
)
def test_bad_contents_name_the_file(tmp_path: Path, data: np.ndarray, labels: np.ndarray) -> None:
    write_fake_imagenet32(tmp_path)
    write_batch(tmp_path / "val_data.npz", data, labels)
    with pytest.raises(UserError, match=r"val_data\.npz"):
        load_imagenet32(tmp_path, train=False)


def test_missing_entry_names_the_file(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, ROW), np.uint8))
    with pytest.raises(UserError, match=r"val_data\.npz.*'labels'"):
        load_imagenet32(tmp_path, train=False)


def test_load_dataset(tmp_path: Path) -> None:
    write_fake_imagenet32(tmp_path)
    assert len(load_dataset("imagenet32", "test", tmp_path, 32)) == 10
    assert len(load_dataset("imagenet32", "train", str(tmp_path), 32)) == 30
    with pytest.raises(UserError, match="image_size"):
        load_dataset("imagenet32", "test", tmp_path, 64)
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("imagenet32", "test", None, 32)


def test_cli_pretrain_on_fake_folder(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_fake_imagenet32(data_dir)
    tiny = [*TINY_NETWORK, "pretrain.batch_size=8"]
    argv = ["pretrain", "--preset", "paper-imagenet32", "--data-dir", str(data_dir)]
    for item in tiny:
        argv += ["--set", item]
    argv += ["--steps", "2", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0


def test_data_check_reports_counts_and_missing_classes(tmp_path: Path, capsys) -> None:
    """`selfie data check --dataset imagenet32`: the fake set has a few of the 1,000 classes,
    so each split is reported and the empty classes are a problem (exit 2, one line each);
    a missing batch is named."""
    write_fake_imagenet32(tmp_path)
    code = cli.main(["-q", "data", "check", "--dataset", "imagenet32", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "train: 30 images" in out and "test: 10 images" in out
    assert "classes have no image" in err
    (tmp_path / "train_data_batch_7.npz").unlink()
    code = cli.main(["-q", "data", "check", "--dataset", "imagenet32", "--data-dir", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and "train_data_batch_7.npz" in err
