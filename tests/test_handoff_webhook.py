"""Webhook deliveries against a real HTTP receiver on 127.0.0.1: signature, retries, restarts."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LogCapture, wait_for
from watchfolder import __version__
from watchfolder.config.handoff import WebhookSettings
from watchfolder.config.settings import Secret
from watchfolder.handoff.deliveries import DeliveryQueue, pending_deliveries
from watchfolder.handoff.retry import backoff_delay
from watchfolder.handoff.webhook import WebhookClient, WebhookUnreachable, signature

SECRET = "whsec-0123456789abcdef"
BODY = json.dumps({"version": 1, "id": "d-1", "event": "done", "path": "/in/été.jpg"},
                  ensure_ascii=False).encode() + b"\n"


class Receiver:
    """A webhook receiver: answers each POST with the next of `statuses` (then 200)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.received.append((dict(self.headers), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/watchfolder"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        name="test-receiver")

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def count(self) -> int:
        with self._lock:
            return len(self.received)


def settings_for(url: str, **changes: Any) -> WebhookSettings:
    values: dict[str, Any] = {"url": url, "secret": Secret(SECRET), "timeout_seconds": 2.0,
                              "connect_timeout_seconds": 1.0, **changes}
    return WebhookSettings(**values)


@contextlib.contextmanager
def sending(queue: DeliveryQueue) -> Iterator[DeliveryQueue]:
    queue.start()
    try:
        yield queue
    finally:
        assert queue.join(10), "the sender did not end"
        queue.close()


def valid_signature(headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Watchfolder-Signature"], expected)


def test_a_500_then_200_across_a_restart_delivers_the_same_id_twice_at_most(
        tmp_path: Path, log_lines: LogCapture) -> None:
    with Receiver(500) as receiver:
        settings = settings_for(receiver.url)
        # The first retry is a minute away: only the restart can deliver it in this test.
        with sending(DeliveryQueue(tmp_path, settings, first_backoff_seconds=60)) as first:
            assert first.enqueue("d-1", BODY)
            wait_for(lambda: log_lines.events("webhook.retry"), what="the 500 to be seen")
        assert pending_deliveries(tmp_path) == 1

        two_minutes_later = DeliveryQueue(tmp_path, settings, clock=lambda: time.time() + 120)
        with sending(two_minutes_later) as second:
            assert second.pending() == 1
            wait_for(lambda: second.state_of("d-1") == "delivered", what="the delivery")
            assert not second.enqueue("d-1", BODY), "a delivered id must not be queued again"
            assert second.pending() == 0
        assert receiver.count() == 2

    for headers, body in receiver.received:
        assert body == BODY
        assert valid_signature(headers, body)
        assert headers["X-Watchfolder-Delivery"] == "d-1"
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == f"watchfolder/{__version__}"
    retry = log_lines.events("webhook.retry")
    assert [(e["status"], e["attempt"]) for e in retry] == [(500, 1)]
    assert 30 <= retry[0]["retry_in_s"] <= 60
    assert log_lines.events("webhook.pending")[0]["count"] == 1
    delivered = log_lines.events("webhook.delivered")
    assert [(e["id"], e["status"], e["attempt"]) for e in delivered] == [("d-1", 200, 2)]
    assert SECRET not in log_lines.getvalue()


def test_a_receiver_that_never_answers_times_out_and_the_delivery_stays_pending(
        tmp_path: Path, log_lines: LogCapture) -> None:
    # Listening but never accepting: the kernel completes the handshake, nobody answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        settings = settings_for(f"http://127.0.0.1:{port}/", timeout_seconds=0.3)
        with sending(DeliveryQueue(tmp_path, settings, first_backoff_seconds=60)) as queue:
            queue.enqueue("d-1", BODY)
            retry = wait_for(lambda: log_lines.events("webhook.retry"), what="a timeout")
            assert queue.pending() == 1
    assert retry[0]["error"] == "ReadTimeout"
    assert retry[0]["status"] is None
    assert pending_deliveries(tmp_path) == 1
    assert SECRET not in log_lines.getvalue()


def test_after_max_age_a_failing_delivery_is_dropped_with_an_error(
        tmp_path: Path, log_lines: LogCapture) -> None:
    now = [time.time()]
    with Receiver(500, 500, 500) as receiver:
        queue = DeliveryQueue(tmp_path, settings_for(receiver.url), first_backoff_seconds=0.2,
                              clock=lambda: now[0])
        with sending(queue):
            queue.enqueue("d-1", BODY)
            wait_for(lambda: log_lines.events("webhook.retry"), what="the first 500")
            assert queue.state_of("d-1") == "pending"
            now[0] += 25 * 3600  # a day and an hour later, the receiver still fails
            wait_for(lambda: queue.state_of("d-1") == "dropped", what="the drop")
            assert queue.pending() == 0
            assert not queue.enqueue("d-1", BODY)  # a dropped id stays dropped
        assert receiver.count() == 2
    dropped = log_lines.events("webhook.dropped")
    assert len(dropped) == 1
    assert dropped[0]["level"] == "error"
    assert dropped[0]["attempts"] == 2
    assert dropped[0]["last_error"] == "HTTP 500"
    assert dropped[0]["receiver"] == receiver.url


def test_enqueue_is_durable_before_start_and_idempotent(tmp_path: Path) -> None:
    settings = settings_for("http://127.0.0.1:9/")
    queue = DeliveryQueue(tmp_path, settings)
    assert queue.enqueue("d-1", BODY)
    assert not queue.enqueue("d-1", b"{}")  # the first body wins
    assert queue.enqueue("d-2", BODY)
    queue.close()
    reopened = DeliveryQueue(tmp_path, settings)
    assert reopened.pending() == 2
    assert reopened.state_of("d-1") == "pending"
    assert reopened.state_of("nope") is None
    reopened.close()
    assert pending_deliveries(tmp_path) == 2
    assert pending_deliveries(tmp_path / "elsewhere") == 0


def test_an_unreachable_receiver_raises_without_url_or_secret(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = WebhookClient(settings_for(f"http://user:pw@127.0.0.1:{port}/x?token=t"))
    try:
        with pytest.raises(WebhookUnreachable) as caught:
            client.post("d-1", BODY)
    finally:
        client.close()
    assert caught.value.error == "ConnectionError"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert str(port) not in str(caught.value) and "token" not in str(caught.value)


def test_signature_is_the_hex_hmac_sha256_of_the_exact_body() -> None:
    expected = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    assert signature(Secret(SECRET), BODY) == f"sha256={expected}"
    assert signature(Secret(SECRET), BODY + b" ") != f"sha256={expected}"


def test_backoff_starts_near_a_second_and_stays_under_five_minutes() -> None:
    def low() -> float:
        return 0.0

    def high() -> float:
        return 0.999999

    assert 0.5 <= backoff_delay(1, 1.0, 300.0, low) <= backoff_delay(1, 1.0, 300.0, high) <= 1
    assert backoff_delay(2, 1.0, 300.0, high) == pytest.approx(2.0, rel=1e-3)
    assert backoff_delay(9, 1.0, 300.0, high) == pytest.approx(256.0, rel=1e-3)
    assert 150 <= backoff_delay(10, 1.0, 300.0, low) <= backoff_delay(10_000, 1.0, 300.0, high)
    assert backoff_delay(10_000, 1.0, 300.0, high) <= 300
    # Tries keep coming at most five minutes apart: a day holds hundreds of them.
    elapsed, tries = 0.0, 0
    while elapsed < 24 * 3600:
        tries += 1
        elapsed += backoff_delay(tries, 1.0, 300.0, high)
    assert tries >= 24 * 3600 / 300
