"""Several daemons, one API key, one share: what a daemon agrees on with the others.

    Coordinator.from_config(config)
    ├── limiter   SharedRateLimiter with `coordination.url` (shared_limit.py), else LocalLimiter
    │             (limits.py): the key's rate limit, a 429's hold and the account pause
    ├── claims    StoreClaims with a store, else ShareClaims: one daemon per file (claims.py)
    ├── marks     DoneMarks: a file finished in keep mode is not sent by another daemon
    └── registry  HostRegistry with a store: which daemons share it, for `status`
    and a thread, `watchfolder-coordination`, that every `min(lease, window)/3` renews the
    claims this daemon holds, beats the registry and refreshes the shared pause.

Without a `coordination:` section nothing here connects anywhere: the limiter is the local one
(ratelimit.py) and claims are files on the share, so two daemons pointed at one inbox by mistake
still send each file once.

With a store, the claims' grace and the send hold after the store lost its data start from one
instant (reset.py), so the first file after a first use or a restart waits at most one window
plus the margin, whatever the lease; `claim_wait` tells the pipeline when a refused claim is
worth asking again (the end of that grace, or a third of a lease).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watchfolder.coordination import reset
from watchfolder.coordination.claims import Claim, ClaimBackend, Holder, instance_id, since_boot
from watchfolder.coordination.done_marks import DoneMark, DoneMarks
from watchfolder.coordination.limits import Limiter, LocalLimiter
from watchfolder.coordination.registry import HostRegistry
from watchfolder.coordination.reset import ResetNotice
from watchfolder.coordination.share_claims import ShareClaims
from watchfolder.coordination.shared_limit import WINDOW, SharedRateLimiter
from watchfolder.coordination.store import Store
from watchfolder.coordination.store_claims import StoreClaims
from watchfolder.errors import CoordinationUnavailable

if TYPE_CHECKING:
    from watchfolder.config.settings import Config, StoreUrl

log = structlog.get_logger("watchfolder")


def key_id(api_key: str) -> str:
    """The name the key's shared state goes by in the store: a hash, never the key."""
    return hashlib.sha256(b"watchfolder rate limit\0" + api_key.encode()).hexdigest()[:24]


class Coordinator:
    """The limiter, the claims, the done marks and the registry, with one thread to renew them.

    `claim(inbox, rel)` is idempotent: the claim this daemon already holds on the file is
    returned again (so a file parked for a retry keeps its claim); a lost one is tried anew.
    """

    def __init__(self, *, holder: Holder, limiter: Limiter, claims: ClaimBackend,
                 marks: DoneMarks, lease_seconds: float, inboxes: Sequence[Path] = (),
                 store: Store | None = None, registry: HostRegistry | None = None,
                 window: float = WINDOW) -> None:
        self.holder = holder
        self.limiter = limiter
        self.claims = claims
        self.marks = marks
        self.lease_seconds = lease_seconds
        # A third of the grace after a store loss (reset.py): every claim the store lost is
        # re-created by its holder before the grace ends, whatever the lease.
        self.interval = min(lease_seconds, window) / 3
        self.inboxes = list(inboxes)
        self.store = store
        self.registry = registry
        self._held: dict[tuple[Path, str], Claim] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Config, *, lease_seconds: float | None = None,
                    window: float = WINDOW, holder: Holder | None = None) -> Coordinator:
        """The coordinator a daemon with `config` needs. Connects nowhere until used; makes
        `state_dir` and this installation's id in it (see `Holder.instance`) if missing.

        `lease_seconds` and `window` are for tests (the configuration requires a lease of at
        least 5 s; the vendor's window is 60 s).
        """
        lease = lease_seconds or config.coordination.lease_seconds
        holder = holder or Holder.this_process(instance_id(config.state_dir))
        share = ShareClaims(holder, lease)
        inboxes = [inbox.path for inbox in config.inboxes]
        retry = config.retry
        rpm = config.api.requests_per_minute
        url = config.coordination.url
        if url is None:
            local = LocalLimiter(rpm, window=window, backoff=retry.backoff_seconds,
                                 max_backoff=retry.max_backoff_seconds)
            return cls(holder=holder, limiter=local, claims=share, marks=DoneMarks(holder),
                       lease_seconds=lease, inboxes=inboxes, window=window)
        store = Store(url, name=f"watchfolder:{holder.host}:{holder.pid}")
        key = key_id(config.api.key.reveal())
        notice = ResetNotice(store)  # one warning per loss, whoever meets it first
        limiter = SharedRateLimiter(store, key, holder.daemon, rpm, window=window,
                                    backoff=retry.backoff_seconds,
                                    max_backoff=retry.max_backoff_seconds, member_ttl=lease,
                                    notice=notice)
        claims = StoreClaims(store, holder, lease, share, key=key, window=window, notice=notice)
        return cls(holder=holder, limiter=limiter, claims=claims, marks=DoneMarks(holder),
                   lease_seconds=lease, inboxes=inboxes, store=store,
                   registry=HostRegistry(store, holder, key, ttl=lease), window=window)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.store is not None:
            log.info("coordination.joined", store=self.store.shown, daemon=self.holder.daemon,
                     lease_s=self.lease_seconds)
        self.beat()  # registers this daemon now; says `coordination.unreachable` at once if so
        self._thread = threading.Thread(target=self._run, name="watchfolder-coordination",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Release every claim (their files are handed back), leave the store, stop the thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for claim in held:
            claim.release()
        self.limiter.leave()
        if self.registry is not None:
            self.registry.leave()
        self.claims.close()
        if self.store is not None:
            self.store.close()

    def _run(self) -> None:
        sweep_every = max(1, round(self.lease_seconds / self.interval))
        for beat in itertools.count(1):
            if self._stopping.wait(self.interval):
                return
            try:
                self.beat(sweep=beat % sweep_every == 0)
            except Exception:  # renewing must go on whatever one beat hit
                log.exception("coordination.beat_failed")

    def beat(self, *, sweep: bool = False) -> None:
        """Renew held claims, beat the registry, refresh the shared pause; sweep the share."""
        with self._lock:
            held = list(self._held.values())
        for claim in held:
            with contextlib.suppress(CoordinationUnavailable):
                claim.renew()
        if self.registry is not None:
            with contextlib.suppress(CoordinationUnavailable):
                self.registry.beat(self.claims_held, self.limiter.limit,
                                   [str(path) for path in self.inboxes])
        self.limiter.refresh()
        if sweep:
            for inbox in self.inboxes:
                self.claims.sweep(inbox)

    # -- claims -------------------------------------------------------------------------------

    def claim(self, inbox: Path, rel: str) -> Claim | None:
        """This daemon's claim on the file, or None while another daemon holds it.

        Raises CoordinationUnavailable when the store or the claims folder cannot be used
        (the file should wait, like a file whose outbox is unavailable).
        """
        key = (inbox, rel)
        with self._lock:
            held = self._held.get(key)
        if held is not None and not held.lost and not held.released:
            return held
        claim = self.claims.claim(inbox, rel)
        with self._lock:
            if claim is None:
                self._held.pop(key, None)
            else:
                self._held[key] = claim
        return claim

    def claim_wait(self) -> float:
        """How long before a refused claim is worth asking again: until the grace after a store
        loss ends when one runs (so the first file waits no longer than the send hold), else a
        third of a lease (its holder may die meanwhile)."""
        default = max(1.0, self.lease_seconds / 3)
        grace = getattr(self.claims, "retry_in", None)
        left = grace() if grace is not None else None
        return default if left is None else min(default, max(0.05, left))

    def holds(self, inbox: Path, rel: str) -> bool:
        """Held and not known lost, as of the last renewal (no round trip)."""
        with self._lock:
            held = self._held.get((inbox, rel))
        return held is not None and not held.lost and not held.released

    def confirm(self, inbox: Path, rel: str) -> bool:
        """Renew the claim now and say whether it is still ours: the check to make right
        before paying, after the limiter's wait (which may have outlasted a lease while the
        store was away). One round trip to the store, or one rewrite of the claim file; none
        for a claim made or renewed less than a beat (`interval`) ago, which cannot have been
        lost since. Raises CoordinationUnavailable (the file should wait)."""
        with self._lock:
            held = self._held.get((inbox, rel))
        if held is None or held.lost or held.released:
            return False
        if since_boot() - held.written < self.interval:
            # Made or renewed less than a beat ago: a takeover needs a whole lease (three
            # beats at least) without a renewal, and a store that lost it holds new claims for
            # as long (reset.py). On the fast path the file was claimed a few ms ago.
            return True
        return held.renew()

    def release(self, inbox: Path, rel: str) -> None:
        """The file ended here (done, failed, gone) or is handed back. Never raises."""
        with self._lock:
            claim = self._held.pop((inbox, rel), None)
        if claim is not None:
            claim.release()

    @property
    def claims_held(self) -> int:
        with self._lock:
            return sum(1 for claim in self._held.values() if not claim.lost)

    # -- files finished in keep mode ----------------------------------------------------------

    def mark_done(self, inbox: Path, rel: str, size: int, mtime_ns: int, sha256: str,
                  result: str | None = None) -> None:
        """Record, on the share, that this content is done here (before releasing its claim).
        Raises CoordinationUnavailable."""
        self.marks.mark(inbox, rel, size, mtime_ns, sha256, result)

    def done_elsewhere(self, inbox: Path, rel: str, size: int, mtime_ns: int,
                       sha256: str) -> DoneMark | None:
        """The mark of another daemon (or an earlier run) that finished this exact content."""
        return self.marks.find(inbox, rel, size, mtime_ns, sha256)

    # -- status -------------------------------------------------------------------------------

    def hosts(self) -> dict[str, Any]:
        """`{"hosts": [{"host", "pid", "claims", ...}]}`: the daemons sharing the key."""
        if self.registry is None:
            return {"hosts": [{**self.holder.as_dict(), "claims": self.claims_held}]}
        assert isinstance(self.limiter, SharedRateLimiter)
        try:
            return {"hosts": self.registry.hosts(self.limiter.key)}
        except CoordinationUnavailable as exc:
            return {"hosts": [], "unreachable": str(exc)}


def hosts_report(config: Config, *, timeout: float = 1.0) -> dict[str, Any] | None:
    """For `status`: the daemons in the configured store (those of the same key when the key
    is readable), or None without a store. Logs nothing; an unreachable store is reported."""
    url = config.coordination.url
    if url is None:
        return None
    store = Store(url, timeout=timeout, name="watchfolder-status", quiet=True)
    try:
        key = config.api.key.reveal()
        found = HostRegistry(store).hosts(key_id(key) if key else None)
    except CoordinationUnavailable as exc:
        return {"store": store.shown, "hosts": [], "unreachable": str(exc)}
    finally:
        store.close()
    return {"store": store.shown, "hosts": found}


def adopt_empty_store(url: StoreUrl, api_key: str) -> None:
    """State that no daemon sent with `api_key` in the last minute nor holds a claim, so this
    (empty or restarted) store needs no hold before the first send or claim
    (`watchfolder coordination adopt`). Raises CoordinationUnavailable."""
    store = Store(url, quiet=True)
    try:
        reset.adopt_empty_store(store, key_id(api_key))
    finally:
        store.close()
