"""The configuration: YAML in, frozen dataclasses out, every default and check in one table.

- `settings`: the settings table (each key's default, type, bounds and README wording) and
  its one reader; `load_config` / `parse_config`.
- `secret`: a string that never shows itself (the API key, the webhook's secret).
"""
