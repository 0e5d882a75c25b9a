"""One daemon per state_dir, and "is it running?" for the tools.

A running daemon holds an exclusive `flock` on `state_dir/daemon.lock` for its whole life,
which keeps a second daemon off the same journal; the kernel drops it when the process dies,
so a crash never leaves a stale "running". `status` tries the lock with a shared flock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from watchfolder.errors import StartupError

LOCK_NAME = "daemon.lock"


class DaemonLock:
    """Held by a running daemon: one daemon per state_dir, and "running" for `status`."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> DaemonLock:
        """Take the lock or raise StartupError naming the daemon that holds it."""
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = _read_pid(path)
            raise StartupError(f"state_dir: another watchfolder daemon (pid {pid or '?'}) is "
                               f"using {state_dir}; stop it first, or give this one its own "
                               f"state_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def daemon_running(state_dir: Path) -> tuple[bool, int | None]:
    """(running, pid) by trying the daemon's lock, without creating anything."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    except PermissionError:
        raise StartupError(f"state_dir: {state_dir} is not readable by this user (run status "
                           f"as root, as the daemon's user or as a member of its group)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return True, _read_pid(path)
    finally:
        os.close(fd)  # also drops our shared lock at once
    return False, None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
