"""Shared fixtures: real folders, a real loopback API (the sandbox), a real daemon.

Nothing here is mocked. Intervals are shrunk through the configuration instead of sleeping.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageDraw

from watchfolder import logs
from watchfolder.config import Config, parse_config
from watchfolder.daemon import Daemon
from watchfolder.sandbox import Sandbox

KEY = "test-key-0123456789"


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (as watchdog's own test-suite does)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(keys=(KEY,), rpm=6000) as server:
        yield server


def make_image(path: Path, fmt: str = "PNG", size: tuple[int, int] = (160, 120),
               backdrop: tuple[int, int, int] = (245, 245, 245),
               subject: tuple[int, int, int] = (200, 30, 30), seed: int = 0) -> Path:
    """A small studio shot: a coloured disc on a plain backdrop, written atomically."""
    image = Image.new("RGB", size, backdrop)
    w, h = size
    draw = ImageDraw.Draw(image)
    # The seed moves the subject's colour enough to survive JPEG: distinct seeds, distinct bytes.
    fill = (subject[0], (subject[1] + 17 * seed) % 200, (subject[2] + 31 * seed) % 200)
    draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=fill)
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {}
    image.save(buffer, fmt, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(buffer.getvalue())
    temp.rename(path)
    return path


class Studio:
    """One inbox with its outbox/errors/archive under tmp_path, and a config for it."""

    def __init__(self, root: Path, url: str, **overrides: Any) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.errors = root / "errors"
        self.archive = root / "archive"
        self.inbox.mkdir(parents=True, exist_ok=True)
        inbox_over = overrides.pop("inbox", {})
        inbox = {"path": "inbox", "outbox": "outbox", "errors": "errors", "archive": "archive",
                 "settle_seconds": 0.1, "polling_interval_seconds": 0.1, **inbox_over}
        if inbox.get("archive") is None:
            inbox.pop("archive")
        self.data: dict[str, Any] = {
            "api": {"url": url, "key": KEY, "requests_per_minute": 6000, "concurrency": 4,
                    "timeout_seconds": 5, "connect_timeout_seconds": 2,
                    **overrides.pop("api", {})},
            "retry": {"max_attempts": 3, "backoff_seconds": 0.05, "max_backoff_seconds": 0.2,
                      "pause_seconds": 0.3, **overrides.pop("retry", {})},
            "state_dir": "state",
            "rescan_seconds": 0.5,
            "shutdown_timeout_seconds": 5,
            "log": {"format": "json", "level": "debug"},
            "inboxes": [inbox, *overrides.pop("extra_inboxes", [])],
            **overrides,
        }

    def config(self) -> Config:
        return parse_config(self.data, base_dir=self.root)

    def write_config(self) -> Path:
        path = self.root / "daemon.yaml"
        path.write_text(yaml.safe_dump(self.data, allow_unicode=True), encoding="utf-8")
        path.chmod(0o600)
        return path

    def files(self, folder: Path) -> list[str]:
        """Relative POSIX paths of the visible files below `folder`, sorted."""
        if not folder.exists():
            return []
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def states(self) -> list[str]:
        """The journal's state of every file so far (read-only; [] before the first run)."""
        path = self.root / "state" / "journal.sqlite3"
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=5)) as db:
            return [state for (state,) in db.execute("SELECT state FROM files ORDER BY id")]

    def reason(self, rel: str) -> dict[str, Any]:
        return json.loads((self.errors / f"{rel}.error.json").read_text(encoding="utf-8"))


@pytest.fixture
def studio(tmp_path: Path, sandbox: Sandbox) -> Studio:
    return Studio(tmp_path, sandbox.url)


class LogCapture(io.StringIO):
    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]
        return [e for e in found if name is None or e.get("event") == name]


@pytest.fixture
def log_lines() -> Iterator[LogCapture]:
    capture = LogCapture()
    logs.configure("json", "debug", stream=capture)
    yield capture
    logs.configure("json", "warning")


class Running:
    """A daemon running in this process with real watchdog observers."""

    def __init__(self, config: Config, once: bool = False) -> None:
        self.daemon = Daemon(config, once=once)

    def __enter__(self) -> Daemon:
        self.daemon.start()
        return self.daemon

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `predicate` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


def run_watchfolder(*args: str, env: dict[str, str] | None = None, without: tuple[str, ...] = (),
                    timeout: float = 60, cwd: Path | None = None
                    ) -> subprocess.CompletedProcess[str]:
    """`python -m watchfolder ARGS` as a user runs it; `without` drops environment variables."""
    environment = {k: v for k, v in os.environ.items() if k not in without}
    return subprocess.run([sys.executable, "-m", "watchfolder", *args], capture_output=True,
                          text=True, timeout=timeout, env={**environment, **(env or {})},
                          cwd=cwd, check=False)
