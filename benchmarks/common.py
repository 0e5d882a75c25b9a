"""What every benchmark case needs: images, a real daemon process, /proc readings, windows.

Nothing is simulated: the daemon is `python -m watchfolder run` (or, where the benchmark must
look inside it, the real `Daemon` class in a child process, see probe.py), folders are real
folders on the disk under /tmp, and the API is the loopback sandbox with its `latency` knob.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

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
    """`python -m watchfolder run --config ...` in a child process, logging JSON to a file."""

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
                 wall: bool = False) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        # wall: sample waiting threads too (fsync, locks, sockets), to see where time goes
        # rather than where the CPU goes.
        self.proc = subprocess.Popen(
            [shutil.which("py-spy") or "py-spy", "record", "--pid", str(pid), "--rate",
             str(rate), "--threads", "--format", "raw", "--output", str(out), "--nonblocking",
             *(["--idle"] if wall else [])],
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads, 1/CLK_TCK resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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
