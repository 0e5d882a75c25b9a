"""Named crash points, so the crash-safety tests can SIGKILL the daemon at every step boundary.

Random kills rarely land in the microseconds between, say, linking a result into the outbox and
journaling that it is there; a failpoint makes each such instant testable. Off unless the
environment says `WATCHFOLDER_FAILPOINT=<name>[:<nth>[:stop]]`: the nth time the named point
is reached, the process sends itself SIGKILL, exactly as `kill -9` would; with `stop`, SIGSTOP
instead, so that a test can change the world at that instant (a share dropped, say) and let it
go on with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import threading

_name, _, _rest = os.environ.get("WATCHFOLDER_FAILPOINT", "").partition(":")
_nth, _, _how = _rest.partition(":")
_target = int(_nth or 1)
_signal = signal.SIGSTOP if _how == "stop" else signal.SIGKILL
_count = 0
_lock = threading.Lock()


def hit(point: str) -> None:
    """Die here if this is the armed failpoint (a no-op in normal runs)."""
    global _count
    if point != _name:
        return
    with _lock:
        _count += 1
        if _count == _target and _signal == signal.SIGSTOP:
            # To this thread: a SIGSTOP sent to the process lets this thread run on until
            # another thread has taken it (it stopped past the instant it was meant for).
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        elif _count >= _target and _signal == signal.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
