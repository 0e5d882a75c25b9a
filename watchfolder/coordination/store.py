"""The coordination store (Redis or Valkey): one connection pool, and what "unreachable" means.

Every command has a timeout; a store that does not answer raises `CoordinationUnavailable`,
logged once per outage as `coordination.unreachable` and `coordination.recovered` when it is
back, so callers only decide what waits meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import structlog

from watchfolder import logs
from watchfolder.errors import CoordinationUnavailable

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

    from watchfolder.config.settings import StoreUrl

log = structlog.get_logger("watchfolder")

T = TypeVar("T")
STORE_TIMEOUT = 2.0  # per store command: a hung store must not hold a worker longer
# Replies that mean "not now" rather than a bug: a replica, a failing disk, a loading dataset.
UNAVAILABLE_REPLIES = ("READONLY", "MISCONF", "LOADING", "MASTERDOWN", "NOREPLICAS",
                       "CLUSTERDOWN", "TRYAGAIN", "BUSY")


class Store:
    """One connection pool to the coordination store; says once when it is lost and when back."""

    def __init__(self, url: StoreUrl, *, timeout: float = STORE_TIMEOUT, name: str = "watchfolder",
                 quiet: bool = False) -> None:
        self.shown = url.redacted()
        password = url.password
        if password:
            logs.add_secret(password)
            logs.add_secret(unquote(password))
        self.quiet = quiet  # `status`: report, do not log
        # Imported here, not with the module: redis costs 90 ms of CPU at every start, and a
        # daemon without `coordination.url` never makes a Store.
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One retry at once: a pooled connection may be stale after a store restart.
        self.client = redis.Redis.from_url(
            url.reveal(), socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1), decode_responses=True, client_name=name,
            health_check_interval=0)
        self._down_since: float | None = None
        self._lock = threading.Lock()

    def script(self, source: str) -> Script:
        return self.client.register_script(source)

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a registered script (reloaded by itself after a store restart)."""
        return self.call(lambda client: script(keys=list(keys), args=list(args), client=client))

    def call(self, action: Callable[[redis.Redis], T]) -> T:
        """`action(client)`, or CoordinationUnavailable when the store does not answer."""
        import redis  # loaded by __init__ already: a lookup

        try:
            result = action(self.client)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._lost(exc) from None
        except redis.ResponseError as exc:
            if str(exc).split(" ", 1)[0].upper() not in UNAVAILABLE_REPLIES:
                raise
            raise self._lost(exc) from None
        if self._down_since is not None:
            self._back()
        return result

    def close(self) -> None:
        import redis  # loaded by __init__ already: a lookup

        with contextlib.suppress(redis.RedisError):
            self.client.close()

    def _lost(self, exc: Exception) -> CoordinationUnavailable:
        with self._lock:
            newly = self._down_since is None
            if newly:
                self._down_since = time.monotonic()
        if newly and not self.quiet:
            log.warning("coordination.unreachable", store=self.shown, error=str(exc),
                        hint="nothing is sent until the coordination store answers again; "
                             "files wait")
        return CoordinationUnavailable(
            f"the coordination store {self.shown} does not answer: {exc}")

    def _back(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None and not self.quiet:
            log.info("coordination.recovered", store=self.shown,
                     down_s=round(time.monotonic() - since, 1))
