"""What the page shows, read from the daemon's own objects: the snapshot that STATUS= and the
metrics read, `status.collect` (the report of `watchfolder status`), the journal (through its
methods, opened read-only: a page never takes the pipeline's journal lock) and the errors
folders' reason files. Nothing here writes; actions are in `actions`.

`Live` keeps the last overview for a moment, so five browsers watching cost one look, and
none at all while no page is open.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from watchfolder.config.settings import Config, InboxConfig
from watchfolder.files.layout import REASON_SUFFIX
from watchfolder.journal.db import DONE, REVIEW, FileRecord, Journal
from watchfolder.pipeline.pause import ALL
from watchfolder.service import status

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon

PAGE = 30  # entries per page of Recent
ATTENTION_MAX = 200  # failed files listed at most (the count says how many there are)


@dataclass
class InboxView:
    index: int
    name: str  # the inbox folder's name, as the `{inbox}` token spells it
    path: str
    waiting: int = 0
    in_flight: int = 0
    done_today: int = 0
    failed: int = 0
    review: bool = False  # `review: true`: results wait for a person
    to_review: int = 0
    paused: str | None = None


@dataclass
class Failure:
    """A failed file in an errors folder, with what its reason file says."""

    index: int  # its inbox's slot
    inbox: str
    rel: str  # below the errors folder (the address of its thumbnail and its Retry)
    file: str  # below the inbox, as the reason file names it
    reason: str
    message: str
    image: bool  # a regular file that may be an image (a link or a device gets no thumbnail)
    failed_at: str


@dataclass
class Done:
    """A finished file, from its journal record."""

    id: int
    inbox: str
    rel: str
    route: str
    outputs: list[str]  # names below their outbox
    finished: str

    @property
    def path_word(self) -> str:
        return "studio path" if self.route == "studio" else "fast path"


@dataclass
class Overview:
    inboxes: list[InboxView]
    credits_today: int
    budget: int | None
    credits_left: int | None
    sent_last_minute: int
    requests_per_minute: int
    account_pause: str | None
    hosts: list[str] | None
    unreachable: str | None
    failures: list[Failure]
    failures_total: int
    recent: list[Done]
    reviews: list[Done]
    made_at: float = field(default_factory=time.monotonic)

    @property
    def all_paused(self) -> bool:
        return bool(self.inboxes) and all(inbox.paused for inbox in self.inboxes)

    @property
    def any_review(self) -> bool:
        return any(inbox.review for inbox in self.inboxes) or bool(self.reviews)


class Reader:
    """The daemon's state as the page shows it."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._journal: Journal | None = None
        self._lock = threading.Lock()

    @property
    def config(self) -> Config:
        return self.daemon.config

    def active(self) -> list[tuple[int, InboxConfig]]:
        """The configured inboxes with their slots (a reload's removed ones left out)."""
        return [(index, inbox) for index, inbox in enumerate(self.config.inboxes)
                if index not in self.daemon.inactive]

    def journal(self) -> Journal:
        """A read-only connection of our own: the pipeline's connection and lock stay its own."""
        with self._lock:
            if self._journal is None:
                found = Journal.for_reading(self.config.state_dir, live=True)
                if found is None:
                    raise FileNotFoundError(self.config.state_dir)
                self._journal = found
            return self._journal

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    # -- the overview -----------------------------------------------------------------------

    def overview(self) -> Overview:
        config = self.config
        snapshot = self.daemon.snapshot()
        report = status.collect(config)
        by_path = {entry["path"]: entry for entry in report["inboxes"]}
        pauses = snapshot.get("paused_inboxes") or {}  # {inbox or "*": "paused by <who>"}
        inboxes = []
        for index, inbox in self.active():
            entry = by_path.get(str(inbox.path), {})
            inboxes.append(InboxView(
                index=index, name=inbox.path.name, path=str(inbox.path),
                # A paused inbox's files have no journal record yet: `new` counts them.
                waiting=entry.get("waiting", 0) + entry.get("new", 0),
                in_flight=entry.get("in_flight", 0), done_today=entry.get("done_today", 0),
                failed=entry.get("in_errors", 0), review=inbox.review,
                to_review=entry.get("review", 0),
                paused=pauses.get(str(inbox.path)) or pauses.get(ALL)))
        journal = self.journal()
        credits = snapshot.get("credits")
        if credits is None and report.get("credits"):
            credits = report["credits"]["remaining"]
        shared = report.get("coordination")
        hosts = None
        if shared is not None:
            hosts = [f"{host.get('host')} (pid {host.get('pid')})" for host in shared["hosts"]]
        failures = self.failures()
        return Overview(
            inboxes=inboxes, credits_today=int(snapshot.get("spent_today") or 0),
            budget=config.api.max_credits_per_day, credits_left=credits,
            sent_last_minute=journal.sends_since(time.time() - 60.0),
            requests_per_minute=config.api.requests_per_minute,
            account_pause=str(snapshot["paused"]) if snapshot.get("paused") else None,
            hosts=hosts, unreachable=(shared or {}).get("unreachable"),
            failures=failures[:ATTENTION_MAX], failures_total=len(failures),
            recent=self.recent(),
            reviews=[self.done(record) for record in journal.finished_page(REVIEW, PAGE)])

    def failures(self) -> list[Failure]:
        """Every failed file in the errors folders now (also those of earlier runs and of
        other hosts), newest first, with its reason file's reason and message."""
        found: list[tuple[float, Failure]] = []
        seen: set[Path] = set()
        for index, inbox in self.active():
            root = inbox.errors
            if root in seen or not root.is_dir():
                continue
            seen.add(root)
            for reason in root.rglob("*" + REASON_SUFFIX):
                if reason.name.startswith("."):
                    continue
                moved = reason.with_name(reason.name[:-len(REASON_SUFFIX)])
                try:
                    st = os.lstat(moved)
                    data = json.loads(reason.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if not isinstance(data, dict):
                    continue
                owner = self._owner(index, data)
                rel = moved.relative_to(root).as_posix()
                found.append((st.st_mtime, Failure(
                    index=owner, inbox=self.config.inboxes[owner].path.name, rel=rel,
                    file=str(data.get("file") or rel), reason=str(data.get("reason") or "?"),
                    message=str(data.get("message") or ""),
                    image=stat.S_ISREG(st.st_mode),
                    failed_at=str(data.get("failed_at") or "")[:19].replace("T", " "))))
        found.sort(key=lambda pair: pair[0], reverse=True)
        return [failure for _, failure in found]

    def _owner(self, index: int, data: dict[str, Any]) -> int:
        """The inbox a reason file names (errors folders may be shared), else this one."""
        for other, inbox in self.active():
            if str(inbox.path) == data.get("inbox") and inbox.errors == \
                    self.config.inboxes[index].errors:
                return other
        return index

    def recent(self, *, before: int | None = None, inbox: int | None = None,
               name: str | None = None, limit: int = PAGE) -> list[Done]:
        """Finished files, newest first (a page of them, below `before`)."""
        inboxes = self.config.inboxes
        path = str(inboxes[inbox].path) if inbox is not None and inbox < len(inboxes) else None
        records = self.journal().finished_page(DONE, limit, before=before, inbox=path,
                                               name=name or None)
        return [self.done(record) for record in records]

    def done(self, record: FileRecord) -> Done:
        return Done(id=record.id, inbox=Path(record.inbox).name, rel=record.rel,
                    route=record.route or "fast",
                    outputs=[Path(p).name for p in output_paths(record)],
                    finished=_clock(record.updated))

    def record(self, record_id: int) -> FileRecord | None:
        return self.journal().record(record_id)

    def timeline(self, record_id: int) -> list[tuple[str, str]]:
        return [(state, _clock(t, seconds=True))
                for state, t in self.journal().timeline(record_id)]


def output_paths(record: FileRecord) -> list[str]:
    """The paths of a record's outputs, by recipe position (the first is `result`)."""
    placed = [entry[0] for entry in record.placed() if entry]
    return placed or ([record.result] if record.result else [])


def output_shas(record: FileRecord) -> list[str | None]:
    placed: list[str | None] = [entry[1] for entry in record.placed() if entry]
    return placed or ([record.result_sha] if record.result else [])


def source_path(record: FileRecord) -> str:
    """Where the original is now: the archive, errors, or still in its inbox."""
    return record.archive or record.error_path or str(Path(record.inbox) / record.rel)


def rel_below(path: str, root: Path) -> str | None:
    with contextlib.suppress(ValueError):
        return PurePosixPath(Path(path).relative_to(root)).as_posix()
    return None


def _clock(t: float, *, seconds: bool = False) -> str:
    when = datetime.fromtimestamp(t)
    if when.date() == datetime.now().date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else ""))


class Live:
    """The last overview, shared by every page and stream, made again when older than
    `max_age` seconds (one caller makes it, the others wait for it)."""

    def __init__(self, reader: Reader, max_age: float = 0.5) -> None:
        self.reader = reader
        self.max_age = max_age
        self._lock = threading.Lock()
        self._current: Overview | None = None

    def invalidate(self) -> None:
        """After an action: the next look shows its effect at once."""
        with self._lock:
            self._current = None

    def get(self) -> Overview:
        with self._lock:
            current = self._current
            if current is None or time.monotonic() - current.made_at >= self.max_age:
                current = self._current = self.reader.overview()
            return current
