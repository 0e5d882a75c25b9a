"""Which files the web view may show: only regular files inside the configured folders.

A file is opened first (`O_NOFOLLOW`, so a symbolic link is never followed at its last step)
and judged by what was opened: it must be a regular file, and the path the kernel reports for
the open descriptor (links in its folders resolved) must lie inside one of the inbox, outbox,
archive or errors folders. Checking the open file, not a name, leaves no window between the
check and the read. Anything else (`..`, an absolute path, an encoded variant, a link in errors
pointing elsewhere, a device) is `Refused`, which the routes turn into a 404.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from watchfolder.config.settings import Config


class Refused(Exception):
    """Not a file the view may show."""


@dataclass
class Opened:
    """A regular file opened for reading, inside the folders; close it (or use `with`)."""

    fd: int
    size: int
    mtime_ns: int
    inode: int
    real: Path  # the file's resolved path

    @property
    def proc_path(self) -> str:
        """A path to exactly this open file, for libraries that take a path."""
        return f"/proc/self/fd/{self.fd}"

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes, read from the open descriptor; closes it at the end."""
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            while chunk := os.read(self.fd, size):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def roots(config: Config) -> list[Path]:
    """Every folder the view may read below, resolved."""
    found: list[Path] = []
    for inbox in config.inboxes:
        folders: Iterable[Path | None] = (inbox.path, inbox.outbox, inbox.archive, inbox.errors,
                                          *(output.outbox for output in inbox.outputs))
        for folder in folders:
            if folder is not None:
                found.append(Path(os.path.realpath(folder)))
    return found


def safe_rel(rel: str) -> PurePosixPath:
    """A relative path as given in a URL or form: no absolute path, no `..`, no oddities."""
    if not rel or "\0" in rel or "\\" in rel:
        raise Refused(rel)
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        raise Refused(rel)
    return pure


def open_inside(path: Path | str, allowed: list[Path]) -> Opened:
    """Open `path` for reading if it is a regular file inside one of `allowed` (resolved)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise Refused(str(path)) from None
    try:
        opened = _judge(fd, allowed)
    except BaseException:
        os.close(fd)
        raise
    if opened is None:
        os.close(fd)
        raise Refused(str(path))
    return opened


def _judge(fd: int, allowed: list[Path]) -> Opened | None:
    """The open file, if it is a regular file inside `allowed`."""
    try:
        st = os.fstat(fd)
        real = Path(f"/proc/self/fd/{fd}").readlink()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if not any(root == real or root in real.parents for root in allowed):
        return None
    os.set_blocking(fd, True)
    return Opened(fd, st.st_size, st.st_mtime_ns, st.st_ino, real)
