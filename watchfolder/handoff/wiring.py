"""The hooks and the webhook of one daemon, as the pipeline sees them (`HandOff`).

Both receive the manifest (manifest.py) of one processing of one file. Neither can change what
happened to the file: a hook that fails or a receiver that is down is logged and retried, the
file stays where the pipeline put it.

Wiring, per finished (done or failed) file, in this order:

    place the outputs (journal: stored)
    manifest = build_manifest(...); body = manifest_json(manifest)     # manifest.py
    place the manifest file, then the .done marker (done only, each when asked for)
    handoff.announce(manifest["id"], body)   # durable webhook delivery; before the journal
    journal: done / failed
    handoff.run_hooks(manifest, manifest_path, body)   # returns at once
    at stop: handoff.stop(timeout)   # hooks and sender joined, the queue's database closed
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from watchfolder.config.handoff import HookSettings, WebhookSettings
from watchfolder.config.secret import Secret
from watchfolder.handoff.deliveries import DeliveryQueue
from watchfolder.handoff.hooks import HookRunner


class HandOff:
    """The hooks and the webhook of one daemon, as the pipeline sees them."""

    def __init__(self, state_dir: Path, hooks: HookSettings | None,
                 webhook: WebhookSettings | None, *, withhold: Iterable[Secret] = ()) -> None:
        secrets = [*withhold, *([webhook.secret] if webhook else [])]
        self.hooks = HookRunner(hooks, withhold=secrets) if hooks else None
        self.deliveries = DeliveryQueue(state_dir, webhook) if webhook else None

    def start(self) -> None:
        for part in (self.hooks, self.deliveries):
            if part is not None:
                part.start()

    def announce(self, manifest_id: str, body: bytes) -> None:
        """Queue the webhook's delivery durably (before the journal says the file is final)."""
        if self.deliveries is not None:
            self.deliveries.enqueue(manifest_id, body)

    def run_hooks(self, manifest: Mapping[str, Any], manifest_path: Path | None,
                  body: bytes) -> None:
        if self.hooks is not None:
            self.hooks.submit(manifest, manifest_path, body)

    def alive(self) -> bool:
        return all(part.alive() for part in (self.hooks, self.deliveries) if part is not None)

    def stop(self, timeout: float) -> None:
        """Stop both; running hooks get what is left of `timeout`, then are killed."""
        deadline = time.monotonic() + timeout
        for part in (self.hooks, self.deliveries):
            if part is not None:
                part.stop()
        for part in (self.hooks, self.deliveries):
            if part is not None:
                part.join(max(0.0, deadline - time.monotonic()))
        if self.deliveries is not None:
            self.deliveries.close()

