"""Claims as keys in the coordination store (see claims.py for what a claim is).

One key per file, whose value carries the expiry in the store's clock (`TIME`), set and checked
by Lua scripts (compare-and-set to claim or take over, compare-and-renew, compare-and-delete),
so the store alone decides and host clocks never matter. The key's identity is the inbox's id
(written once in its claims folder), not its path, so hosts may mount the share at different
places.

After the store lost its data, nobody may take a new claim during the grace that follows the
loss (reset.py): every live holder re-creates the claims it renews meanwhile, so a live
holder's file cannot be claimed by someone else first. A refused claim says how long the grace
still runs (`retry_in`), so the file is tried again the moment it ends.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from watchfolder.coordination.claims import Claim, Holder, holder_label, rel_hash, unavailable
from watchfolder.coordination.reset import MARGIN, ResetNotice, epoch_key, since_loss
from watchfolder.coordination.share_claims import ShareClaims
from watchfolder.coordination.store import Store

log = structlog.get_logger("watchfolder")

# KEYS[2] the key's epoch; ARGV[4] the grace (us), ARGV[5] window + margin (us). Sets `grace`
# (new claims refused) and `waits`: {send hold left, grace left} in us.
_GRACE = since_loss("KEYS[2]", "tonumber(ARGV[5])") + """
local grace_left = math.max(0, loss + tonumber(ARGV[4]) - now)
local hold_left = math.max(0, loss + tonumber(ARGV[5]) - now)
local grace = grace_left > 0
"""

# KEYS: 1 the claim, 2 the epoch; ARGV: lease in microseconds, our token, a value to replace
# even if live (a claim left by our own previous life) or "", grace us, span us. Value:
# "<expires_us>|<token>". Returns {1, previous value or "", hold left, grace left} when ours
# now, {0, current value or "", hold left, grace left} when held by a live claim (or during
# the grace after a store reset).
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
""" + _GRACE + """
local waits = {string.format('%.0f', hold_left), string.format('%.0f', grace_left)}
local current = redis.call('GET', KEYS[1])
local forced = ARGV[3] ~= '' and current == ARGV[3]
if grace and not forced then
  return {0, current or '', waits[1], waits[2]}
end
if current and not forced then
  local expires = tonumber(string.match(current, '^(%d+)|'))
  if expires and expires > now then
    return {0, current, waits[1], waits[2]}
  end
end
redis.call('SET', KEYS[1], string.format('%.0f|', now + lease) .. ARGV[2],
           'PX', math.floor(2 * lease / 1000) + 1000)
return {1, current or '', waits[1], waits[2]}
"""

# KEYS: as _CLAIM; ARGV: lease in microseconds, our token, "", grace us, span us. {1, hold
# left} renewed (or re-created after a store reset), {0, hold left} not ours any more.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
""" + _GRACE + """
local left = string.format('%.0f', hold_left)
local current = redis.call('GET', KEYS[1])
if current then
  if string.match(current, '^%d+|(.*)$') ~= ARGV[2] then return {0, left} end
elseif not grace then
  return {0, left}  -- expired two leases ago: whoever took it over may have finished it
end
redis.call('SET', KEYS[1], string.format('%.0f|', now + lease) .. ARGV[2],
           'PX', math.floor(2 * lease / 1000) + 1000)
return {1, left}
"""

# KEYS[1] the claim; ARGV[1] our token. 1 deleted, 0 not ours.
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and string.match(current, '^%d+|(.*)$') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class StoreClaims:
    """Claims as keys in the coordination store, expiring by the store's clock.

    `key` is the API key's id (coordinator.key_id): its epoch records the last loss of the
    store's data (reset.py). `window` is the vendor's (tests shrink it); the grace after a loss
    is `min(lease, window)`.
    """

    def __init__(self, store: Store, holder: Holder, lease_seconds: float,
                 share: ShareClaims, *, key: str, window: float = 60.0,
                 notice: ResetNotice | None = None) -> None:
        self.store = store
        self.holder = holder
        self.lease_us = int(lease_seconds * 1e6)
        self.grace_us = int(min(lease_seconds, window) * 1e6)
        self.span_us = int((window + MARGIN) * 1e6)
        self.share = share  # for each inbox's id (its claims folder)
        self.epoch = epoch_key(key)
        self.notice = notice or ResetNotice(store)
        self._ids: dict[Path, str] = {}
        self._grace_ends = 0.0  # monotonic: new claims are refused until then
        self._lock = threading.Lock()
        self._claim = store.script(_CLAIM)
        self._renew = store.script(_RENEW)
        self._release = store.script(_RELEASE)

    def keys(self, inbox: Path, rel: str) -> list[str]:
        """The claim's key, and the epoch that dates the store's last loss."""
        return [self.key(inbox, rel), self.epoch]

    def key(self, inbox: Path, rel: str) -> str:
        inbox_id = self._ids.get(inbox)
        if inbox_id is None:
            try:
                inbox_id = self._ids[inbox] = self.share.folder(inbox).inbox_id()
            except OSError as exc:
                raise unavailable(inbox, exc) from None
        return f"watchfolder:{{{inbox_id}}}:claim:{rel_hash(rel)}"

    def claim(self, inbox: Path, rel: str) -> Claim | None:
        token = json.dumps({**self.holder.as_dict(), "nonce": secrets.token_hex(8)})
        keys = self.keys(inbox, rel)
        ours, previous = self._ask(keys, token, "")
        mine = False
        if not ours and previous and self.holder.left_by_my_previous_life(
                _store_holder(previous)):
            # Left by this daemon before its restart: replace exactly that claim, at once.
            ours, previous = self._ask(keys, token, previous)
            mine = bool(ours)
        if not ours:
            return None
        if mine:
            log.debug("claim.reclaimed", inbox=str(inbox), file=rel,
                      hint="left by this daemon before its restart")
        elif previous:
            holder = _store_holder(previous)
            log.warning("claim.taken_over", inbox=str(inbox), file=rel,
                        previous=holder_label(holder),
                        hint="its holder stopped renewing the claim for a whole lease (it died)")
        return Claim(self, inbox, rel, token)

    def _ask(self, keys: list[str], token: str, forced: str) -> tuple[bool, str]:
        ours, value, hold_us, grace_us = self.store.run(
            self._claim, keys, [self.lease_us, token, forced, self.grace_us, self.span_us])
        grace_left = int(grace_us) / 1e6
        if grace_left > 0:
            with self._lock:
                self._grace_ends = max(self._grace_ends, time.monotonic() + grace_left)
            self.notice.waiting(int(hold_us), claims=True)
        return bool(ours), value

    def retry_in(self) -> float | None:
        """Seconds until the grace after a store reset ends, if a claim was refused for it."""
        with self._lock:
            left = self._grace_ends - time.monotonic()
        return left if left > 0 else None

    def renew(self, claim: Claim) -> bool:
        ours, hold_us = self.store.run(self._renew, self.keys(claim.inbox, claim.rel),
                                       [self.lease_us, claim.token, "", self.grace_us,
                                        self.span_us])
        self.notice.waiting(int(hold_us))
        return bool(ours)

    def release(self, claim: Claim) -> None:
        self.store.run(self._release, [self.key(claim.inbox, claim.rel)], [claim.token])

    def sweep(self, inbox: Path) -> None:
        """Nothing to sweep: the store expires dead claims itself."""

    def close(self) -> None:
        self.share.close()


def _store_holder(value: bytes | str) -> dict[str, Any]:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    with contextlib.suppress(ValueError):
        loaded = json.loads(text.partition("|")[2])
        if isinstance(loaded, dict):
            return loaded
    return {}
