"""Putting files in place without ever showing a partial file or overwriting one.

- `copy_into` / `move_into`: place a file at `dest` only if `dest` is free. The final step is
  `link()`, which fails instead of overwriting, so two writers cannot clobber each other; where
  hard links are not supported (some SMB/FAT mounts) it falls back to exists-check + rename.
- `candidates`: `x.png`, `x-1.png`, `x-2.png`, ... the collision rule.
- `Destinations.place`: the one way a file goes to the outbox, the archive or errors. Each
  name is journaled *before* the file is placed there, so after a crash the caller's `ours`
  recognises its own file (by content) and no `x-1.png` twin is made; a folder that is missing
  or unwritable raises `DestinationError` and is reported once until it recovers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import structlog

from watchfolder import failpoints
from watchfolder.errors import DestinationError
from watchfolder.files.atomic import Written, fsync_dir, fsync_file, write_atomic
from watchfolder.files.layout import temp_beside
from watchfolder.logs import Outages

log = structlog.get_logger("watchfolder")
T = TypeVar("T")

_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}

NAME_MAX = 255  # bytes in one name, on every filesystem we write to (ext4, XFS, NFS, SMB)


def candidates(path: Path, *, also_free: tuple[str, ...] = ()) -> Iterator[Path]:
    """`path`, then `stem-1.ext`, `stem-2.ext`, ...; skips names where `name+suffix` is taken.

    A name too long for the filesystem (with the longest of `also_free` after it) is shortened
    to fit: the start of its stem, `~` and 8 hex digits of the full name's hash (unique and
    still recognisable), then its `-N` and extension.
    """
    stem, suffix = path.stem, path.suffix
    room = NAME_MAX - max((len(os.fsencode(extra)) for extra in also_free), default=0)
    n = 0
    while True:
        tail = f"{'' if n == 0 else f'-{n}'}{suffix}"
        candidate = path.with_name(fit_name(stem, tail, room))
        if not any(os.path.lexists(f"{candidate}{extra}") for extra in also_free):
            yield candidate
        n += 1


def fit_name(stem: str, tail: str, room: int = NAME_MAX) -> str:
    """`stem + tail`, or, when longer than `room` bytes, a shortened stem that makes it fit."""
    name = stem + tail
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    mark = "~" + hashlib.sha256(os.fsencode(stem)).hexdigest()[:8]
    keep = room - len(os.fsencode(mark + tail))
    whole = os.fsencode(stem)
    head = whole[:keep]
    if _is_utf8(whole):
        head = head.decode("utf-8", "ignore").encode()  # never half a character
    return os.fsdecode(head) + mark + tail


def free_folder(root: Path, folder: Path) -> Path:
    """`folder` below `root`, where a part taken by a file (an earlier result named like this
    folder) is replaced by its first `-1`, `-2`, ... variant that is free or a folder."""
    current = root
    for part in folder.relative_to(root).parts:
        for candidate in candidates(current / part):
            if not os.path.lexists(candidate) or (candidate.is_dir()
                                                  and not candidate.is_symlink()):
                current = candidate
                break
    return current


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _holds(path: Path, sha: str) -> bool:
    """`path` is a regular file with exactly the bytes whose SHA-256 is `sha`."""
    try:
        return path.is_file() and not path.is_symlink() and sha256_file(path) == sha
    except OSError:
        return False


def _head(path: Path, size: int = 4096) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def _link_no_clobber(src: Path, dest: Path) -> bool:
    try:
        os.link(src, dest, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(dest):
            return False
        src.rename(dest)
        return True
    return True


def copy_into(src: Path, dest: Path) -> bool:
    """Copy `src` to `dest` complete and fsynced; False (nothing written) if `dest` is taken."""
    if os.path.lexists(dest):
        return False
    temp = temp_beside(dest)
    try:
        with src.open("rb") as reader, temp.open("wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            writer.flush()
            os.fsync(writer.fileno())
        placed = _link_no_clobber(temp, dest)
    finally:
        temp.unlink(missing_ok=True)
    if placed:
        fsync_dir(dest.parent)
    return placed


def move_into(src: Path, dest: Path) -> bool:
    """Move `src` to `dest` (any filesystem); False (nothing moved) if `dest` is taken.

    `src` is unlinked through a handle on its folder opened first, not by its path: a share
    that drops (a lazy unmount) between the copy and the unlink leaves the path naming the
    bare mount point, where the original is not, and the original stayed on the share, to be
    sent again when it came back."""
    folder = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            placed = _link_no_clobber(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            if src.is_symlink():
                # A link is never followed out of the inbox: move the link itself.
                if os.path.lexists(dest):
                    return False
                dest.symlink_to(src.readlink())
                placed = True
            else:
                placed = copy_into(src, dest)
        if not placed:
            return False
        failpoints.hit("moved-linked")  # both names exist: the instant a crash must survive
        with contextlib.suppress(FileNotFoundError):  # a rename (no hard links) moved it
            os.unlink(src.name, dir_fd=folder)
        fsync_dir(dest.parent)
        os.fsync(folder)
    finally:
        os.close(folder)
    return True


def same_file(a: Path, b: Path) -> bool:
    """Hard links of one file, or two files with the same bytes."""
    try:
        if a.lstat().st_ino == b.lstat().st_ino and a.lstat().st_dev == b.lstat().st_dev:
            return True
        if a.is_symlink() or b.is_symlink():
            return a.is_symlink() and b.is_symlink() and a.readlink() == b.readlink()
        return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)
    except OSError:
        return False


def folder_problem(folder: Path, name: str) -> str | None:
    """Why we cannot write in `folder` (the outbox, say), or None when we can."""
    if not folder.is_dir():
        return f"the {name} folder {folder} is missing (deleted or not mounted)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the {name} folder {folder} is not writable by this user"
    return None


class Destinations:
    """The folders results, originals and failures go to, and whether each is usable.

    A root (an outbox, archive or errors folder) is never recreated while the daemon runs: it
    may be an unmounted share. A problem is logged once (`destination.unavailable`) until the
    root works again (`destination.recovered`).
    """

    def __init__(self) -> None:
        self._bad = Outages()

    def check(self, root: Path, name: str, need: int = 0) -> None:
        """Raise DestinationError (reported) unless `root` exists, is writable and has `need`
        bytes free."""
        problem = folder_problem(root, name)
        if problem is None and need:
            free = shutil.disk_usage(root).free
            if free < need:
                problem = (f"the {name} folder {root} is full: {free / 1e6:.1f} MB free, "
                           f"about {need / 1e6:.1f} MB needed")
        if problem is not None:
            self._problem(root, problem)
        self._ok(root)

    def guard(self, root: Path, action: Callable[..., T], *args: object) -> T:
        """Run a filesystem action below `root`; an OSError becomes a DestinationError."""
        try:
            result = action(*args)
        except OSError as exc:
            self.failed(root, exc)
        self._ok(root)
        return result

    def failed(self, root: Path, exc: OSError) -> NoReturn:
        """Writing below `root` failed: report it (once) and raise DestinationError."""
        self._problem(root, f"cannot write in {root}: {exc.strerror or exc} "
                            f"({type(exc).__name__})")

    def place(self, root: Path, name: str, target: Path, chosen: Path | None, *,
              claim: Callable[[Path], None], put: Callable[[Path], bool],
              ours: Callable[[Path], bool], also_free: tuple[str, ...] = (),
              need: int = 0) -> Path:
        """Put a file at `target`, or at the first free `-N` name; return where it went.

        `chosen` is the name journaled by an earlier try: if `ours` recognises the file there,
        it was placed before a crash and nothing is done. Otherwise every name is `claim`ed
        (journaled) before `put` tries it; `put` returns False when the name is taken. `need`
        is the bytes the file takes where it lands (0 for a move within one filesystem).
        """
        if chosen is not None and os.path.lexists(chosen) and ours(chosen):
            return chosen
        target = self.folder_for(root, name, target, need)
        first = [chosen] if chosen is not None and not os.path.lexists(chosen) else []
        for candidate in itertools.chain(first, candidates(target, also_free=also_free)):
            claim(candidate)
            if self.guard(root, put, candidate):
                return candidate
        raise AssertionError("candidates() never ends")  # pragma: no cover

    def place_new(self, root: Path, name: str, target: Path, chosen: Path | None, *,
                  produce: Callable[[Path], object], claim: Callable[[Path, str], None],
                  ours: Callable[[Path], bool], need: int = 0,
                  adopt_identical: bool = False) -> tuple[Path, str]:
        """`place` a file that `produce` writes (to the path it is given); return where it
        went and its SHA-256, which `claim` journals with each name it tries: the one
        `produce` returns as `Written` (hashed as it wrote), or read from the file.

        The file is written complete and fsynced beside its target before any name is
        tried, so a reader never sees it partial and a crash leaves only a hidden temp file.
        With `adopt_identical`, a name already holding exactly these bytes is taken as this
        file's own (placed by a daemon that died before it could journal it, whose claim was
        then taken over): no twin.
        """
        if chosen is not None and os.path.lexists(chosen) and ours(chosen):
            return chosen, sha256_file(chosen)
        target = self.folder_for(root, name, target, need)
        temp = temp_beside(target)
        try:
            made = self.guard(root, produce, temp)
            self.guard(root, fsync_file, temp)
            sha = made.sha256 if isinstance(made, Written) else sha256_file(temp)
            placed = self.place(root, name, target, chosen, ours=ours,
                                claim=lambda candidate: claim(candidate, sha),
                                put=lambda candidate: _link_no_clobber(temp, candidate)
                                or (adopt_identical and _holds(candidate, sha)))
        finally:
            temp.unlink(missing_ok=True)
        self.guard(root, fsync_dir, placed.parent)
        return placed, sha

    def replace_own(self, root: Path, target: Path, data: bytes, owner: bytes) -> Path:
        """Write `data` at `target` (a sidecar: a manifest, a marker), replacing an earlier
        file of ours (whose first 4 KiB hold `owner`), never anybody else's: theirs pushes
        ours to `-1`, `-2`, ..."""
        target = self.folder_for(root, "outbox", target)
        for candidate in candidates(target):
            if not os.path.lexists(candidate) or owner in _head(candidate):
                self.guard(root, write_atomic, data, candidate)
                return candidate
        raise AssertionError("candidates() never ends")  # pragma: no cover

    def folder_for(self, root: Path, name: str, target: Path, need: int = 0) -> Path:
        """`target` with its folder made below `root` (checked, with `need` bytes free)."""
        self.check(root, name, need)
        # A name clash is this file's problem, never the destination's: resolved like any
        # collision (`clash-1.png/`), while a real write error stays a DestinationError.
        target = self.guard(root, free_folder, root, target.parent) / target.name
        self.guard(root, target.parent.mkdir, 0o777, True, True)
        return target

    def _problem(self, root: Path, message: str) -> NoReturn:
        if self._bad.began(root):
            log.error("destination.unavailable", folder=str(root), message=message,
                      hint="files wait in the inbox until it is back")
        raise DestinationError(message)

    def _ok(self, root: Path) -> None:
        if self._bad.ended(root):
            log.warning("destination.recovered", folder=str(root))
