"""Who shares the store: each daemon's heartbeat (host, pid, claims held), for `status`.

A beat expires with the daemon's lease, so a daemon that died leaves the list by itself.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

from watchfolder.coordination.claims import Holder
from watchfolder.coordination.store import Store
from watchfolder.errors import CoordinationUnavailable

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


