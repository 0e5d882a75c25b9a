"""Values that never show their secret: the API key, the webhook's secret (`Secret`) and a
coordination store's URL with its password (`StoreUrl`)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


class StoreUrl:
    """A coordination store's URL (`redis://user:password@host:6379/0`): the password in it is
    a secret, so repr, str and `check-config` show the URL with `***` in its place."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def password(self) -> str | None:
        return urlsplit(self._value).password

    def redacted(self) -> str:
        parts = urlsplit(self._value)
        if parts.password is None:
            return self._value
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreUrl) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"StoreUrl({self.redacted()!r})"

    __str__ = redacted


def store_url_problem(text: str) -> str | None:
    """What is wrong with a coordination store URL, said without its password; None if fine."""
    shown = StoreUrl(text).redacted()
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss"):
        return f"must be a redis:// or rediss:// URL, got {shown!r}"
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return f"has an invalid port: {shown!r}"
    if not parts.hostname:
        return f"names no host: {shown!r}"
    if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
        return f"the path must be a database number (/0), got {shown!r}"
    if parts.query or parts.fragment:
        return f"takes no ?options or #fragment: {shown!r}"
    return None
