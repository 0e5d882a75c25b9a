"""Opening the daemon's SQLite files (the journal, the webhook's delivery queue) one way.

    open_durable(path)                  read-write, WAL, synchronous=FULL, autocommit (each
                                        write is its own transaction unless BEGIN is issued)
    open_durable(path, power_safe=False)
                                        the same with synchronous=NORMAL: a commit survives
                                        the process's death (SIGKILL), while a power loss
                                        may roll back the last ones; the owner makes the
                                        commits that must survive it durable itself (the
                                        journal: `Journal.update`)
    open_read_only(path, live=...)      for another process (`status`, tests): never
                                        changes the file, nor creates `-wal`/`-shm` beside it
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_durable(path: Path, *, power_safe: bool = True) -> sqlite3.Connection:
    """A connection shared by the owner's threads (each caller holds the owner's lock)."""
    db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed write survives power loss too, not only a crash of the process (an
    # fsync of the WAL per commit). NORMAL: the commit is written to the WAL, which the
    # kernel keeps when the process dies; the WAL is fsynced before each checkpoint.
    db.execute(f"PRAGMA synchronous={'FULL' if power_safe else 'NORMAL'}")
    return db


def open_read_only(path: Path, *, live: bool) -> sqlite3.Connection:
    """`mode=ro` while the owner runs (or its `-wal` file exists); `immutable=1` after a
    clean stop, because a read-only open of a WAL database would create `-wal` and `-shm`
    files owned by whoever reads (root, say), which the daemon could not write."""
    mode = "mode=ro" if live or Path(f"{path}-wal").exists() else "immutable=1"
    return sqlite3.connect(f"{Path(path).as_uri()}?{mode}", uri=True, check_same_thread=False,
                           timeout=5)
