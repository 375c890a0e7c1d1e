"""The image files under a folder: walked once, and reused while the tree is unchanged.

`list_images(folder)` lists every file at any depth whose name ends in one of EXTENSIONS (any
case), skipping names that start with "." (files and folders) and not following symlinked
folders, sorted by path components ("a/b.png" before "a-b.png", as folders list).

Walking ImageNet's training tree (1.28M files in 1,000 class folders) takes seconds on a
local disk and minutes on network storage, and a run opens its splits several times; so a
walk that found at least CACHE_MIN_FILES images is saved, and the next call reuses it while
the tree is unchanged.

Unchanged means: every folder the walk entered still exists with the modification time it
had. Adding, removing or renaming a file or a folder changes the modification time of the
folder that holds it (editing a file's contents does not, and does not change the list
either). Checking costs one stat per folder: 1,001 for ImageNet's train/.

Where: $XDG_CACHE_HOME/selfie/filelists/ (default ~/.cache/selfie/filelists/), one gzipped
JSON file per folder, named by the sha256 of the folder's absolute path. Not beside the data:
shared dataset folders are often read-only, and a file written into the tree would change the
very modification time the check reads. A cache folder that cannot be written only costs the
walk next time.

Racing writers: a list is not saved while any of its folders was modified less than
RACY_SECONDS before the walk ended (as git does for its index): on a file system with coarse
timestamps a file added in the same tick would not change the folder's time.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FORMAT = 1  # of the saved lists; a list of another format is walked again
CACHE_MIN_FILES = 10_000  # smaller trees walk in milliseconds: nothing to save
RACY_SECONDS = 2.0


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "selfie" / "filelists"


def _cache_file(folder: str) -> Path:
    key = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()
    return cache_dir() / f"{key}.json.gz"


def _walk(folder: str) -> tuple[list[str], int, dict[str, int]]:
    """(image paths relative to `folder`, "/"-joined and sorted; count of other files;
    {folder entered, relative ("" for `folder`): its st_mtime_ns})."""
    found: list[str] = []
    ignored = 0
    mtimes: dict[str, int] = {}
    for here, dirs, files in os.walk(folder):  # followlinks=False: no symlink loops
        rel = os.path.relpath(here, folder)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        # Stat after the listing: a file added in between leaves a newer time than the
        # listing shows, which the racy rule keeps out of the cache.
        with contextlib.suppress(OSError):
            mtimes[rel] = os.stat(here).st_mtime_ns
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        prefix = f"{rel}/" if rel else ""
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(EXTENSIONS):
                found.append(prefix + name)
            else:
                ignored += 1
    found.sort(key=lambda r: r.split("/"))
    return found, ignored, mtimes


def _load(path: Path, folder: str) -> tuple[list[str], int] | None:
    """The saved list of `folder` if it is still current, else None."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
            data: Any = json.load(f)
    except (OSError, EOFError, ValueError):
        return None  # absent, unreadable or damaged: walk again
    expected = {"format": FORMAT, "folder": folder, "extensions": list(EXTENSIONS)}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in expected.items()):
        return None
    try:
        for rel, mtime in data["mtimes"].items():
            if os.stat(os.path.join(folder, rel)).st_mtime_ns != mtime:
                return None
        files, ignored = list(data["files"]), int(data["ignored"])
    except (OSError, KeyError, TypeError, AttributeError, ValueError):
        return None  # a folder gone, or a list not written by this module
    return files, ignored


def _save(path: Path, folder: str, files: list[str], ignored: int, mtimes: dict) -> None:
    data = {
        "format": FORMAT,
        "folder": folder,
        "extensions": list(EXTENSIONS),
        "mtimes": mtimes,
        "ignored": ignored,
        "files": files,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(tmp, "wt", encoding="utf-8", errors="surrogateescape", compresslevel=1) as f:
            json.dump(data, f)
        os.replace(tmp, path)  # readers see the old list or the new one, whole
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.debug("file list of %s not cached (%s)", folder, e)


def list_images(folder: str | Path) -> tuple[list[str], int]:
    """Image files under `folder` in sorted order (module docstring) as "/"-joined paths
    relative to it (strings: 1.28M Path objects cost seconds to build), and the count of
    other files; from the saved list when the tree is unchanged since it was saved."""
    absolute = os.path.abspath(folder)
    cache = _cache_file(absolute)
    saved = _load(cache, absolute)
    if saved is not None:
        rels, ignored = saved
        log.info("%s: %d image files, listed from the cache %s", folder, len(rels), cache)
    else:
        rels, ignored, mtimes = _walk(absolute)
        newest = max(mtimes.values(), default=0) / 1e9
        if len(rels) >= CACHE_MIN_FILES and time.time() - newest >= RACY_SECONDS:
            _save(cache, absolute, rels, ignored, mtimes)
    return rels, ignored


__all__ = ["CACHE_MIN_FILES", "EXTENSIONS", "cache_dir", "list_images"]
