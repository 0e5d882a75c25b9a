"""Claims: a daemon takes a file before it pays for it, so daemons sharing an inbox send it once.

A claim names its holder (host, pid, a random id per daemon process) and lasts a lease: the
coordinator's thread renews it every lease/3 (at most every window/3) while this daemon works
on the file (parked for a retry or a 429 included), and it is released when the file ends or is
handed back at a stop. A claim not renewed for a whole lease belongs to a daemon that died (or
lost the share or the store that long): the next daemon that wants the file takes it over. A
takeover pays for a file again only for a request that was truly in flight at the crash: with a
coordination store the pipeline keeps a request slot from before the request until the file is
finished, so an answer the dead host had already received counts against the same
`api.concurrency` slots (without one, a slot ends at its answer, safe in the host's own spool
for its restart: a takeover by a second daemon pointed at the inbox by mistake may also pay
for the dead one's answers not yet placed, at most `api.concurrency` more). A daemon
restarted on the same state_dir takes the claims of its previous life back at once
(`Holder.instance`).

Two mechanisms behind one interface, `ClaimBackend.claim(inbox, rel) -> Claim | None` (None:
held by a live claim of another daemon):
- `share_claims.ShareClaims` (no coordination store): exclusive creates in
  `<inbox>/.watchfolder-claims`, judged by the file server's clock;
- `store_claims.StoreClaims` (with `coordination.url`): one key per file in the store, judged
  by the store's clock.
Files finished in keep mode are remembered on the share (`done_marks`).

This module holds what both share: who holds a claim (`Holder`), the claim itself (`Claim`),
the backends' interface, and the names of the claims folder. Both `.watchfolder-claims` and the
files in it are ignored by the intake (a dot-folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from watchfolder.errors import CoordinationUnavailable
from watchfolder.files.layout import CLAIMS_FOLDER
from watchfolder.logs import readable

log = structlog.get_logger("watchfolder")


def since_boot() -> float:
    """Seconds on a clock that goes on while the machine is suspended (CLOCK_BOOTTIME; the
    monotonic clock elsewhere): a claim's age must count a suspend, during which the other
    hosts' leases ran on."""
    return time.clock_gettime(_BOOTTIME)


_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)

DONE_FOLDER = "done"


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: this daemon process, of this daemon installation (`instance`)."""

    host: str
    pid: int
    daemon: str  # random per process: a restarted daemon with the same pid is someone else
    # Random per state_dir, kept there: a claim of the same instance but another process was
    # left by this daemon's previous life (the state_dir's lock proves that process is gone),
    # so a restart takes its own files back at once instead of waiting a lease.
    instance: str = ""

    @classmethod
    def this_process(cls, instance: str = "") -> Holder:
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(8), instance)

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "daemon": self.daemon,
                "instance": self.instance}

    def left_by_me(self, other: dict[str, Any]) -> bool:
        """True for a claim this very process made and no longer holds: its release failed
        (the share or the inbox was away at that moment). The coordinator only asks the
        backend for a claim it does not hold, so it is ours to take back at once."""
        return bool(other.get("daemon")) and other.get("daemon") == self.daemon and \
            other.get("host") == self.host and other.get("pid") == self.pid

    def left_by_my_previous_life(self, other: dict[str, Any]) -> bool:
        """True for the holder of a claim this daemon left before a restart: same instance and
        host, another daemon id, and its process is gone."""
        if not self.instance or other.get("instance") != self.instance:
            return False
        if other.get("daemon") == self.daemon or other.get("host") != self.host:
            return False
        return not _running(other.get("pid"))


def _running(pid: Any) -> bool:
    """Is there a process with this pid here? (When unsure, yes: the lease decides then.)"""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


INSTANCE_FILE = "coordination-instance"


def instance_id(state_dir: Path) -> str:
    """This daemon installation's id, kept in its state_dir (made on first use)."""
    path = state_dir / INSTANCE_FILE
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(encoding="ascii").strip()
        if text:
            return text
    state_dir.mkdir(parents=True, exist_ok=True)
    made = f"{socket.gethostname()}:{secrets.token_hex(8)}"
    temp = path.with_name(f".{INSTANCE_FILE}.{os.getpid()}")
    temp.write_text(made + "\n", encoding="ascii")
    temp.replace(path)
    return made


def rel_hash(rel: str) -> str:
    """The name a file's claim and done mark go by (any rel, any length, any bytes)."""
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape"), usedforsecurity=False).hexdigest()


def claims_folder(inbox: Path) -> Path:
    return inbox / CLAIMS_FOLDER


class Claim:
    """One file held by this daemon until `release`; renewed by the coordinator's thread."""

    def __init__(self, backend: ClaimBackend, inbox: Path, rel: str, token: str) -> None:
        self.backend = backend
        self.inbox = inbox
        self.rel = rel
        self.token = token  # what the backend compares to know the claim is still ours
        self.lost = False  # a renewal found it taken over: do not send; let it go
        self.released = False
        # (device, inode) of the inbox folder the claim was made in (share claims): a claim
        # not found in another folder at that path is away with its folder, not lost.
        self.where: tuple[int, int] | None = None
        # When this daemon last wrote it (made it, or a renewal that found it still ours).
        self.written = since_boot()

    def renew(self) -> bool:
        """Extend the lease; False once it turned out lost. Raises CoordinationUnavailable."""
        if self.lost or self.released:
            return not self.lost
        written = since_boot()
        if self.backend.renew(self):
            self.written = written
        else:
            self.lost = True
            log.warning("claim.lost", inbox=str(self.inbox), file=self.rel,
                        hint="another daemon took this file over (this one did not renew its "
                             "claim for a whole lease); it is left to that daemon")
        return not self.lost

    def release(self) -> None:
        """Let the file go (done, failed, gone or handed back). Never raises."""
        if self.released:
            return
        self.released = True
        if self.lost:
            return
        try:
            self.backend.release(self)
        except (CoordinationUnavailable, OSError) as exc:
            # The lease runs out by itself; until then nobody else takes the file.
            log.info("claim.release_failed", inbox=str(self.inbox), file=self.rel,
                     error=str(exc))

    def __repr__(self) -> str:
        return f"Claim({readable(self.rel)!r}, lost={self.lost}, released={self.released})"


class ClaimBackend(Protocol):
    def claim(self, inbox: Path, rel: str) -> Claim | None: ...

    def renew(self, claim: Claim) -> bool: ...

    def release(self, claim: Claim) -> None: ...

    def sweep(self, inbox: Path) -> None: ...

    def close(self) -> None: ...


def holder_label(holder: dict[str, Any]) -> str:
    if not holder:
        return "unknown (the claim file was empty)"
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')}"


def unavailable(inbox: Path, exc: OSError) -> CoordinationUnavailable:
    return CoordinationUnavailable(
        f"cannot use the claims folder {claims_folder(inbox)}: {exc.strerror or exc}")


