"""The Clipdrop remove-background API, one call: bytes in, a result file or a typed error out.

Everything urllib3 (or `requests`, setting a connection up) can raise is turned into our own
exceptions here (see errors.py), and every status of the contract (../shared/clipdrop-api.md)
maps to exactly one of them; a redirect is never followed (the key would go along), it is
`EndpointMissing`. The key
is sent in a header and never put in a message: exceptions are raised `from None` so that no
request object rides along in a traceback.

Two defences against a server that misbehaves:

- `timeout` bounds the whole request (connect, upload, headers, every byte of the answer).
  Socket timeouts only bound the wait for the next byte, so a server trickling one byte a
  second would hold a request slot for as long as it likes; the client's one watchdog thread
  shuts the connection's socket down when the request's time is up (deadline.py).
- The answer is streamed, never read whole: to the caller's file (written, flushed, fsynced)
  with its SHA-256 computed on the way, and never beyond `max_bytes`, so a 300 MB body costs
  one 64 KiB buffer and stops at the bound.

The only file this module touches is the one the caller names in `dest`.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import requests
import urllib3
from requests.utils import DEFAULT_ACCEPT_ENCODING
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.filepost import encode_multipart_formdata

from watchfolder import __version__
from watchfolder.config.settings import OUTPUT_FORMATS, Secret
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
from watchfolder.pipeline.deadline import Deadline, DeadlineAdapter, Watchdog

USER_AGENT = f"watchfolder/{__version__} (+https://github.com/watchfolder) python-requests/" \
             f"{requests.__version__}"

_CHUNK = 64 * 1024
# An error body is a short JSON message; more than this is not worth reading.
_MAX_ERROR_BODY = 64 * 1024
# An answer up to this size is kept in memory as well as written to its file.
SMALL_BODY = 256 * 1024
# Room for a result's container (PNG chunks, WEBP/JPEG headers, metadata) beyond its pixels.
_RESULT_SLACK = 1 << 20
# Inputs are at most 25 megapixels and 30 MB (the API's limits).
_API_MAX_PIXELS = 25_000_000
_API_MAX_INPUT = 30_000_000


def max_result_bytes(width: int, height: int, input_size: int) -> int:
    """The most bytes a genuine result for a `width` x `height` input of `input_size` bytes
    can have: 6 bytes a pixel (an 8-bit RGBA PNG stored without compression is 4, a JPEG or
    WEBP at its worst stays below 6) plus 1 MiB of container, or the input itself (returned
    unchanged when it already has transparency), whichever is larger."""
    return max(6 * width * height, input_size) + _RESULT_SLACK


DEFAULT_MAX_BYTES = max_result_bytes(_API_MAX_PIXELS, 1, _API_MAX_INPUT)
"""The bound when the caller gives none: the largest input the API accepts (151 MB)."""


@dataclass(frozen=True)
class Form:
    """A request's multipart body and the format it asks for, encoded ahead of its turn (a
    request that waits for a slot goes the moment it has one)."""

    body: bytes = field(repr=False)
    content_type: str
    accept: str


def form(data: bytes, *, filename: str, mime: str, output_format: str = "png",
         transparency: str = "return_input_if_non_opaque") -> Form:
    """The request for `data`: the fields in the order requests sends them (form data, then
    files)."""
    body, content_type = encode_multipart_formdata(
        [("transparency_handling", transparency), ("image_file", (filename, data, mime))])
    return Form(body, content_type, OUTPUT_FORMATS[output_format])


@dataclass(frozen=True)
class ApiResult:
    """A 200 answer. Its body is in `path` (complete, flushed and fsynced) when the caller gave
    `dest`, and in `body` too when it is small (`SMALL_BODY`: checked without reading the
    file back); otherwise in memory (`content`), for tools."""

    path: Path | None
    size: int
    sha256: str
    content_type: str
    credits_remaining: int | None
    credits_consumed: int | None
    seconds: float
    body: bytes | None = field(default=None, repr=False)
    # Writing `dest` failed (disk full, I/O error) after the answer came: the whole answer is
    # in `body` instead (it was paid for), and this says why.
    spool_error: OSError | None = None

    @property
    def content(self) -> bytes:
        """The body as bytes (read from `path` when it was streamed to a file)."""
        if self.body is not None:
            return self.body
        assert self.path is not None
        return self.path.read_bytes()


class ApiClient:
    """Sends one image per call. Thread-safe: each thread gets its own keep-alive connection
    pool.

    `requests` is used to set the connection up, once per thread: the environment's proxies
    (`HTTPS_PROXY`, `NO_PROXY`), CA bundle (`REQUESTS_CA_BUNDLE`) and TLS settings are read
    as a `requests.Session` would, once, at the first request, and requests' adapter builds
    the pool.
    Each request then goes to urllib3's pool directly: a `Session` call costs about 0.45 ms
    of CPU more per request (reading the environment and ~/.netrc again, preparing, cookies,
    hooks, the redirect machinery), 60 % of the whole call on loopback.
    """

    def __init__(self, url: str, key: Secret, *, timeout: float = 120.0,
                 connect_timeout: float = 10.0) -> None:
        self.url = url
        self._key = key
        self.timeout = (min(connect_timeout, timeout), timeout)
        self._pool_timeout = urllib3.Timeout(connect=self.timeout[0], read=self.timeout[1])
        self._local = threading.local()
        self._adapters: list[DeadlineAdapter] = []
        self._lock = threading.Lock()
        self.watchdog = Watchdog()
        self._environment: dict[str, Any] | None = None

    def _route(self) -> _Route:
        route: _Route | None = getattr(self._local, "route", None)
        if route is None:
            with self._lock:
                if self._environment is None:
                    with requests.Session() as session:
                        self._environment = dict(session.merge_environment_settings(
                            self.url, {}, None, None, None))
                environment: dict[str, Any] = self._environment
            adapter = DeadlineAdapter()
            stub = requests.Request("POST", self.url).prepare()
            proxies, verify = environment["proxies"], environment["verify"]
            pool = cast(HTTPConnectionPool, adapter.get_connection_with_tls_context(
                stub, verify, proxies=proxies, cert=environment["cert"]))
            adapter.cert_verify(pool, self.url, verify, environment["cert"])
            route = _Route(adapter, pool, adapter.request_url(stub, proxies))
            self._local.route = route
            with self._lock:
                self._adapters.append(adapter)
        return route

    def close(self) -> None:
        """Close the connections and stop the watchdog thread (a later call starts them
        again)."""
        with self._lock:
            for adapter in self._adapters:
                adapter.close()
            self._adapters.clear()
        self._local = threading.local()
        self.watchdog.close()

    def remove_background(self, data: bytes, *, filename: str, mime: str,
                          dest: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                          output_format: str = "png",
                          transparency: str = "return_input_if_non_opaque") -> ApiResult:
        """POST the original bytes; return the result or raise an ApiError subclass
        (`form`, then `post`)."""
        return self.post(form(data, filename=filename, mime=mime, output_format=output_format,
                              transparency=transparency), dest=dest, max_bytes=max_bytes)

    def post(self, request: Form, *, dest: Path | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES) -> ApiResult:
        """POST an encoded request; return the result or raise an ApiError subclass.

        With `dest`, a 200 body is streamed into that file (created or truncated, then
        flushed and fsynced; removed again if anything fails); a small one is kept in `body`
        too. A body longer than `max_bytes` (see `max_result_bytes`) is not read further:
        BadResult. The whole call takes at most `timeout` seconds: TransportError. When
        writing `dest` fails (the disk is full or failing), the rest is read into memory and
        the answer returned with `body` and `spool_error`, `dest` removed: it was paid for,
        and the caller keeps it.
        """
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": DEFAULT_ACCEPT_ENCODING,
                   "Accept": request.accept, "Connection": "keep-alive",
                   "x-api-key": self._key.reveal(), "Content-Type": request.content_type,
                   "Content-Length": str(len(request.body))}
        body = request.body
        started = time.monotonic()
        with Deadline(self.timeout[1], self.watchdog) as deadline:
            try:
                route = self._route()
                response = route.pool.urlopen(
                    "POST", route.target, body=body, headers=headers, redirect=False,
                    assert_same_host=False, preload_content=False, decode_content=False,
                    retries=route.adapter.max_retries, timeout=self._pool_timeout,
                    chunked=False)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                raise self._transport_error(exc, deadline) from None
            reading = _Reading(response)
            with reading:
                status = response.status
                if status != 200:
                    content = b"".join(self._body(reading, deadline, _MAX_ERROR_BODY,
                                                  cut_off=True))
                    raise error_for(status, _error_message(status, content),
                                    response.headers.get("Retry-After"),
                                    response.headers.get("Location"))
                declared = _declared_length(response)
                if declared is not None and declared > max_bytes:
                    raise BadResult(f"result too large: the API announced {declared:,} bytes, "
                                    f"more than the {max_bytes:,} this image can need", 200)
                chunks = self._body(reading, deadline, max_bytes)
                if dest is None:
                    buffer = io.BytesIO()
                    size, digest = _copy(chunks, buffer)
                    kept: bytes | None = buffer.getvalue()
                    spool_error: OSError | None = None
                else:
                    size, digest, kept, spool_error = _write_file(chunks, dest)
        if declared is not None and declared != size:  # a Content-Length the body broke
            if dest is not None:
                dest.unlink(missing_ok=True)
            raise BadResult(f"truncated result: {size} of {declared} bytes", 200)
        return ApiResult(
            path=dest,
            size=size,
            sha256=digest,
            content_type=response.headers.get("Content-Type", ""),
            credits_remaining=_int_header(response, "x-remaining-credits"),
            credits_consumed=_int_header(response, "x-credits-consumed"),
            seconds=time.monotonic() - started,
            body=kept,
            spool_error=spool_error,
        )

    def _body(self, reading: _Reading, deadline: Deadline, limit: int, *,
              cut_off: bool = False) -> Iterator[bytes]:
        """The body in chunks, at most `limit` bytes: beyond it, stop reading and raise
        BadResult (or, with `cut_off`, end quietly: an error message needs no more)."""
        seen = 0
        try:
            for chunk in reading.response.stream(_CHUNK, decode_content=True):
                if not chunk:
                    continue
                seen += len(chunk)
                if seen > limit:
                    if cut_off:
                        yield chunk[:len(chunk) - (seen - limit)]
                        return
                    raise BadResult(f"result too large: more than the {limit:,} bytes this "
                                    f"image can need; stopped reading", 200)
                yield chunk
                if deadline.expired:  # only reached when the watchdog could not abort the socket
                    raise TransportError(deadline.message())
            reading.complete = True
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._transport_error(exc, deadline, body=True) from None

    def _transport_error(self, exc: BaseException, deadline: Deadline, *,
                         body: bool = False) -> TransportError:
        """Our error for what urllib3 (or requests, setting a connection up) raised, worded
        as before: `body` for a failure while the answer's body was read."""
        if deadline.expired:
            return TransportError(deadline.message())
        reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason else exc
        if isinstance(reason, ConnectTimeoutError) and not isinstance(reason,
                                                                      NewConnectionError):
            return TransportError(f"could not connect within {self.timeout[0]:g} s (timed out)")
        if isinstance(reason, ReadTimeoutError) and not body:
            return TransportError(f"no answer within {self.timeout[1]:g} s (timed out)")
        if body and isinstance(reason, (ProtocolError, DecodeError)):
            return TransportError(f"transfer failed: {_short(exc)}")
        if isinstance(reason, (urllib3.exceptions.HTTPError, OSError,
                               requests.ConnectionError)):
            return TransportError(f"connection failed: {_short(exc)}")
        return TransportError(f"transfer failed: {_short(exc)}")


@dataclass
class _Route:
    """One thread's way to the API: its adapter, the pool it built, the URL to ask it for
    (the path, or the whole URL through a plain HTTP proxy)."""

    adapter: DeadlineAdapter
    pool: HTTPConnectionPool
    target: str


class _Reading:
    """An answer being read: on exit, a connection read to the end goes back to its pool
    for the next request (keep-alive); one left mid-answer is closed, as requests does."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self.response = response
        self.complete = False

    def __enter__(self) -> _Reading:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.complete:
            self.response.close()
        self.response.release_conn()


def _copy(chunks: Iterator[bytes], handle: BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        handle.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _write_file(chunks: Iterator[bytes],
                dest: Path) -> tuple[int, str, bytes | None, OSError | None]:
    """Stream into `dest`, then flush and fsync: (size, sha256, the body if it is small (at
    most `SMALL_BODY`) else None, None). When the disk refuses (full, I/O error), the rest of
    the body is read into memory and what was written read back: (size, sha256, the whole
    body, the error), `dest` removed. The partial file is removed on any other failure too."""
    digest = hashlib.sha256()
    size = 0
    written = 0  # bytes known to be in `dest` (unbuffered writes: no doubt about a failure)
    small: list[bytes] | None = []  # the body, while it is small
    try:
        with dest.open("wb", buffering=0) as handle:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if small is not None and size <= SMALL_BODY:
                    small.append(chunk)
                else:
                    small = None
                view = memoryview(chunk)
                try:
                    while view:
                        done = handle.write(view) or 0
                        written += done
                        view = view[done:]
                except OSError as exc:
                    rest = [bytes(view), *chunks]  # the body goes on arriving: it is paid for
                    for more in rest[1:]:
                        digest.update(more)
                        size += len(more)
                    kept = _read_back(dest, written) + b"".join(rest)
                    dest.unlink(missing_ok=True)
                    return size, digest.hexdigest(), kept, exc
            handle.flush()
            try:
                os.fsync(handle.fileno())
            except OSError as exc:
                kept = _read_back(dest, written)
                dest.unlink(missing_ok=True)
                return size, digest.hexdigest(), kept, exc
    except BaseException:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise
    return size, digest.hexdigest(), None if small is None else b"".join(small), None


def _read_back(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def _declared_length(response: urllib3.BaseHTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def error_for(status: int, message: str, retry_after: str | None = None,
              location: str | None = None) -> ApiError:
    """Map a non-200 status of the contract to the exception that carries its policy."""
    if 300 <= status < 400:
        # Never followed: the key would go along to wherever it points.
        return EndpointMissing(f"api.url is redirected (HTTP {status}"
                               f"{f' to {location}' if location else ''}); set it to the "
                               f"remove-background endpoint itself", status)
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


def _error_message(status: int, content: bytes) -> str:
    if not content:
        return f"HTTP {status} with an empty body"
    try:
        body = json.loads(content)
    except ValueError:
        text = content.decode("utf-8", "replace").strip().replace("\n", " ")
        return text[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"][:500]
    return json.dumps(body)[:200]


def _int_header(response: urllib3.BaseHTTPResponse, name: str) -> int | None:
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
