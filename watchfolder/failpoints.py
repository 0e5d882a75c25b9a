"""Named crash points, so the crash-safety tests can SIGKILL the daemon at every step boundary.

Random kills rarely land in the microseconds between, say, linking a result into the outbox and
journaling that it is there; a failpoint makes each such instant testable. Off unless the
environment says `WATCHFOLDER_FAILPOINT=<name>[:<nth>]`: the nth time the named point is
reached, the process sends itself SIGKILL, exactly as `kill -9` would.
"""

from __future__ import annotations

import os
import signal
import threading

_name, _, _nth = os.environ.get("WATCHFOLDER_FAILPOINT", "").partition(":")
_target = int(_nth or 1)
_count = 0
_lock = threading.Lock()


def hit(point: str) -> None:
    """Die here if this is the armed failpoint (a no-op in normal runs)."""
    global _count
    if point != _name:
        return
    with _lock:
        _count += 1
        if _count >= _target:
            os.kill(os.getpid(), signal.SIGKILL)
