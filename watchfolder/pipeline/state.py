"""The state_dir as the pipeline sees it: writable, or not (disk full, I/O error).

A journal or spool write (or a flush of the journal) that fails is a pause, not a crash:
`StateGuard.failed` says `state.unavailable` once (naming the state_dir and the error),
sending stops (`ready()` is False: no request is made whose `sending` record or answer could
not be kept), and the files wait. A probe, made at most every `PROBE_SECONDS` while paused (by
a file waiting to be sent, and by the main loop), ends it (`state.recovered`) once it works:
a journal write and its flush, with the room an answer needs. Another commit that works does
not: it is not flushed, and a disk that takes writes but refuses flushes would be said
recovered and unavailable again at each file.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from watchfolder.errors import StateUnavailable

log = structlog.get_logger("watchfolder")

PROBE_SECONDS = 1.0
STATE_RECHECK_SECONDS = 1.0  # a job waiting for a state_dir that can be written
# Room kept free in state_dir beyond an answer's largest size before a request is made: the
# journal's next writes and its write-ahead log.
HEADROOM = 1 << 20


class StateGuard:
    """Whether the state_dir can be written; thread-safe. `probe` is a write that must work
    for sending to go on (the journal's meta table, say)."""

    def __init__(self, state_dir: Path, probe: Callable[[], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = state_dir
        self.probe = probe
        self.clock = clock
        self.down: str | None = None  # why, while the state_dir cannot be written
        self._need = HEADROOM  # free bytes the last refusal asked for: recovery waits for them
        self._next_probe = 0.0
        self._lock = threading.Lock()

    def failed(self, exc: Exception) -> None:
        """A write failed: pause sending (said once per outage)."""
        with self._lock:
            newly = self.down is None
            self.down = str(exc)
            self._next_probe = self.clock() + PROBE_SECONDS
        if newly:
            log.error("state.unavailable", state_dir=str(self.state_dir), error=str(exc),
                      hint="the journal or the spool cannot be written (disk full or failing): "
                           "nothing is sent, files wait; it resumes by itself when it can")

    def ready(self) -> bool:
        """True when sending may go on; while paused, tries a write at most every second."""
        if self.down is None:
            return True
        with self._lock:
            if self.clock() < self._next_probe:
                return False
            self._next_probe = self.clock() + PROBE_SECONDS
        try:
            free = _free(self.state_dir)
            if free >= self._need:
                self.probe()
        except (StateUnavailable, OSError) as exc:
            with self._lock:
                self.down = str(exc)
            return False
        if free < self._need:
            # A write alone does not end an outage: the few kilobytes an answer's spool file
            # frees when its result is placed let the journal's next pages in while the disk
            # is still full, and a recovery said then would be followed by a second outage.
            with self._lock:
                self.down = f"{free} bytes free in {self.state_dir}, {self._need} needed"
            return False
        with self._lock:
            self._need = HEADROOM
            was, self.down = self.down, None
        if was is not None:
            log.warning("state.recovered", state_dir=str(self.state_dir))
        return True

    def room_for(self, folder: Path, size: int) -> bool:
        """Can `folder` (the spool) take an answer of `size` bytes and the journal's next
        writes? Said as an outage when not (the answer would be paid for and lost)."""
        try:
            free = _free(folder)
        except OSError as exc:
            self.failed(exc)
            return False
        if free < size + HEADROOM:
            with self._lock:
                self._need = size + HEADROOM
            self.failed(StateUnavailable(
                f"{free} bytes free in {folder}, {size + HEADROOM} needed for the answer"))
            return False
        return True


def _free(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
