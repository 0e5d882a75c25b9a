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
from watchfolder.config.settings import Config, parse_config
from watchfolder.dev.sandbox import Sandbox
from watchfolder.imaging import libraries
from watchfolder.service.daemon import Daemon

KEY = "test-key-0123456789"


@pytest.fixture(autouse=True, scope="session")
def image_libraries() -> None:
    """libvips set up as the daemon sets it at start (tests call imaging code directly)."""
    libraries.configure()


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
            # Off unless a test asks for it: tests run side by side, and 8470 is one port.
            "web": {"listen": "off"},
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
                      if p.is_file() and not any(part.startswith(".")
                                                 for part in p.relative_to(folder).parts))

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


# -- a real redis-server for the coordination tests (issue 13) ------------------------------------
#
# Each test that asks for `redis_server` gets its own `redis-server` process on a free loopback
# port, in a temp folder, without persistence (a restart comes back empty, like a store without
# RDB/AOF). Never the system service. When redis-server is missing the test fails and says how
# to install it: a skipped coordination test would hide exactly what it guards.

REDIS_INSTALL_HINT = ("redis-server is not installed: `apt-get install redis-server` (Debian/"
                      "Ubuntu; .ci/run does it when run as root) or put a redis-server (or "
                      "valkey-server) binary on PATH")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server process of our own: start, kill -9, start again (empty) on the same port."""

    def __init__(self, folder: Path, binary: str) -> None:
        self.folder = folder
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder), "--logfile",
             str(self.folder / "redis.log"), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = self.folder / "redis.log"
                        pytest.fail("redis-server did not start: "
                                    + (log.read_text() if log.exists() else "no log"))
                    time.sleep(0.02)
                else:
                    return
        finally:
            client.close()

    def kill(self) -> None:
        """kill -9: the store vanishes mid-run, with everything it held in memory."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """kill -9 and start again, empty, on the same port."""
        self.kill()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    import shutil

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        pytest.fail(REDIS_INSTALL_HINT)
    server = RedisServer(tmp_path / "redis", binary)
    server.start()
    yield server
    server.kill()
