"""Several daemons, one API key, one share: what a daemon agrees on with the others.

    Coordinator.from_config(config)
    ├── limiter   SharedRateLimiter with `coordination.url`, else LocalLimiter: the key's rate
    │             limit, a 429's hold and the account pause (401/402/403)
    ├── claims    StoreClaims with a store, else ShareClaims: one daemon per file (claims.py)
    ├── marks     DoneMarks: a file finished in keep mode is not sent by another daemon
    └── registry  HostRegistry with a store: which daemons share it, for `status`
    and a thread, `watchfolder-coordination`, that every lease/3 renews the claims this daemon
    holds, beats the registry and refreshes the shared pause.

Without a `coordination:` section nothing here connects anywhere: the limiter is the local one
(ratelimit.py) and claims are files on the share, so two daemons pointed at one inbox by mistake
still send each file once.

The shared rate limit (`SharedRateLimiter`) has the local limiter's interface. One Lua script,
run atomically by the store, keeps an exact sliding window: a sorted set of send times in the
store's clock (`redis.call('TIME')`), never more than the limit within any `window + margin`
(the margin, as in ratelimit.py, absorbs network jitter), bursts spread over half a window
(see `SharedRateLimiter`). The hosts' clocks never matter. Every daemon registers its
`requests_per_minute` with an expiry (renewed by its thread) and the script applies the
smallest registered one, so the most careful host's limit holds. Keys are
named after a hash of the API key (never the key): daemons naming the same store and key share
one window. A 429's hold and the account pause live in the store too: one host's 402 pauses all;
while paused, the store grants one probe per `retry.pause_seconds` across all hosts, and the
probe's success (`succeeded()`) resumes everyone.

When the store cannot be reached, nothing is sent: `acquire` keeps asking (once a second) and
returns only when the store grants a send, so the limit holds (a guess at a per-host share
could exceed it when hosts send unequal shares). `coordination.unreachable` (warning) is logged
once per outage, `coordination.recovered` (info) when the store answers again. Claims in the
store cannot be taken meanwhile; files wait.

A store that comes back empty (restarted without persistence, or restored from a snapshot older
than its last minute) lost sends that still count for the vendor. Chosen: hold every send until
those lost sends are out of any window. The script keeps an epoch key holding the store's
`run_id`; when it differs from the running store's, every send made before the store started is
lost to it, and all of them are out of the window `window + margin` after the start, known to the
store as `TIME - uptime_in_seconds`. So the hold ends at `start + window + margin`: nothing at all
for a store that restarted long ago, at most a minute for one that just did. A store empty for
longer than a window (first use, or a FLUSHALL) cannot say when sends were lost: it holds one
full window from now (`adopt_empty_store` skips that when the operator knows no daemon sent in
the last minute). Not chosen: every host re-inserting its own recent sends. A host that has not
noticed the restart yet (idle, or between two sends) has not re-inserted its sends when another
host fills the window, so it cannot promise the limit; the hold can, at the cost of at most one
minute per store restart. (The claims the store lost are re-created by their holders first: see
the grace in claims.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog

from watchfolder import errors
from watchfolder.coordination.claims import (
    GRACE_KEYS,
    STORE_RUN,
    Claim,
    ClaimBackend,
    DoneMark,
    DoneMarks,
    Holder,
    ShareClaims,
    StoreClaims,
    instance_id,
)
from watchfolder.coordination.ratelimit import RateLimiter, acquire_with, backoff
from watchfolder.coordination.store import Store
from watchfolder.errors import CoordinationUnavailable

if TYPE_CHECKING:

    from watchfolder.config.settings import Config, StoreUrl

log = structlog.get_logger("watchfolder")

T = TypeVar("T")
WINDOW = 60.0  # the vendor's window: any 60 s
RETRY_SECONDS = 1.0  # while the store is unreachable, ask again this often
PAUSE_POLL_SECONDS = 5.0  # while paused, a waiting send looks again this often (a resume)
SPREAD = 0.5  # a burst of the whole limit takes at least half a window (see SharedRateLimiter)


def key_id(api_key: str) -> str:
    """The name the key's shared state goes by in the store: a hash, never the key."""
    return hashlib.sha256(b"watchfolder rate limit\0" + api_key.encode()).hexdigest()[:24]


# -- the store ---------------------------------------------------------------------------------


# -- the account pause, as every limiter reports it ---------------------------------------------


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
        self._pause = SharedPause(reason, status, message, *_this_host(), seconds)
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


def _this_host() -> tuple[str, int]:
    holder = Holder.this_process()
    return holder.host, holder.pid


# -- the shared rate limit ---------------------------------------------------------------------

# KEYS: 1 sends, 2 members, 3 limits, 4 hold, 5 epoch, 6 pause, 7 probe_at
# ARGV: 1 daemon id, 2 its limit, 3 window us, 4 margin us, 5 member ttl us, 6 unique suffix,
#       7 pause poll us, 8 spread
# Returns {granted 0|1, wait us, limit applied, hold set for a reset (us) or 0, pause|nil, probe}
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(x) return string.format('%.0f', x) end
local window = tonumber(ARGV[3])
local span = window + tonumber(ARGV[4])

-- A store that lost its data lost sends that still count: hold until they are out of any window.
local reset = 0
""" + STORE_RUN + """
local epoch = redis.call('GET', KEYS[5])
if epoch ~= run_id then
  local lost_until
  if uptime and (epoch or uptime < window) then
    lost_until = now - uptime + span  -- every lost send was made before this store started
  else
    lost_until = now + span  -- empty for a long time: nothing says when sends were lost
  end
  redis.call('SET', KEYS[5], run_id)
  if lost_until > now then
    local held = tonumber(redis.call('GET', KEYS[4]) or '0')
    if lost_until > held then
      redis.call('SET', KEYS[4], fmt(lost_until), 'PX', math.ceil((lost_until - now) / 1000))
    end
    reset = lost_until - now
  end
end

-- Our limit joins everyone's; the smallest registered limit holds.
local ttl = tonumber(ARGV[5])
redis.call('ZADD', KEYS[2], fmt(now + ttl), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
local values = redis.call('HMGET', KEYS[3], unpack(members))
local limit = tonumber(ARGV[2])
for i = 1, #members do
  local v = tonumber(values[i])
  if v and v < limit then limit = v end
end
if redis.call('HLEN', KEYS[3]) > #members then
  for _, id in ipairs(redis.call('HKEYS', KEYS[3])) do
    if not redis.call('ZSCORE', KEYS[2], id) then redis.call('HDEL', KEYS[3], id) end
  end
end
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000) + 1000)
redis.call('PEXPIRE', KEYS[3], math.ceil(ttl / 1000) + 1000)

local pause = redis.call('GET', KEYS[6])
local hold = tonumber(redis.call('GET', KEYS[4]) or '0')
if hold > now then
  return {0, hold - now, limit, reset, pause, 0}
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - span))
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then
  local edge = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  return {0, math.max(1, tonumber(edge[2]) + span - now), limit, reset, pause, 0}
end
-- Spread bursts: grants at least `spread * window / limit` apart.
local spacing = tonumber(ARGV[8]) * window / limit
if n > 0 and spacing > 0 then
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local ready = tonumber(newest[2]) + spacing
  if now < ready then
    return {0, math.max(1, ready - now), limit, reset, pause, 0}
  end
end

-- Paused: one probe per interval for all hosts.
local probe = 0
if pause then
  local due = tonumber(redis.call('GET', KEYS[7]) or '0')
  if now < due then
    return {0, math.min(due - now, tonumber(ARGV[7])), limit, reset, pause, 0}
  end
  local ok, decoded = pcall(cjson.decode, pause)
  local every = ok and tonumber(decoded['probe_every_us']) or 300000000
  redis.call('SET', KEYS[7], fmt(now + every), 'PX', 604800000)
  probe = 1
end

redis.call('ZADD', KEYS[1], fmt(now), fmt(now) .. ':' .. ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.ceil(span / 1000) + 1000)
return {1, 0, limit, reset, pause, probe}
"""

# KEYS: 1 members, 2 limits, 3 pause. ARGV: 1 daemon, 2 limit, 3 ttl us. Returns the pause.
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) + 1000)
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000) + 1000)
return redis.call('GET', KEYS[3])
"""

# KEYS: 1 hold. ARGV: 1 delay us. Holds every host's sends for the delay (the longest wins).
_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delay = tonumber(ARGV[1])
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + delay > held and delay > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', now + delay),
             'PX', math.ceil(delay / 1000) + 1)
end
return 1
"""

# KEYS: 1 pause, 2 probe_at. ARGV: 1 pause JSON, 2 probe every us. 1 if newly paused.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', 604800000)
if existed == 0 then
  redis.call('SET', KEYS[2], string.format('%.0f', now + tonumber(ARGV[2])), 'PX', 604800000)
end
return 1 - existed
"""

# KEYS: 1 pause, 2 probe_at. 1 if it was paused.
_RESUME = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
return existed
"""

# KEYS: 1 pause, 2 probe_at. The next probe may go now (a reload brought a new key).
_PROBE_NOW = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], '0', 'PX', 604800000)
end
return 1
"""

# KEYS: 1 members, 2 limits. ARGV: 1 daemon. This daemon's limit no longer counts.
_LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_KEYS = ("sends", "members", "limits", "hold", "epoch", "pause", "probe_at")


class SharedRateLimiter:
    """`ratelimit.RateLimiter`'s interface, kept in the store for every daemon sharing the key.

    See the module docstring. `window` and `margin` are the vendor's 60 s and our jitter
    allowance; tests shrink the window. `member_ttl` is how long a daemon's limit counts after
    its last word (its thread renews it every lease/3).

    Bursts are spread: grants are at least `spread * window / limit` apart (0.5: at most twice
    the average rate over short spans, so a backlog of 120 at 120/min starts over 30 s instead
    of at once). A sliding window replays a burst every minute; when a host dies in the middle
    of one, the survivors, with fewer request slots, cannot refill the hole it leaves and the
    key loses part of a minute for good. A spread burst is slow enough for the survivors' slots.
    It costs a batch of N files N x 0.25 s at 120/min before the last starts, against 2 s or
    more per answer.

    `on_pause_change(pause or None)` is called whenever the shared pause appears, changes its
    reason or goes, whoever caused it, except this limiter's own `pause()` (its caller knows).
    It runs on a worker or on the coordination thread: keep it quick (pause or resume a queue).
    """

    def __init__(self, store: Store, key: str, daemon: str, limit: int, *,
                 window: float = WINDOW, margin: float = 0.5, backoff: float = 2.0,
                 max_backoff: float = 300.0, member_ttl: float = 60.0,
                 spread: float = SPREAD, retry_every: float = RETRY_SECONDS,
                 pause_poll: float = PAUSE_POLL_SECONDS) -> None:
        self.store = store
        self.key = key
        self.daemon = daemon
        self.limit = limit
        self.window = window
        self.margin = margin
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.member_ttl = member_ttl
        self.spread = spread
        self.retry_every = retry_every
        self.pause_poll = pause_poll
        self.on_pause_change: Callable[[SharedPause | None], None] | None = None
        self.applied: int | None = None  # the limit the store applied last (the smallest)
        self.keys = {name: f"watchfolder:{{{key}}}:{name}" for name in _KEYS}
        self._scripts = {name: store.script(source) for name, source in (
            ("acquire", _ACQUIRE), ("refresh", _REFRESH), ("hold", _HOLD), ("pause", _PAUSE),
            ("resume", _RESUME), ("probe_now", _PROBE_NOW), ("leave", _LEAVE))}
        self._sequence = itertools.count()
        self._strikes = 0  # consecutive 429s without Retry-After, on this host
        self._pause: SharedPause | None = None
        self._pause_text: str | None = None
        self._lock = threading.Lock()
        self._probe = threading.local()  # was this thread's last grant the store's probe?

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        return self.store.run(self._scripts[name], [self.keys[k] for k in keys], args)

    # -- the local limiter's interface --------------------------------------------------------

    def preload(self, ages: Iterable[float]) -> None:
        """Nothing to do: the store holds the window of every host, restarts included."""

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self.limit = limit

    def try_acquire(self) -> float:
        """Take a slot and return 0.0, or return how long to wait before asking again
        (`retry_every` while the store does not answer)."""
        self._probe.granted = False
        try:
            granted, wait_us, applied, reset_us, pause, probe = self._run(
                "acquire", _KEYS,
                [self.daemon, self.limit, int(self.window * 1e6), int(self.margin * 1e6),
                 int(self.member_ttl * 1e6), f"{self.daemon}:{next(self._sequence)}",
                 int(self.pause_poll * 1e6), self.spread])
        except CoordinationUnavailable:
            return self.retry_every
        self.applied = int(applied)
        if reset_us:
            log.warning("coordination.store_reset", store=self.store.shown,
                        hold_s=round(int(reset_us) / 1e6, 1),
                        hint="the store restarted or lost its data, and with it the sends of "
                             "the last minute: every host waits until they are out of the "
                             "window")
        self._note_pause(pause)
        if granted:
            self._probe.granted = bool(probe)
            return 0.0
        return max(int(wait_us) / 1e6, 0.001)

    def wait_time(self) -> float:
        """How long a send would wait: not known without asking the store (0.0)."""
        return 0.0

    def acquire(self, stop: threading.Event) -> bool:
        """Block until the store grants a send (True) or `stop` is set (False)."""
        return acquire_with(self.try_acquire, stop)

    def rate_limited(self, retry_after: float | None) -> float:
        """The server said 429: hold every host's sends; return the delay applied."""
        with self._lock:
            if retry_after is None:
                self._strikes += 1
                delay = backoff(self._strikes, self.backoff, self.max_backoff)
            else:
                delay = max(0.0, retry_after)
        # Unreachable: nothing is sent anyway until the store answers.
        with contextlib.suppress(CoordinationUnavailable):
            self._run("hold", ("hold",), [int(delay * 1e6)])
        return delay

    def succeeded(self) -> None:
        """A request was answered: reset the backoff; if it was the store's probe, resume all."""
        with self._lock:
            self._strikes = 0
        if getattr(self._probe, "granted", False):
            self._probe.granted = False
            self.resume()

    # -- the shared pause ---------------------------------------------------------------------

    def paused(self) -> SharedPause | None:
        """The account pause as last seen in the store (no round trip)."""
        return self._pause

    def pause(self, reason: str, seconds: float, *, status: int | None = None,
              message: str = "") -> bool:
        """Pause every host; one probe per `seconds` across all. True if newly paused."""
        host, pid = _this_host()
        text = json.dumps({"reason": reason, "status": status, "message": message,
                           "host": host, "pid": pid, "probe_every_us": int(seconds * 1e6)})
        try:
            newly = bool(self._run("pause", ("pause", "probe_at"), [text, int(seconds * 1e6)]))
        except CoordinationUnavailable:
            newly = False
        self._note_pause(text, notify=False)  # the caller knows: it is pausing its own queue
        return newly

    def resume(self) -> bool:
        """Lift the pause for every host; True if it was paused."""
        try:
            was = bool(self._run("resume", ("pause", "probe_at")))
        except CoordinationUnavailable:
            return False
        self._note_pause(None)
        return was

    def probe_now(self) -> None:
        with contextlib.suppress(CoordinationUnavailable):
            self._run("probe_now", ("pause", "probe_at"))

    def refresh(self) -> None:
        """Renew this daemon's limit in the store and look at the pause (the thread's beat)."""
        try:
            pause = self._run("refresh", ("members", "limits", "pause"),
                              [self.daemon, self.limit, int(self.member_ttl * 1e6)])
        except CoordinationUnavailable:
            return
        self._note_pause(pause)

    def leave(self) -> None:
        """This daemon stops: its limit no longer counts."""
        with contextlib.suppress(CoordinationUnavailable):
            self._run("leave", ("members", "limits"), [self.daemon])

    def _note_pause(self, text: str | None, *, notify: bool = True) -> None:
        with self._lock:
            if text == self._pause_text:
                return
            before = self._pause
            self._pause_text, self._pause = text, SharedPause.from_json(text)
            changed = (before is None) != (self._pause is None) or (
                before is not None and self._pause is not None
                and before.reason != self._pause.reason)
        callback = self.on_pause_change
        if changed and notify and callback is not None:
            callback(self._pause)


# -- who shares the store -----------------------------------------------------------------------

_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('HLEN', KEYS[2]) > redis.call('ZCARD', KEYS[1]) then
  for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
    if not redis.call('ZSCORE', KEYS[1], id) then redis.call('HDEL', KEYS[2], id) end
  end
end
return 1
"""

_HOSTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local found = redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%.0f', now), '+inf',
                         'WITHSCORES')
local out = {string.format('%.0f', now)}
for i = 1, #found, 2 do
  table.insert(out, found[i])
  table.insert(out, found[i + 1])
  table.insert(out, redis.call('HGET', KEYS[2], found[i]) or '')
end
return out
"""

_GONE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_REGISTRY = ("watchfolder:{hosts}:members", "watchfolder:{hosts}:info")


class HostRegistry:
    """Each daemon's heartbeat in the store (host, pid, claims held), expiring with its lease."""

    def __init__(self, store: Store, holder: Holder | None = None, key: str = "",
                 ttl: float = 60.0) -> None:
        self.store = store
        self.holder = holder
        self.key = key
        self.ttl = ttl
        self._beat = store.script(_BEAT)
        self._hosts = store.script(_HOSTS)
        self._gone = store.script(_GONE)

    def beat(self, claims: int, limit: int, inboxes: Sequence[str] = ()) -> None:
        assert self.holder is not None
        info = {**self.holder.as_dict(), "claims": claims, "key": self.key[:8],
                "requests_per_minute": limit, "inboxes": list(inboxes), "ttl": self.ttl}
        self.store.run(self._beat, _REGISTRY,
                       [self.holder.daemon, json.dumps(info), int(self.ttl * 1e6)])

    def leave(self) -> None:
        assert self.holder is not None
        with contextlib.suppress(CoordinationUnavailable):
            self.store.run(self._gone, _REGISTRY, [self.holder.daemon])

    def hosts(self, key: str | None = None) -> list[dict[str, Any]]:
        """Every live daemon (of the key with this id, if given), oldest beat first."""
        reply = self.store.run(self._hosts, _REGISTRY, [])
        now = int(reply[0])
        found = []
        for daemon, expires, text in zip(reply[1::3], reply[2::3], reply[3::3], strict=True):
            try:
                info = json.loads(text)
            except ValueError:
                continue
            if key is not None and info.get("key") != key[:8]:
                continue
            seen = float(info.get("ttl", 0)) - (int(float(expires)) - now) / 1e6
            found.append({"host": info.get("host"), "pid": info.get("pid"),
                          "claims": info.get("claims", 0), "daemon": daemon,
                          "key": info.get("key"),
                          "requests_per_minute": info.get("requests_per_minute"),
                          "seen_s_ago": round(max(0.0, seen), 1)})
        return sorted(found, key=lambda h: (str(h["host"]), int(h["pid"] or 0)))


# -- what the pipeline calls --------------------------------------------------------------------


class Coordinator:
    """The limiter, the claims, the done marks and the registry, with one thread to renew them.

    `claim(inbox, rel)` is idempotent: the claim this daemon already holds on the file is
    returned again (so a file parked for a retry keeps its claim); a lost one is tried anew.
    """

    def __init__(self, *, holder: Holder, limiter: Limiter, claims: ClaimBackend,
                 marks: DoneMarks, lease_seconds: float, inboxes: Sequence[Path] = (),
                 store: Store | None = None, registry: HostRegistry | None = None) -> None:
        self.holder = holder
        self.limiter = limiter
        self.claims = claims
        self.marks = marks
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 3
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
                       lease_seconds=lease, inboxes=inboxes)
        store = Store(url, name=f"watchfolder:{holder.host}:{holder.pid}")
        key = key_id(config.api.key.reveal())
        limiter = SharedRateLimiter(store, key, holder.daemon, rpm, window=window,
                                    backoff=retry.backoff_seconds,
                                    max_backoff=retry.max_backoff_seconds, member_ttl=lease)
        return cls(holder=holder, limiter=limiter, claims=StoreClaims(store, holder, lease, share),
                   marks=DoneMarks(holder), lease_seconds=lease, inboxes=inboxes, store=store,
                   registry=HostRegistry(store, holder, key, ttl=lease))

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

    def holds(self, inbox: Path, rel: str) -> bool:
        """Held and not known lost, as of the last renewal (no round trip)."""
        with self._lock:
            held = self._held.get((inbox, rel))
        return held is not None and not held.lost and not held.released

    def confirm(self, inbox: Path, rel: str) -> bool:
        """Renew the claim now and say whether it is still ours: the check to make right
        before paying, after the limiter's wait (which may have outlasted a lease while the
        store was away). One round trip to the store, or one rewrite of the claim file.
        Raises CoordinationUnavailable (the file should wait)."""
        with self._lock:
            held = self._held.get((inbox, rel))
        if held is None or held.lost or held.released:
            return False
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
    (empty or restarted) store needs no hold before the first send or claim.
    Raises CoordinationUnavailable."""
    store = Store(url, quiet=True)
    adopt = store.script(STORE_RUN + """
redis.call('SET', KEYS[1], run_id)
redis.call('SET', KEYS[2], run_id)
redis.call('DEL', KEYS[3])
return 1
""")
    try:
        store.run(adopt, [f"watchfolder:{{{key_id(api_key)}}}:epoch", *GRACE_KEYS], [])
    finally:
        store.close()
