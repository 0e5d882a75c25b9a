"""The `web:` section: where the daemon serves its web view, its token, the names it answers to.

`listen` is `host:port` or `off` (YAML reads a bare `off` as false: both turn it off). The
token comes from `token` (`${VAR}` works), `token_file`, or the systemd credential
`watchfolder-web-token`; without one the view is read-only. An address that is not loopback
requires a token. The token is a `Secret`: `check-config` shows `***`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchfolder.config.secret import Secret
from watchfolder.config.table import ENV_REF, Reader, not_a_key, special, table_keys

DEFAULT_LISTEN = "127.0.0.1:8470"
CREDENTIAL_NAME = "watchfolder-web-token"
MIN_TOKEN = 8  # shorter could be guessed, and the log scrubber hides 8 characters and up


@dataclass(frozen=True)
class WebConfig:
    # None: off; the default address, when taken, only logs a warning
    listen: str | None = special(DEFAULT_LISTEN)
    token: Secret = special(factory=lambda: Secret(""), shown="none", secret=True)
    token_file: Path | None = special(shown="none")
    allowed_hosts: tuple[str, ...] = special((), shown="none")
    listen_given: bool = not_a_key(False)  # set in the file: a taken address stops the start
    token_source: str = not_a_key("none")  # where the token came from (never the token)

    def redacted(self) -> dict[str, Any]:
        """For `check-config`: the token as `***`, `off` for no address."""
        return {"listen": self.listen or "off", "token": "***" if self.token else "<not set>",
                "token_file": str(self.token_file) if self.token_file else None,
                "allowed_hosts": list(self.allowed_hosts)}


def read_web(c: Reader, raw: Any) -> WebConfig:
    data = c.mapping(raw, "web", table_keys(WebConfig))
    given = "listen" in data
    listen = _listen(c, data.get("listen", DEFAULT_LISTEN))
    token, source, token_path = _token(c, data)
    hosts_raw = data.get("allowed_hosts") or []
    if not isinstance(hosts_raw, list) or not all(isinstance(h, str) and h.strip()
                                                  for h in hosts_raw):
        c.fail("web.allowed_hosts", "must be a list of host names (studio.local, "
                                    "studio.local:8470)")
        hosts_raw = []
    if listen is not None and not token and not is_loopback(listen):
        c.fail("web.listen", f"{listen} is reachable from other machines: set web.token "
                             f"(or web.token_file, or the systemd credential {CREDENTIAL_NAME})"
                             f" so only people with it can see and act, or listen on 127.0.0.1")
    return WebConfig(listen=listen, token=token, token_file=token_path,
                     allowed_hosts=tuple(h.strip().lower() for h in hosts_raw),
                     listen_given=given, token_source=source)


def _listen(c: Reader, value: Any) -> str | None:
    if value is False or value is None or (isinstance(value, str)
                                           and value.strip().lower() == "off"):
        return None
    if isinstance(value, str):
        listen = c.expand(value.strip(), "web.listen")
        if re.match(r"^[\w.\-\[\]:]*:\d+$", listen):
            return listen
    c.fail("web.listen", f"must be host:port or off, e.g. 127.0.0.1:8470; got {value!r}")
    return None


def _token(c: Reader, data: dict[str, Any]) -> tuple[Secret, str, Path | None]:
    inline = data.get("token")
    token_file = c.text(data, "token_file", "web")
    if inline is not None and token_file:
        c.fail("web.token", "set either web.token or web.token_file, not both")
    token, source, path = Secret(""), "none", None
    if inline is not None:
        token = c.inline_secret(inline, "web.token")
        source = "environment" if isinstance(inline, str) and ENV_REF.search(inline) \
            else "config file (inline)"
    elif token_file:
        path = c.path(token_file)
        token, source = c.secret_file(path, "web.token_file", noun="token file "), f"file {path}"
    else:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
            token = c.secret_file(Path(creds) / CREDENTIAL_NAME, "web.token",
                                  noun="token file ")
            source = "systemd credential"
    if token and len(token.reveal()) < MIN_TOKEN:
        c.fail("web.token", f"must be at least {MIN_TOKEN} characters "
                            f"(e.g. `openssl rand -hex 16`)")
    return token, source, path


def is_loopback(listen: str) -> bool:
    """Whether `host:port` is reachable from this machine only."""
    host = listen.rpartition(":")[0].strip("[]")  # empty: every interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
