"""What the driver and the steps pass each other: the `Work` item in a worker's hands, and
what a step returns (`Advance` to a new state, or `Park` back in the queue).

Also the small facts several steps share: identical files in flight (`Twins`), a result's
key for reuse, the earlier results a record reuses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchfolder.config.settings import InboxConfig
from watchfolder.files.place import same_file, sha256_file
from watchfolder.journal.db import FAILING, PROXIED, QUEUED, FileRecord
from watchfolder.pipeline.client import Form
from watchfolder.pipeline.jobqueue import Job

MAIN, LOCAL = "main", "local"  # the lanes: requests and light steps / heavy local image work


@dataclass(frozen=True)
class Advance:
    """Journal `state` with `changes`, then run the step for the new state."""

    state: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    sent: bool = False  # a request goes out: journal its send time too (the rate limit)
    remember: Sequence[tuple[str, str, str]] = ()  # (identity, result, sha256) for reuse
    then: Callable[[], object] | None = None  # called once the transition is committed


@dataclass(frozen=True)
class Park:
    """Journal `changes`, then put the job back in the queue of the lane its state needs.

    After `delay` seconds (at the `front` for a retry that cost no attempt), or, with
    `twin`, only when the identical file ahead of it is finished; with `held`, never: it
    waits for a person (review), whose approval or rejection submits it again.
    """

    delay: float = 0.0
    front: bool = False
    twin: bool = False
    held: bool = False
    changes: Mapping[str, Any] = field(default_factory=dict)


Outcome = Advance | Park


def failing(reason: str, message: str, status: int | None = None, *,
            attempts: int | None = None) -> Advance:
    changes: dict[str, Any] = {"reason": reason, "message": message, "status": status}
    if attempts is not None:
        changes["attempts"] = attempts
    return Advance(FAILING, changes)


@dataclass(frozen=True)
class Payload:
    """What one request sends: the original's bytes (fast path) or its proxy's (studio)."""

    data: bytes
    mime: str
    width: int
    height: int


@dataclass
class Work:
    """One file in the hands of a worker: its job, its journal record, its inbox, the lane
    it runs on. What was learned about the file lives on the job (kept across parks)."""

    job: Job
    record: FileRecord
    inbox: InboxConfig
    lane: str = MAIN
    payload: Payload | None = None  # made by `prepare`, sent by `send` (never across a park)
    form: Form | None = None  # the payload's request, encoded by `admit` (sent by `send`)

    @property
    def src(self) -> Path:
        return self.inbox.path / self.job.rel

    def log_fields(self) -> dict[str, str]:
        return {"inbox": str(self.inbox.path), "file": self.job.rel}


class Twins:
    """Identical files (same content, same settings) in flight: only the first is sent.

    The others wait here, holding no worker, until the first finishes; then they run again
    and reuse its stored result (or, if it failed, one of them is sent).
    """

    def __init__(self) -> None:
        self._owners: dict[str, tuple[int, str]] = {}
        self._waiting: dict[str, list[Job]] = {}
        self._lock = threading.Lock()

    def claim(self, identity: str, job: Job) -> bool:
        """True if `job` is the one to send; False if it now waits for the owner."""
        with self._lock:
            owner = self._owners.setdefault(identity, job.key)
            if owner == job.key:
                return True
            self._waiting.setdefault(identity, []).append(job)
            return False

    def release(self, identity: str, job: Job) -> list[Job]:
        """The owner is finished: the jobs that waited for it."""
        with self._lock:
            if self._owners.get(identity) != job.key:
                return []
            del self._owners[identity]
            return self._waiting.pop(identity, [])


def moved(src: Path, dest: Path) -> bool:
    """True if `src` was moved to `dest` (a crash may have left both names: finish the move)."""
    if not same_file(src, dest):
        return False
    src.unlink()
    return True


def sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def back_from_sending(record: FileRecord) -> dict[str, Any]:
    """Where a `sending` file goes when its request will not be (or was not) answered:
    to `proxied` when its proxy exists (never made twice), else to `queued`."""
    return {"state": PROXIED if record.proxy else QUEUED}
