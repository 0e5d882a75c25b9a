"""The durable record of each file's progress (SQLite in `state_dir`).

Every step that has an effect outside the process is written here *before* it is done, so
that after a crash at any instant the next start resumes each file from its last state:

    queued ──► proxied ──► sending ──► fetched ──► stored ──► done
      │   (studio path)         │
      │                         └─► retry / pause: back to proxied (studio) or queued
      ├─► fetched      identical content already made: reused, no request
      ├─► done         finished in place by another daemon (coordination)
      └─► failing ──► failed                    (gone, from any state: vanished from the inbox)

- `proxied`: a studio file's proxy is made and fsynced in the spool (`proxy`); it is what is
  sent, also after a restart.
- `sending`: a request may be in flight. After a crash it is sent again: that is the only
  credit a crash can cost (one per request in flight).
- `fetched`: the result is safe in the spool (`state_dir/spool`), fsynced; nothing is paid twice.
- `review` (an inbox with `review: true`): the answer is in the spool and waits for a person;
  `approved` goes on as `fetched` does, a rejection to `failing` (reason `rejected`).
- `stored`: the result is in the outbox under the name recorded in `result`.
- `done` / `failed` / `gone` are final. A final record's `handoff` is "pending" from the
  final commit until its hand-off (manifest, done marker, webhook, hooks) is complete.

Durability: every commit is written to SQLite's WAL before the step it guards has its
effect, so the process's death at any instant (SIGKILL, a crash) loses none. A power loss
(or a kernel crash) may also roll back commits the kernel had not written yet; only those
whose loss would cost a credit again are forced to disk before their effect
(`must_survive_power_loss`): `sending` (with its send time) and a commit that forgets a
spooled answer (its file is deleted next) before `update` returns; `fetched` (the paid
answer in the spool) before the next request goes (that request's `sending` fsync covers it)
or anything is made of the answer, whichever comes first (`update`'s `owed`); `stored` once
its answer is deleted (the next fsync, whoever makes it: `when_durable`). The daemon's main
loop makes an fsync when such a commit waits and none came within its turn (5 s at most),
and a start makes one for what the last run left in the WAL. One fsync of the WAL makes
every commit written before it durable, so workers committing at the same time share one
(group commit), and none holds the journal's lock while the disk syncs. What a power loss
can still undo costs no credit: a record created (the file waits in its inbox again), the
name chosen for an output (made again: adopted when the name holds the same bytes, else
placed beside it as `-1`), the archive's name (the original, moved, is not there any more:
done, without its archive path), `stored`, `done` and the hand-off's completion (done again:
each part of a hand-off is idempotent). The name chosen in errors is fsynced too (see
`must_survive_power_loss`).

The journal also keeps the results table (content identity → outbox file, so the same content
dropped again costs nothing), the send times of the last minute (so a restart cannot burst past
the rate limit; each with the boot id and the monotonic time, so that a wall-clock step between
two runs can neither let a burst through nor hold the queue), and a small key/value table for
status (the pause reasons and a person's per-inbox pauses, as `pipeline.pause` writes them;
credits last seen).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from watchfolder.errors import JournalUnreadable, StateDirFull, StateUnavailable
from watchfolder.files.layout import JOURNAL_NAME, SPOOL
from watchfolder.files.spares import Spares
from watchfolder.journal.durable import GroupCommit
from watchfolder.journal.notes import Notes
from watchfolder.journal.sqlite import open_durable, open_read_only


def _damaged(path: Path, detail: str) -> str:
    return (f"the journal {path} is damaged or unreadable ({detail}). If the disk is fine, "
            f"move it aside and rebuild what the folders tell with `watchfolder reset-journal`; "
            f"files in the inboxes then simply wait again")

SQLITE_FULL = 13  # "database or disk is full" (sqlite3.SQLITE_FULL, which typeshed lacks)


def _boot_id() -> str:
    """This boot of the machine (Linux), or "" where unknown: monotonic times of two runs
    compare only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()

QUEUED, PROXIED, SENDING = "queued", "proxied", "sending"
FETCHED, STORED, DONE = "fetched", "stored", "done"
FAILING, FAILED, GONE = "failing", "failed", "gone"
# An inbox with `review: true`: the answer is safe in the spool and waits for a person;
# approved, its outputs are made and placed as any other file's (rejected: failing).
REVIEW, APPROVED = "review", "approved"
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
    updated REAL NOT NULL,
    route TEXT,
    proxy TEXT,
    outputs TEXT,
    handoff TEXT
);
CREATE INDEX IF NOT EXISTS files_by_path ON files (inbox, rel);
CREATE INDEX IF NOT EXISTS files_by_finish ON files (state, updated);
CREATE TABLE IF NOT EXISTS results (
    identity TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    t REAL
);
CREATE TABLE IF NOT EXISTS sends (t REAL NOT NULL, boot TEXT, mono REAL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS steps (file INTEGER NOT NULL, state TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS steps_by_file ON steps (file);
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
    route: str | None = None  # "fast" (sent as it is) or "studio" (a proxy is sent)
    proxy: str | None = None  # the proxy in the spool, while it may still be sent
    outputs: str | None = None  # JSON: [[path, sha256] or null, ...] by recipe position
    handoff: str | None = None  # "pending": final, but not yet handed on (manifest, webhook)

    # The JSON columns are read through these, never with json.loads elsewhere.

    def placed(self) -> list[tuple[str, str] | None]:
        """The outputs placed so far, (path, sha256) or None by recipe position; [] if none."""
        return [None if entry is None else (entry[0], entry[1])
                for entry in json.loads(self.outputs or "[]")]

    def reused(self) -> list[str]:
        """The earlier results this record reuses, by recipe position (0.1 journaled one path,
        not a JSON list)."""
        if not self.reuse_from:
            return []
        if not self.reuse_from.startswith("["):
            return [self.reuse_from]
        return [str(path) for path in json.loads(self.reuse_from)]


def must_survive_power_loss(record: FileRecord, changes: Mapping[str, Any],
                            sent: bool = False) -> bool:
    """Whether the commit of `changes` to `record` must be on disk, not only written to the
    WAL, before its effect: when a power loss that rolled it back would cost a credit again.

    `sending` (a request goes out next: rolled back, the file would be sent again unjournaled),
    `fetched` (the answer is paid for and spooled: rolled back to `sending`, it would be sent
    again), and a commit that forgets a spooled answer (the spool file is deleted after it:
    rolled back, the record would point at a deleted answer and ask again), but `stored`,
    whose answer is deleted only once a later fsync covers it (`GroupCommit.when_durable`).
    Also the name chosen in errors, which costs no credit but is rare: rolled back, a failed file
    moved there would be taken for gone and keep no reason beside it.
    """
    state = changes.get("state", record.state)
    enters = state != record.state and state in (SENDING, FETCHED)  # not an output's name
    # A stored file's answer is deleted only once a later fsync covers `stored`
    # (`when_durable`): that commit waits for nobody's fsync.
    forgets_answer = "spool" in changes and changes["spool"] is None and \
        record.spool is not None and state != STORED
    return sent or enters or forgets_answer or "error_path" in changes


def encode_outputs(placed: Sequence[tuple[str, str] | list[str] | None]) -> str:
    """The `outputs` column for outputs placed so far (see `FileRecord.placed`)."""
    return json.dumps([None if entry is None else [entry[0], entry[1]] for entry in placed])


def encode_reused(paths: Sequence[str]) -> str:
    """The `reuse_from` column for earlier results reused by recipe position."""
    return json.dumps(list(paths))


def output_identity(identity: str, index: int) -> str:
    """A result's key in the results table: the content and settings, and which output of
    the recipe (the first keeps the bare identity, as 0.1 wrote it)."""
    return identity if index == 0 else f"{identity}#{index}"



_COLUMNS = [f.name for f in fields(FileRecord)]


# File names are bytes on Linux: one that is not valid UTF-8 (from an old Windows or Mac
# client, a zip archive) reaches Python as a str with surrogate escapes, which SQLite's UTF-8
# text cannot hold. Such a value is stored as the BLOB of its bytes and read back as the same
# str, so every name round-trips exactly; valid names stay readable TEXT.
def _in(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(os.fsencode(a) if isinstance(a, str) and not _is_utf8(a) else a for a in args)


def _out(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(os.fsdecode(v) if isinstance(v, bytes) else v for v in row)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True



def _create_or_upgrade(db: sqlite3.Connection) -> None:
    """The schema, with the columns older journals lack added."""
    db.executescript(_SCHEMA)
    # (state) is the prefix of files_by_finish (state, updated), which serves the same
    # queries: one index fewer to rewrite at each state change.
    db.execute("DROP INDEX IF EXISTS files_by_state")
    columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
    for column in ("route", "proxy", "outputs", "handoff"):  # older journals
        if column not in columns:
            db.execute(f"ALTER TABLE files ADD COLUMN {column} TEXT")
    sends = {row[1] for row in db.execute("PRAGMA table_info(sends)")}
    for column, kind in (("boot", "TEXT"), ("mono", "REAL")):  # journals of 0.2
        if column not in sends:
            db.execute(f"ALTER TABLE sends ADD COLUMN {column} {kind}")
    if "t" not in {row[1] for row in db.execute("PRAGMA table_info(results)")}:
        # Journals of 0.1: their results count as made now for retention.
        db.execute("ALTER TABLE results ADD COLUMN t REAL")
        db.execute("UPDATE results SET t = ?", (time.time(),))


class Journal:
    """Thread-safe access to the journal database; every write is committed when the call
    returns, and on disk too when its loss to a power cut would cost a credit (Durability)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / JOURNAL_NAME
        self.spool_dir = Path(state_dir) / SPOOL
        self._lock = threading.Lock()
        self.notes = Notes(self._query, self._writing)
        self.commits = GroupCommit(None)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # Spent answers' files, written again by the next answers (no inode per file).
        self.spool_spares = Spares(self.spool_dir)
        try:
            self._db = open_durable(self.path, power_safe=False)
            _create_or_upgrade(self._db)
            damage = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                # Not damage: a full disk (the daemon's start names it with the space needed).
                raise StateDirFull(f"the disk of state_dir {state_dir} is full: the journal "
                                   f"{self.path} cannot be written ({exc}); free some space "
                                   f"there") from None
            raise JournalUnreadable(_damaged(self.path, str(exc))) from None
        if damage != ["ok"]:
            self._db.close()
            raise JournalUnreadable(_damaged(self.path, "; ".join(damage[:3])))
        try:
            self.commits = GroupCommit(self.path)  # the journal was read: its WAL exists
        except StateUnavailable:
            self._db.close()
            raise
        if self.commits.every_commit:
            self._db.execute("PRAGMA synchronous=FULL")

    @classmethod
    def for_reading(cls, state_dir: Path, *, live: bool) -> Journal | None:
        """Open the journal without ever changing it (for `status`); None if there is none.

        See `sqlite.open_read_only` for how (`live`: the daemon runs).
        """
        path = Path(state_dir) / JOURNAL_NAME
        if not path.exists():
            return None
        self = cls.__new__(cls)
        self.path = path
        self.spool_dir = Path(state_dir) / SPOOL
        self._lock = threading.Lock()
        self.notes = Notes(self._query, self._writing)
        self.commits = GroupCommit(None)
        try:
            self._db = open_read_only(path, live=live)
        except sqlite3.Error as exc:
            raise JournalUnreadable(f"cannot read the journal {path}: {exc} (run status as "
                                    f"the daemon's user or a member of its group)") from None
        return self

    def close(self) -> None:
        """Close the journal, once what waits for the disk (`when_durable`) has happened; the
        spool's spares are removed (a stopped daemon leaves no spent answer behind)."""
        self.commits.close()
        if hasattr(self, "spool_spares"):  # not for_reading's
            self.spool_spares.drop()
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return [_out(row) for row in self._db.execute(sql, _in(args)).fetchall()]
            except sqlite3.DatabaseError as exc:
                raise JournalUnreadable(f"cannot read the journal {self.path}: {exc}") from None

    @contextmanager
    def _writing(self, transaction: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the lock for one write (one transaction with `transaction`). A failure of the
        disk (full, I/O error, read-only) becomes StateUnavailable, with nothing changed: SQLite
        rolls a failed transaction back (and may already have: then there is nothing to roll
        back, which must not hide the cause)."""
        with self._lock:
            try:
                if transaction:
                    self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    if transaction:
                        self._db.execute("COMMIT")
                    self.commits.written()
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except (sqlite3.OperationalError, OSError) as exc:
                raise StateUnavailable(f"cannot write the journal {self.path}: {exc}") from exc

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[FileRecord]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM files {sql}"  # noqa: S608 - our own SQL
        return [FileRecord(*row) for row in self._query(query, args)]

    # -- files -------------------------------------------------------------------------------

    def create(self, inbox: str, rel: str, size: int, mtime_ns: int, settings: str) -> FileRecord:
        now = time.time()
        with self._writing(transaction=True) as db:  # the record and its first step
            cur = db.execute(
                "INSERT INTO files (inbox, rel, state, size, mtime_ns, settings, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                _in((inbox, rel, QUEUED, size, mtime_ns, settings, now, now)))
            row_id = cur.lastrowid
            db.execute("INSERT INTO steps (file, state, t) VALUES (?, ?, ?)", (row_id, QUEUED, now))
        assert row_id is not None
        return FileRecord(id=row_id, inbox=inbox, rel=rel, state=QUEUED, size=size,
                          mtime_ns=mtime_ns, settings=settings, created=now, updated=now)

    def update(self, record: FileRecord, *, sent: bool = False,
               remember: Sequence[tuple[str, str, str]] = (), owed: bool = False,
               **changes: Any) -> None:
        """Commit `changes` to the record, then apply them to the object.

        `sent` also journals a send time (the rate limit survives a restart); `remember`
        ((identity, path, sha256), ...) records results for reuse in the same transaction. The
        object changes only once the commit succeeded, so memory and disk always agree; a
        commit that `must_survive_power_loss` is on disk when this returns. Raises
        StateUnavailable when the disk refuses the write (nothing changed, in memory either)
        or that fsync (the object is unchanged: the caller goes on as if nothing was
        journaled, so no request follows a `sending` that a power cut could undo).

        `owed` (an answer's `fetched`): only written to the WAL; the next fsync covers it,
        the next request's `sending` (so a power cut still costs one credit per slot at
        most) or `GroupCommit.settle_owed` before anything is made of the answer.
        """
        durable = must_survive_power_loss(record, changes, sent)
        changes = {**changes, "updated": time.time()}
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._writing(transaction=True) as db:
            db.execute(f"UPDATE files SET {assignments} WHERE id = ?",  # noqa: S608
                       _in((*changes.values(), record.id)))
            if sent:
                db.execute("INSERT INTO sends (t, boot, mono) VALUES (?, ?, ?)",
                           (changes["updated"], BOOT_ID or None, time.monotonic()))
            if "state" in changes and changes["state"] != record.state:
                # The file's timeline (its page in the web view).
                db.execute("INSERT INTO steps (file, state, t) VALUES (?, ?, ?)",
                           (record.id, changes["state"], changes["updated"]))
            if remember:
                db.executemany(
                    "INSERT OR REPLACE INTO results (identity, path, sha256, t) VALUES "
                    "(?, ?, ?, ?)", [_in((*entry, time.time())) for entry in remember])
        if durable and owed:
            self.commits.owe(record.id)
        elif durable:
            # Outside the lock: other workers commit while the disk syncs, and one fsync
            # serves them all. At least this commit's number (one read later is larger).
            self.commits.sync(self.commits.count)
        for name, value in changes.items():
            setattr(record, name, value)

    def active(self, inbox: str, rel: str) -> FileRecord | None:
        """The unfinished record for this path, if any."""
        found = self._rows("WHERE inbox = ? AND rel = ? AND state NOT IN (?, ?, ?) "
                           "ORDER BY id DESC LIMIT 1", (inbox, rel, *FINAL))
        return found[0] if found else None

    def handoffs_pending(self) -> list[FileRecord]:
        """Final records whose hand-off a crash interrupted (it follows the final commit)."""
        return self._rows("WHERE handoff IS NOT NULL ORDER BY id")

    def finished_unarchived(self, inbox: str, rel: str, sha256: str,
                            settings: str) -> FileRecord | None:
        """The last record of this path and content done without its original archived (it
        vanished first), if that is the path's last finished record."""
        found = self._rows("WHERE inbox = ? AND rel = ? AND state IN (?, ?, ?) "
                           "ORDER BY id DESC LIMIT 1", (inbox, rel, *FINAL))
        if not found:
            return None
        record = found[0]
        if (record.state, record.sha256, record.settings) != (DONE, sha256, settings) or \
                record.archive is not None or record.size == -1:
            return None
        return record

    def unfinished(self) -> list[FileRecord]:
        return self._rows("WHERE state NOT IN (?, ?, ?) ORDER BY id", FINAL)

    def kept_in_place(self, inbox: str | None = None) -> dict[str, dict[str, tuple[int, int]]]:
        """inbox → rel → (size, mtime_ns) of files finished without an archive (they stay put)."""
        where, args = ("AND inbox = ?", (DONE, inbox)) if inbox else ("", (DONE,))
        kept: dict[str, dict[str, tuple[int, int]]] = {}
        for box, rel, size, mtime in self._query(
                f"SELECT inbox, rel, size, mtime_ns FROM files WHERE state = ? "  # noqa: S608
                f"AND archive IS NULL {where} ORDER BY id", args):
            kept.setdefault(box, {})[rel] = (size, mtime)
        return kept

    # -- for status (read-only) ----------------------------------------------------------------

    def unfinished_paths(self) -> list[tuple[str, str, str]]:
        """(inbox, rel, state) of every unfinished record."""
        marks = ", ".join("?" for _ in FINAL)
        return [(inbox, rel, state) for inbox, rel, state in self._query(
            f"SELECT inbox, rel, state FROM files WHERE state NOT IN ({marks})",  # noqa: S608
            FINAL)]

    def finished_since(self, since: float) -> list[tuple[str, str, int]]:
        """(inbox, final state, count) of records finished at or after `since`."""
        marks = ", ".join("?" for _ in FINAL)
        return [(inbox, state, count) for inbox, state, count in self._query(
            f"SELECT inbox, state, COUNT(*) FROM files WHERE state IN ({marks}) "  # noqa: S608
            "AND updated >= ? GROUP BY inbox, state", (*FINAL, since))]

    def recent_failures(self, limit: int) -> list[FileRecord]:
        return self._rows("WHERE state = ? ORDER BY updated DESC LIMIT ?", (FAILED, limit))

    # -- for the web view (read-only) ---------------------------------------------------------

    def record(self, record_id: int) -> FileRecord | None:
        found = self._rows("WHERE id = ?", (record_id,))
        return found[0] if found else None

    def finished_page(self, state: str, limit: int, *, before: int | None = None,
                      inbox: str | None = None, name: str | None = None) -> list[FileRecord]:
        """Records in `state`, the last changed first, `limit` of them after record `before`
        in that order; only those of `inbox`, and whose path contains `name`
        (case-insensitive), when given. Walks the (state, updated) index backwards, so the
        first page is instant at any journal size."""
        where: list[str] = ["state = ?"]
        args: list[Any] = [state]
        if before is not None:
            where.append("(updated, id) < (SELECT updated, id FROM files WHERE id = ?)")
            args.append(before)
        if inbox is not None:
            where.append("inbox = ?")
            args.append(inbox)
        if name:
            where.append("rel LIKE ? ESCAPE '\\'")
            args.append("%" + name.replace("\\", "\\\\").replace("%", "\\%")
                        .replace("_", "\\_") + "%")
        args.append(limit)
        return self._rows(f"WHERE {' AND '.join(where)} ORDER BY updated DESC, id DESC LIMIT ?",
                          tuple(args))

    def timeline(self, record_id: int) -> list[tuple[str, float]]:
        """(state, wall-clock time) of each step of one file, in order."""
        return [(state, t) for state, t in self._query(
            "SELECT state, t FROM steps WHERE file = ? ORDER BY rowid", (record_id,))]

    # -- results, sends, meta -----------------------------------------------------------------

    def find_result(self, identity: str) -> tuple[str, str] | None:
        rows = self._query("SELECT path, sha256 FROM results WHERE identity = ?", (identity,))
        return (rows[0][0], rows[0][1]) if rows else None

    def prune(self, older_than: float, still_kept: Callable[[str, str, int, int], bool]) -> int:
        """Forget finished records and reusable results last changed before `older_than`.

        A file finished in place (no archive) is forgotten only once `still_kept(inbox, rel,
        size, mtime_ns)` says it is no longer there: its record is what keeps it from being
        sent again. Returns how many records went.
        """
        kept = self._query(
            "SELECT id, inbox, rel, size, mtime_ns FROM files WHERE state = ? AND archive IS "
            "NULL AND updated < ?", (DONE, older_than))
        keep_ids = [row_id for row_id, inbox, rel, size, mtime in kept
                    if still_kept(inbox, rel, size, mtime)]
        marks = ", ".join("?" for _ in FINAL)
        with self._writing(transaction=True) as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS keep (id INTEGER PRIMARY KEY)")
            db.execute("DELETE FROM keep")
            db.executemany("INSERT INTO keep (id) VALUES (?)", [(row_id,) for row_id in keep_ids])
            gone = db.execute(
                f"DELETE FROM files WHERE state IN ({marks}) AND updated < ? "  # noqa: S608
                "AND id NOT IN (SELECT id FROM keep)", (*FINAL, older_than)).rowcount
            db.execute("DELETE FROM results WHERE t < ?", (older_than,))
            db.execute("DELETE FROM steps WHERE file NOT IN (SELECT id FROM files)")
        return gone

    def sends_since(self, since: float) -> int:
        """Requests sent at or after `since` (wall clock): the day's spend."""
        return int(self._query("SELECT COUNT(*) FROM sends WHERE t >= ?", (since,))[0][0])

    def recent_send_ages(self, window: float = 60.0) -> list[float]:
        """Seconds since each request of the last `window` was sent, for the rate limit after a
        restart. A send of this boot is aged on the monotonic clock, so a wall-clock step
        between two runs (NTP, an operator) changes nothing; one of another boot (or journaled
        before boot ids were) is aged by the wall clock, and one that the wall clock puts in
        the future counts as just sent: recent for one window at most, never longer."""
        now, mono = time.time(), time.monotonic()
        with contextlib.suppress(StateUnavailable), self._writing():
            # Two days are kept: the rate limit needs a minute, the daily budget a day (the
            # trim waits for a disk with room).
            self._db.execute("DELETE FROM sends WHERE t < ?", (now - 2 * 86400,))
        this_boot = self._query(
            "SELECT mono FROM sends WHERE boot = ? AND mono >= ?",
            (BOOT_ID, mono - window)) if BOOT_ID else []
        other = self._query(
            "SELECT t FROM sends WHERE (boot IS NULL OR boot != ?) AND t >= ?",
            (BOOT_ID, now - window))
        return [mono - m for (m,) in this_boot] + [max(0.0, now - t) for (t,) in other]
