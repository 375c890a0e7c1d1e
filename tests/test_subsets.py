"""Labelled subsets: amount parsing, class balance, seeding, the 90/10 split, JSON round trip."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from selfie.data.subsets import (
    amount_label,
    balanced_subset,
    load_indices,
    parse_amount,
    per_class_counts,
    read_subset_file,
    save_indices,
    split_validation,
    subset_label,
)
from selfie.errors import UserError


def cifar_like_labels(per_class: int = 5000, num_classes: int = 10) -> torch.Tensor:
    """int64 (per_class * num_classes,) labels, classes interleaved and shuffled."""
    labels = torch.arange(num_classes).repeat(per_class)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]


# --- parse_amount / amount_label ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.08", 0.08), ("1.0", 1.0), (".5", 0.5), ("5%", 0.05), ("100%", 1.0), ("2.5%", 0.025)],
)
def test_parse_amount_fractions(text: str, expected: float) -> None:
    value = parse_amount(text)
    assert isinstance(value, float)
    assert value == pytest.approx(expected)


@pytest.mark.parametrize(("text", "expected"), [("400", 400), ("1", 1), (" 60 ", 60)])
def test_parse_amount_counts(text: str, expected: int) -> None:
    value = parse_amount(text)
    assert isinstance(value, int)
    assert value == expected


@pytest.mark.parametrize("text", ["0", "0.0", "1.5", "150%", "0%", "-3", "abc", "", "5 %", "1e-2"])
def test_parse_amount_rejects(text: str) -> None:
    with pytest.raises(UserError, match="per class"):  # the message lists the accepted forms
        parse_amount(text)


def test_amount_label() -> None:
    assert amount_label(0.08) == "frac0.08"
    assert amount_label(1.0) == "frac1"
    assert amount_label(0.05) == "frac0.05"
    assert amount_label(400) == "400pc"
    assert amount_label(parse_amount("5%")) == "frac0.05"


# --- per_class_counts / balanced_subset -----------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "expected"), [(0.05, 250), (0.08, 400), (0.2, 1000), (1.0, 5000), (400, 400)]
)
def test_per_class_counts_cifar_like(amount: float | int, expected: int) -> None:
    """CIFAR-10's subsets stay exactly what they were: 250 / 400 / 1,000 / 5,000 per class."""
    counts = per_class_counts(cifar_like_labels(), amount, 10)
    assert counts.tolist() == [expected] * 10


def test_per_class_counts_on_unequal_classes() -> None:
    """Classes of 100, 40 and 60 images: a fraction is of the dataset (50% of 200 is about 33
    per class, balanced, as every class has 33); 100% is every image; a class smaller than the
    balanced share gives all it has; a count per class larger than a class is an error."""
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 60)
    assert per_class_counts(labels, 0.5, 3).tolist() == [33, 33, 33]
    assert per_class_counts(labels, 1.0, 3).tolist() == [100, 40, 60]
    assert per_class_counts(labels, 0.8, 3).tolist() == [53, 40, 53]  # class 1 has only 40
    assert per_class_counts(labels, 20, 3).tolist() == [20, 20, 20]
    with pytest.raises(UserError, match="class 1 has only 40"):
        per_class_counts(labels, 41, 3)
    with pytest.raises(UserError, match="less than one image per class"):
        per_class_counts(labels, 0.001, 3)


def test_imagenet_like_five_percent_is_about_64_per_class() -> None:
    """ImageNet's 1,000 classes hold 732 to 1,300 training images; 5% is about 64 of each
    (the paper's "60 examples per class"), not 5% of the smallest class (37)."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(732, 1301, (1000,), generator=g)
    sizes[0], sizes[1] = 732, 1300
    labels = torch.repeat_interleave(torch.arange(1000), sizes)
    counts = per_class_counts(labels, 0.05, 1000)
    assert set(counts.tolist()) == {round(0.05 * len(labels) / 1000)}
    assert abs(int(counts.sum()) - 0.05 * len(labels)) < 1000


def test_balanced_subset_is_balanced_and_sorted() -> None:
    labels = cifar_like_labels(per_class=300)
    idx = balanced_subset(labels, 0.1, 10, seed=0)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.sort(idx).values)
    assert torch.unique(idx).numel() == idx.numel() == 300
    assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.full((10,), 30))


def test_balanced_subset_seeded() -> None:
    labels = cifar_like_labels(per_class=300)
    a = balanced_subset(labels, 25, 10, seed=1)
    assert torch.equal(a, balanced_subset(labels, 25, 10, seed=1))
    assert not torch.equal(a, balanced_subset(labels, 25, 10, seed=2))


def test_balanced_subset_whole_set() -> None:
    labels = cifar_like_labels(per_class=20)
    assert torch.equal(balanced_subset(labels, 1.0, 10, seed=0), torch.arange(200))


def test_balanced_subset_count_too_large() -> None:
    with pytest.raises(UserError, match="class"):
        balanced_subset(cifar_like_labels(per_class=20), 21, 10, seed=0)


@pytest.mark.parametrize("bad", [10, -1])
def test_balanced_subset_label_out_of_range(bad: int) -> None:
    labels = cifar_like_labels(per_class=20)
    labels[7] = bad
    with pytest.raises(UserError, match=f"label {bad}"):
        balanced_subset(labels, 5, 10, seed=0)


# --- split_validation -----------------------------------------------------------------------


def test_split_validation_disjoint_balanced() -> None:
    labels = cifar_like_labels(per_class=500)
    subset = balanced_subset(labels, 200, 10, seed=0)
    train, val = split_validation(labels, subset, 0.1, seed=0)
    assert torch.equal(train, torch.sort(train).values)
    assert torch.equal(val, torch.sort(val).values)
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(torch.sort(torch.cat([train, val])).values, subset)
    assert torch.equal(torch.bincount(labels[val], minlength=10), torch.full((10,), 20))
    assert torch.equal(torch.bincount(labels[train], minlength=10), torch.full((10,), 180))


def test_split_validation_seeded_and_at_least_one() -> None:
    labels = cifar_like_labels(per_class=500)
    subset = balanced_subset(labels, 4, 10, seed=0)
    train, val = split_validation(labels, subset, 0.1, seed=3)  # round(0.4) = 0 -> 1 per class
    assert torch.equal(torch.bincount(labels[val], minlength=10), torch.ones(10, dtype=torch.long))
    assert torch.equal(val, split_validation(labels, subset, 0.1, seed=3)[1])
    assert not torch.equal(val, split_validation(labels, subset, 0.1, seed=4)[1])
    assert train.numel() == 30


def test_split_validation_zero_fraction() -> None:
    labels = cifar_like_labels(per_class=10)
    subset = torch.arange(100)
    train, val = split_validation(labels, subset, 0.0, seed=0)
    assert torch.equal(train, subset)
    assert val.numel() == 0


def test_split_validation_class_of_one() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    with pytest.raises(UserError, match="class 1"):
        split_validation(labels, torch.arange(4), 0.1, seed=0)


# --- save / load ----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    labels = cifar_like_labels(per_class=50)
    subset = balanced_subset(labels, 0.2, 10, seed=0)
    train, val = split_validation(labels, subset, 0.1, seed=0)
    path = tmp_path / "subsets" / "frac0.2.json"
    save_indices(path, subset=subset, train=train, val=val, empty=torch.empty(0, dtype=torch.long))
    loaded = load_indices(path)
    assert list(loaded) == ["subset", "train", "val", "empty"]
    for name, tensor in [("subset", subset), ("train", train), ("val", val)]:
        assert loaded[name].dtype == torch.int64
        assert torch.equal(loaded[name], tensor)
    assert loaded["empty"].numel() == 0


def test_load_indices_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_indices(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_indices(tmp_path / "bad.json")
    (tmp_path / "shape.json").write_text('{"a": [1, "x"]}')
    with pytest.raises(UserError, match="name"):
        load_indices(tmp_path / "shape.json")


# --- subset files (--subset-file) -----------------------------------------------------------

NAMES = ("ant/a1.JPEG", "ant/shared.JPEG", "bee/b1.JPEG", "bee/deep/b2.JPEG", "cat/shared.JPEG")


def test_subset_file_matches_bare_names_and_relative_paths(tmp_path: Path) -> None:
    """SimCLR's format (bare file names), paths relative to the split folder, blank lines and
    a repeated name: the sorted positions of the files named, and the file's sha256."""
    listed = tmp_path / "pick.txt"
    listed.write_bytes(b"b2.JPEG\r\n\nant/a1.JPEG\n./cat/shared.JPEG\nb2.JPEG\n")
    got = read_subset_file(listed, NAMES, "folder")
    assert got.indices.tolist() == [0, 3, 4]
    assert got.record == {
        "path": str(listed),
        "sha256": hashlib.sha256(listed.read_bytes()).hexdigest(),
        "lines": 3,
    }


def test_subset_file_naming_missing_images_is_an_error_naming_the_first_few(
    tmp_path: Path,
) -> None:
    listed = tmp_path / "pick.txt"
    listed.write_text("a1.JPEG\n" + "".join(f"gone{i}.JPEG\n" for i in range(8)))
    with pytest.raises(
        UserError, match=r"8 of its 9 names .* \(first: gone0.JPEG, gone1.JPEG"
    ) as e:
        read_subset_file(listed, NAMES, "folder")
    assert "gone4.JPEG" in str(e.value) and "gone5.JPEG" not in str(e.value)  # the first five
    assert "\n" not in str(e.value)
    listed.write_text("bee/a1.JPEG\n")  # a path must match as a whole
    with pytest.raises(UserError, match=r"first: bee/a1\.JPEG"):
        read_subset_file(listed, NAMES, "folder")


def test_subset_file_ambiguous_bare_name_is_an_error(tmp_path: Path) -> None:
    listed = tmp_path / "pick.txt"
    listed.write_text("shared.JPEG\n")
    with pytest.raises(UserError, match=r"shared.JPEG \(ant/shared.JPEG, cat/shared.JPEG\)"):
        read_subset_file(listed, NAMES, "folder")
    listed.write_text("cat/shared.JPEG\n")  # its path says which one
    assert read_subset_file(listed, NAMES, "folder").indices.tolist() == [4]


def test_subset_file_needs_file_names_and_a_readable_list(tmp_path: Path) -> None:
    listed = tmp_path / "pick.txt"
    listed.write_text("a1.JPEG\n")
    with pytest.raises(UserError, match=r"the cifar10 data has no file names.*use --labels"):
        read_subset_file(listed, None, "cifar10")
    with pytest.raises(UserError, match="cannot read it"):
        read_subset_file(tmp_path / "absent.txt", NAMES, "folder")
    listed.write_text("\n \n")
    with pytest.raises(UserError, match="names no images"):
        read_subset_file(listed, NAMES, "folder")


def test_subset_label_is_filesystem_safe() -> None:
    assert subset_label("lists/1percent.txt") == "file-1percent.txt"
    assert subset_label("my list (v2).txt") == "file-my_list__v2_.txt"
