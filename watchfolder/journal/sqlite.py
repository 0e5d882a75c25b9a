"""Opening the daemon's SQLite files (the journal, the webhook's delivery queue) one way.

    open_durable(path)                  read-write, WAL, synchronous=FULL, autocommit (each
                                        write is its own transaction unless BEGIN is issued)
    open_read_only(path, live=...)      for another process (`status`, tests): never
                                        changes the file, nor creates `-wal`/`-shm` beside it
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_durable(path: Path) -> sqlite3.Connection:
    """A connection shared by the owner's threads (each caller holds the owner's lock)."""
    db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed write survives power loss too, not only a crash of the process.
    db.execute("PRAGMA synchronous=FULL")
    return db


def open_read_only(path: Path, *, live: bool) -> sqlite3.Connection:
    """`mode=ro` while the owner runs (or its `-wal` file exists); `immutable=1` after a
    clean stop, because a read-only open of a WAL database would create `-wal` and `-shm`
    files owned by whoever reads (root, say), which the daemon could not write."""
    mode = "mode=ro" if live or Path(f"{path}-wal").exists() else "immutable=1"
    return sqlite3.connect(f"{Path(path).as_uri()}?{mode}", uri=True, check_same_thread=False,
                           timeout=5)
