"""The durable record of each file's progress (SQLite in `state_dir`).

Every step that has an effect outside the process is written here *before* it is done, so
that after a crash at any instant the next start resumes each file from its last state:

    queued ──► sending ──► fetched ──► stored ──► done
       │          │                                 ▲
       │          └─► (retry / pause: back to queued)
       └──────────────────────────► failing ──► failed        (gone: vanished from the inbox)

- `sending`: a request may be in flight. After a crash it is sent again: that is the only
  credit a crash can cost (one per request in flight).
- `fetched`: the result is safe in the spool (`state_dir/spool`), fsynced; nothing is paid twice.
- `stored`: the result is in the outbox under the name recorded in `result`.
- `done` / `failed` / `gone` are final.

The journal also keeps the results table (content identity → outbox file, so the same content
dropped again costs nothing), the send times of the last minute (so a restart cannot burst past
the rate limit), and a small key/value table for status (pause reason, credits last seen).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

QUEUED, SENDING, FETCHED, STORED, DONE = "queued", "sending", "fetched", "stored", "done"
FAILING, FAILED, GONE = "failing", "failed", "gone"
FINAL = (DONE, FAILED, GONE)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    inbox TEXT NOT NULL,
    rel TEXT NOT NULL,
    state TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    settings TEXT NOT NULL,
    sha256 TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    spool TEXT,
    reuse_from TEXT,
    result TEXT,
    result_sha TEXT,
    archive TEXT,
    error_path TEXT,
    reason TEXT,
    message TEXT,
    status INTEGER,
    credits INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_path ON files (inbox, rel);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state);
CREATE TABLE IF NOT EXISTS results (
    identity TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sends (t REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
"""


@dataclass
class FileRecord:
    id: int
    inbox: str
    rel: str
    state: str
    size: int
    mtime_ns: int
    settings: str
    sha256: str | None = None
    attempts: int = 0
    spool: str | None = None
    reuse_from: str | None = None
    result: str | None = None
    result_sha: str | None = None
    archive: str | None = None
    error_path: str | None = None
    reason: str | None = None
    message: str | None = None
    status: int | None = None
    credits: int | None = None
    created: float = 0.0
    updated: float = 0.0


_COLUMNS = [f.name for f in fields(FileRecord)]


class Journal:
    """Thread-safe access to the journal database; every write is committed durably."""

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.path = Path(state_dir) / "journal.sqlite3"
        self.spool_dir = Path(state_dir) / "spool"
        self._lock = threading.Lock()
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                       check_same_thread=False, timeout=5)
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed step survives power loss too, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[FileRecord]:
        with self._lock:
            query = f"SELECT {', '.join(_COLUMNS)} FROM files {sql}"  # noqa: S608 - our own SQL
            cur = self._db.execute(query, args)
            return [FileRecord(*row) for row in cur.fetchall()]

    # -- files -------------------------------------------------------------------------------

    def create(self, inbox: str, rel: str, size: int, mtime_ns: int, settings: str) -> FileRecord:
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO files (inbox, rel, state, size, mtime_ns, settings, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (inbox, rel, QUEUED, size, mtime_ns, settings, now, now))
            row_id = cur.lastrowid
        assert row_id is not None
        return FileRecord(id=row_id, inbox=inbox, rel=rel, state=QUEUED, size=size,
                          mtime_ns=mtime_ns, settings=settings, created=now, updated=now)

    def update(self, record: FileRecord, *, sent: bool = False, **changes: Any) -> None:
        """Apply changes to the record and commit them (with a send time when `sent`)."""
        changes["updated"] = time.time()
        for name, value in changes.items():
            setattr(record, name, value)
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(f"UPDATE files SET {assignments} WHERE id = ?",  # noqa: S608
                                 (*changes.values(), record.id))
                if sent:
                    self._db.execute("INSERT INTO sends (t) VALUES (?)", (changes["updated"],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def active(self, inbox: str, rel: str) -> FileRecord | None:
        """The unfinished record for this path, if any."""
        found = self._rows("WHERE inbox = ? AND rel = ? AND state NOT IN (?, ?, ?) "
                           "ORDER BY id DESC LIMIT 1", (inbox, rel, *FINAL))
        return found[0] if found else None

    def unfinished(self) -> list[FileRecord]:
        return self._rows("WHERE state NOT IN (?, ?, ?) ORDER BY id", FINAL)

    def kept_in_place(self, inbox: str) -> dict[str, tuple[int, int]]:
        """rel → (size, mtime_ns) of files finished without an archive (they stay put)."""
        with self._lock:
            cur = self._db.execute(
                "SELECT rel, size, mtime_ns FROM files WHERE inbox = ? AND state = ? "
                "AND archive IS NULL ORDER BY id", (inbox, DONE))
            return {rel: (size, mtime) for rel, size, mtime in cur.fetchall()}

    # -- results, sends, meta -----------------------------------------------------------------

    def find_result(self, identity: str) -> tuple[str, str] | None:
        with self._lock:
            row = self._db.execute("SELECT path, sha256 FROM results WHERE identity = ?",
                                   (identity,)).fetchone()
        return (row[0], row[1]) if row else None

    def remember_result(self, identity: str, path: str, sha256: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO results (identity, path, sha256) "
                             "VALUES (?, ?, ?)", (identity, path, sha256))

    def recent_sends(self, window: float = 60.0) -> list[float]:
        """Wall-clock times of requests sent in the last `window` seconds (oldest first)."""
        cutoff = time.time() - window
        with self._lock:
            self._db.execute("DELETE FROM sends WHERE t < ?", (cutoff - 3600,))
            rows = self._db.execute("SELECT t FROM sends WHERE t >= ? ORDER BY t",
                                    (cutoff,)).fetchall()
        return [t for (t,) in rows]

    def set_meta(self, key: str, value: str | None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def meta(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._db.execute("SELECT k, v FROM meta").fetchall())
