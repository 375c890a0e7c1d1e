"""Seconds to list a class-folder tree (`scan_folder`): walked, and from the saved file list.

Writes a tree of empty `.JPEG` files (ImageNet's layout: train/<class>/<class>_<i>.JPEG, and
one val/ image) into a temporary folder, dates its folders an hour back (a settled tree; see
selfie.data.filelist on trees still changing), then times `scan_folder` with the cache off
(a walk), the first call with it on (a walk, then the list is saved) and the next calls (read
back). The page cache is warm throughout: on cold or network storage the walk costs far more
and the saved list the same. Prints figures; asserts nothing.

    python benchmarks/file_list.py [--classes 100] [--per-class 1000] [--reps 3]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from selfie.data import filelist
from selfie.data.folder import scan_folder


def write_tree(root: Path, classes: int, per_class: int) -> None:
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"n{c:08d}_{i}.JPEG").touch()
    (root / "val" / "n00000000").mkdir(parents=True)
    (root / "val" / "n00000000" / "x.JPEG").touch()
    past = time.time() - 3600
    for here, _, _ in os.walk(root):
        os.utime(here, (past, past))


def seconds(root: Path) -> float:
    start = time.perf_counter()
    scan_folder(root)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # a private cache
        root = Path(tmp) / "tree"
        write_tree(root, args.classes, args.per_class)
        saved_min = filelist.CACHE_MIN_FILES
        filelist.CACHE_MIN_FILES = 10**12  # off
        walked = min(seconds(root) for _ in range(args.reps))
        filelist.CACHE_MIN_FILES = saved_min
        first = seconds(root)
        cached = min(seconds(root) for _ in range(args.reps))
    files = args.classes * args.per_class
    print(f"{files:,} files in {args.classes} class folders (warm page cache)")
    print(f"  walked:            {walked:6.2f} s (best of {args.reps})")
    print(f"  walked and saved:  {first:6.2f} s")
    print(f"  from the list:     {cached:6.2f} s (best of {args.reps})")
    print(json.dumps({"files": files, "walked_s": walked, "first_s": first, "cached_s": cached}))


if __name__ == "__main__":
    main()
