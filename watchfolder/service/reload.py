"""What a reload (SIGHUP) decides before the daemon applies it: which settings must wait for a
restart, where each inbox goes, and which parts are replaced (the metrics server, the API
client). The daemon's `reload` applies them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from watchfolder.config.settings import ApiConfig, Config, InboxConfig

if TYPE_CHECKING:
    from watchfolder.service.metrics import Metrics


def pin_what_cannot_change(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with what cannot change while running (state_dir, api.concurrency) kept at its
    old value, and the names of those the new configuration wanted to change."""
    needs_restart = [name for name, before, after in (
        ("state_dir", old.state_dir, new.state_dir),
        ("api.concurrency", old.api.concurrency, new.api.concurrency)) if before != after]
    pinned = dataclasses.replace(new, state_dir=old.state_dir, api=dataclasses.replace(
        new.api, concurrency=old.api.concurrency))
    return pinned, needs_restart


def match_slots(old: tuple[InboxConfig, ...], inactive: set[int],
                new: tuple[InboxConfig, ...]) -> tuple[list[InboxConfig], set[int], list[int],
                                                        list[int]]:
    """Where each inbox of a reloaded configuration goes: (slots, inactive, added, changed).

    An inbox keeps its slot (found by path) for the life of the process; a new one gets a new
    slot; one configured again after a reload removed it counts as added; one no longer
    configured is inactive.
    """
    slots = list(old)
    now_inactive = set(range(len(slots)))
    added: list[int] = []
    changed: list[int] = []
    for inbox in new:
        index = next((i for i, slot in enumerate(slots) if slot.path == inbox.path), None)
        if index is None:
            index = len(slots)
            slots.append(inbox)
            added.append(index)
        elif index in inactive:
            slots[index] = inbox
            added.append(index)  # configured again
        elif slots[index] != inbox:
            slots[index] = inbox
            changed.append(index)
        now_inactive.discard(index)
    return slots, now_inactive, added, changed


def rebind_metrics(current: Metrics | None, listen: str | None,
                   snapshot: Callable[[], dict[str, Any]]) -> Metrics | None:
    """The metrics server for a new `metrics.listen` (or the first, at start-up): bound on
    the new address before the old one is let go (raises StartupError when taken), or closed
    when turned off."""
    if listen:
        # Imported only when asked for: prometheus_client costs 40 ms of CPU at every start.
        from watchfolder.service.metrics import Metrics

        metrics = current or Metrics(snapshot)
        metrics.serve(listen)
        return metrics
    if current is not None:
        current.close()
    return current


def client_changed(before: ApiConfig, after: ApiConfig) -> bool:
    """Whether the API client must be replaced (a new URL, key or timeouts)."""
    return (after.url, after.key, after.timeout_seconds, after.connect_timeout_seconds) != (
        before.url, before.key, before.timeout_seconds, before.connect_timeout_seconds)
