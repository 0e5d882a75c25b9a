"""Telling systemd how the daemon is doing: the sd_notify protocol.

The protocol needs no library: each message is one datagram of `KEY=value` lines sent to the
AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without
that variable every call is a no-op, so the same code runs under systemd, in a terminal and in
tests (which bind a real datagram socket and read what we send).

The socket is non-blocking: when PID 1 is too busy to drain it (its queue holds only
`net.unix.max_dgram_qlen` datagrams, often 10), a send must not block the main loop, whose
signals, reloads and pings would all wait. A WATCHDOG or STATUS message that does not fit is
dropped (the next one follows within seconds); READY, RELOADING and STOPPING are kept and sent
first at the next call, in order.

`supervise` (daemon.py), the main thread's loop while the daemon runs, is the only sender, in
this order:

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
from collections.abc import Mapping

import structlog

log = structlog.get_logger("watchfolder")


_STATE_CHANGES = {"READY", "RELOADING", "STOPPING"}


class Notifier:
    """Sends sd_notify messages to `address`; does nothing when `address` is None."""

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        self._held: list[bytes] = []  # state changes that did not fit, sent first next time

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
        keep = any(line.split("=", 1)[0] in _STATE_CHANGES for line in lines)
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(
                        socket.AF_UNIX,
                        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                while self._held:
                    self._socket.sendto(self._held[0], target)
                    self._held.pop(0)
                self._socket.sendto(payload, target)
            except BlockingIOError:
                if keep:
                    self._held.append(payload)
                if not self._failed:
                    self._failed = True
                    log.warning("notify.busy", socket=self.address,
                                hint="systemd is not reading its notify socket; messages wait")
                return False
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
