"""Writing a file so that readers see all of it or nothing, and it survives a crash.

The one way the daemon writes a file whole: the content goes to a hidden temp name beside the
destination (layout's `temp_beside`, which the intake ignores and a restart clears), is
fsynced, renamed over the destination, and the folder is fsynced. Encoders (libvips savers,
chunk writers) use `write_atomically`; bytes in memory (spool entries, reason files,
manifests, markers) use `write_atomic`. A file that is itself a temp name of ours, placed
later by files/place.py (which fsyncs it and its folder then), is written with `write_hashed`,
which also gives its SHA-256 without reading it back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchfolder.files.layout import temp_beside


def fsync_file(path: Path) -> int:
    """Flush `path`'s content to disk; its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush `folder`'s entries (a rename or link in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(dest: Path, write: Callable[[Path], object]) -> int:
    """Call `write(temp)` to fill a temp file beside `dest`, then put it in place (replacing
    what is there); its size."""
    dest = Path(dest)
    temp = temp_beside(dest)
    try:
        write(temp)
        size = fsync_file(temp)
        temp.replace(dest)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return size


@dataclass(frozen=True)
class Written:
    """A file we wrote: its size and SHA-256, taken from the bytes as they were written (no
    read back)."""

    size: int
    sha256: str


def write_hashed(path: Path, parts: Iterable[bytes | memoryview]) -> Written:
    """Write the concatenation of `parts` to `path` (created or truncated; not fsynced),
    hashing it on the way."""
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("wb") as handle:
        for part in parts:
            digest.update(part)
            size += handle.write(part)
    return Written(size, digest.hexdigest())


def write_parts(dest: Path, parts: Iterable[bytes | memoryview]) -> int:
    """Write the concatenation of `parts` to `dest` atomically; its size."""

    def write(temp: Path) -> None:
        with temp.open("wb") as handle:
            for part in parts:
                handle.write(part)

    return write_atomically(dest, write)


def write_atomic(data: bytes, dest: Path) -> None:
    """Write `data` to `dest` (replacing it) so that readers see all of it or nothing."""
    write_parts(dest, (data,))
