"""Writing an image file so that readers see all of it or nothing, and it survives a crash.

Encoders (libvips savers, chunk writers) write to a temp name beside the destination; the
file is fsynced, renamed over the destination, and the folder is fsynced. Temp names start
with outbox's `.watchfolder-` prefix, so the daemon's own clean-up and the watcher treat them
as ours; this module keeps its own copy to stay free of the pipeline's modules.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

TEMP_PREFIX = ".watchfolder-"


def write_atomically(dest: Path, write: Callable[[Path], None]) -> int:
    """Call `write(temp)` to fill a temp file beside `dest`, then put it in place; its size."""
    dest = Path(dest)
    temp = dest.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        temp.replace(dest)
    finally:
        temp.unlink(missing_ok=True)
    fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def write_parts(dest: Path, parts: Iterable[bytes | memoryview]) -> int:
    """Write the concatenation of `parts` to `dest` atomically; its size."""

    def write(temp: Path) -> None:
        with temp.open("wb") as handle:
            for part in parts:
                handle.write(part)

    return write_atomically(dest, write)
