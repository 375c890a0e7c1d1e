"""Fetch a file with a checksum, and unpack a tar archive without letting it write elsewhere."""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from selfie.errors import UserError

_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to keep memory flat.


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in chunks so a 170 MB archive is never held in memory."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str) -> None:
    """Stream `url` to dest.with_suffix(".part"), check its md5, then rename it to `dest`.

    The partial name means an interrupted or corrupt download never sits at `dest`, where
    a later run would take it for a good file. On any failure the partial file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as err:  # urllib's URLError is an OSError; so are disk-full errors.
        part.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} to {dest}: {err}; check the network connection and "
            "free disk space, then run the command again"
        ) from err
    except BaseException:
        part.unlink(missing_ok=True)  # Ctrl-C mid-download: leave nothing half-written.
        raise

    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise UserError(
            f"checksum mismatch for {url}: md5 {got}, expected {md5}; the download is corrupt "
            "or the file changed upstream, so it was deleted; run the command again"
        )
    part.replace(dest)


def _is_absolute(name: str) -> bool:
    # A leading slash or backslash, or a Windows drive ("C:x"), all escape the target folder.
    return name.startswith(("/", "\\")) or bool(PureWindowsPath(name).drive)


def _walk(start: list[str], path: str, links: set[str]) -> list[str] | None:
    """Follow `path` lexically from folder `start` (components relative to the target).

    Returns the components of where it lands, or None if it climbs above the target or
    passes through a link member: a lexical walk cannot know where a link leads, so a path
    that goes through one could land anywhere (no genuine dataset archive needs that).
    """
    here = list(start)
    comps = [c for c in PurePosixPath(path.replace("\\", "/")).parts if c != "."]
    for i, comp in enumerate(comps):
        if comp == "..":
            if not here:
                return None
            here.pop()
            continue
        here.append(comp)
        if i < len(comps) - 1 and "/".join(here) in links:
            return None
    return here


def _check_member(member: tarfile.TarInfo, links: set[str], archive: Path) -> None:
    """Raise UserError if extracting `member` could touch anything outside the target.

    `links` holds the names of the link members seen so far; this member is added to it
    if it is a link.
    """

    def refuse(why: str) -> UserError:
        return UserError(
            f"refusing to extract {archive}: member {member.name!r} {why}; the archive is "
            "corrupt or malicious, so delete it and download it again from the official source"
        )

    name = member.name
    if _is_absolute(name):
        raise refuse("has an absolute path")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise refuse("has a '..' component")
    here = _walk([], name, links)
    if here is None or "/".join(here) in links:
        raise refuse("is written through a link in the same archive")

    if member.issym() or member.islnk():
        if _is_absolute(member.linkname):
            raise refuse(f"is a link to the absolute path {member.linkname!r}")
        # A symlink resolves from its own folder, a hard link from the archive root.
        start = here[:-1] if member.issym() else []
        if _walk(start, member.linkname, links) is None:
            raise refuse(f"is a link to {member.linkname!r}, outside the target folder")
        links.add("/".join(here))
    elif not (member.isreg() or member.isdir()):
        raise refuse("is a device, fifo or other special file")


def safe_extract_tar(archive: Path, target: Path) -> None:
    """Extract `archive` into `target` after checking every member stays inside `target`.

    All members are checked before anything is written, so a bad archive leaves no partial
    output. Where this Python has tarfile's "data" filter (3.11.4+, 3.12+), it is used too,
    as a second line of defence (it also strips set-uid bits and checks real paths on disk).
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    real_target = os.path.realpath(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            links: set[str] = set()
            for member in members:
                _check_member(member, links, archive)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(real_target, members=members, filter="data")
            else:
                tar.extractall(real_target, members=members)  # members checked above
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(
            f"could not extract {archive}: {err}; the archive is incomplete or corrupt, "
            "so delete it and download it again"
        ) from err


__all__ = ["download_file", "md5sum", "safe_extract_tar"]
