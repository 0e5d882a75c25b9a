"""Hooks: local commands run when a file is done or failed (`hooks.on_done` / `on_failed`).

`HookRunner` runs them (argv lists, never a shell) on its own threads, `max_parallel` at once;
`submit` never blocks. Each run gets the manifest on stdin and WATCHFOLDER_* variables
(EVENT, ID, SOURCE, OUTPUTS, MANIFEST), is killed with its whole process group after
`timeout_seconds`, and is retried `retries` times with backoff. In memory: hooks still waiting
when the daemon stops are dropped (logged). A hook that fails never changes what happened to
the file. The settings are `HookSettings` (config/handoff.py).

Log events: hook.done, hook.failed, hook.timeout, hook.retry, hook.gave_up, hook.killed,
hook.dropped, hook.error.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog

from watchfolder.config.handoff import HookSettings
from watchfolder.config.secret import Secret
from watchfolder.handoff.manifest import manifest_json
from watchfolder.handoff.retry import backoff_delay

log = structlog.get_logger("watchfolder")

STDERR_TAIL_BYTES = 2000


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

