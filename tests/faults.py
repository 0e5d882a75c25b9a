"""Operating-system faults for the tests (issue 19): real mounts, real permissions, real errnos.

- `LoopMount`: a small ext4 image on a loop device, mounted at a folder; `vanish()` unmounts it
  lazily (`umount -l`, as a dropped share: what the daemon holds open stays readable, the path
  shows the empty folder underneath) and `come_back()` mounts the same device there again.
- `Tmpfs`: a small tmpfs, to fill up.
- `eio_shim`: an LD_PRELOAD library, compiled with gcc in the test, that makes `open`/`read`
  fail with an errno only below one folder (`WATCHFOLDER_FAULT_BELOW`), for the processes it is
  preloaded into: always, while a switch file exists, or at a rate (a degrading disk). libfiu
  fails reads process-wide (the interpreter then fails at import), so it cannot be used here.
- `without_dac_override`: the command prefix that runs a process as root without
  CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so that mode bits bind it (root reads a mode-000
  folder otherwise).
- `DaemonProcess`: `watchfolder run` as a subprocess, its JSON log lines collected as they come.

These need root (mount, losetup) and mkfs.ext4, losetup, setpriv and gcc; `.ci/run` installs
them on a fresh Debian machine. A test that cannot have them fails, saying what is missing: a
skipped fault test would hide what it guards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from watchfolder.files.layout import JOURNAL_NAME

INSTALL_HINT = ("run the fault tests as root with e2fsprogs (mkfs.ext4), util-linux (losetup, "
                "mount, setpriv) and gcc installed: `.ci/run` does it on Debian")


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"missing {', '.join(missing) or 'root'}: {INSTALL_HINT}")


def _tool(name: str) -> str:
    return shutil.which(name) or name


def _run(*args: str) -> str:
    done = subprocess.run([_tool(args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


class LoopMount:
    """An ext4 image of `size_mb` on its own loop device, mounted at `where`."""

    def __init__(self, image: Path, where: Path, size_mb: int = 32) -> None:
        _need("mkfs.ext4", "losetup", "mount", "umount")
        self.image = image
        self.where = where
        with image.open("wb") as handle:
            handle.truncate(size_mb * 1024 * 1024)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        # One device for the image's whole life: mounting that same device again after a lazy
        # unmount reuses the kernel's superblock if it is still alive, so a file system is never
        # driven by two superblocks at once (two loop devices on one image would corrupt it).
        self.device = _run("losetup", "--find", "--show", str(image))
        where.mkdir(parents=True, exist_ok=True)
        self.mounted = False
        self.mount()

    def mount(self) -> None:
        _run("mount", "-t", "ext4", self.device, str(self.where))
        self.mounted = True

    def vanish(self) -> None:
        """The share drops: lazily unmounted while the daemon may hold files open on it."""
        _run("umount", "-l", str(self.where))
        self.mounted = False

    def come_back(self) -> None:
        """The share is mounted again, with the files it had."""
        self.mount()

    def close(self) -> None:
        if self.mounted:
            subprocess.run([_tool("umount"), "-l", str(self.where)], capture_output=True,
                           check=False)
            self.mounted = False
        # A lazily unmounted file system lets its device go once nothing uses it any more.
        subprocess.run([_tool("losetup"), "-d", self.device], capture_output=True, check=False)


class Tmpfs:
    """A tmpfs of `size_kb` mounted at `where` (a disk that fills up)."""

    def __init__(self, where: Path, size_kb: int) -> None:
        _need("mount", "umount")
        where.mkdir(parents=True, exist_ok=True)
        self.where = where
        _run("mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(where))

    def close(self) -> None:
        subprocess.run([_tool("umount"), "-l", str(self.where)], capture_output=True, check=False)


@pytest.fixture
def loop_mount(tmp_path: Path) -> Iterator[Callable[[Path], LoopMount]]:
    """Make loop mounts at the folders asked; every one is unmounted and detached at the end."""
    made: list[LoopMount] = []

    def make(where: Path, size_mb: int = 32) -> LoopMount:
        mount = LoopMount(tmp_path / f"disk{len(made)}.ext4", where, size_mb)
        made.append(mount)
        return mount

    yield make
    for mount in made:
        mount.close()


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, int], Tmpfs]]:
    """Mount small tmpfs file systems at the folders asked; each is unmounted at the end."""
    made: list[Tmpfs] = []

    def make(where: Path, size_kb: int) -> Tmpfs:
        made.append(Tmpfs(where, size_kb))
        return made[-1]

    yield make
    for disk in made:
        disk.close()


def fill(folder: Path, name: str = "filler") -> Path:
    """Fill the file system of `folder` to the last byte with one file; returns it."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (65536, 4096, 1):  # then the last partial blocks
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return path


_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* Fail open() and read() with WATCHFOLDER_FAULT_ERRNO (default EIO) for paths below
   WATCHFOLDER_FAULT_BELOW, while the file WATCHFOLDER_FAULT_SWITCH exists (always, if
   unset), each time with the probability WATCHFOLDER_FAULT_RATE (default 1: always); with
   WATCHFOLDER_FAULT_SYNC set, fsync() and fdatasync() too (a disk that fails its flush),
   and with it set to "only", those alone. */

static int armed(void) {
    const char *sw = getenv("WATCHFOLDER_FAULT_SWITCH");
    const char *rate = getenv("WATCHFOLDER_FAULT_RATE");
    static unsigned seed = 12345;
    if (sw && access(sw, F_OK) != 0) return 0;
    return !rate || (double)rand_r(&seed) / RAND_MAX < atof(rate);
}

static int below(const char *path) {
    const char *root = getenv("WATCHFOLDER_FAULT_BELOW");
    size_t n;
    if (!root || !path) return 0;
    n = strlen(root);
    return strncmp(path, root, n) == 0 && (path[n] == '/' || path[n] == 0);
}

static int fault(void) {
    const char *e = getenv("WATCHFOLDER_FAULT_ERRNO");
    return e ? atoi(e) : EIO;
}

static int fd_below(int fd) {
    char link[64], path[PATH_MAX];
    ssize_t n;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return below(path);
}

static int sync_only(void) {
    const char *s = getenv("WATCHFOLDER_FAULT_SYNC");
    return s && strcmp(s, "only") == 0;
}

static int sync_fault(int fd) {
    return getenv("WATCHFOLDER_FAULT_SYNC") && armed() && fd_below(fd);
}

int open(const char *path, int flags, ...) {
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;
    if (!real) real = dlsym(RTLD_NEXT, "open");
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, int);
        va_end(ap);
    }
    if (below(path) && !(flags & O_DIRECTORY) && !sync_only() && armed()) {
        errno = fault();
        return -1;
    }
    return real(path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;
    if (!real) real = dlsym(RTLD_NEXT, "open64");
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, int);
        va_end(ap);
    }
    if (below(path) && !(flags & O_DIRECTORY) && !sync_only() && armed()) {
        errno = fault();
        return -1;
    }
    return real(path, flags, mode);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    if (sync_fault(fd)) { errno = fault(); return -1; }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    if (sync_fault(fd)) { errno = fault(); return -1; }
    return real(fd);
}

ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "read");
    if (fd > 2 && !sync_only() && armed() && fd_below(fd)) { errno = fault(); return -1; }
    return real(fd, buf, count);
}
"""


def eio_shim(folder: Path) -> Path:
    """Compile the fault shim into `folder`; returns the .so for LD_PRELOAD."""
    _need("gcc")
    source = folder / "fault_shim.c"
    library = folder / "fault_shim.so"
    source.write_text(_SHIM, encoding="ascii")
    _run("gcc", "-shared", "-fPIC", "-O1", "-o", str(library), str(source), "-ldl")
    return library


def wal_flushes_fail(folder: Path, state_dir: Path, switch: Path) -> dict[str, str]:
    """The environment of a process in which every flush (fsync, fdatasync) of the journal's
    WAL in `state_dir` fails with EIO while `switch` exists, and nothing else fails: a disk
    that takes writes but refuses to flush them (the shim compiled into `folder`)."""
    return {"LD_PRELOAD": str(eio_shim(folder)),
            "WATCHFOLDER_FAULT_BELOW": f"{state_dir / JOURNAL_NAME}-wal",
            "WATCHFOLDER_FAULT_SWITCH": str(switch), "WATCHFOLDER_FAULT_SYNC": "only"}


def without_dac_override() -> list[str]:
    """Run as root, but bound by mode bits (no CAP_DAC_OVERRIDE, no CAP_DAC_READ_SEARCH)."""
    _need("setpriv")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--"]


class DaemonProcess:
    """`watchfolder run --config CONFIG` in a subprocess; its JSON log lines, as they come."""

    def __init__(self, config: Path, *, prefix: Sequence[str] = (),
                 env: dict[str, str] | None = None, once: bool = False) -> None:
        args = [*prefix, sys.executable, "-m", "watchfolder", "run", "--config", str(config)]
        if once:
            args.append("--once")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        self.log = config.parent / "daemon.log"  # every line, to read after a failure
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []  # lines that are not JSON: tracebacks, raw library output
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock, self.log.open("a", encoding="utf-8") as kept:
                kept.write(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    self.raw.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [line for line in self.lines if line.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events(name)) < count:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)  # the last lines may still be on their way
                if len(self.events(name)) >= count:
                    return
                pytest.fail(f"the daemon exited ({self.proc.returncode}) before {count} "
                            f"{name}: {''.join(self.raw)[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {count} {name} "
                            f"(saw {len(self.events(name))})")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code
