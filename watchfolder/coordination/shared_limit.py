"""The key's rate limit, 429 hold and account pause, kept in the store for every daemon sharing it.

One Lua script, run atomically by the store, keeps an exact sliding window: a sorted set of send
times in the store's clock (`redis.call('TIME')`), never more than the limit within any
`window + margin` (the margin, as in ratelimit.py, absorbs network jitter), bursts spread over
half a window (see `SharedRateLimiter`). The hosts' clocks never matter. Every daemon registers
its `requests_per_minute` with an expiry (renewed by its coordination thread) and the script
applies the smallest registered one, so the most careful host's limit holds. Keys are named
after a hash of the API key (never the key): daemons naming the same store and key share one
window. A 429's hold and the account pause live in the store too: one host's 402 pauses all;
while paused, the store grants one probe per `retry.pause_seconds` across all hosts, and the
probe's success (`succeeded()`) resumes everyone.

When the store cannot be reached, nothing is sent: `acquire` keeps asking (once a second) and
returns only when the store grants a send, so the limit holds (a guess at a per-host share
could exceed it when hosts send unequal shares).

A store that lost its data (restarted without persistence, restored from an older snapshot,
flushed, or new to this key) lost sends that still count for the vendor: every send waits until
`loss + window + margin`, the loss being dated once for all hosts (reset.py). Not chosen: every
host re-inserting its own recent sends. A host that has not noticed the restart yet (idle, or
between two sends) has not re-inserted its sends when another host fills the window, so it
cannot promise the limit; the hold can, at the cost of at most one minute per store loss.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog

from watchfolder.coordination.limits import SharedPause, this_host
from watchfolder.coordination.ratelimit import Strikes, Tunable, acquire_with
from watchfolder.coordination.reset import MARGIN, ResetNotice, epoch_key, since_loss
from watchfolder.coordination.store import Store
from watchfolder.errors import CoordinationUnavailable

log = structlog.get_logger("watchfolder")

WINDOW = 60.0  # the vendor's window: any 60 s
RETRY_SECONDS = 1.0  # while the store is unreachable, ask again this often
PAUSE_POLL_SECONDS = 5.0  # while paused, a waiting send looks again this often (a resume)
SPREAD = 0.5  # a burst of the whole limit takes at least half a window (see SharedRateLimiter)

# KEYS: 1 sends, 2 members, 3 limits, 4 hold, 5 epoch, 6 pause, 7 probe_at
# ARGV: 1 daemon id, 2 its limit, 3 window us, 4 margin us, 5 member ttl us, 6 unique suffix,
#       7 pause poll us, 8 spread
# Returns {granted 0|1, wait us, limit applied, hold left for a reset (us) or 0, pause|nil, probe}
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(x) return string.format('%.0f', x) end
local window = tonumber(ARGV[3])
local span = window + tonumber(ARGV[4])

-- A store that lost its data lost sends that still count: hold until they are out of any
-- window, from the loss that the claims' grace also starts from (reset.py).
""" + since_loss("KEYS[5]", "span") + """
local reset = math.max(0, loss + span - now)

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
local hold = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), now + reset)
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

# KEYS: 1 members, 2 limits, 3 pause, 4 epoch. ARGV: 1 daemon, 2 limit, 3 ttl us, 4 window +
# margin us. Returns {the pause, the hold left after a store loss (us)}. Dating a loss here, at
# a daemon's start, starts the first-use minute then rather than at the first file.
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) + 1000)
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000) + 1000)
""" + since_loss("KEYS[4]", "tonumber(ARGV[4])") + """
local left = math.max(0, loss + tonumber(ARGV[4]) - now)
return {redis.call('GET', KEYS[3]), string.format('%.0f', left)}
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


class SharedRateLimiter(Tunable):
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
                 window: float = WINDOW, margin: float = MARGIN, backoff: float = 2.0,
                 max_backoff: float = 300.0, member_ttl: float = 60.0,
                 spread: float = SPREAD, retry_every: float = RETRY_SECONDS,
                 pause_poll: float = PAUSE_POLL_SECONDS,
                 notice: ResetNotice | None = None) -> None:
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
        self.keys["epoch"] = epoch_key(key)  # shared with the claims' grace (reset.py)
        self.notice = notice or ResetNotice(store)
        self._scripts = {name: store.script(source) for name, source in (
            ("acquire", _ACQUIRE), ("refresh", _REFRESH), ("hold", _HOLD), ("pause", _PAUSE),
            ("resume", _RESUME), ("probe_now", _PROBE_NOW), ("leave", _LEAVE))}
        self._sequence = itertools.count()
        self._strikes = Strikes()  # consecutive 429s without Retry-After, on this host
        self._pause: SharedPause | None = None
        self._pause_text: str | None = None
        self._lock = threading.Lock()
        self._probe = threading.local()  # was this thread's last grant the store's probe?

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        return self.store.run(self._scripts[name], [self.keys[k] for k in keys], args)

    # -- the local limiter's interface --------------------------------------------------------

    def preload(self, ages: Iterable[float]) -> None:
        """Nothing to do: the store holds the window of every host, restarts included."""

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
        self.notice.waiting(int(reset_us))
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
        delay = self._strikes.delay(retry_after, self.backoff, self.max_backoff)
        # Unreachable: nothing is sent anyway until the store answers.
        with contextlib.suppress(CoordinationUnavailable):
            self._run("hold", ("hold",), [int(delay * 1e6)])
        return delay

    def succeeded(self) -> None:
        """A request was answered: reset the backoff; if it was the store's probe, resume all."""
        self._strikes.clear()
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
        host, pid = this_host()
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
        """Renew this daemon's limit in the store, look at the pause and notice a loss of the
        store's data (the thread's beat, and the daemon's start)."""
        try:
            pause, reset_us = self._run(
                "refresh", ("members", "limits", "pause", "epoch"),
                [self.daemon, self.limit, int(self.member_ttl * 1e6),
                 int((self.window + self.margin) * 1e6)])
        except CoordinationUnavailable:
            return
        self.notice.waiting(int(reset_us))
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


