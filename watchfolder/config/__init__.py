"""The configuration: YAML in, frozen dataclasses out, every default and check in one table.

- `table`: the vocabulary of the settings table (`number`, `integer`, `flag`, `choice`,
  `folder`, `argv`, `special` fields carrying their `Spec`) and its one `Reader`, which
  collects every problem with its path and expands `${VAR}` and secret files.
- `settings`: the sections (`Config`, `ApiConfig`, `InboxConfig`, `OutputConfig`, ...), the
  README reference, check-config's view, and `load_config` / `parse_config`.
- `handoff`: the `hooks:` and `webhook:` sections (`HookSettings`, `WebhookSettings`).
- `secret`: values that never show their secret: `Secret` (the API key, the webhook's
  secret) and `StoreUrl` (a coordination store's URL, its password hidden).
"""
