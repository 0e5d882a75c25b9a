"""The `hooks:` and `webhook:` sections: hand-off settings as kinds of the settings table.

Their defaults, bounds and README wording are stated once, in the fields below, and read by
the one `Reader` (table.py) like every other section; `read_hooks` / `read_webhook` add what
the table cannot say (the URL's form, the signing secret inline or from a file). The hand-off
package (handoff/) runs what these settings describe.

    hooks:
      on_done: ["/usr/local/bin/publish", "--fast"]   # optional
      on_failed: ["/usr/local/bin/alert"]             # optional
      timeout_seconds: 60     # per run; then SIGTERM to the group, SIGKILL 2 s later
      max_parallel: 4         # hooks running at once
      retries: 3              # further runs after a failure or timeout
    webhook:
      url: https://example.com/watchfolder            # http:// allowed
      secret: ${WEBHOOK_SECRET}                       # or secret_file: /path/to/file
      timeout_seconds: 10                             # waiting for the answer
      connect_timeout_seconds: 5
      max_age_hours: 24                               # keep trying this long, then drop
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watchfolder.config.secret import Secret
from watchfolder.config.table import (
    Reader,
    argv,
    integer,
    known_keys,
    number,
    shown_default,
    spec_of,
    special,
    table_keys,
)


@dataclass(frozen=True)
class HookSettings:
    on_done: tuple[str, ...] | None = argv()
    on_failed: tuple[str, ...] | None = argv()
    timeout_seconds: float = number(60.0, 0.1)
    max_parallel: int = integer(4, 1)
    retries: int = integer(3, 0)

    def argv_for(self, event: str) -> tuple[str, ...] | None:
        """The command for a manifest's `event` (done or failed), None when there is none."""
        return {"done": self.on_done, "failed": self.on_failed}.get(event)


@dataclass(frozen=True)
class WebhookSettings:
    url: str = special("", shown="required")
    secret: Secret = special(factory=lambda: Secret(""), shown="required", secret=True,
                             hidden=True)
    # Read into `secret` and not kept, as api.key_file is.
    secret_file: Path | None = special(shown="none", secret=True, hidden=True)
    timeout_seconds: float = number(10.0, 0.1)
    connect_timeout_seconds: float = number(5.0, 0.1)
    max_age_hours: float = number(24.0, 1)

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data for check-config, the secret replaced by a marker."""
        return {"url": display_url(self.url), "secret": "<set>" if self.secret else "<not set>",
                "timeout_seconds": self.timeout_seconds,
                "connect_timeout_seconds": self.connect_timeout_seconds,
                "max_age_hours": self.max_age_hours}


HANDOFF_SECTIONS: dict[str, type] = {"hooks": HookSettings, "webhook": WebhookSettings}


def handoff_reference() -> dict[str, str]:
    """`hooks.key` / `webhook.key` → its default as the README's reference states it."""
    return {f"{prefix}.{f.name}": shown_default(f)
            for prefix, cls in HANDOFF_SECTIONS.items()
            for f in fields(cls) if spec_of(f) is not None}


def read_hooks(r: Reader, raw: Any, path: str = "hooks") -> HookSettings | None:
    """The `hooks:` mapping; None when it is absent or not a mapping."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        r.mapping(raw, path, set())  # reports "must be a mapping"
        return None
    r.mapping(raw, path, table_keys(HookSettings), hint=known_keys)
    settings: HookSettings = r.section(raw, path, HookSettings, checked=True)
    return settings


def read_webhook(r: Reader, raw: Any, path: str = "webhook") -> WebhookSettings | None:
    """The `webhook:` mapping; None when it is absent or has a problem."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        r.mapping(raw, path, set())
        return None
    before = len(r.problems)
    data = r.mapping(raw, path, table_keys(WebhookSettings), hint=known_keys)
    url = ""
    if data.get("url") is None:
        r.fail(f"{path}.url", "is required: where to POST each manifest")
    else:
        url = r.text(data, "url", path) or ""
        parts = urlsplit(url)
        if isinstance(data["url"], str) and (parts.scheme not in ("http", "https")
                                             or not parts.hostname):
            r.fail(f"{path}.url", f"must be an http(s) URL, got {display_url(url)!r}")
    settings: WebhookSettings = r.section(data, path, WebhookSettings, checked=True, url=url,
                                          secret=_read_secret(r, data, path),
                                          secret_file=None)
    return None if len(r.problems) > before else settings


def _read_secret(r: Reader, data: dict[str, Any], path: str) -> Secret:
    inline, file = data.get("secret"), data.get("secret_file")
    if inline is not None and file is not None:
        r.fail(f"{path}.secret", "set either secret or secret_file, not both")
        return Secret("")
    if inline is not None:
        return r.inline_secret(inline, f"{path}.secret")
    if file is not None:
        where = f"{path}.secret_file"
        if not isinstance(file, str) or not file:
            r.fail(where, f"must be a path, got {file!r}")
            return Secret("")
        return r.secret_file(r.path(r.expand(file, where)), where)
    r.fail(f"{path}.secret", "is required: the key that signs each delivery "
                             "(e.g. secret: ${WEBHOOK_SECRET}, or secret_file)")
    return Secret("")


def parse_hooks(raw: Any, path: str = "hooks") -> tuple[HookSettings | None, list[str]]:
    """Validate a `hooks:` mapping on its own: the settings (None when absent) and every
    problem with its path."""
    r = Reader(Path.cwd())
    return read_hooks(r, raw, path), r.problems


def parse_webhook(raw: Any, path: str = "webhook", *, base_dir: Path | None = None
                  ) -> tuple[WebhookSettings | None, list[str]]:
    """Validate a `webhook:` mapping on its own; None when absent or unusable. A relative
    `secret_file` resolves against `base_dir` (the config file's folder; default: cwd)."""
    r = Reader(base_dir or Path.cwd())
    return read_webhook(r, raw, path), r.problems


def display_url(url: str) -> str:
    """scheme://host[:port]/path without user info or query, safe to print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else "<not a URL>"
