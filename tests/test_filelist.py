"""The saved file list of a large tree: reused while the tree is unchanged, rebuilt when a
file is added, never saved for a tree that is still changing, harmless when unwritable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

from selfie.data import filelist
from selfie.data.folder import scan_folder

HOUR_AGO = time.time() - 3600


def write_tree(root: Path) -> None:
    """train/ with 2 classes of 3 images (one nested deeper), test/ with one of each."""
    for split, n in (("train", 3), ("test", 1)):
        for name in ("ant", "bee"):
            for i in range(n):
                sub = "deep/" if (split, name, i) == ("train", "bee", 2) else ""
                path = root / split / name / f"{sub}{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4)).save(path)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")


def settle(root: Path) -> None:
    """Date every folder an hour back: a tree that stopped changing long ago."""
    for here, _, _ in os.walk(root):
        os.utime(here, (HOUR_AGO, HOUR_AGO))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache folder, and lists saved from a single file on."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(filelist, "CACHE_MIN_FILES", 1)
    return tmp_path / "cache" / "selfie" / "filelists"


def no_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tree was walked again")

    monkeypatch.setattr(filelist.os, "walk", fail)


def test_cached_list_is_reused_while_the_tree_is_unchanged(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    write_tree(root)
    settle(root)
    first = scan_folder(root)
    assert len(list(cache.glob("*.json.gz"))) == 2  # train/ and test/, one list each
    no_walk(monkeypatch)
    again = scan_folder(root)
    assert again == first
    assert [p.relative_to(root).as_posix() for p, _ in again.files["train"]] == [
        "train/ant/0.png",
        "train/ant/1.png",
        "train/ant/2.png",
        "train/bee/0.png",
        "train/bee/1.png",
        "train/bee/deep/2.png",
    ]
    assert again.ignored == 1  # notes.txt, counted from the saved list too


@pytest.mark.parametrize("where", ["train/bee", "train/bee/deep", "test/ant"])
def test_adding_a_file_rebuilds_the_list(tmp_path: Path, cache: Path, where: str) -> None:
    root = tmp_path / "data"
    write_tree(root)
    settle(root)
    before = scan_folder(root)
    Image.new("RGB", (4, 4)).save(root / where / "new.png")  # the folder's mtime moves on
    after = scan_folder(root)
    split = where.split("/")[0]
    added = {p for p, _ in after.files[split]} - {p for p, _ in before.files[split]}
    assert added == {root / where / "new.png"}


def test_removing_a_class_folder_rebuilds_the_list(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    write_tree(root)
    settle(root)
    assert scan_folder(root).files["train"][-1][0] == root / "train" / "bee" / "deep" / "2.png"
    for p in (root / "train" / "bee" / "deep").iterdir():
        p.unlink()
    (root / "train" / "bee" / "deep").rmdir()
    assert scan_folder(root).files["train"][-1][0] == root / "train" / "bee" / "1.png"


def test_a_tree_still_changing_is_not_saved(tmp_path: Path, cache: Path) -> None:
    """Folders modified just now (within RACY_SECONDS): a file added in the same timestamp
    tick would go unseen, so nothing is saved and the next call walks again."""
    root = tmp_path / "data"
    write_tree(root)
    scan_folder(root)
    assert not cache.exists() or not list(cache.iterdir())


def test_small_trees_are_not_saved(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filelist, "CACHE_MIN_FILES", 10_000)
    root = tmp_path / "data"
    write_tree(root)
    settle(root)
    scan_folder(root)
    assert not cache.exists()


def test_unwritable_cache_or_damaged_list_only_costs_a_walk(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    write_tree(root)
    settle(root)
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    layout = scan_folder(root)  # nothing saved, no error
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert scan_folder(root) == layout
    for saved in cache.glob("*.json.gz"):
        saved.write_bytes(b"\x1f\x8b damaged")
    assert scan_folder(root) == layout
