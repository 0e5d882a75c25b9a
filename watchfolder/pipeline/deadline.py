"""The bound on a whole request: connect, upload, headers and every byte of the answer.

Socket timeouts only bound the wait for the next byte, so a server trickling one byte a second
would hold a request slot for as long as it likes. urllib3 runs each request on one
connection, on the calling thread. Our connection classes tell the thread's current deadline
which socket the request uses (when the socket is made, after the TLS handshake wraps it, and
on each request over a kept-alive connection), so that the watchdog can shut that socket down
when the time is up: a read or write blocked in it returns at once, whatever stage the request
is at (TLS handshake, upload, headers, body). The socket itself is kept, not the connection:
http.client hands it over to the response and forgets it when the answer says `Connection:
close`. An SSLSocket is shut down through the plain socket method, so its TLS state is not
touched from the watchdog's thread. One watchdog thread serves every request of a client: a
thread per request would cost a thread start and join on each call.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from typing import Any

import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()


class Deadline:
    """The time limit of one request: when it is over, the watchdog aborts its connection."""

    def __init__(self, seconds: float, watchdog: Watchdog) -> None:
        self.seconds = seconds
        self.expired = False
        self.due = 0.0
        self._watchdog = watchdog
        self._socket: socket.socket | None = None
        self._finished = False
        self._lock = threading.Lock()

    def message(self) -> str:
        return (f"no complete answer within {self.seconds:g} s (api.timeout_seconds bounds "
                f"the whole request); connection dropped")

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self.due = time.monotonic() + self.seconds
        self._watchdog.watch(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._finished = True
            self._socket = None
        _current.deadline = None

    @property
    def finished(self) -> bool:
        return self._finished

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._socket = sock
            if self.expired:
                _shut_down(sock)

    def expire(self) -> None:
        """The time is up: shut the request's socket down (unless it finished)."""
        with self._lock:
            if self._finished:
                return
            self.expired = True
            if self._socket is not None:
                _shut_down(self._socket)


class Watchdog:
    """One thread that expires the deadlines whose time is up, started with the first."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, Deadline]] = []  # a heap, earliest first
        self._count = itertools.count()  # ties in `due` never compare deadlines
        self._thread: threading.Thread | None = None
        self._generation = 0  # a closed watchdog's thread ends even if a new one starts

    def watch(self, deadline: Deadline) -> None:
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self._generation,),
                                                daemon=True, name="watchfolder-api-deadlines")
                self._thread.start()
            # Finished deadlines leave the heap here, not when they fall due: every request
            # has the same timeout, so the earliest are the oldest, nearly all finished, and
            # the heap stays near the requests in flight instead of rate x timeout entries.
            while self._due and self._due[0][2].finished:
                heapq.heappop(self._due)
            entry = (deadline.due, next(self._count), deadline)
            heapq.heappush(self._due, entry)
            # Woken only for a deadline that comes first: with one timeout for every request
            # that is only the first after an idle spell, not a wake-up per request.
            if self._due[0] is entry:
                self._changed.notify()

    @property
    def watched(self) -> int:
        """Deadlines still held (in flight, or finished and not yet let go)."""
        with self._changed:
            return len(self._due)

    def close(self) -> None:
        with self._changed:
            thread, self._thread = self._thread, None
            self._generation += 1
            self._due.clear()
            self._changed.notify()
        if thread is not None:
            thread.join()

    def _run(self, generation: int) -> None:
        with self._changed:
            while generation == self._generation:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    heapq.heappop(self._due)[2].expire()  # a finished one ignores it
                self._changed.wait(self._due[0][0] - now if self._due else None)


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _attach(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(sock)


class _DeadlineHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _attach(sock)  # from now on, whatever the TLS handshake or the upload does
        return sock

    def connect(self) -> None:
        super().connect()
        _attach(self.sock)  # TLS wraps the socket in a new object

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self.sock)  # a kept-alive connection does not connect again
        super().request(*args, **kwargs)


class _DeadlineHTTPSConnection(_DeadlineHTTPConnection, HTTPSConnection):
    """The same hooks in front of urllib3's TLS connection (its connect() calls _new_conn())."""


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_POOLS = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """requests' adapter with connection pools whose connections report to the deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.ProxyManager:
        manager: urllib3.ProxyManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager

    def close(self) -> None:
        # urllib3 2 closes a pool's connections only when the pool is garbage-collected, and
        # a kept exception (its traceback holds the response, the response its pool) can keep
        # it alive with a socket open: close them now.
        for manager in (self.poolmanager, *self.proxy_manager.values()):
            for key in manager.pools.keys():  # noqa: SIM118 (the container cannot iterate)
                pool = manager.pools.get(key)
                if pool is not None:
                    pool.close()
        super().close()
