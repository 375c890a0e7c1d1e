"""Data layer: augmentation against naive loops, loaders on fake and real files, safe I/O."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from selfie.data import ImageSet, load_dataset
from selfie.data import cifar10 as cifar10_module
from selfie.data.augment import channel_stats, normalize, pad_crop_flip
from selfie.data.cifar10 import load_cifar10
from selfie.data.digits import load_digits
from selfie.data.download import download_file, md5sum, safe_extract_tar
from selfie.errors import UserError

CLASS_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
CLASS_NAMES += [b"dog", b"frog", b"horse", b"ship", b"truck"]


def random_images(b: int = 16, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


# --- augment --------------------------------------------------------------------------------


def test_pad_crop_flip_identity_without_pad_or_flip() -> None:
    x = random_images()
    assert pad_crop_flip(x, pad=0, flip=False) is x


def test_pad_crop_flip_reproducible_from_seed() -> None:
    x = random_images(b=32)
    a = pad_crop_flip(x, 4, True, torch.Generator().manual_seed(7))
    b = pad_crop_flip(x, 4, True, torch.Generator().manual_seed(7))
    c = pad_crop_flip(x, 4, True, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pad_crop_flip_keeps_dtype_and_shape() -> None:
    x = random_images(b=5, c=3, h=8, w=12)
    out = pad_crop_flip(x, 3, True, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8
    assert out.shape == x.shape


def test_flip_only_mirrors_some_images_and_keeps_the_rest() -> None:
    x = random_images(b=64)
    out = pad_crop_flip(x, 0, True, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 64  # both outcomes occur, roughly half each


def reflected(k: int, n: int) -> int:
    """Index of padded coordinate k (0 = the first pixel of the image) after reflection."""
    return -k if k < 0 else 2 * (n - 1) - k if k >= n else k


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_every_output_is_a_window_of_the_padded_input(mode: str) -> None:
    pad, b = 2, 48
    x = random_images(b=b, h=6, w=7)
    out = pad_crop_flip(x, pad, True, torch.Generator().manual_seed(3), mode)
    padded = torch.zeros(b, 3, 6 + 2 * pad, 7 + 2 * pad, dtype=torch.uint8)
    padded[:, :, pad : pad + 6, pad : pad + 7] = x
    if mode == "reflect":  # naive reference: every padded pixel mirrors one of the image
        for i in range(6 + 2 * pad):
            for j in range(7 + 2 * pad):
                padded[:, :, i, j] = x[:, :, reflected(i - pad, 6), reflected(j - pad, 7)]
    seen = set()
    for i in range(b):  # naive reference: try every window and both orientations
        matches = [
            (oy, ox, mirror)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            for mirror in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, oy : oy + 6, ox : ox + 7].flip(-1)
                if mirror
                else padded[i, :, oy : oy + 6, ox : ox + 7],
            )
        ]
        assert matches, f"image {i} is not a window of its padded input"
        seen.update(matches)
    assert len({(oy, ox) for oy, ox, _ in seen}) > 5  # offsets vary from image to image
    assert {m for _, _, m in seen} == {False, True}


def test_reflect_padding_leaves_no_border_to_see() -> None:
    """The border cue: a white image keeps zero pixels in some crops with zero padding and
    none with reflect padding (the pretraining ablation of issue 11)."""
    white = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    zero = pad_crop_flip(white, 4, True, torch.Generator().manual_seed(0), "zero")
    reflect = pad_crop_flip(white, 4, True, torch.Generator().manual_seed(0), "reflect")
    assert bool((zero == 0).any()) and bool((reflect == 255).all())


def test_channel_stats_matches_direct_computation() -> None:
    x = random_images(b=5000, h=4, w=4)  # more than one chunk
    mean, std = channel_stats(x)
    xf = x.double() / 255
    assert mean.dtype == std.dtype == torch.float32
    assert mean.shape == std.shape == (3,)
    torch.testing.assert_close(mean, xf.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(std, xf.std(dim=(0, 2, 3), correction=0).float())


def test_a_constant_channel_normalises_to_zero_not_nan() -> None:
    """Images whose blue channel is always 50 (std 0): normalised, that channel is 0."""
    x = random_images(b=8, h=4, w=4)
    x[:, 2] = 50
    mean, std = channel_stats(x)
    assert std[2] == pytest.approx(1 / 255)
    out = normalize(x, mean, std)
    assert torch.isfinite(out).all() and torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))


def test_normalize_matches_direct_computation() -> None:
    x = random_images()
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    out = normalize(x, mean, std)
    expected = (x.float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    with pytest.raises(TypeError):
        normalize(x.float(), mean, std)


# --- digits -------------------------------------------------------------------------------


def test_digits_split_sizes_stratified_and_deterministic() -> None:
    train, test = load_digits(train=True), load_digits(train=False)
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    for split in (train, test):
        assert split.images.shape[1:] == (3, 32, 32)
        assert split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert set(split.labels.tolist()) == set(range(10))
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # grey, repeated to RGB
    assert train.classes == tuple("0123456789")
    again = load_digits(train=False)
    assert torch.equal(again.images, test.images)
    assert torch.equal(again.labels, test.labels)
    assert int(test.images.max()) == 255


def test_load_dataset_dispatches_and_checks() -> None:
    data = load_dataset("digits", "test", None, 16)
    assert data.images.shape[-2:] == (16, 16)
    with pytest.raises(UserError, match="streamed"):
        load_dataset("imagenet224", "train", None, 32)
    with pytest.raises(UserError, match="cifar10, digits"):
        load_dataset("mnist", "train", None, 32)
    with pytest.raises(UserError, match="split"):
        load_dataset("digits", "val", None, 32)


def test_load_dataset_rejects_wrong_image_size(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    with pytest.raises(UserError, match="image_size"):
        load_dataset("cifar10", "test", tmp_path, 64)


# --- cifar10 ------------------------------------------------------------------------------


def write_fake_cifar(root: Path, rows: int = 20) -> dict[str, np.ndarray]:
    """Official-format batches (protocol 2, bytes keys) with `rows` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        labels = [(i + r) % 10 for r in range(rows)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = data
    meta = {b"num_cases_per_batch": rows, b"label_names": CLASS_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar10_loads_fake_folder(tmp_path: Path) -> None:
    written = write_fake_cifar(tmp_path)
    train = load_cifar10(tmp_path, train=True)
    test = load_cifar10(str(tmp_path), train=False)
    assert isinstance(train, ImageSet)
    assert train.images.shape == (100, 3, 32, 32)
    assert test.images.shape == (20, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous()
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert train.labels[:3].tolist() == [0, 1, 2]
    assert train.labels[20:23].tolist() == [1, 2, 3]  # data_batch_2 follows data_batch_1
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    row = written["test_batch"][4]
    assert test.images[4, 1, 0, 0] == row[1024]
    assert test.images[4, 2, 31, 31] == row[3071]
    assert test.images[4, 0, 1, 0] == row[32]


def test_cifar10_missing_folder_suggests_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--download") as err:
        load_cifar10(tmp_path / "nowhere", train=True)
    assert "data_batch_1" in str(err.value)


def test_cifar10_truncated_batch_names_the_file(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(UserError, match="data_batch_3"):
        load_cifar10(tmp_path, train=True)


def test_cifar10_wrong_shape_names_the_file(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad = {b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)}
    batch.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(UserError, match="test_batch"):
        load_cifar10(tmp_path, train=False)


def test_cifar10_refuses_pickles_that_call_arbitrary_code(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="test_batch"):
        load_cifar10(tmp_path, train=False)


def make_archive(path: Path, source: Path) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return md5sum(path)


def test_cifar10_download_extracts_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_cifar(tmp_path / "src")
    archive = tmp_path / "fake.tar.gz"
    md5 = make_archive(archive, tmp_path / "src")
    monkeypatch.setattr(cifar10_module, "ARCHIVE_URL", archive.as_uri())
    monkeypatch.setattr(cifar10_module, "ARCHIVE_MD5", md5)
    root = tmp_path / "root"
    data = load_cifar10(root, train=False, download=True)
    direct = load_cifar10(tmp_path / "src", train=False)  # the files the archive was made of
    assert len(data) == 20
    assert torch.equal(data.images, direct.images) and torch.equal(data.labels, direct.labels)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # archive gone

    monkeypatch.setattr(cifar10_module, "ARCHIVE_MD5", "0" * 32)
    other = tmp_path / "other"
    with pytest.raises(UserError, match="checksum"):
        load_cifar10(other, train=False, download=True)
    assert list(other.iterdir()) == []


# --- download and extraction ----------------------------------------------------------------


def test_md5sum_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"selfie" * 1000)
    assert md5sum(f) == hashlib.md5(b"selfie" * 1000).hexdigest()


def test_download_file_checks_md5(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01payload" * 5000)
    dest = tmp_path / "out" / "dest.bin"
    download_file(src.as_uri(), dest, md5sum(src))
    assert dest.read_bytes() == src.read_bytes()
    assert not dest.with_suffix(".part").exists()

    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(UserError, match="checksum"):
        download_file(src.as_uri(), bad, "0" * 32)
    assert not bad.exists()
    assert not bad.with_suffix(".part").exists()


def test_download_file_unreachable_url_is_a_user_error(tmp_path: Path) -> None:
    dest = tmp_path / "dest.bin"
    with pytest.raises(UserError, match="could not download"):
        download_file((tmp_path / "absent.bin").as_uri(), dest, "0" * 32)
    assert list(tmp_path.iterdir()) == []


def tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def file_member(name: str, payload: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), payload


def link_member(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    ("members", "complaint"),
    [
        ([file_member("ok.txt"), file_member("../evil")], "'..'"),
        ([file_member("dir/../../evil")], "'..'"),
        ([file_member("/tmp/evil")], "absolute"),
        ([link_member("escape", "../../etc")], "outside"),
        ([link_member("escape", "/etc/passwd")], "absolute"),
        ([link_member("escape", "../outside", hard=True)], "outside"),
        # "here" points at the target itself, so "here/.." is its parent: only a walk that
        # refuses to pass through links catches this, not a lexical normpath.
        ([link_member("here", "."), link_member("up", "here/..")], "outside"),
        ([link_member("here", "."), file_member("here/file")], "through a link"),
    ],
)
def test_safe_extract_tar_refuses_escaping_members(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], complaint: str
) -> None:
    archive = tar_with(tmp_path / "bad.tar", *members)
    target = tmp_path / "target"
    with pytest.raises(UserError, match=complaint) as err:
        safe_extract_tar(archive, target)
    assert repr(members[-1][0].name) in str(err.value)  # names the offending member
    assert list(target.iterdir()) == []  # nothing extracted, not even the good members


def test_safe_extract_tar_refuses_fifo(tmp_path: Path) -> None:
    info = tarfile.TarInfo("pipe")
    info.type = tarfile.FIFOTYPE
    archive = tar_with(tmp_path / "bad.tar", (info, None))
    with pytest.raises(UserError, match="fifo"):
        safe_extract_tar(archive, tmp_path / "target")


@pytest.mark.parametrize("has_data_filter", [True, False])
def test_safe_extract_tar_extracts_good_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_data_filter: bool
) -> None:
    if not has_data_filter:  # the Python 3.10 path: tarfile has no filter= argument
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tar_with(
        tmp_path / "good.tar",
        file_member("a/b.txt", b"hello"),
        file_member("./c.txt", b"world"),
        link_member("a/link", "b.txt"),
    )
    target = tmp_path / "target"
    safe_extract_tar(archive, target)
    assert (target / "a" / "b.txt").read_bytes() == b"hello"
    assert (target / "c.txt").read_bytes() == b"world"
    assert (target / "a" / "link").read_bytes() == b"hello"


def test_safe_extract_tar_corrupt_archive_is_a_user_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"not a tar file at all")
    with pytest.raises(UserError, match=r"broken\.tar\.gz"):
        safe_extract_tar(archive, tmp_path / "target")


# --- real data ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar10(cifar_root: Path) -> None:
    train = load_cifar10(cifar_root, train=True)
    test = load_cifar10(cifar_root, train=False)
    assert train.images.shape == (50_000, 3, 32, 32)
    assert test.images.shape == (10_000, 3, 32, 32)
    assert train.images.dtype == test.images.dtype == torch.uint8
    assert torch.bincount(train.labels, minlength=10).tolist() == [5_000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1_000] * 10
    assert train.classes == tuple(n.decode() for n in CLASS_NAMES)
    # Known values of the official files (first pixels of data_batch_1 row 0, first labels).
    assert train.images[0, 0, 0, :3].tolist() == [59, 43, 50]
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    mean, std = channel_stats(train.images)
    torch.testing.assert_close(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.tensor([0.2470, 0.2435, 0.2616]), atol=1e-4, rtol=0)
