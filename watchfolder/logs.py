"""structlog set-up: JSON lines for machines, a readable console for people, never a secret.

Standard-library records (watchdog's warnings, for one) go through the same renderer, so with
`format: json` every line on stderr is one JSON object.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Hashable
from typing import Any, TextIO

import structlog

_secrets: set[str] = set()


# Scrubbing a very short "key" (a placeholder like `k` in a test config) would blank every
# letter it matches in every line; real API keys are long random strings. Such a key still never
# reaches a log through the config: `Secret` prints as '***'.
MIN_SCRUBBED_LENGTH = 8


def add_secret(value: str) -> None:
    """Never let `value` reach a log line, whatever field or traceback it hides in."""
    if len(value) >= MIN_SCRUBBED_LENGTH:
        _secrets.add(value)


def readable(text: str) -> str:
    """A file name for people: bytes that are not UTF-8 shown as `\\xff` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Outages:
    """Things that broke, each said once until it works again (thread-safe): `began` is True
    only for the first failure of an outage, `ended` only for the first success after one."""

    def __init__(self) -> None:
        self._down: set[Hashable] = set()
        self._lock = threading.Lock()

    def began(self, key: Hashable) -> bool:
        with self._lock:
            new = key not in self._down
            self._down.add(key)
        return new

    def ended(self, key: Hashable) -> bool:
        if key not in self._down:  # the usual case, without the lock
            return False
        with self._lock:
            was = key in self._down
            self._down.discard(key)
        return was


def _readable(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for name, value in event.items():
        if isinstance(value, str):
            event[name] = readable(value)
    return event


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if not _secrets:
        return event
    for name, value in event.items():
        if isinstance(value, str):
            for secret in _secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            event[name] = value
    return event


def configure(fmt: str | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging; `fmt` None picks console on a terminal."""
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (structlog.processors.JSONRenderer(ensure_ascii=False) if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _readable,
        _redact,
    ]
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # a library's warning becomes a log line, JSON like the rest
    root.setLevel(max(numeric, logging.WARNING) if numeric < logging.WARNING else numeric)
