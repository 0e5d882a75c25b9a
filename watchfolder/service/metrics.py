"""Prometheus metrics (`metrics: {listen: 127.0.0.1:9464}`), off unless configured.

Each daemon has its own `CollectorRegistry`, never the library's global one, so that several
daemons (in tests) or a reload do not collide. Two kinds of metric:

- events the pipeline reports through two hooks (`file_finished`, `api_response`): files by
  inbox and outcome, failures by reason, API answers by status code, request latency;
- state read from the daemon at scrape time (a custom collector): queue depth, in flight,
  credits remaining, paused and why, healthy. Reading at scrape time means no thread keeps
  gauges up to date and a scrape always sees the present.

The HTTP server is a small WSGI server in one thread that `close()` stops and joins, unlike
`prometheus_client.start_http_server`, which cannot be stopped. Labels carry inbox paths,
status codes and reason codes, never the API key.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from watchfolder import __version__
from watchfolder.errors import StartupError

# Requests take from well under a second (sandbox) to a minute (big images, slow API).
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


class Metrics:
    """The registry, the pipeline's hooks, and the HTTP endpoint serving them."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        """`state` returns the daemon's snapshot plus `healthy`, read at each scrape."""
        self.registry = CollectorRegistry()
        self.files = Counter("watchfolder_files", "Files finished, by inbox and outcome "
                             "(done, failed, gone)", ["inbox", "outcome"],
                             registry=self.registry)
        self.reused = Counter("watchfolder_results_reused", "Files done with an earlier "
                              "result for the same content (no request spent)", ["inbox"],
                              registry=self.registry)
        self.failures = Counter("watchfolder_failures", "Files moved to errors, by inbox and "
                                "reason code", ["inbox", "reason"], registry=self.registry)
        self.responses = Counter("watchfolder_api_responses", "API answers by HTTP status "
                                 "('transport' when none came)", ["status"],
                                 registry=self.registry)
        self.latency = Histogram("watchfolder_api_request_duration_seconds", "Time from "
                                 "sending a request to its answer (or its failure)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(state))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- hooks, called by pipeline workers ------------------------------------------------------

    def file_finished(self, inbox: str, outcome: str, *, reason: str | None = None,
                      reused: bool = False) -> None:
        self.files.labels(inbox=inbox, outcome=outcome).inc()
        if reused:
            self.reused.labels(inbox=inbox).inc()
        if outcome == "failed":
            self.failures.labels(inbox=inbox, reason=reason or "unknown").inc()

    def api_response(self, status: int | None, seconds: float) -> None:
        self.responses.labels(status=str(status) if status else "transport").inc()
        self.latency.observe(seconds)

    # -- the endpoint --------------------------------------------------------------------------

    @property
    def address(self) -> str | None:
        """`host:port` actually listened on (the port is chosen when 0 was asked)."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"

    def serve(self, listen: str) -> None:
        """Listen on `host:port` (instead of any earlier address, once the new one is bound);
        StartupError when it cannot be bound."""
        host, port = split_listen(listen)
        server_class = _Server6 if ":" in host else _Server
        try:
            server = make_server(host, port, make_wsgi_app(self.registry),
                                 server_class=server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise StartupError(f"metrics.listen: cannot listen on {listen}: "
                               f"{exc.strerror or exc}") from None
        assert isinstance(server, _Server)
        self.close()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="watchfolder-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and join every thread of the server."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None


def split_listen(listen: str) -> tuple[str, int]:
    """`127.0.0.1:9464` / `[::1]:9464` / `:9464` (all interfaces) → (host, port)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)  # an empty host: all interfaces, as asked


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    # Joined on close (block_on_close) so no request thread outlives the daemon; the handler's
    # timeout bounds how long a slow client can delay that.
    daemon_threads = False
    block_on_close = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the log; say nothing."""


class _StateCollector(Collector):
    """Gauges read from the daemon when Prometheus scrapes."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        snap = self.state()
        yield InfoMetricFamily("watchfolder", "watchfolder version", value={"version": __version__})
        yield GaugeMetricFamily("watchfolder_queue_depth", "Files waiting in the queue "
                                "(ready, or parked until a retry time)",
                                value=float(snap.get("waiting") or 0))
        yield GaugeMetricFamily("watchfolder_in_flight", "Files a worker is processing now",
                                value=float(snap.get("in_flight") or 0))
        credits = snap.get("credits")
        if credits is not None:  # unknown until the API has said it: absent, not zero
            yield GaugeMetricFamily("watchfolder_credits_remaining", "x-remaining-credits of "
                                    "the last successful request", value=float(credits))
        paused = snap.get("paused")
        yield GaugeMetricFamily("watchfolder_paused", "1 while the account problem pauses "
                                "the queue", value=1.0 if paused else 0.0)
        reason = GaugeMetricFamily("watchfolder_paused_reason", "1 for the reason of the "
                                   "current pause (key_missing, key_refused, no_credits, ...)",
                                   labels=["reason"])
        if paused:
            reason.add_metric([str(paused).split(":", 1)[0]], 1.0)
        yield reason
        inbox_paused = GaugeMetricFamily("watchfolder_inbox_paused", "1 while a person paused "
                                         "this inbox (its files wait), with the reason "
                                         "(`paused by web`)", labels=["inbox", "reason"])
        for inbox, why in (snap.get("paused_inboxes") or {}).items():
            inbox_paused.add_metric([inbox, str(why)], 1.0)  # inbox "*": every inbox
        yield inbox_paused
        yield GaugeMetricFamily("watchfolder_credits_spent_today", "Requests sent since local "
                                "midnight (what api.max_credits_per_day counts)",
                                value=float(snap.get("spent_today") or 0))
        if snap.get("budget") is not None:
            yield GaugeMetricFamily("watchfolder_credits_budget", "api.max_credits_per_day",
                                    value=float(snap["budget"]))
        yield GaugeMetricFamily("watchfolder_healthy", "1 while every worker, the intake and "
                                "the watches are alive", value=1.0 if snap.get("healthy") else 0.0)
