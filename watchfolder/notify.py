"""Telling systemd how the daemon is doing: the sd_notify protocol and the loop that feeds it.

The protocol needs no library: each message is one datagram of `KEY=value` lines sent to the
AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without
that variable every call is a no-op, so the same code runs under systemd, in a terminal and in
tests (which bind a real datagram socket and read what we send).

`supervise` is the main thread's loop while the daemon runs. It is the only sender, in this
order:

    READY=1 (once start() has returned: config valid, key found, folders writable, journal
             open, watches set, start-up scan queued)
    STATUS=... whenever the one-line summary changes
    WATCHDOG=1 every half WATCHDOG_USEC, but only while every worker, the intake and the
               watches are alive: a dead thread stops the pings and systemd restarts us
    RELOADING=1 ... READY=1 around a reload (SIGHUP)
    STOPPING=1 when a stop is requested

Pinging from the main loop (not from a thread of its own) is deliberate: a ping thread can
outlive a stuck main loop, and the pings must stop whenever the daemon stops working.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

from watchfolder import status
from watchfolder.daemon import Daemon

log = structlog.get_logger("watchfolder")

STATUS_SECONDS = 5.0  # how often STATUS= may change at most, when no watchdog asks for more


class Notifier:
    """Sends sd_notify messages to `address`; does nothing when `address` is None."""

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Read `NOTIFY_SOCKET` and `WATCHDOG_USEC` (ignored when `WATCHDOG_PID` is not us)."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = None
        pid = env.get("WATCHDOG_PID")
        usec = env.get("WATCHDOG_USEC", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec) / 1_000_000
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def ping_interval(self) -> float | None:
        """Half the watchdog timeout, as sd_watchdog_enabled(3) recommends; None when off."""
        return None if self.watchdog_seconds is None else self.watchdog_seconds / 2

    def send(self, *lines: str) -> bool:
        """Send one message; False if it could not be delivered (never raises)."""
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]  # abstract namespace
        payload = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX,
                                                 socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(payload, target)
            except OSError as exc:
                # systemd going away must not take the daemon with it; say it once.
                if not self._failed:
                    self._failed = True
                    log.warning("notify.failed", socket=self.address, error=exc.strerror)
                return False
            self._failed = False
            return True

    def ready(self, text: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={text}"] if text else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC is required with Type=notify-reload (systemd 253+), harmless before.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}",
                         "STATUS=reloading the configuration")

    def stopping(self, text: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={text}"] if text else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1") if self.watchdog_seconds is not None else False

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def supervise(daemon: Daemon, notifier: Notifier,
              reload: Callable[[], bool] | None = None, *,
              status_seconds: float = STATUS_SECONDS) -> None:
    """Run the main loop of a started daemon until a stop is requested.

    `reload` re-reads the configuration and returns whether it was applied; None (--once)
    ignores reload requests. Signal handlers only set the daemon's flags; everything they
    ask for happens here, in the main thread.
    """
    tick = min(status_seconds, notifier.ping_interval or status_seconds)
    note: str | None = None
    shown: str | None = _summary(daemon, note)
    withheld = False
    notifier.ready(shown)
    while True:
        problems = daemon.problems()
        if not problems:
            notifier.watchdog()
            if withheld:
                withheld = False
                log.warning("watchdog.resumed", hint="every thread is alive again")
        elif not withheld:
            withheld = True
            log.critical("watchdog.withheld", problems=problems,
                         hint="systemd restarts the service when its WatchdogSec= expires; "
                              "without systemd, restart watchfolder")
        text = _summary(daemon, note, problems)
        if text != shown:
            notifier.status(text)
            shown = text
        daemon.wake.wait(tick)  # drains what woke it: nothing to clear
        if daemon.finished.is_set():
            break
        if daemon.reload_requested:
            daemon.reload_requested = False
            if reload is None:
                log.warning("reload.ignored", why="--once runs do not reload")
                continue
            notifier.reloading()
            note = None if reload() else "last reload rejected, see the log"
            shown = _summary(daemon, note)
            notifier.ready(shown)
    snapshot = daemon.snapshot()
    notifier.stopping(f"stopping: {snapshot.get('in_flight', 0)} in flight, "
                      f"{snapshot.get('waiting', 0)} waiting")
    notifier.close()


def _summary(daemon: Daemon, note: str | None, problems: list[str] | None = None) -> str:
    parts = [status.summary(daemon.snapshot())]
    if problems:
        parts.append("UNHEALTHY: " + "; ".join(problems))
    if note:
        parts.append(note)
    return "; ".join(parts)
