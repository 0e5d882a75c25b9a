"""The limiter the pipeline uses, whether this daemon is alone or shares the key: its interface
(`Limiter`), the account pause as every limiter reports it (`SharedPause`), and the local one
(`LocalLimiter`: ratelimit.RateLimiter with a pause nobody else shares).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from watchfolder import errors
from watchfolder.coordination.claims import Holder
from watchfolder.coordination.ratelimit import RateLimiter


@dataclass(frozen=True)
class SharedPause:
    """The account refuses requests (401/402/403/404), as one daemon found out."""

    reason: str
    status: int | None
    message: str
    host: str
    pid: int
    probe_every: float

    def account_error(self) -> errors.AccountError:
        """The error the daemon would have raised itself, for its queue's pause."""
        kind = {"key_missing": errors.KeyMissing, "no_credits": errors.CreditsExhausted,
                "key_refused": errors.KeyRefused,
                "endpoint_missing": errors.EndpointMissing}.get(self.reason, errors.AccountError)
        return kind(f"{self.message} (seen by {self.host} pid {self.pid})", self.status)

    @classmethod
    def from_json(cls, text: str | None) -> SharedPause | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["reason"]), data.get("status"), str(data.get("message", "")),
                       str(data.get("host", "?")), int(data.get("pid", 0)),
                       float(data.get("probe_every_us", 0)) / 1e6)
        except (ValueError, KeyError, TypeError):
            return None


class Limiter(Protocol):
    """What the pipeline uses: `ratelimit.RateLimiter`'s interface plus the shared pause."""

    limit: int
    backoff: float
    max_backoff: float
    on_pause_change: Callable[[SharedPause | None], None] | None

    def preload(self, ages: Iterable[float]) -> None: ...

    def set_limit(self, limit: int) -> None: ...

    def set_backoff(self, base: float, cap: float) -> None: ...

    def try_acquire(self) -> float: ...

    def acquire(self, stop: threading.Event) -> bool: ...

    def wait_time(self) -> float: ...

    def rate_limited(self, retry_after: float | None) -> float: ...

    def succeeded(self) -> None: ...

    def paused(self) -> SharedPause | None: ...

    def pause(self, reason: str, seconds: float, *, status: int | None = None,
              message: str = "") -> bool: ...

    def resume(self) -> bool: ...

    def probe_now(self) -> None: ...

    def refresh(self) -> None: ...

    def leave(self) -> None: ...


class LocalLimiter(RateLimiter):
    """The single-daemon limiter with the shared limiter's pause methods.

    The pause is this process's alone (the pipeline's queue already holds it), so
    `on_pause_change` is never called: nobody else can change it.
    """

    def __init__(self, limit: int, **kw: Any) -> None:
        super().__init__(limit, **kw)
        self.on_pause_change: Callable[[SharedPause | None], None] | None = None
        self._pause: SharedPause | None = None

    def paused(self) -> SharedPause | None:
        return self._pause

    def pause(self, reason: str, seconds: float, *, status: int | None = None,
              message: str = "") -> bool:
        newly = self._pause is None
        self._pause = SharedPause(reason, status, message, *this_host(), seconds)
        return newly

    def resume(self) -> bool:
        was, self._pause = self._pause, None
        return was is not None

    def probe_now(self) -> None:
        """Nothing to do: the pipeline's queue times the probes of a local pause."""

    def refresh(self) -> None:
        """Nothing to refresh: nobody else shares this limiter."""

    def leave(self) -> None:
        """Nothing to leave."""


def this_host() -> tuple[str, int]:
    holder = Holder.this_process()
    return holder.host, holder.pid

