"""Hand-off: telling the next tool that a file is finished.

- `manifest`: what one processing of one file produced, as one JSON document.
- `wiring`: `HandOff`, the hooks and the webhook of one daemon as the pipeline sees them,
  and the order in which a finished file is handed on.
- `hooks`: local commands run per finished file, on threads of their own.
- `webhook`: one signed POST of a manifest (`WebhookClient`, `signature`).
- `deliveries`: the durable queue of webhook deliveries (SQLite) and its sender thread.
- `retry`: the jittered backoff between tries of a hook or a delivery.

Their settings are read by config/ (`config.handoff`); nothing here parses YAML.
"""
