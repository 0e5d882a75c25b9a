"""Putting files in place without ever showing a partial file or overwriting one.

- `write_atomic`: temp file in the same folder, fsync, rename; for files whose name we own
  (spool entries, reason files).
- `copy_into` / `move_into`: place a file at `dest` only if `dest` is free. The final step is
  `link()`, which fails instead of overwriting, so two writers cannot clobber each other; where
  hard links are not supported (some SMB/FAT mounts) it falls back to exists-check + rename.
- `candidates`: `x.png`, `x-1.png`, `x-2.png`, ... the collision rule.

The caller records the chosen name in the journal *before* placing a file there; after a crash
it recognises its own file by content and does not pick `x-1.png` for it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from watchfolder import failpoints

TEMP_PREFIX = ".watchfolder-"
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def candidates(path: Path, *, also_free: tuple[str, ...] = ()) -> Iterator[Path]:
    """`path`, then `stem-1.ext`, `stem-2.ext`, ...; skips names where `name+suffix` is taken."""
    stem, suffix = path.stem, path.suffix
    n = 0
    while True:
        candidate = path if n == 0 else path.with_name(f"{stem}-{n}{suffix}")
        if not any(Path(f"{candidate}{extra}").exists() for extra in also_free):
            yield candidate
        n += 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(dest: Path) -> Path:
    return dest.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}.tmp")


def write_atomic(data: bytes, dest: Path) -> None:
    """Write `data` to `dest` (replacing it) so that readers see all of it or nothing."""
    temp = _temp_beside(dest)
    try:
        with temp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(dest)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(dest.parent)


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
    temp = _temp_beside(dest)
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
    """Move `src` to `dest` (any filesystem); False (nothing moved) if `dest` is taken."""
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
    if os.path.lexists(src):
        src.unlink()
    fsync_dir(dest.parent)
    fsync_dir(src.parent)
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
