"""Watches that died and did not come back: a problem that stops the watchdog pings."""

from __future__ import annotations

import time

from watchfolder.intake.watcher import Watcher


class WatchLoss:
    """When each inbox's watch was first seen dead. One dead for less than two rescans is not
    a problem yet (the intake's rescan restores it), nor one of a folder that is missing (the
    intake reports it and watches it again when it is back)."""

    def __init__(self) -> None:
        self._since: dict[int, float] = {}  # inbox slot → when its watch was seen dead

    def clear(self) -> None:
        self._since.clear()

    def unrestored(self, watcher: Watcher, inactive: set[int],
                   rescan_seconds: float) -> list[str]:
        found = []
        now = time.monotonic()
        for index, inbox in enumerate(watcher.inboxes):
            if index in inactive or watcher.healthy(index) or not inbox.path.is_dir():
                self._since.pop(index, None)
                continue
            lost = self._since.setdefault(index, now)
            if now - lost > 2 * rescan_seconds + 1:
                found.append(f"the watch on {inbox.path} stopped and was not restored")
        return found
