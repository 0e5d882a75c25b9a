"""Telling the next tool that a file is finished: hooks (local commands) and a signed webhook.

Both receive the manifest (manifest.py) of one processing of one file. Neither can change what
happened to the file: a hook that fails or a receiver that is down is logged and retried, the
file stays where the pipeline put it.

    HookRunner     runs `hooks.on_done` / `hooks.on_failed` (argv lists, never a shell) on its
                   own threads, `max_parallel` at once. `submit` never blocks. Each run gets the
                   manifest on stdin and WATCHFOLDER_* variables, is killed with its whole
                   process group after `timeout_seconds`, and is retried `retries` times with
                   backoff. In memory: hooks still waiting when the daemon stops are dropped.
    DeliveryQueue  POSTs the manifest to `webhook.url`, signed
                   (`X-Watchfolder-Signature: sha256=<HMAC-SHA256 of the body>`). `enqueue`
                   commits the delivery to `state_dir/deliveries.sqlite3` before it returns, so
                   a delivery survives a crash or restart: at least once, the body's `id`
                   (also in `X-Watchfolder-Delivery`) lets the receiver deduplicate. Anything
                   but a 2xx is retried with exponential backoff and jitter (about 1 s, then up
                   to 5 min between tries) for `max_age_hours`, then dropped with an error log.

Wiring, per finished (done or failed) file, in this order:

    manifest = build_manifest(...); body = manifest_json(manifest)     # manifest.py
    place the outputs, then the manifest file (done only)
    deliveries.enqueue(manifest["id"], body)    # durable; before the journal says final
    place the .done marker; journal: done / failed
    hooks.submit(manifest, manifest_path, body) # returns at once
    at stop: hooks.join(t); deliveries.join(t); deliveries.close()

Exceptions (see errors.py for the rest of the tree):

    WatchfolderError
    └── WebhookUnreachable   no HTTP answer (refused, reset, timeout, TLS); carries only the
                             kind of failure, never the URL or the secret

Log events: hook.done, hook.failed, hook.timeout, hook.gave_up, hook.killed, hook.dropped;
webhook.queued, webhook.pending, webhook.delivered, webhook.retry, webhook.dropped.

Configuration (parsed by `parse_hooks` / `parse_webhook`, which report every problem with its
path, e.g. `hooks.on_done: must be a list of strings (an argv), not a shell string`):

    hooks:
      on_done: ["/usr/local/bin/publish", "--fast"]   # optional
      on_failed: ["/usr/local/bin/alert"]             # optional
      timeout_seconds: 60     # per run; then SIGTERM to the group, SIGKILL 2 s later
      max_parallel: 4         # hooks running at once
      retries: 3              # further runs after a failure or timeout
    webhook:
      url: https://example.com/watchfolder            # http:// allowed
      secret: ${WEBHOOK_SECRET}                       # or secret_file: /path/to/file
      timeout_seconds: 10                             # waiting for the answer
      connect_timeout_seconds: 5
      max_age_hours: 24                               # keep trying this long, then drop
"""

from __future__ import annotations

import contextlib
import heapq
import hmac
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import requests
import structlog

from watchfolder import __version__, logs
from watchfolder.config.secret import Secret
from watchfolder.coordination.ratelimit import backoff
from watchfolder.errors import WatchfolderError
from watchfolder.handoff.manifest import manifest_json

log = structlog.get_logger("watchfolder")

USER_AGENT = f"watchfolder/{__version__}"
SIGNATURE_HEADER = "X-Watchfolder-Signature"
DELIVERY_HEADER = "X-Watchfolder-Delivery"
STDERR_TAIL_BYTES = 2000
KEEP_FINISHED_SECONDS = 30 * 86400  # delivered/dropped ids are remembered this long (dedupe)


class WebhookUnreachable(WatchfolderError):
    """The receiver gave no HTTP answer; `error` names the kind (e.g. ConnectTimeout)."""

    reason = "webhook_unreachable"

    def __init__(self, error: str) -> None:
        self.error = error
        super().__init__(f"webhook request failed: {error}")


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookSettings:
    on_done: tuple[str, ...] | None = None
    on_failed: tuple[str, ...] | None = None
    timeout_seconds: float = 60.0
    max_parallel: int = 4
    retries: int = 3

    def argv_for(self, event: str) -> tuple[str, ...] | None:
        """The command for a manifest's `event` (done or failed), None when there is none."""
        return {"done": self.on_done, "failed": self.on_failed}.get(event)


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: Secret = field(repr=False)
    timeout_seconds: float = 10.0
    connect_timeout_seconds: float = 5.0
    max_age_hours: float = 24.0

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data for check-config, the secret replaced by a marker."""
        return {"url": _display_url(self.url), "secret": "<set>" if self.secret else "<not set>",
                "timeout_seconds": self.timeout_seconds,
                "connect_timeout_seconds": self.connect_timeout_seconds,
                "max_age_hours": self.max_age_hours}


_HOOK_KEYS = {"on_done", "on_failed", "timeout_seconds", "max_parallel", "retries"}
_WEBHOOK_KEYS = {"url", "secret", "secret_file", "timeout_seconds", "connect_timeout_seconds",
                 "max_age_hours"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Reader:
    """Collects problems while reading one mapping of the YAML, each with its path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        where = f"{self.path}.{key}" if key else self.path
        self.problems.append(f"{where}: {message}")

    def mapping(self, raw: Any, allowed: set[str]) -> dict[str, Any] | None:
        if not isinstance(raw, dict):
            self.fail("", f"must be a mapping, got {type(raw).__name__}")
            return None
        for key in raw:
            if key not in allowed:
                self.fail(str(key), f"unknown key (known: {', '.join(sorted(allowed))})")
        return raw

    def number(self, data: dict[str, Any], key: str, default: float, *, minimum: float,
               integer: bool = False) -> Any:
        value = data.get(key, default)
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            self.fail(key, f"must be {'a whole number' if integer else 'a number'}, "
                           f"got {value!r}")
            return default
        if value < minimum:
            self.fail(key, f"must be at least {minimum}, got {value}")
            return default
        return value

    def expand(self, value: str, key: str) -> str:
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                self.fail(key, f"environment variable {name} is not set "
                               f"(export it, or remove the ${{{name}}} reference)")
                return ""
            return os.environ[name]

        return _ENV_REF.sub(sub, value)

    def argv(self, data: dict[str, Any], key: str) -> tuple[str, ...] | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; write {json.dumps(shlex.split(value))}"
            self.fail(key, f"must be a list of strings (an argv), not a shell string{hint}")
            return None
        if not isinstance(value, list) or not value:
            self.fail(key, "must be a non-empty list of strings (an argv)")
            return None
        argv: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or (index == 0 and not item):
                self.fail(f"{key}[{index}]", f"must be a string, got {item!r}")
                return None
            argv.append(self.expand(item, f"{key}[{index}]"))
        program = argv[0]
        if "/" not in program:
            if program and shutil.which(program) is None:
                self.fail(f"{key}[0]", f"command {program!r} not found on PATH "
                                       f"(give its absolute path)")
        elif not program.startswith("/"):
            self.fail(f"{key}[0]", f"must be an absolute path or a command on PATH, "
                                   f"not {program!r}")
        elif not (Path(program).is_file() and os.access(program, os.X_OK)):
            self.fail(f"{key}[0]", f"{program} is not an executable file")
        return tuple(argv)


def parse_hooks(raw: Any, path: str = "hooks") -> tuple[HookSettings | None, list[str]]:
    """Validate the `hooks:` mapping; None when it is absent. Every problem has its path."""
    if raw is None:
        return None, []
    r = _Reader(path)
    data = r.mapping(raw, _HOOK_KEYS)
    if data is None:
        return None, r.problems
    settings = HookSettings(
        on_done=r.argv(data, "on_done"),
        on_failed=r.argv(data, "on_failed"),
        timeout_seconds=float(r.number(data, "timeout_seconds", 60, minimum=0.1)),
        max_parallel=r.number(data, "max_parallel", 4, minimum=1, integer=True),
        retries=r.number(data, "retries", 3, minimum=0, integer=True),
    )
    return settings, r.problems


def parse_webhook(raw: Any, path: str = "webhook", *, base_dir: Path | None = None
                  ) -> tuple[WebhookSettings | None, list[str]]:
    """Validate the `webhook:` mapping; None when absent or unusable. Relative `secret_file`
    paths resolve against `base_dir` (the config file's folder)."""
    if raw is None:
        return None, []
    r = _Reader(path)
    data = r.mapping(raw, _WEBHOOK_KEYS)
    if data is None:
        return None, r.problems
    url = data.get("url")
    if url is None:
        r.fail("url", "is required: where to POST each manifest")
        url = ""
    elif not isinstance(url, str):
        r.fail("url", f"must be a string, got {url!r}")
        url = ""
    else:
        url = r.expand(url, "url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            r.fail("url", f"must be an http(s) URL, got {_display_url(url)!r}")
    secret = _read_secret(r, data, base_dir)
    settings = WebhookSettings(
        url=url,
        secret=secret,
        timeout_seconds=float(r.number(data, "timeout_seconds", 10, minimum=0.1)),
        connect_timeout_seconds=float(r.number(data, "connect_timeout_seconds", 5,
                                               minimum=0.1)),
        max_age_hours=float(r.number(data, "max_age_hours", 24, minimum=1)),
    )
    return (None if r.problems else settings), r.problems


def _read_secret(r: _Reader, data: dict[str, Any], base_dir: Path | None) -> Secret:
    inline, file = data.get("secret"), data.get("secret_file")
    if inline is not None and file is not None:
        r.fail("secret", "set either secret or secret_file, not both")
        return Secret("")
    if inline is not None:
        if not isinstance(inline, str):
            r.fail("secret", "must be a string")  # never echo the value
            return Secret("")
        value = r.expand(inline, "secret").strip()
        if not value and not _ENV_REF.search(inline):
            r.fail("secret", "is empty")
        return Secret(value)
    if file is not None:
        if not isinstance(file, str) or not file:
            r.fail("secret_file", f"must be a path, got {file!r}")
            return Secret("")
        secret_path = Path(r.expand(file, "secret_file")).expanduser()
        if not secret_path.is_absolute():
            secret_path = (base_dir or Path.cwd()) / secret_path
        try:
            value = secret_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            r.fail("secret_file", f"cannot read {secret_path}: "
                                  f"{getattr(exc, 'strerror', None) or type(exc).__name__}")
            return Secret("")
        if not value:
            r.fail("secret_file", f"{secret_path} is empty")
        return Secret(value)
    r.fail("secret", "is required: the key that signs each delivery "
                     "(e.g. secret: ${WEBHOOK_SECRET}, or secret_file)")
    return Secret("")


def _display_url(url: str) -> str:
    """scheme://host[:port]/path without user info or query, safe to print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else "<not a URL>"


def backoff_delay(attempt: int, first: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds to wait after failed try number `attempt` (1-based): `first` doubled per try,
    capped at `cap`, then jittered into its upper half so that retries spread out."""
    ceiling = backoff(min(attempt, 60), first, cap)
    return ceiling * (0.5 + 0.5 * rand())


# -- hooks -----------------------------------------------------------------------------------


@dataclass
class _HookRun:
    event: str
    argv: tuple[str, ...]
    body: bytes
    variables: dict[str, str]
    delivery_id: str
    source: str
    tries: int = 0


class HookRunner:
    """Runs hooks on `max_parallel` threads of its own; start, submit, stop, join.

    `withhold` lists secrets (the API key, the webhook secret) that must not reach a hook: an
    inherited environment variable whose value is one of them is left out.
    """

    def __init__(self, settings: HookSettings, *, withhold: Iterable[Secret] = (),
                 backoff_seconds: float = 2.0, max_backoff_seconds: float = 60.0,
                 kill_grace_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self._withhold = frozenset(s for s in withhold if s)
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.kill_grace_seconds = kill_grace_seconds
        self._clock = clock
        self._rand = rand
        # One condition guards the schedule: workers wait on it for the next due run, submit
        # and stop notify it. (An Event cannot carry "the earliest run is due at t".)
        self._cond = threading.Condition()
        self._schedule: list[tuple[float, int, _HookRun]] = []
        self._order = itertools.count()
        self._stopping = False
        self._running: set[subprocess.Popen[bytes]] = set()
        self._killed_at_shutdown: set[int] = set()
        self._shutdown_signal: signal.Signals | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.settings.max_parallel):
            thread = threading.Thread(target=self._work, name=f"watchfolder-hook-{n}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, manifest: Mapping[str, Any], manifest_path: str | Path | None = None,
               body: bytes | None = None) -> bool:
        """Schedule the hook for the manifest's event; returns at once.

        False when no hook is configured for that event or the runner is stopping. `body` is
        the manifest's JSON (manifest_json(manifest) when not given).
        """
        event = str(manifest["event"])
        argv = self.settings.argv_for(event)
        if argv is None:
            return False
        source = str(manifest["source"]["path"])
        variables = {
            "WATCHFOLDER_EVENT": event,
            "WATCHFOLDER_ID": str(manifest["id"]),
            "WATCHFOLDER_SOURCE": source,
            "WATCHFOLDER_OUTPUTS": json.dumps([o["path"] for o in manifest["outputs"]],
                                              ensure_ascii=False),
        }
        if manifest_path is not None:
            variables["WATCHFOLDER_MANIFEST"] = str(manifest_path)
        if body is None:
            body = manifest_json(manifest)
        run = _HookRun(event=event, argv=argv, body=body, variables=variables,
                       delivery_id=str(manifest["id"]), source=source)
        with self._cond:
            if self._stopping:
                self._dropped(run)
                return False
            heapq.heappush(self._schedule, (self._clock(), next(self._order), run))
            self._cond.notify()
        return True

    def stop(self) -> None:
        """Start no new run; runs waiting for their turn or a retry are dropped (logged)."""
        with self._cond:
            self._stopping = True
            dropped = [run for _, _, run in self._schedule]
            self._schedule.clear()
            self._cond.notify_all()
        for run in dropped:
            self._dropped(run)

    def join(self, timeout: float) -> bool:
        """Let running hooks finish within `timeout` s, then kill their process groups
        (SIGTERM, SIGKILL at the deadline). True when every thread has ended."""
        self.stop()
        deadline = time.monotonic() + timeout
        term_at = deadline - min(self.kill_grace_seconds, timeout / 2)
        self._join_until(term_at)
        self._signal_running(signal.SIGTERM)
        self._join_until(deadline)
        self._signal_running(signal.SIGKILL)
        # A killed hook's wait returns at once; this only bounds a pathological case.
        self._join_until(time.monotonic() + 1.0)
        return not any(thread.is_alive() for thread in self._threads)

    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def running(self) -> int:
        with self._cond:
            return len(self._running)

    def waiting(self) -> int:
        with self._cond:
            return len(self._schedule)

    def _join_until(self, deadline: float) -> None:
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _signal_running(self, sig: signal.Signals) -> None:
        with self._cond:
            self._shutdown_signal = sig
            running = list(self._running)
            self._killed_at_shutdown.update(proc.pid for proc in running)
        for proc in running:
            _signal_group(proc, sig)

    def _work(self) -> None:
        while (run := self._next()) is not None:
            try:
                self._run(run)
            except Exception:  # one hook must not take a worker down (logged with its trace)
                log.exception("hook.error", hook=run.argv[0], id=run.delivery_id)

    def _next(self) -> _HookRun | None:
        with self._cond:
            while not self._stopping:
                wait = None
                if self._schedule:
                    wait = self._schedule[0][0] - self._clock()
                    if wait <= 0:
                        return heapq.heappop(self._schedule)[2]
                self._cond.wait(wait)
            return None

    def _run(self, run: _HookRun) -> None:
        with self._cond:
            if self._stopping:  # taken just before stop: do not start it now
                self._dropped(run)
                return
        run.tries += 1
        bound = log.bind(hook=run.argv[0], hook_event=run.event, id=run.delivery_id,
                         source=run.source, attempt=run.tries)
        started = time.monotonic()
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stderr:
            # Files, not pipes: no deadlock on a hook that does not read its stdin, no memory
            # for a chatty one, and a child that keeps the descriptors cannot hold us up.
            stdin.write(run.body)
            stdin.seek(0)
            try:
                proc = subprocess.Popen(run.argv, stdin=stdin, stdout=subprocess.DEVNULL,
                                        stderr=stderr, env=self._environment(run),
                                        start_new_session=True, close_fds=True)
            except OSError as exc:
                self._failed(run, bound, exit_status=None, error=exc.strerror or str(exc))
                return
            with self._cond:
                self._running.add(proc)
                late = self._shutdown_signal  # join signalled while we were starting it
                if late is not None:
                    self._killed_at_shutdown.add(proc.pid)
            if late is not None:
                _signal_group(proc, late)
            try:
                code = proc.wait(timeout=self.settings.timeout_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc, self.kill_grace_seconds)
                code = proc.returncode
            finally:
                with self._cond:
                    self._running.discard(proc)
                    killed = proc.pid in self._killed_at_shutdown
                    self._killed_at_shutdown.discard(proc.pid)
            if killed:
                # The leader died of the shutdown's SIGTERM; children that ignore it go too.
                _signal_group(proc, signal.SIGKILL)
            ms = round((time.monotonic() - started) * 1000)
            tail = _tail(stderr)
        if killed and not timed_out:
            bound.warning("hook.killed", reason="shutdown", ms=ms, stderr_tail=tail)
        elif timed_out:
            bound.warning("hook.timeout", timeout_s=self.settings.timeout_seconds, ms=ms,
                          stderr_tail=tail)
            self._retry_or_give_up(run, bound)
        elif code == 0:
            bound.info("hook.done", exit_status=0, ms=ms)
        else:
            self._failed(run, bound, exit_status=code, stderr_tail=tail, ms=ms)

    def _failed(self, run: _HookRun, bound: Any, **facts: Any) -> None:
        bound.warning("hook.failed", **facts)
        self._retry_or_give_up(run, bound)

    def _retry_or_give_up(self, run: _HookRun, bound: Any) -> None:
        if run.tries > self.settings.retries:
            bound.error("hook.gave_up", tries=run.tries,
                        hint="the file is unaffected; run the hook by hand if needed")
            return
        delay = backoff_delay(run.tries, self.backoff_seconds, self.max_backoff_seconds,
                              self._rand)
        with self._cond:
            if not self._stopping:
                heapq.heappush(self._schedule, (self._clock() + delay, next(self._order), run))
                self._cond.notify()
                bound.info("hook.retry", retry_in_s=round(delay, 2))
                return
        self._dropped(run)

    def _dropped(self, run: _HookRun) -> None:
        log.warning("hook.dropped", reason="shutdown", hook=run.argv[0], hook_event=run.event,
                    id=run.delivery_id, source=run.source, tries=run.tries)

    def _environment(self, run: _HookRun) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("WATCHFOLDER_")
               and Secret(value.strip()) not in self._withhold}
        env.update(run.variables)
        return env


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session made the hook the leader of a group whose id is its pid; the kernel
    # does not hand that number to a new process while the group still has members.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the hook's group, SIGKILL it after `grace` s (children that ignore TERM too)."""
    _signal_group(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _tail(file: IO[bytes]) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - STDERR_TAIL_BYTES))
    return file.read().decode("utf-8", errors="replace").strip()


# -- webhook ---------------------------------------------------------------------------------


def signature(secret: Secret, body: bytes) -> str:
    """The `X-Watchfolder-Signature` value: `sha256=` and the hex HMAC-SHA256 of `body`."""
    return "sha256=" + hmac.new(secret.reveal().encode("utf-8"), body, sha256).hexdigest()


class WebhookClient:
    """One keep-alive session that POSTs signed bodies; used by one thread at a time."""

    def __init__(self, settings: WebhookSettings) -> None:
        self._settings = settings
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT

    def post(self, delivery_id: str, body: bytes) -> int:
        """Send `body` once; return the HTTP status, or raise WebhookUnreachable."""
        settings = self._settings
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id,
                   SIGNATURE_HEADER: signature(settings.secret, body)}
        try:
            response = self._session.post(
                settings.url, data=body, headers=headers, allow_redirects=False,
                timeout=(settings.connect_timeout_seconds, settings.timeout_seconds))
            response.close()
        except requests.RequestException as exc:
            # from None: the request (URL, signed headers) must not ride along in a traceback.
            raise WebhookUnreachable(type(exc).__name__) from None
        return response.status_code

    def close(self) -> None:
        self._session.close()


PENDING, DELIVERED, DROPPED = "pending", "delivered", "dropped"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    finished REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
"""
DELIVERIES_FILE = "deliveries.sqlite3"


class DeliveryQueue:
    """Durable webhook deliveries in `state_dir/deliveries.sqlite3`, sent by one thread.

    `enqueue` works before `start` and after `stop` (the delivery waits for the next start);
    `close` after `join`. Times in the database are wall-clock (`clock`), so the age limit
    and the backoff hold across restarts.
    """

    def __init__(self, state_dir: Path, settings: WebhookSettings, *,
                 first_backoff_seconds: float = 1.0, max_backoff_seconds: float = 300.0,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.path = Path(state_dir) / DELIVERIES_FILE
        self.first_backoff_seconds = first_backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._closing = False
        self._sender_done = False
        self._thread: threading.Thread | None = None
        logs.add_secret(settings.secret.reveal())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an enqueued delivery survives power loss, not only a crash of the process.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.execute("DELETE FROM deliveries WHERE state != ? AND finished < ?",
                         (PENDING, clock() - KEEP_FINISHED_SECONDS))

    # -- the pipeline's side ---------------------------------------------------------------

    def enqueue(self, delivery_id: str, body: bytes) -> bool:
        """Record a delivery durably (committed on return). Idempotent by id: False when that
        id was already queued, delivered or dropped."""
        now = self._clock()
        with self._lock:
            if self._closing:
                raise RuntimeError("DeliveryQueue is closed")
            cur = self._db.execute(
                "INSERT OR IGNORE INTO deliveries (id, body, state, created, next_at) "
                "VALUES (?, ?, ?, ?, ?)", (delivery_id, body, PENDING, now, now))
            added = cur.rowcount == 1
        if added:
            log.debug("webhook.queued", id=delivery_id, bytes=len(body))
            self._wake.set()
        return added

    def pending(self) -> int:
        """Deliveries not yet delivered nor dropped."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM deliveries WHERE state = ?",
                                        (PENDING,)).fetchone()
        return int(count)

    def state_of(self, delivery_id: str) -> str | None:
        """pending, delivered, dropped, or None for an unknown id."""
        with self._lock:
            row = self._db.execute("SELECT state FROM deliveries WHERE id = ?",
                                   (delivery_id,)).fetchone()
        return row[0] if row else None

    # -- the sender thread -------------------------------------------------------------------

    def start(self) -> None:
        waiting = self.pending()
        if waiting:
            log.info("webhook.pending", count=waiting, receiver=_display_url(self.settings.url))
        self._thread = threading.Thread(target=self._send_loop, name="watchfolder-webhook",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send nothing more; a request in flight ends within its timeouts (see `join`)."""
        self._stopping.set()
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the sender; False if a request is still in flight (its
        delivery stays pending and is sent again next start)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Close the database (at once, or when a request still in flight has ended)."""
        self.stop()
        with self._lock:
            self._closing = True
            if self._thread is None or self._sender_done:
                self._db.close()

    def _send_loop(self) -> None:
        client = WebhookClient(self.settings)
        try:
            while not self._stopping.is_set():
                self._wake.clear()  # before looking, so an enqueue from now on wakes us
                try:
                    due, wait = self._next_due()
                    if due is not None:
                        self._attempt(client, *due)
                        continue
                except sqlite3.Error:
                    # The state folder is full or unwritable: keep the thread, try again soon.
                    log.exception("webhook.error", path=str(self.path))
                    wait = 5.0
                # Capped: a wall clock that jumps must not leave a delivery unseen for long.
                self._wake.wait(min(wait, 30.0))
        finally:
            client.close()
            with self._lock:
                self._sender_done = True
                if self._closing:
                    self._db.close()

    def _next_due(self) -> tuple[tuple[str, bytes, float, int] | None, float]:
        with self._lock:
            row = self._db.execute(
                "SELECT id, body, created, attempts, next_at FROM deliveries WHERE state = ? "
                "ORDER BY next_at, created LIMIT 1", (PENDING,)).fetchone()
        if row is None:
            return None, 30.0
        wait = row[4] - self._clock()
        if wait > 0:
            return None, wait
        return (row[0], row[1], row[2], row[3]), 0.0

    def _attempt(self, client: WebhookClient, delivery_id: str, body: bytes, created: float,
                 attempts: int) -> None:
        attempt = attempts + 1
        started = time.monotonic()
        status: int | None = None
        try:
            status = client.post(delivery_id, body)
            error = f"HTTP {status}"
        except WebhookUnreachable as exc:
            error = exc.error
        except Exception as exc:  # noqa: BLE001 - one odd answer must not end the sender
            error = type(exc).__name__
        ms = round((time.monotonic() - started) * 1000)
        now = self._clock()
        if status is not None and 200 <= status < 300:
            self._finish(delivery_id, DELIVERED, attempt, now, None)
            log.info("webhook.delivered", id=delivery_id, status=status, attempt=attempt, ms=ms)
            return
        age = now - created
        if age >= self.settings.max_age_hours * 3600:
            self._finish(delivery_id, DROPPED, attempt, now, error)
            log.error("webhook.dropped", id=delivery_id, attempts=attempt,
                      age_h=round(age / 3600, 2), last_error=error,
                      receiver=_display_url(self.settings.url))
            return
        delay = backoff_delay(attempt, self.first_backoff_seconds, self.max_backoff_seconds,
                              self._rand)
        with self._lock:
            self._db.execute("UPDATE deliveries SET attempts = ?, next_at = ?, last_error = ? "
                             "WHERE id = ?", (attempt, now + delay, error, delivery_id))
        log.warning("webhook.retry", id=delivery_id, status=status, error=error,
                    attempt=attempt, retry_in_s=round(delay, 2), ms=ms)

    def _finish(self, delivery_id: str, state: str, attempts: int, now: float,
                error: str | None) -> None:
        # The body is no longer needed; the row stays as a tombstone so that enqueueing the
        # same id again (a restart that finishes the file twice) does not deliver it again.
        with self._lock:
            self._db.execute("UPDATE deliveries SET state = ?, attempts = ?, finished = ?, "
                             "last_error = ?, body = X'' WHERE id = ?",
                             (state, attempts, now, error, delivery_id))


def pending_deliveries(state_dir: Path) -> int:
    """Pending webhook deliveries, read-only (for `status` in another process); 0 if none."""
    path = Path(state_dir) / DELIVERIES_FILE
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            timeout=5)) as db:
        try:
            (count,) = db.execute("SELECT COUNT(*) FROM deliveries WHERE state = ?",
                                  (PENDING,)).fetchone()
        except sqlite3.OperationalError:  # created but no table yet
            return 0
    return int(count)


class HandOff:
    """The hooks and the webhook of one daemon, as the pipeline sees them."""

    def __init__(self, state_dir: Path, hooks: HookSettings | None,
                 webhook: WebhookSettings | None, *, withhold: Iterable[Secret] = ()) -> None:
        secrets = [*withhold, *([webhook.secret] if webhook else [])]
        self.hooks = HookRunner(hooks, withhold=secrets) if hooks else None
        self.deliveries = DeliveryQueue(state_dir, webhook) if webhook else None

    def start(self) -> None:
        for part in (self.hooks, self.deliveries):
            if part is not None:
                part.start()

    def announce(self, manifest_id: str, body: bytes) -> None:
        """Queue the webhook's delivery durably (before the journal says the file is final)."""
        if self.deliveries is not None:
            self.deliveries.enqueue(manifest_id, body)

    def run_hooks(self, manifest: Mapping[str, Any], manifest_path: Path | None,
                  body: bytes) -> None:
        if self.hooks is not None:
            self.hooks.submit(manifest, manifest_path, body)

    def alive(self) -> bool:
        return all(part.alive() for part in (self.hooks, self.deliveries) if part is not None)

    def stop(self, timeout: float) -> None:
        """Stop both; running hooks get what is left of `timeout`, then are killed."""
        deadline = time.monotonic() + timeout
        for part in (self.hooks, self.deliveries):
            if part is not None:
                part.stop()
        for part in (self.hooks, self.deliveries):
            if part is not None:
                part.join(max(0.0, deadline - time.monotonic()))
        if self.deliveries is not None:
            self.deliveries.close()
