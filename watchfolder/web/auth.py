"""Who may see and act, done the way Syncthing, Prometheus and Jupyter do it.

- **Host**: a request whose `Host` is not the listen address (or, on loopback, `localhost` /
  `127.0.0.1` / `[::1]` at its port) nor in `web.allowed_hosts` gets 421, pages and images
  included: a DNS-rebinding page cannot read the view through a name it controls.
- **Token** (`web.token`): without one the view is read-only and every action is refused. With
  one, `/?token=...` once, or the login form, sets a session cookie (`HttpOnly`,
  `SameSite=Strict`) and redirects to `/`; the cookie's value is an HMAC of the token under a
  key made at start, so a restart or a new token asks again. Everything but the login page and
  the static files needs the cookie then. Tokens are compared in constant time and never logged.
- **Actions** are POST only, and refused (403) without the cookie, or when `Origin` or
  `Sec-Fetch-Site` says another site sent them. Chromium sends `Origin: null` on a page's own
  form POST under `Referrer-Policy: no-referrer`: that is accepted when `Sec-Fetch-Site` says
  `same-origin`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request

from watchfolder.config.web import WebConfig

COOKIE = "watchfolder_session"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class Gate:
    """The rules above for one configuration of `web.*` (a reload makes a new one)."""

    def __init__(self, settings: WebConfig, bound: str, key: bytes | None = None) -> None:
        self.settings = settings
        self.bound = bound  # host:port actually listened on (the port chosen when 0)
        self._key = key or secrets.token_bytes(32)
        host, _, port = bound.rpartition(":")
        allowed = {bound.lower()}
        if host.strip("[]") in ("127.0.0.1", "::1", "localhost"):
            allowed |= {f"{name}:{port}" for name in LOOPBACK_NAMES}
        for name in settings.allowed_hosts:
            allowed.add(name)
            if ":" not in name.strip("[]") or name.endswith("]"):
                allowed.add(f"{name}:{port}")
        self.hosts = frozenset(allowed)

    @property
    def token_set(self) -> bool:
        return bool(self.settings.token)

    def host_ok(self, request: Request) -> bool:
        return request.headers.get("host", "").strip().lower() in self.hosts

    def session(self) -> str:
        """The cookie value that proves the token was given to this process."""
        return hmac.new(self._key, self.settings.token.reveal().encode("utf-8"),
                        hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        if not self.token_set or not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                   self.settings.token.reveal().encode("utf-8"))

    def logged_in(self, request: Request) -> bool:
        cookie = request.cookies.get(COOKIE)
        return self.token_set and cookie is not None and hmac.compare_digest(
            cookie.encode("utf-8", "surrogateescape"), self.session().encode())

    def may_see(self, request: Request) -> bool:
        return not self.token_set or self.logged_in(request)

    def may_act(self, request: Request) -> bool:
        """Logged in with the token, and the request comes from this page's own site."""
        return self.logged_in(request) and self.same_site(request)

    def same_site(self, request: Request) -> bool:
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True  # not a browser's cross-site request: browsers send Origin on POST
        if origin == "null":
            return fetch_site == "same-origin"
        parts = urlsplit(origin)
        return parts.netloc.lower() == request.headers.get("host", "").strip().lower() and \
            parts.scheme in ("http", "https")
