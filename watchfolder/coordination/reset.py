"""After the store lost its data: one instant from which both the claim grace and the send hold
run, and the one warning that says how long the first file waits.

A store that comes back empty (restarted without persistence, restored from an older snapshot,
flushed) lost two things at once: the sends of the last minute, which still count for the
vendor, and the claims of files being worked on. Both waits start from the same instant, the
*loss*, recorded once per store run in the key's epoch (`<run_id>|<loss, store clock, us>`):

- the loss is the store's start (`TIME - uptime`, plus the second `uptime` may be rounded up
  by, never later than now) when the store says it restarted (another
  run_id than the epoch's), or when no epoch exists and the store started less than
  `window + margin` ago (a fresh store);
- it is *now* (the first time any daemon of the key notices) when no epoch exists and the store
  has been up longer: nothing says when sends were lost (first use of a store, a FLUSHALL).

Sends wait until `loss + window + margin` (every lost send is then out of any window). New
claims wait until `loss + grace`, `grace = min(lease, window)`: each live holder renews its
claims every `grace / 3` (the coordinator's beat), so within the grace every claim the store
lost is re-created by its holder before anyone else may take the file. As the grace is never
longer than the send hold and both start at the loss, the first file after a first use or a
restart waits at most `window + margin`, whatever the lease.

Whoever notices first (a daemon's start or beat, a claim, a renewal or a send, on any host)
records the loss; everyone
else reads it, so every host holds until the same instant. `coordination.store_reset` is
logged by each daemon once per loss, when it first meets the wait (its start or a beat, a
claim, a renewal, a send), with the wait that remains.
`adopt_empty_store` records "no loss" for a store the operator vouches for
(`watchfolder coordination adopt`).
"""

from __future__ import annotations

import threading
import time

import structlog

from watchfolder.coordination.store import Store

log = structlog.get_logger("watchfolder")

MARGIN = 0.5  # our jitter allowance on the vendor's window (as in ratelimit.py)

# Which run of the store this is (`run_id`) and since when (`uptime`, us, or nil). INFO may be
# refused to an ACL user without @dangerous: then run_id is 'unknown' and only a store that
# lost everything (a missing epoch) is noticed, not one restored from an older snapshot.
STORE_RUN = """
local run_id, uptime = 'unknown', nil
local info = redis.pcall('INFO', 'server')
if type(info) == 'string' then
  run_id = string.match(info, 'run_id:(%w+)') or 'unknown'
  local up = string.match(info, 'uptime_in_seconds:(%d+)')
  if up then uptime = tonumber(up) * 1000000 end
end
"""


def since_loss(epoch: str, span: str) -> str:
    """Lua that sets `loss` (store clock, us; 0: nothing lost) from the epoch key `epoch`,
    recording it on first notice. Needs `now` (us); `span` is `window + margin` in us."""
    return STORE_RUN + f"""
local loss = 0
local recorded = redis.call('GET', {epoch})
local seen_run, seen_loss = nil, 0
if recorded then
  seen_run, seen_loss = string.match(recorded, '^([^|]*)|(%d+)$')
  if not seen_run then seen_run, seen_loss = recorded, 0 end  -- an epoch of 0.2: run_id only
end
if seen_run == run_id then
  loss = tonumber(seen_loss)
else
  if uptime and (recorded or uptime < {span}) then
    -- Every lost send and claim is older than this store's start. `uptime_in_seconds` is
    -- the difference of two truncated clocks, up to a second more than the store has been
    -- up: the start is dated a second later (never after now), not up to a second early.
    loss = math.min(now, now - uptime + 1000000)
  else
    loss = now  -- empty for long (first use, a flush): nothing says since when
  end
  redis.call('SET', {epoch}, run_id .. '|' .. string.format('%.0f', loss))
end
"""


def epoch_key(key: str) -> str:
    """The store key recording the last loss noticed, for the API key with id `key`."""
    return f"watchfolder:{{{key}}}:epoch"


class ResetNotice:
    """Says `coordination.store_reset` once per loss, when this daemon first meets the wait."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._until: float | None = None  # monotonic end of the last wait announced
        self._lock = threading.Lock()

    def waiting(self, wait_us: float, *, claims: bool = False) -> None:
        """Sends (or, with `claims`, new claims) wait `wait_us` more for a store reset;
        `wait_us` is always the send hold: the longer of the two, the first file's wait."""
        if wait_us <= 0:
            return
        until = time.monotonic() + wait_us / 1e6
        with self._lock:
            # The same loss reported again (by the other path, or a second later) is not new.
            if self._until is not None and abs(until - self._until) < 2.0:
                return
            self._until = until
        log.warning("coordination.store_reset", store=self.store.shown,
                    hold_s=round(wait_us / 1e6, 1), held="claims and sends" if claims
                    else "sends",
                    hint="the store restarted, lost its data or is new to this key: the sends "
                         "of the last minute and the claims are lost to it, so every host "
                         "waits until those sends are out of any window and the live holders "
                         "re-created their claims")


def adopt_empty_store(store: Store, key: str) -> None:
    """State that no daemon sent with the key of id `key` in the last minute nor holds a claim,
    so this (empty or restarted) store needs no hold before the first send or claim.
    Raises CoordinationUnavailable."""
    adopt = store.script(STORE_RUN + """
redis.call('SET', KEYS[1], run_id .. '|0')
return 1
""")
    store.run(adopt, [epoch_key(key)], [])
