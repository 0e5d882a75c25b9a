"""The Clipdrop remove-background API, one call: bytes in, result or typed error out.

Everything `requests` can raise is turned into our own exceptions here (see errors.py), and
every status of the contract (../shared/clipdrop-api.md) maps to exactly one of them. The key
is sent in a header and never put in a message: exceptions are raised `from None` so that no
request object rides along in a traceback.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from dataclasses import dataclass

import requests

from watchfolder import __version__
from watchfolder.config import OUTPUT_FORMATS, Secret
from watchfolder.errors import (
    ApiError,
    BadResult,
    CreditsExhausted,
    EndpointMissing,
    FileRejected,
    FormatNotAcceptable,
    KeyMissing,
    KeyRefused,
    RateLimited,
    ServerError,
    TransportError,
)

USER_AGENT = f"watchfolder/{__version__} (+https://github.com/watchfolder) python-requests/" \
             f"{requests.__version__}"


@dataclass(frozen=True)
class ApiResult:
    content: bytes
    content_type: str
    credits_remaining: int | None
    credits_consumed: int | None
    seconds: float


class ApiClient:
    """Sends one image per call. Thread-safe: each thread gets its own keep-alive session."""

    def __init__(self, url: str, key: Secret, *, timeout: float = 120.0,
                 connect_timeout: float = 10.0) -> None:
        self.url = url
        self._key = key
        self.timeout = (connect_timeout, timeout)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def remove_background(self, data: bytes, *, filename: str, mime: str,
                          output_format: str = "png",
                          transparency: str = "return_input_if_non_opaque") -> ApiResult:
        """POST the original bytes; return the result or raise an ApiError subclass."""
        headers = {"x-api-key": self._key.reveal(), "Accept": OUTPUT_FORMATS[output_format]}
        started = time.monotonic()
        try:
            response = self._session().post(
                self.url,
                headers=headers,
                files={"image_file": (filename, data, mime)},
                data={"transparency_handling": transparency},
                timeout=self.timeout,
            )
            content = response.content
        except requests.Timeout:
            raise TransportError(f"no answer within {self.timeout[1]:g} s (timed out)") from None
        except requests.ConnectionError as exc:
            raise TransportError(f"connection failed: {_short(exc)}") from None
        except requests.RequestException as exc:
            raise TransportError(f"transfer failed: {_short(exc)}") from None
        seconds = time.monotonic() - started
        status = response.status_code
        if status == 200:
            expected = response.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and int(expected) != len(content):
                raise BadResult(f"truncated result: {len(content)} of {expected} bytes", 200)
            return ApiResult(
                content=content,
                content_type=response.headers.get("Content-Type", ""),
                credits_remaining=_int_header(response, "x-remaining-credits"),
                credits_consumed=_int_header(response, "x-credits-consumed"),
                seconds=seconds,
            )
        raise error_for(status, _error_message(response, content),
                        response.headers.get("Retry-After"))


def error_for(status: int, message: str, retry_after: str | None = None) -> ApiError:
    """Map a non-200 status of the contract to the exception that carries its policy."""
    if status == 400:
        return FileRejected(message, status)
    if status == 401:
        return KeyMissing(f"the API says the key is missing: {message}", status)
    if status == 402:
        return CreditsExhausted(f"no credits left on the account: {message}", status)
    if status == 403:
        return KeyRefused(f"the API key is invalid or revoked: {message}", status)
    if status in (404, 405):
        return EndpointMissing(f"api.url does not look like the remove-background endpoint "
                               f"(HTTP {status}): {message}", status)
    if status == 406:
        return FormatNotAcceptable(f"the API refused the requested output format: {message}",
                                   status)
    if status == 429:
        return RateLimited(f"rate limited: {message}", status, parse_retry_after(retry_after))
    if status == 408 or status >= 500:
        return ServerError(f"server error HTTP {status}: {message}", status,
                           parse_retry_after(retry_after))
    return FileRejected(f"HTTP {status}: {message}", status)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _error_message(response: requests.Response, content: bytes) -> str:
    if not content:
        return f"HTTP {response.status_code} with an empty body"
    try:
        body = json.loads(content)
    except ValueError:
        text = content.decode("utf-8", "replace").strip().replace("\n", " ")
        return text[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"][:500]
    return json.dumps(body)[:200]


def _int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests error, without URLs or object reprs."""
    text = str(exc)
    for marker in ("Connection reset by peer", "Connection refused", "Connection aborted",
                   "Remote end closed connection", "IncompleteRead", "Read timed out",
                   "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__
