"""The durable queue of webhook deliveries (`state_dir/deliveries.sqlite3`) and its sender.

`DeliveryQueue.enqueue` commits the delivery before it returns, so a delivery survives a crash
or restart: at least once, the body's `id` (also in `X-Watchfolder-Delivery`) lets the receiver
deduplicate. One thread POSTs due deliveries (webhook.py); anything but a 2xx is retried with
exponential backoff and jitter (about 1 s, then up to 5 min between tries) for `max_age_hours`,
then dropped with an error log. Delivered and dropped ids stay as tombstones for 30 days, so
enqueueing the same id again delivers nothing twice.

Log events: webhook.queued, webhook.pending, webhook.delivered, webhook.retry,
webhook.dropped, webhook.error.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from watchfolder import logs
from watchfolder.config.handoff import WebhookSettings, display_url
from watchfolder.handoff.retry import backoff_delay
from watchfolder.handoff.webhook import WebhookClient, WebhookUnreachable
from watchfolder.journal.sqlite import open_durable, open_read_only

log = structlog.get_logger("watchfolder")

KEEP_FINISHED_SECONDS = 30 * 86400  # delivered/dropped ids are remembered this long (dedupe)

PENDING, DELIVERED, DROPPED = "pending", "delivered", "dropped"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    finished REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
"""
DELIVERIES_FILE = "deliveries.sqlite3"


class DeliveryQueue:
    """Durable webhook deliveries in `state_dir/deliveries.sqlite3`, sent by one thread.

    `enqueue` works before `start` and after `stop` (the delivery waits for the next start);
    `close` after `join`. Times in the database are wall-clock (`clock`), so the age limit
    and the backoff hold across restarts.
    """

    def __init__(self, state_dir: Path, settings: WebhookSettings, *,
                 first_backoff_seconds: float = 1.0, max_backoff_seconds: float = 300.0,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.path = Path(state_dir) / DELIVERIES_FILE
        self.first_backoff_seconds = first_backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._closing = False
        self._sender_done = False
        self._thread: threading.Thread | None = None
        logs.add_secret(settings.secret.reveal())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_durable(self.path)  # an enqueued delivery survives power loss
        self._db.executescript(_SCHEMA)
        self._db.execute("DELETE FROM deliveries WHERE state != ? AND finished < ?",
                         (PENDING, clock() - KEEP_FINISHED_SECONDS))

    # -- the pipeline's side ---------------------------------------------------------------

    def enqueue(self, delivery_id: str, body: bytes) -> bool:
        """Record a delivery durably (committed on return). Idempotent by id: False when that
        id was already queued, delivered or dropped."""
        now = self._clock()
        with self._lock:
            if self._closing:
                raise RuntimeError("DeliveryQueue is closed")
            cur = self._db.execute(
                "INSERT OR IGNORE INTO deliveries (id, body, state, created, next_at) "
                "VALUES (?, ?, ?, ?, ?)", (delivery_id, body, PENDING, now, now))
            added = cur.rowcount == 1
        if added:
            log.debug("webhook.queued", id=delivery_id, bytes=len(body))
            self._wake.set()
        return added

    def pending(self) -> int:
        """Deliveries not yet delivered nor dropped."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM deliveries WHERE state = ?",
                                        (PENDING,)).fetchone()
        return int(count)

    def state_of(self, delivery_id: str) -> str | None:
        """pending, delivered, dropped, or None for an unknown id."""
        with self._lock:
            row = self._db.execute("SELECT state FROM deliveries WHERE id = ?",
                                   (delivery_id,)).fetchone()
        return row[0] if row else None

    # -- the sender thread -------------------------------------------------------------------

    def start(self) -> None:
        waiting = self.pending()
        if waiting:
            log.info("webhook.pending", count=waiting, receiver=display_url(self.settings.url))
        self._thread = threading.Thread(target=self._send_loop, name="watchfolder-webhook",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send nothing more; a request in flight ends within its timeouts (see `join`)."""
        self._stopping.set()
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the sender; False if a request is still in flight (its
        delivery stays pending and is sent again next start)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Close the database (at once, or when a request still in flight has ended)."""
        self.stop()
        with self._lock:
            self._closing = True
            if self._thread is None or self._sender_done:
                self._db.close()

    def _send_loop(self) -> None:
        client = WebhookClient(self.settings)
        try:
            while not self._stopping.is_set():
                self._wake.clear()  # before looking, so an enqueue from now on wakes us
                try:
                    due, wait = self._next_due()
                    if due is not None:
                        self._attempt(client, *due)
                        continue
                except sqlite3.Error:
                    # The state folder is full or unwritable: keep the thread, try again soon.
                    log.exception("webhook.error", path=str(self.path))
                    wait = 5.0
                # Capped: a wall clock that jumps must not leave a delivery unseen for long.
                self._wake.wait(min(wait, 30.0))
        finally:
            client.close()
            with self._lock:
                self._sender_done = True
                if self._closing:
                    self._db.close()

    def _next_due(self) -> tuple[tuple[str, bytes, float, int] | None, float]:
        with self._lock:
            row = self._db.execute(
                "SELECT id, body, created, attempts, next_at FROM deliveries WHERE state = ? "
                "ORDER BY next_at, created LIMIT 1", (PENDING,)).fetchone()
        if row is None:
            return None, 30.0
        wait = row[4] - self._clock()
        if wait > 0:
            return None, wait
        return (row[0], row[1], row[2], row[3]), 0.0

    def _attempt(self, client: WebhookClient, delivery_id: str, body: bytes, created: float,
                 attempts: int) -> None:
        attempt = attempts + 1
        started = time.monotonic()
        status: int | None = None
        try:
            status = client.post(delivery_id, body)
            error = f"HTTP {status}"
        except WebhookUnreachable as exc:
            error = exc.error
        except Exception as exc:  # noqa: BLE001 - one odd answer must not end the sender
            error = type(exc).__name__
        ms = round((time.monotonic() - started) * 1000)
        now = self._clock()
        if status is not None and 200 <= status < 300:
            self._finish(delivery_id, DELIVERED, attempt, now, None)
            log.info("webhook.delivered", id=delivery_id, status=status, attempt=attempt, ms=ms)
            return
        age = now - created
        if age >= self.settings.max_age_hours * 3600:
            self._finish(delivery_id, DROPPED, attempt, now, error)
            log.error("webhook.dropped", id=delivery_id, attempts=attempt,
                      age_h=round(age / 3600, 2), last_error=error,
                      receiver=display_url(self.settings.url))
            return
        delay = backoff_delay(attempt, self.first_backoff_seconds, self.max_backoff_seconds,
                              self._rand)
        with self._lock:
            self._db.execute("UPDATE deliveries SET attempts = ?, next_at = ?, last_error = ? "
                             "WHERE id = ?", (attempt, now + delay, error, delivery_id))
        log.warning("webhook.retry", id=delivery_id, status=status, error=error,
                    attempt=attempt, retry_in_s=round(delay, 2), ms=ms)

    def _finish(self, delivery_id: str, state: str, attempts: int, now: float,
                error: str | None) -> None:
        # The body is no longer needed; the row stays as a tombstone so that enqueueing the
        # same id again (a restart that finishes the file twice) does not deliver it again.
        with self._lock:
            self._db.execute("UPDATE deliveries SET state = ?, attempts = ?, finished = ?, "
                             "last_error = ?, body = X'' WHERE id = ?",
                             (state, attempts, now, error, delivery_id))


def pending_deliveries(state_dir: Path) -> int:
    """Pending webhook deliveries, read-only, so another process may ask while the daemon
    runs (nothing calls it yet but the tests; `status` does not show it); 0 if none."""
    path = Path(state_dir) / DELIVERIES_FILE
    if not path.exists():
        return 0
    with contextlib.closing(open_read_only(path, live=True)) as db:
        try:
            (count,) = db.execute("SELECT COUNT(*) FROM deliveries WHERE state = ?",
                                  (PENDING,)).fetchone()
        except sqlite3.OperationalError:  # created but no table yet
            return 0
    return int(count)

