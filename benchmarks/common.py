"""What every benchmark case needs: images, a real daemon process, /proc readings, windows.

Nothing is simulated: the daemon is `python -m watchfolder run` (or, where the benchmark must
look inside it, the real `Daemon` class in a child process, see probe.py), folders are real
folders on the disk under /tmp, and the API is the loopback sandbox with its `latency` knob.
"""

from __future__ import annotations

import atexit
import bisect
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from watchfolder.dev.sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123456789"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- images ------------------------------------------------------------------------------------

def _base_png() -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (64, 48), (245, 245, 245))
    image.paste((200, 30, 30), (24, 16, 40, 32))  # a subject on a plain backdrop
    image.save(buffer, "PNG")
    return buffer.getvalue()


_BASE = _base_png()


def unique_png(n: int) -> bytes:
    """A valid 64x48 PNG whose bytes are unique to `n` (a tEXt chunk carries it).

    Unique bytes matter: watchfolder reuses the result of identical content without a request,
    so a benchmark of requests needs every file to be different. Encoding one image and
    splicing a chunk in costs microseconds, so 100,000 files are written in seconds.
    """
    payload = b"n\x00" + str(n).encode()
    chunk = (struct.pack(">I", len(payload)) + b"tEXt" + payload
             + struct.pack(">I", zlib.crc32(b"tEXt" + payload)))
    return _BASE[:-12] + chunk + _BASE[-12:]  # before IEND (the last 12 bytes)


def write_images(folder: Path, names: Iterable[str], start: int = 0) -> int:
    """Write a unique PNG for each name (plain writes: for folders nobody watches yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, name in enumerate(names, 1):
        (folder / name).write_bytes(unique_png(start + count))
    return count


def names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:06d}.png" for i in range(count)]


# -- the API ---------------------------------------------------------------------------------------

class ReplaySandbox(Sandbox):
    """The sandbox, cutting out each distinct big image once and replaying that answer for
    the same bytes (same Accept, same transparency_handling).

    The API's work happens on its servers, not on the daemon's machine; here the sandbox
    shares the daemon's 2 cores, and cutting out one 25 MP proxy costs it 2.4 s of CPU (the
    mask, then a PNG of the full size): at 60/min that alone would take more than the box.
    The studio cases' files differ only in bytes that never reach the proxy, so every proxy
    of a case is the same image: the daemon gets exactly the answer the sandbox would have
    computed. Everything else (limit, latency, records, headers) is the sandbox's own.
    Images under 1 MB are cut out every time, as usual.
    """

    MIN_BYTES = 1_000_000
    KEEP = 4  # distinct answers kept

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replay: OrderedDict[tuple[bytes, str | None, bytes | None], Any] = OrderedDict()
        # One cut-out at a time: identical requests arriving together wait for the first
        # one's answer instead of each computing it.
        self._replay_lock = threading.Lock()
        self.computed = 0  # how many big answers were really computed

    def _process(self, accept: str | None, form: Any, body_too_large: bool) -> Any:
        part = form.get("image_file") if isinstance(form, dict) else None
        if part is None or body_too_large or len(part.data) < self.MIN_BYTES:
            return super()._process(accept, form, body_too_large)
        handling = form.get("transparency_handling")
        key = (hashlib.sha256(part.data).digest(), accept, handling.data if handling else None)
        with self._replay_lock:
            answer = self._replay.get(key)
            if answer is None:
                answer = super()._process(accept, form, body_too_large)
                self.computed += 1
                if answer.status == 200:
                    self._replay[key] = answer
                    while len(self._replay) > self.KEEP:
                        self._replay.popitem(last=False)
        # The caller adds headers (credits) to the answer: each request gets its own dict.
        return dataclasses.replace(answer, headers=dict(answer.headers))


# -- a daemon process --------------------------------------------------------------------------

def studio_config(root: Path, url: str, *, rpm: int, concurrency: int,
                  inboxes: int = 1, polling: Sequence[int] = (), **extra: Any) -> dict[str, Any]:
    """A daemon.yaml for `inboxes` inboxes under `root` (inbox0, inbox1, ...)."""
    boxes = []
    for i in range(inboxes):
        box: dict[str, Any] = {"path": str(root / f"inbox{i}"), "outbox": str(root / f"outbox{i}"),
                               "errors": str(root / f"errors{i}"),
                               "archive": str(root / f"archive{i}")}
        if i in polling:
            box["polling"] = True
        boxes.append(box)
        (root / f"inbox{i}").mkdir(parents=True, exist_ok=True)
    return {"api": {"url": url, "key": KEY, "requests_per_minute": rpm,
                    "concurrency": concurrency},
            "state_dir": str(root / "state"),
            "log": {"format": "json", "level": "info"},
            "inboxes": boxes, **extra}


class DaemonProcess:
    """`python -m watchfolder run --config ...` in a child process, logging JSON to a file.
    A daemon still running when the harness exits (a case that failed half-way) is stopped
    then, not left behind to load the machine under the next measurement."""

    def __init__(self, root: Path, config: dict[str, Any], name: str = "daemon",
                 argv: Sequence[str] | None = None) -> None:
        self.root = root
        self.config_path = root / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.config_path.chmod(0o600)
        self.log_path = root / f"{name}.log"
        self.argv = list(argv or [sys.executable, "-m", "watchfolder", "run", "--config"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self._log_offset = 0
        self.events: list[dict[str, Any]] = []

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for the `ready` line; return seconds from exec to ready."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen([*self.argv, str(self.config_path)], cwd=REPO, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        atexit.register(self.stop, 10.0)
        deadline = time.monotonic() + timeout
        while not any(e.get("event") == "ready" for e in self.read_events()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready after {timeout} s; see {self.log_path}")
            time.sleep(0.02)
        return time.monotonic() - self.started

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def read_events(self) -> list[dict[str, Any]]:
        """Log events written since the last start (parsed JSON lines)."""
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        for line in complete.splitlines():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "<not json>", "line": line.decode(errors="replace")})
        return self.events

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Profiler:
    """py-spy attached to a running process (optional: `--profile DIR`)."""

    def __init__(self, pid: int, out: Path | None, rate: int = 100, *,
                 wall: bool = False, gil: bool = False) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        # wall: sample waiting threads too (fsync, locks, sockets), to see where time goes
        # rather than where the CPU goes. gil: only the thread holding the GIL, the nearest
        # py-spy comes to "where the interpreter's CPU goes" (a thread blocked in fsync or in
        # a socket read counts as active otherwise, which is most of the samples).
        self.proc = subprocess.Popen(
            [shutil.which("py-spy") or "py-spy", "record", "--pid", str(pid), "--rate",
             str(rate), "--threads", "--format", "raw", "--output", str(out), "--nonblocking",
             *(["--idle"] if wall else []), *(["--gil"] if gil else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- /proc readings ----------------------------------------------------------------------------

def status_kb(pid: int, field: str) -> int:
    """A `Vm*` field of /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and the parts of RSS (RssAnon, RssFile, RssShmem) of a process, in kB."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name in wanted:
            found[name] = int(line.split()[1])
    return found


def folder_bytes(folder: Path) -> int:
    """Bytes of the files below `folder` (0 if it is gone)."""
    total = 0
    for path, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(path, name)).st_size
            except FileNotFoundError:
                continue
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads, 1/CLK_TCK resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process in seconds: the interpreter's work and the kernel's
    on its behalf (syscalls: fsync, rename, inotify, sockets)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def task_totals(pid: int) -> tuple[float, int]:
    """(on-CPU seconds from schedstat, context switches) summed over the live threads.

    schedstat counts nanoseconds, so it resolves what 10 ms clock ticks cannot in a short
    idle measurement; context switches count wake-ups (a busy poll shows up here).
    """
    runtime = 0
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            runtime += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return runtime / 1e9, switches


# -- request times -----------------------------------------------------------------------------

def max_in_window(times: Sequence[float], seconds: float = 60.0) -> int:
    """The most receipts inside any window of `seconds` (both ends included)."""
    ordered = sorted(times)
    best = 0
    for end, t in enumerate(ordered):
        start = bisect.bisect_left(ordered, t - seconds, 0, end)
        best = max(best, end - start + 1)
    return best


def count_between(times: Sequence[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def count_files(folder: Path) -> int:
    """Visible files in `folder` (not recursive), cheap enough to poll."""
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if not e.name.startswith("."))
    except FileNotFoundError:
        return 0
