"""The main loop of a started daemon: watchdog pings, STATUS=, and what signals asked for.

Signal handlers only set the daemon's flags and wake the loop through a `Waker`; everything
they ask for (stop, reload) happens here, in the main thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from watchfolder.service import status
from watchfolder.service.notify import Notifier

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon

log = structlog.get_logger("watchfolder")

STATUS_SECONDS = 5.0  # how often STATUS= may change at most, when no watchdog asks for more


def supervise(daemon: Daemon, notifier: Notifier,
              reload: Callable[[], bool] | None = None, *,
              status_seconds: float = STATUS_SECONDS,
              on_tick: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the main loop of a started daemon until a stop is requested.

    `reload` re-reads the configuration and returns whether it was applied; None (--once)
    ignores reload requests. Signal handlers only set the daemon's flags; everything they
    ask for happens here, in the main thread. `on_tick` gets the snapshot at every turn (the
    progress line of `run --once` on a terminal).
    """
    tick = min(status_seconds, notifier.ping_interval or status_seconds)
    note: str | None = None
    shown: str | None = _summary(daemon, note)
    withheld = False
    notifier.ready(shown)
    while True:
        daemon.housekeeping()
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
        if on_tick is not None:
            on_tick(daemon.snapshot())
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


class Waker:
    """Wakes the main loop from a signal handler or another thread.

    A `threading.Event` is not safe here: its `set()` takes a lock that the interrupted main
    thread may be holding inside `wait()`, and the handler would deadlock. This is the
    self-pipe trick (as asyncio does it): `set()` is one non-blocking send, no lock.
    """

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._early = False  # set() before open(): e.g. --once found nothing to do

    def open(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._pair = (reader, writer)
        if self._early:
            self.set()

    def set(self) -> None:
        pair = self._pair
        if pair is None:
            self._early = True
            return
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            pair[1].send(b"\0")

    def wait(self, timeout: float) -> bool:
        """Block until `set()` or `timeout`; True if woken."""
        pair = self._pair
        if pair is None:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([pair[0]], [], [], timeout)
        with contextlib.suppress(OSError):
            while pair[0].recv(4096):
                pass
        return bool(ready)

    def close(self) -> None:
        pair, self._pair = self._pair, None
        if pair is not None:
            for sock in pair:
                sock.close()
