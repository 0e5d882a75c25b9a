"""Is each inbox folder there, readable, and the folder it was? One open and one stat a look.

A folder that is missing (deleted, or a share no longer mounted where it was) or that cannot
be read or searched (permissions taken away, EIO, a stale handle) pauses its inbox: its index
goes into `paused`, which the pipeline reads, so none of its files is touched until it is back
(`inbox.missing` or `inbox.unreadable` once, `inbox.back`). A folder that is another one now
(its device, inode or mount changed) is reported as "changed" so the intake watches it again
and rescans (`inbox.remounted`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from watchfolder.config.settings import InboxConfig

log = structlog.get_logger("watchfolder")

MISSING, UNREADABLE = "missing", "unreadable"


class InboxFolders:
    """The health of the inbox folders, looked at by the intake thread, asked by any."""

    def __init__(self, inboxes: Callable[[], tuple[InboxConfig, ...]], paused: set[int], *,
                 pausing: Callable[[], bool]) -> None:
        self._inboxes = inboxes
        self.paused = paused  # shared with the pipeline (see Intake.paused)
        self._pausing = pausing  # False: report, but hold no files (nothing would end it)
        self._identity: dict[int, tuple[int, int, int | None]] = {}
        self._mount_point: set[int] = set()  # inboxes seen as mount points of their own
        self._problem: dict[int, str] = {}  # index → MISSING or UNREADABLE, said once

    def forget(self, index: int) -> None:
        """Another folder in that slot now (a reload), or none: what was seen of it is moot."""
        self._identity.pop(index, None)
        self._mount_point.discard(index)
        self._problem.pop(index, None)
        self.paused.discard(index)

    def away(self, index: int) -> bool:
        """Is this inbox's folder away right now (missing, unreadable, or not the folder last
        seen: a share unmounted)? Any thread may ask, when one of its files is not found: a
        file is gone only if its folder is still there."""
        if index in self.paused:
            return True
        try:
            now = _identity(self._inboxes()[index].path)
        except OSError:
            return True
        if index in self._mount_point and now[2] is None:
            return True
        before = self._identity.get(index)
        return before is not None and before[:2] != now[:2]

    def probe(self, index: int, *, quiet: bool = False) -> str | None:
        """Look at one inbox folder: "same", "changed" (back, or another folder now), or None
        while it is missing or unreadable (the inbox is paused, said once)."""
        inbox = self._inboxes()[index]
        try:
            identity = _identity(inbox.path)
        except (FileNotFoundError, NotADirectoryError):
            return self._pause(index, MISSING, None)
        except OSError as exc:  # EACCES, EIO, ESTALE: there, but we cannot use it
            return self._pause(index, UNREADABLE, exc)
        if identity[2] is not None:
            self._mount_point.add(index)
        elif index in self._mount_point:
            # A mount point before, a plain folder now: the share is not mounted there any
            # more, and what we see is the empty folder under it.
            return self._pause(index, MISSING, None)
        before = self._identity.get(index)
        self._identity[index] = identity
        problem = self._problem.pop(index, None)
        self.paused.discard(index)
        if problem is not None:
            log.warning("inbox.back", inbox=str(inbox.path), was=problem)
            return "changed"
        if before is not None and before != identity and not quiet:
            log.warning("inbox.remounted", inbox=str(inbox.path),
                        hint="the folder is another one now (a share mounted again): "
                             "watched again and rescanned")
            return "changed"
        return "same"

    def _pause(self, index: int, problem: str, exc: OSError | None) -> str | None:
        if self._pausing():
            # Only while probes run to end it: a --once run (no watches) never un-pauses, and
            # its files then fail or go on as they would.
            self.paused.add(index)
        self._identity.pop(index, None)
        if self._problem.get(index) == problem:
            return None
        self._problem[index] = problem
        path = str(self._inboxes()[index].path)
        if problem == MISSING:
            log.error("inbox.missing", inbox=path,
                      hint="deleted or not mounted; its files wait, watching resumes when it "
                           "is back")
        else:
            assert exc is not None
            log.error("inbox.unreadable", inbox=path, errno=exc.errno,
                      code=errno.errorcode.get(exc.errno or 0, "?"),
                      error=exc.strerror or str(exc),
                      hint="its files wait until the folder can be read again (permissions, "
                           "the share, the disk)")
        return None


def _identity(path: Path) -> tuple[int, int, int | None]:
    """(device, inode, mount id) of a folder we can list and search; the mount id only when
    the folder is a mount point of its own (a share), else None. Raises OSError: missing
    (FileNotFoundError, NotADirectoryError) or unusable (EACCES, EIO, ESTALE)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # needs read permission: can we list it
    os.close(fd)
    # Needs search permission: can we reach its files? (pathlib would drop the ".")
    st = os.stat(f"{path}{os.sep}.")  # noqa: PTH116
    try:
        parent = path.parent.stat()
    except OSError:
        return st.st_dev, st.st_ino, None
    if parent.st_dev != st.st_dev:
        return st.st_dev, st.st_ino, _mount_id(path)
    return st.st_dev, st.st_ino, None


def _mount_id(path: Path) -> int:
    """The id of the mount at `path` (the top one): a share mounted again gets a new one, even
    with the same device and inode, and its old inotify watches are dead."""
    where = os.path.realpath(path)
    found = 0
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            for line in info:
                fields = line.split(" ", 5)
                if len(fields) > 4 and _unescape(fields[4]) == where:
                    found = int(fields[0])  # stacked mounts: the last one listed is on top
    except OSError:
        return 0
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field
