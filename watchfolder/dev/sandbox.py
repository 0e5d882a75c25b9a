"""A local stand-in for the Clipdrop remove-background API.

The sandbox honours the contract in ``clipdrop-api.md`` closely enough that the daemon, its
tests, the demo and the benchmarks never need the real service: the same endpoint, headers,
status codes and error bodies, per-key credits and a sliding 60-second rate limit. It can
also misbehave on purpose (latency, random 500s and a FIFO plan of faults such as resets,
hangs and truncated bodies) so the client's defences are tested against a real socket.

The "background removal" is a modest, honest imitation and **not** a neural matting model:
the backdrop colour is estimated from the image border, and pixels close to that colour that
are connected to the border are knocked out with a soft edge. It works for products shot on
plain seamless paper or a green screen, which is what the tests and samples use.

Order of checks for ``POST /remove-background/v1`` (each request):

    planned fault (consumed first, so tests are deterministic)
    401 no key -> 403 unknown key -> 429 rate limit -> random 500 (fail_rate)
    -> 402 no credits -> 400 bad request -> 406 Accept -> 200 result

Named faults (``FAULTS``; an int status 400-599 answers that status with a JSON error):

    429-date, 429-none  429 with an HTTP-date Retry-After, or none at all
    500-empty, 500-html 500 with an empty body, or an HTML page
    reset, hang         a TCP reset; no answer at all (for ``hang_seconds`` at most)
    truncated           a 200 that sends half its promised body, then closes
    garbage, wrong-size a 200 that is not an image; a valid image of other dimensions
    undecodable         a 200 PNG of the right size, every chunk's CRC right, whose pixel
                        data does not decode (a row with an invalid filter type)
    trickle             a 200 whose headers come at once and whose body (a valid cut-out)
                        comes one byte every ``trickle_seconds``
    trickle-headers     the same, but the status line and headers trickle too
    huge                a 200 of ``huge_bytes``: a valid cut-out followed by zeros, with a
                        Content-Length that says so (streamed: the sandbox holds 1 MiB)
    huge-unsized        the same without Content-Length: the body ends when the connection does

A trickle lasts ``hang_seconds`` at most, then the connection is closed mid-answer.

Typical use in a test::

    with Sandbox(keys=["k"], credits=3) as sandbox:
        requests.post(sandbox.url, headers={"x-api-key": "k"}, files=..., timeout=5)
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import email.message
import email.parser
import email.utils
import hashlib
import io
import itertools
import json
import logging
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, cast

from PIL import Image, ImageChops, ImageFilter, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

__all__ = [
    "API_PATH",
    "FAULTS",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "RequestRecord",
    "Sandbox",
    "add_arguments",
    "remove_backdrop",
    "run",
]

log = logging.getLogger(__name__)

API_PATH = "/remove-background/v1"
MAX_IMAGE_BYTES = 30_000_000
"""30 MB read as decimal megabytes: the stricter reading, so a client that passes here passes
the vendor too."""
MAX_IMAGE_PIXELS = 25_000_000
TRANSPARENCY_MODES = ("return_input_if_non_opaque", "discard_alpha_layer")
FAULTS = (
    "429-date",
    "429-none",
    "500-empty",
    "500-html",
    "reset",
    "hang",
    "truncated",
    "garbage",
    "wrong-size",
    "undecodable",
    "trickle",
    "trickle-headers",
    "huge",
    "huge-unsized",
)
"""Named faults for :meth:`Sandbox.add_faults`; an int status code (400-599) is a fault too."""

Fault = int | str

# Bodies above this are drained and refused without being held in memory.
_MAX_BODY = 64 * 1024 * 1024
# Idle keep-alive connections are closed after this, so a forgotten client does not keep a
# handler thread alive forever.
_IDLE_TIMEOUT = 60.0
_WINDOW = 60.0
_MASK_SIDE = 512
_WHITE = (255, 255, 255)
# Huge bodies are written from one block of zeros, so the sandbox itself stays small.
_HUGE_BLOCK = 1 << 20

_ACCEPTED = {
    "image/png": "png",
    "image/webp": "webp",
    "image/jpg": "jpeg",
    "image/jpeg": "jpeg",
    "*/*": "png",
    "image/*": "png",
}
_CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
_MESSAGES = {
    400: "Bad request",
    401: "No api key provided",
    402: "Not enough credits",
    403: "Invalid api key",
    404: "Not found",
    405: "Method not allowed",
    406: "Accept header not acceptable",
    429: "Too many requests",
    500: "Internal server error",
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RequestRecord:
    """What the sandbox saw and answered for one request, for tests to assert on.

    ``status`` is 0 when no HTTP response was sent (``reset`` and ``hang`` faults).
    ``key`` is kept in-process only and left out of ``repr`` so assertion output never
    shows it.
    """

    time: float
    key: str | None = field(repr=False)
    status: int
    accept: str | None
    transparency_handling: str | None
    filename: str | None
    content_type: str | None
    sha256: str | None
    size: int | None
    result_type: str | None = None
    fault: str | None = None
    ms: float = 0.0
    connection: int = 0


@dataclass
class _Answer:
    """A decided response; the handler applies latency, records it, then sends it."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    action: str = "send"  # send | reset | hang | truncate | trickle | trickle-headers | huge
    sized: bool = True  # huge: announce the Content-Length
    fault: str | None = None


@dataclass(frozen=True)
class _Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _error(status: int, message: str | None = None, **headers: str) -> _Answer:
    body = json.dumps({"error": message or _MESSAGES.get(status, HTTPStatus(status).phrase)})
    return _Answer(status, body.encode(), headers=dict(headers))


# --------------------------------------------------------------------------- multipart


def parse_multipart(body: bytes, content_type: str | None) -> dict[str, _Part]:
    """Split a ``multipart/form-data`` body into named parts (the first of each name wins).

    A small parser instead of the removed ``cgi`` module: it slices the body on the boundary
    without decoding it, so binary image data passes through untouched and 30 MB parse fast.
    Raises ValueError on anything that is not well-formed multipart.
    """
    header = email.message.Message()
    header["content-type"] = content_type or ""
    if header.get_content_type() != "multipart/form-data":
        raise ValueError("request body must be multipart/form-data")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("multipart/form-data without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    separator = b"\r\n" + delimiter

    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        found = body.find(separator)
        if found < 0:
            raise ValueError("multipart body has no boundary")
        pos = found + len(separator)

    parts: dict[str, _Part] = {}
    while not body.startswith(b"--", pos):
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise ValueError("malformed multipart boundary line")
        start = line_end + 2
        end = body.find(separator, start)
        if end < 0:
            raise ValueError("multipart body is truncated (no closing boundary)")
        head_end = body.find(b"\r\n\r\n", start, end)
        if head_end < 0:
            raise ValueError("multipart part without headers")
        head = body[start:head_end].decode("utf-8", "replace")
        headers = email.parser.Parser().parsestr(head, headersonly=True)
        name = headers.get_param("name", header="content-disposition")
        if name is not None:
            name = email.utils.collapse_rfc2231_value(name)
        if name and name not in parts:
            parts[name] = _Part(
                name=name,
                filename=headers.get_filename(),
                content_type=headers.get("content-type"),
                data=body[head_end + 4 : end],
            )
        pos = end + len(separator)
    return parts


# --------------------------------------------------------------------------- images

# Only the three accepted formats are tried, through their plugin classes directly. That
# keeps the process-wide ``Image.MAX_IMAGE_PIXELS`` untouched (the daemon's own code shares
# this process in tests) while skipping Pillow's decompression-bomb check, which lives in
# ``Image.open``: the 25 MP rule below, read from the header, is the one that answers.
_OPENERS: tuple[tuple[str, Callable[[bytes], bool], Callable[[io.BytesIO], Image.Image]], ...] = (
    ("png", lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"), PngImagePlugin.PngImageFile),
    ("jpeg", lambda d: d.startswith(b"\xff\xd8\xff"), JpegImagePlugin.JpegImageFile),
    ("webp", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", WebPImagePlugin.WebPImageFile),
)
_OPEN_ERRORS = (SyntaxError, OSError, ValueError, IndexError, TypeError, EOFError, struct.error)


def _sniff(data: bytes) -> tuple[str, Image.Image] | None:
    """Identify a PNG, JPEG or WEBP from its bytes and read its header (no pixels decoded)."""
    for fmt, accepts, opener in _OPENERS:
        if accepts(data):
            try:
                return fmt, opener(io.BytesIO(data))
            except _OPEN_ERRORS:
                return None
    return None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _is_non_opaque(image: Image.Image) -> bool:
    if not _has_alpha(image):
        return False
    low, _ = image.convert("RGBA").getchannel("A").getextrema()
    return cast(int, low) < 255


def _to_rgb(image: Image.Image) -> Image.Image:
    # Palette transparency must go through RGBA, or Pillow warns (an error under pytest).
    if _has_alpha(image) and image.mode != "RGBA":
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _distance(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """Per-pixel colour distance to ``colour``: the largest channel difference, as "L"."""
    lut = [abs(v - c) for c in colour for v in range(256)]
    red, green, blue = image.point(lut).split()
    return ImageChops.lighter(ImageChops.lighter(red, green), blue)


def _border_boxes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    width, height = size
    band = max(1, min(width, height) // 64)
    return [
        (0, 0, width, band),
        (0, height - band, width, height),
        (0, 0, band, height),
        (width - band, 0, width, height),
    ]


def _border_histogram(image: Image.Image) -> list[int]:
    total = [0] * (256 * len(image.getbands()))
    for box in _border_boxes(image.size):
        for i, count in enumerate(image.crop(box).histogram()):
            total[i] += count
    return total


def _percentile(histogram: list[int], fraction: float) -> int:
    target = sum(histogram) * fraction
    running = 0
    for value, count in enumerate(histogram):
        running += count
        if running >= target:
            return value
    return 255


def _border_connected(candidate: Image.Image) -> Image.Image:
    """Keep the 255-regions of a 0/255 "L" mask that touch the image border (4-connected).

    Works on runs of 255 per row found by ``re`` (C speed), then joins overlapping runs of
    neighbouring rows with a union-find, so a 512 px mask takes milliseconds in pure Python.
    """
    width, height = candidate.size
    data = candidate.tobytes()
    run = re.compile(rb"\xff+")
    rows: list[list[tuple[int, int, int]]] = []  # (start, end, run id) per row
    parent: list[int] = []
    for y in range(height):
        row = []
        for match in run.finditer(data, y * width, (y + 1) * width):
            row.append((match.start() - y * width, match.end() - y * width, len(parent)))
            parent.append(len(parent))
        rows.append(row)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for above, below in itertools.pairwise(rows):
        i = j = 0
        while i < len(above) and j < len(below):
            a_start, a_end, a_id = above[i]
            b_start, b_end, b_id = below[j]
            if a_start < b_end and b_start < a_end:
                parent[find(a_id)] = find(b_id)
            if a_end < b_end:
                i += 1
            else:
                j += 1

    touching = {find(r[2]) for r in rows[0] + rows[-1]}
    touching |= {find(r[2]) for row in rows for r in row if r[0] == 0 or r[1] == width}
    out = bytearray(width * height)
    for y, row in enumerate(rows):
        for start, end, run_id in row:
            if find(run_id) in touching:
                out[y * width + start : y * width + end] = b"\xff" * (end - start)
    return Image.frombytes("L", (width, height), bytes(out))


def remove_backdrop(image: Image.Image) -> Image.Image:
    """Knock out a plain studio backdrop; returns an RGBA image of the same size.

    Not a neural matting model: the backdrop colour is the median of the border pixels, and
    pixels close to it that are connected to the border become transparent. Connectivity is
    computed on a copy whose longest side is at most 512 px (fast on 25 MP images); that
    mask is grown, blurred and scaled up bilinearly, then combined with a full-resolution
    colour test, so the edge follows the real pixels (with a feather of a few pixels) and
    anything clearly unlike the backdrop, such as the subject's interior, stays opaque.
    A subject the colour of its backdrop, or backdrop seen through holes in the subject,
    are beyond it.
    """
    rgb = _to_rgb(image)
    width, height = rgb.size
    scale = max(width, height) / _MASK_SIDE
    small = rgb
    if scale > 1:
        small_size = (max(1, round(width / scale)), max(1, round(height / scale)))
        small = rgb.resize(small_size, Image.Resampling.BOX)

    histogram = _border_histogram(small)
    backdrop = cast(
        tuple[int, int, int],
        tuple(_percentile(histogram[i * 256 : (i + 1) * 256], 0.5) for i in range(3)),
    )
    small_distance = _distance(small, backdrop)
    # Tolerance follows how uneven the border is (gradients, noise, JPEG), within sane bounds.
    spread = _percentile(_border_histogram(small_distance), 0.9)
    tolerance = min(max(2 * spread + 12, 20), 90)
    ramp = max(16, tolerance // 2)

    candidate = small_distance.point(lambda v: 255 if v <= tolerance + ramp // 2 else 0)
    near = _border_connected(candidate)
    if min(near.size) >= 5:
        # Grow two (small) pixels so the mask covers the subject's edge at full resolution
        # too; where it overlaps the subject, the colour test below keeps the subject opaque.
        near = near.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.GaussianBlur(1))
        # Saturate: the blur smooths the staircase but must not leave a faint veil of
        # backdrop near concave corners.
        near = near.point(lambda v: min(255, 2 * v))
    if near.size != rgb.size:
        near = near.resize(rgb.size, Image.Resampling.BILINEAR)

    # 255 where a full-resolution pixel looks like the backdrop, fading to 0 over ``ramp``.
    likeness = _distance(rgb, backdrop).point(
        lambda v: 255 if v <= tolerance else max(0, 255 - (v - tolerance) * 255 // ramp)
    )
    alpha = ImageChops.invert(ImageChops.darker(near, likeness))
    result = rgb.convert("RGBA")
    result.putalpha(alpha.filter(ImageFilter.BoxBlur(1)))  # a feather of a few pixels
    return result


def _encode(image: Image.Image, fmt: str) -> bytes:
    """Encode a result; settings favour speed, the sandbox serves tests and benchmarks."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=1)
    elif fmt == "webp":
        image.save(buffer, "WEBP", lossless=True, quality=0, method=0, exact=True)
    else:
        flat = Image.new("RGB", image.size, _WHITE)
        flat.paste(image, mask=image.getchannel("A") if image.mode == "RGBA" else None)
        flat.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _undecodable(width: int, height: int) -> bytes:
    """An RGBA PNG of `width` x `height` whose layout, size and CRCs are all sound but whose
    last row's filter type is 7 (only 0-4 exist): only a complete decode finds it."""
    stride = 1 + 4 * width
    rows = bytearray(stride * height)
    rows[-stride] = 7

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(rows), 1)) + chunk(b"IEND", b""))


def _negotiate(accept: str | None) -> str | None:
    """Map an Accept header to png/webp/jpeg, honouring q-values; None means 406."""
    if accept is None or not accept.strip():
        return "png"
    choices: list[tuple[float, str]] = []
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            choices.append((quality, media.lower()))
    choices.sort(key=lambda c: -c[0])  # stable: equal q keeps the client's order
    return next((_ACCEPTED[m] for _, m in choices if m in _ACCEPTED), None)


# --------------------------------------------------------------------------- sandbox


class Sandbox:
    """The fake API server: knobs, fault plan, accounting and a log of every request.

    Every knob passed to the constructor is also a thread-safe property that tests can
    change while the server runs; :meth:`reset` puts them back and forgets all state.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        keys: Iterable[str] = (),
        credits: int | None = None,
        rpm: int | None = 60,
        latency: float = 0.0,
        fail_rate: float = 0.0,
        hang_seconds: float = 30.0,
        trickle_seconds: float = 1.0,
        huge_bytes: int = 300_000_000,
        *,
        on_request: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.on_request = on_request
        """Called (on the handler thread) with each record, e.g. to log it."""
        self.requests: list[RequestRecord] = []
        """Every request in the order answered; ``time`` is the receipt time."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._random = random.Random()
        self._initial = (_key_set(keys), credits, rpm, latency, fail_rate, hang_seconds,
                         trickle_seconds, huge_bytes)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._restore()

    def _restore(self) -> None:
        (keys, credits, rpm, latency, fail_rate, hang_seconds, trickle_seconds,
         huge_bytes) = self._initial
        self.keys = keys
        self.rpm = rpm
        self.latency = latency
        self.fail_rate = fail_rate
        self.hang_seconds = hang_seconds
        self.trickle_seconds = trickle_seconds
        self.huge_bytes = huge_bytes
        with self._lock:
            self._default_credits = _check_credits(credits)
            self._credits: dict[str, int | None] = {}
            self._windows: dict[str, list[float]] = {}
            self._faults: list[Fault] = []
            self.requests.clear()

    # ---- knobs

    @property
    def keys(self) -> frozenset[str]:
        """Accepted keys; empty means any non-empty key is accepted."""
        return self._keys

    @keys.setter
    def keys(self, value: Iterable[str]) -> None:
        self._keys = _key_set(value)

    @property
    def credits(self) -> int | None:
        """Credits a key starts with (None: unlimited). Setting it resets every key to it."""
        return self._default_credits

    @credits.setter
    def credits(self, value: int | None) -> None:
        self.set_credits(None, value)

    @property
    def rpm(self) -> int | None:
        """Requests per sliding 60 s per key; None or 0 is unlimited."""
        return self._rpm

    @rpm.setter
    def rpm(self, value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError("rpm must be >= 0 or None")
        self._rpm = value or None

    @property
    def latency(self) -> float:
        """Seconds from a request's arrival (its headers read) to its answer: the sandbox's own
        work is counted in it, and the rest is slept (work that takes longer answers at once)."""
        return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        if value < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(value)

    @property
    def fail_rate(self) -> float:
        """Probability that an otherwise acceptable request gets a 500."""
        return self._fail_rate

    @fail_rate.setter
    def fail_rate(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        self._fail_rate = float(value)

    @property
    def hang_seconds(self) -> float:
        """How long a ``hang`` or ``trickle`` fault holds the connection at most (stop() ends
        it sooner)."""
        return self._hang_seconds

    @hang_seconds.setter
    def hang_seconds(self, value: float) -> None:
        if value < 0:
            raise ValueError("hang_seconds must be >= 0")
        self._hang_seconds = float(value)

    @property
    def trickle_seconds(self) -> float:
        """The pause before each byte of a ``trickle`` fault's answer."""
        return self._trickle_seconds

    @trickle_seconds.setter
    def trickle_seconds(self, value: float) -> None:
        if value < 0:
            raise ValueError("trickle_seconds must be >= 0")
        self._trickle_seconds = float(value)

    @property
    def huge_bytes(self) -> int:
        """The body size of a ``huge`` fault (a valid cut-out padded with zeros)."""
        return self._huge_bytes

    @huge_bytes.setter
    def huge_bytes(self, value: int) -> None:
        if value < 0:
            raise ValueError("huge_bytes must be >= 0")
        self._huge_bytes = int(value)

    # ---- state for tests

    def add_faults(self, *faults: Fault) -> None:
        """Plan faults, consumed in order, one per incoming request, before any check."""
        for fault in faults:
            _check_fault(fault)
        with self._lock:
            self._faults.extend(faults)

    @property
    def pending_faults(self) -> list[Fault]:
        """Planned faults not consumed yet."""
        with self._lock:
            return list(self._faults)

    def credits_left(self, key: str) -> int | None:
        """Credits left for ``key`` (None: unlimited)."""
        with self._lock:
            return self._credits.get(key, self._default_credits)

    def set_credits(self, key: str | None, credits: int | None) -> None:
        """Give ``key`` (or, with None, every key present and future) that many credits."""
        credits = _check_credits(credits)
        with self._lock:
            if key is None:
                self._default_credits = credits
                self._credits.clear()
            else:
                self._credits[key] = credits

    def count(self, status: int | None = None) -> int:
        """How many requests were answered with ``status`` (all requests with None)."""
        with self._lock:
            return sum(1 for r in self.requests if status is None or r.status == status)

    def max_in_window(self, seconds: float = 60.0, statuses: Iterable[int] | None = (200,)) -> int:
        """The most requests with these statuses (None: any) received within ``seconds``."""
        wanted = None if statuses is None else set(statuses)
        with self._lock:
            times = sorted(r.time for r in self.requests if wanted is None or r.status in wanted)
        best = 0
        for end, t in enumerate(times):
            start = bisect.bisect_right(times, t - seconds, 0, end)
            best = max(best, end - start + 1)
        return best

    def reset(self) -> None:
        """Forget requests, faults, rate windows and spent credits; restore initial knobs."""
        self._restore()

    # ---- life cycle

    def start(self) -> Sandbox:
        """Bind and serve on a background thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("sandbox already started")
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="watchfolder-sandbox",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, wake hanging handlers, close every connection, join all threads."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout)
        server.close_connections()
        server.join_handlers(timeout)
        self._server = self._thread = None

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no client connection is open (clients closed theirs); True if so."""
        server = self._server
        return server is None or server.join_handlers(timeout)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound."""
        if self._server is None:
            raise RuntimeError("sandbox not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """The endpoint URL, e.g. ``http://127.0.0.1:8765/remove-background/v1``."""
        host, port = self.address
        if host in ("0.0.0.0", "::"):  # a wildcard bind is reached over loopback
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}{API_PATH}"

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- deciding an answer (called by the handler thread)

    def _answer(
        self,
        receipt: float,
        key: str | None,
        accept: str | None,
        form: dict[str, _Part] | str,
        body_too_large: bool,
    ) -> _Answer:
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            return self._fault(fault, form)

        if not key:
            return _error(401, "No api key provided")
        if self._keys and key not in self._keys:
            return _error(403, "Invalid api key")

        retry_after = self._admit(key, receipt)
        if retry_after is not None:
            return _error(429, "Too many requests", **{"Retry-After": str(retry_after)})
        with self._lock:
            unlucky = self._random.random() < self._fail_rate
        if unlucky:
            answer = _error(500)
            answer.fault = "fail-rate"
            return answer

        granted, left = self._reserve_credit(key)
        if not granted:
            return _error(402, "Not enough credits", **{"x-remaining-credits": "0"})
        try:
            answer = self._process(accept, form, body_too_large)
        except Exception:
            log.exception("sandbox.process_failed")
            answer = _error(500)
        if answer.status != 200:
            if left is not None:  # a credit was taken: give it back
                self._refund_credit(key)
            return answer
        if left is not None:
            answer.headers["x-remaining-credits"] = str(left)
        answer.headers["x-credits-consumed"] = "1"
        return answer

    def _admit(self, key: str, receipt: float) -> int | None:
        """Sliding-window rate limit: None to admit, else seconds until a slot frees up."""
        with self._lock:
            window = self._windows.setdefault(key, [])
            window[:] = [t for t in window if t > receipt - _WINDOW]
            if self._rpm is not None and len(window) >= self._rpm:
                oldest = min(window)
                return max(1, math.ceil(oldest + _WINDOW - receipt))
            window.append(receipt)
            return None

    def _reserve_credit(self, key: str) -> tuple[bool, int | None]:
        """Take a credit up front so concurrent calls cannot overspend; refunded on failure.

        Returns (granted, credits left afterwards or None when unlimited).
        """
        with self._lock:
            left = self._credits.get(key, self._default_credits)
            if left is None:
                return True, None
            if left <= 0:
                return False, 0
            self._credits[key] = left - 1
            return True, left - 1

    def _refund_credit(self, key: str) -> None:
        with self._lock:
            left = self._credits.get(key, self._default_credits)
            if left is not None:
                self._credits[key] = left + 1

    def _process(
        self, accept: str | None, form: dict[str, _Part] | str, body_too_large: bool
    ) -> _Answer:
        if body_too_large:
            return _error(400, "image_file is larger than 30 MB")
        if isinstance(form, str):
            return _error(400, form)
        part = form.get("image_file")
        if part is None:
            return _error(400, "image_file is required")
        handling = form.get("transparency_handling")
        mode = handling.data.decode("utf-8", "replace").strip() if handling else None
        if mode is not None and mode not in TRANSPARENCY_MODES:
            return _error(
                400, "transparency_handling must be one of " + ", ".join(TRANSPARENCY_MODES)
            )
        data = part.data
        if len(data) > MAX_IMAGE_BYTES:
            return _error(400, "image_file is larger than 30 MB")
        sniffed = _sniff(data)
        if sniffed is None:
            return _error(400, "image_file is not a PNG, JPEG or WEBP image")
        input_format, image = sniffed
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            return _error(400, f"image_file is {width}x{height}, more than 25 megapixels")
        try:
            image.load()
        except _OPEN_ERRORS:
            return _error(400, "image_file could not be decoded (truncated or corrupt)")
        output_format = _negotiate(accept)
        if output_format is None:
            return _error(406, "Accept must be image/png, image/webp or image/jpg")

        if mode != "discard_alpha_layer" and _is_non_opaque(image):
            return _Answer(200, data, _CONTENT_TYPES[input_format])
        result = remove_backdrop(image)
        return _Answer(200, _encode(result, output_format), _CONTENT_TYPES[output_format])

    def _fault(self, fault: Fault, form: dict[str, _Part] | str) -> _Answer:
        name = str(fault)
        if isinstance(fault, int):
            headers = {"Retry-After": "1"} if fault == 429 else {}
            answer = _error(fault, **headers)
        elif fault == "429-date":
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            answer = _error(429, **{"Retry-After": when})
        elif fault == "429-none":
            answer = _error(429)
        elif fault == "500-empty":
            answer = _Answer(500, b"", content_type=None)
        elif fault == "500-html":
            page = b"<html><body><h1>502 Bad Gateway</h1>upstream hiccup</body></html>"
            answer = _Answer(500, page, "text/html; charset=utf-8")
        elif fault in ("reset", "hang"):
            answer = _Answer(0, action=fault)
        elif fault == "garbage":
            answer = _Answer(200, b"this is not an image\n" * 8, "image/png")
        else:  # truncated, wrong-size, trickle, trickle-headers, huge, huge-unsized
            width, height = _input_size(form)
            if fault == "wrong-size":
                small = (max(1, width // 2), max(1, height // 2))
                width, height = small if small != (width, height) else (width + 1, height + 1)
            png = _encode(Image.new("RGBA", (width, height), (0, 0, 0, 0)), "png")
            if fault == "undecodable":
                png = _undecodable(width, height)
            answer = _Answer(200, png, "image/png")
            if fault == "truncated":
                answer.action = "truncate"
            elif fault in ("trickle", "trickle-headers"):
                answer.action = fault
            elif fault in ("huge", "huge-unsized"):
                answer.action = "huge"
                answer.sized = fault == "huge"
        if answer.status == 200:
            answer.headers["x-credits-consumed"] = "1"
        answer.fault = name
        return answer

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)
        if self.on_request is not None:
            self.on_request(record)


def _input_size(form: dict[str, _Part] | str) -> tuple[int, int]:
    part = None if isinstance(form, str) else form.get("image_file")
    sniffed = _sniff(part.data) if part else None
    return sniffed[1].size if sniffed else (64, 48)


def _key_set(keys: Iterable[str]) -> frozenset[str]:
    if isinstance(keys, str):  # a lone key, not its characters
        keys = (keys,)
    return frozenset(k for k in keys if k)


def _check_credits(credits: int | None) -> int | None:
    if credits is not None and credits < 0:
        raise ValueError("credits must be >= 0 or None")
    return credits


def _check_fault(fault: Fault) -> None:
    if isinstance(fault, bool) or not (
        (isinstance(fault, int) and 400 <= fault <= 599) or fault in FAULTS
    ):
        raise ValueError(f"unknown fault {fault!r}: use a status 400-599 or one of {FAULTS}")


# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that can close its connections and join its handler threads.

    With ``daemon_threads`` the standard server forgets its handler threads, and an idle
    keep-alive connection parks one in ``readline()``; stop() needs both under control so
    no thread outlives the sandbox.
    """

    # socketserver's backlog of 5 drops SYNs when dozens of clients connect at once; the
    # client's retry a second later then lands outside the daemon's rate-limit margin.
    request_queue_size = 128

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.sandbox = sandbox
        self._connections: dict[threading.Thread, tuple[socket.socket, int]] = {}
        self._idle = threading.Condition()
        self._ids = itertools.count(1)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        number = next(self._ids)
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"watchfolder-sandbox-conn-{number}",
            daemon=True,
        )
        with self._idle:
            self._connections[thread] = (request, number)
        thread.start()

    def connection_number(self) -> int:
        """The number of the connection served by the calling handler thread."""
        with self._idle:
            return self._connections[threading.current_thread()][1]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._idle:
                self._connections.pop(threading.current_thread(), None)
                self._idle.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that go away mid-answer are normal here (timeouts, resets, stop()).
        if not isinstance(sys.exc_info()[1], OSError):
            log.error("sandbox.handler_error", exc_info=True)

    def close_connections(self) -> None:
        with self._idle:
            sockets = [sock for sock, _ in self._connections.values()]
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._connections, timeout)


# A marker body: bigger than we are willing to hold, already drained from the socket.
_TOO_LARGE = b"<too large>"


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: always reads the whole body, always sends Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "watchfolder-sandbox"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK and every answer takes 40 ms more than asked (measured by the benchmarks).
    disable_nagle_algorithm = True
    timeout = _IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection_id = self.server.connection_number()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the library does not print; run() logs through ``on_request``."""

    def do_POST(self) -> None:
        receipt = time.monotonic()
        body = self._read_body()
        if body is None:
            return
        if self.path.split("?", 1)[0] != API_PATH:
            self._send(_error(404, f"Not found: {self.command} {self.path.split('?', 1)[0]}"))
            return
        sandbox = self.server.sandbox
        too_large = body is _TOO_LARGE
        try:
            form: dict[str, _Part] | str = (
                {} if too_large else parse_multipart(body, self.headers.get("content-type"))
            )
        except ValueError as exc:
            form = str(exc)
        key = (self.headers.get("x-api-key") or "").strip() or None
        accept = self.headers.get("accept")
        answer = sandbox._answer(receipt, key, accept, form, too_large)
        record = self._make_record(receipt, key, accept, form, answer)
        if answer.action != "hang" and sandbox.latency:
            # `latency` is what a client reads: from the request to the answer. The sandbox's
            # own work (reading the body, the cut-out, the record) is part of it, not added
            # to it (added, it made 0.2 s answer in 0.2045 s: 2.2 % of a benchmark's rate).
            sandbox._stopping.wait(max(0.0, receipt + sandbox.latency - time.monotonic()))
        sandbox._record(replace(record, ms=(time.monotonic() - receipt) * 1000))
        if answer.action == "send":
            self._send(answer)
        elif answer.action == "truncate":
            self._send(answer, truncate=True)
        elif answer.action == "reset":
            self._reset()
        elif answer.action in ("trickle", "trickle-headers"):
            self._trickle(answer, headers_too=answer.action == "trickle-headers")
        elif answer.action == "huge":
            self._send_huge(answer)
        else:
            sandbox._stopping.wait(sandbox.hang_seconds)
            self.close_connection = True

    def _not_allowed(self) -> None:
        if self._read_body() is None:
            return
        if self.path.split("?", 1)[0] != API_PATH:
            self._send(_error(404, f"Not found: {self.command} {self.path.split('?', 1)[0]}"))
        else:
            self._send(_error(405, f"Method {self.command} not allowed", Allow="POST"))

    do_GET = do_HEAD = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed

    def _read_body(self) -> bytes | None:
        """Read the whole request body (keep-alive depends on it); None after a 400."""
        chunked = "chunked" in (self.headers.get("transfer-encoding") or "").lower()
        length_header = self.headers.get("content-length") or "0"
        try:
            if chunked:
                return self._read_chunked()
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True  # the stream cannot be resynchronised
            self._send(_error(400, "invalid Content-Length or chunked body"))
            return None
        if length > _MAX_BODY:
            self._drain(length)
            return _TOO_LARGE
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while size := int(self.rfile.readline(1024).split(b";", 1)[0].strip(), 16):
            total += size
            if total > _MAX_BODY:
                chunks.clear()
                self._drain(size)
            else:
                chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after each chunk
        while self.rfile.readline(1024).strip():
            pass  # trailer fields, ignored
        return _TOO_LARGE if total > _MAX_BODY else b"".join(chunks)

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)

    def _send(self, answer: _Answer, truncate: bool = False) -> None:
        self.send_response(answer.status)
        if answer.content_type:
            self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if truncate:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body[: len(answer.body) // 2] if truncate else answer.body)

    def _head(self, answer: _Answer, length: int | None) -> bytes:
        """The status line and headers of `answer`, for the faults that write them by hand."""
        lines = [f"{self.protocol_version} {answer.status} {HTTPStatus(answer.status).phrase}",
                 f"Server: {self.version_string()}", f"Date: {self.date_time_string()}"]
        if answer.content_type:
            lines.append(f"Content-Type: {answer.content_type}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines += [f"{name}: {value}" for name, value in answer.headers.items()]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _trickle(self, answer: _Answer, *, headers_too: bool) -> None:
        """One byte every `trickle_seconds`, for `hang_seconds` at most, then close."""
        sandbox = self.server.sandbox
        self.close_connection = True
        head = self._head(answer, len(answer.body))
        data = head + answer.body
        if not headers_too:
            self.wfile.write(head)
            data = answer.body
        deadline = time.monotonic() + sandbox.hang_seconds
        for i in range(len(data)):
            pause = sandbox.trickle_seconds
            if time.monotonic() + pause > deadline:  # out of time before the next byte
                sandbox._stopping.wait(max(0.0, deadline - time.monotonic()))
                return
            if sandbox._stopping.wait(pause):
                return
            self.wfile.write(data[i:i + 1])

    def _send_huge(self, answer: _Answer) -> None:
        """`huge_bytes` of body (the image, then zeros) in 1 MiB writes; close after."""
        sandbox = self.server.sandbox
        self.close_connection = True
        total = max(sandbox.huge_bytes, len(answer.body))
        self.wfile.write(self._head(answer, total if answer.sized else None) + answer.body)
        left = total - len(answer.body)
        block = bytes(_HUGE_BLOCK)
        while left > 0 and not sandbox._stopping.is_set():
            self.wfile.write(block[:left] if left < _HUGE_BLOCK else block)
            left -= _HUGE_BLOCK

    def _reset(self) -> None:
        """Abort with a TCP RST: linger 0, then close every reference to the socket."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()  # the makefile() reference would keep the socket open
        self.connection.close()
        # handle_one_request() flushes wfile after us; give it something harmless to flush.
        self.wfile = io.BytesIO()

    def _make_record(
        self,
        receipt: float,
        key: str | None,
        accept: str | None,
        form: dict[str, _Part] | str,
        answer: _Answer,
    ) -> RequestRecord:
        parts = {} if isinstance(form, str) else form
        image = parts.get("image_file")
        handling = parts.get("transparency_handling")
        return RequestRecord(
            time=receipt,
            key=key,
            status=answer.status,
            accept=accept,
            transparency_handling=handling.data.decode("utf-8", "replace") if handling else None,
            filename=image.filename if image else None,
            content_type=image.content_type if image else None,
            sha256=hashlib.sha256(image.data).hexdigest() if image else None,
            size=len(image.data) if image else None,
            result_type=answer.content_type if answer.status == 200 else None,
            fault=answer.fault,
            ms=(time.monotonic() - receipt) * 1000,
            connection=self.connection_id,
        )


# --------------------------------------------------------------------------- CLI


def _fault_arg(text: str) -> Fault:
    fault: Fault = int(text) if text.isdigit() else text
    try:
        _check_fault(fault)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return fault


def _rate_arg(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``watchfolder sandbox`` options to ``parser``."""
    # Pre-wrapped: the CLI uses RawDescriptionHelpFormatter for its sub-commands.
    parser.description = (
        "Run a local stand-in for the Clipdrop remove-background API\n"
        f"(POST {API_PATH}) for demos, tests and benchmarks.\n"
        "\n"
        "It honours the API contract: keys (401/403), credits (402), a sliding\n"
        "60-second rate limit (429 with Retry-After), bad requests (400) and\n"
        "the Accept header (406), and it can inject faults. The background\n"
        "removal is a modest knock-out of a plain backdrop connected to the\n"
        "image border, not a neural model.\n"
        "\n"
        "The first line printed is the URL to put in the configuration."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8765,
        help="port to bind; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY",
        help="accepted API key (repeatable); without any, every non-empty key is accepted",
    )
    parser.add_argument(
        "--credits",
        type=int,
        default=None,
        metavar="N",
        help="credits each key starts with (default: unlimited)",
    )
    parser.add_argument(
        "--rpm",
        type=int,
        default=60,
        metavar="N",
        help="requests per sliding minute per key; 0 is unlimited (default: %(default)s)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds from a request's arrival to its answer, the sandbox's own work "
        "included (default: %(default)s)",
    )
    parser.add_argument(
        "--fail-rate",
        type=_rate_arg,
        default=0.0,
        metavar="P",
        help="probability of a random 500 (default: %(default)s)",
    )
    parser.add_argument(
        "--fault",
        type=_fault_arg,
        action="append",
        default=[],
        metavar="F",
        help="a fault for the next request, in order (repeatable): a status code 400-599 or "
        + ", ".join(FAULTS)
        + ". trickle: the body comes one byte every --trickle-seconds (trickle-headers: the "
        "headers too), for --hang-seconds at most; huge: a valid image padded to "
        "--huge-bytes (huge-unsized: without Content-Length)",
    )
    parser.add_argument(
        "--hang-seconds",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a hang or trickle fault holds the connection (default: %(default)s)",
    )
    parser.add_argument(
        "--trickle-seconds",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the pause before each byte of a trickle fault (default: %(default)s)",
    )
    parser.add_argument(
        "--huge-bytes",
        type=int,
        default=300_000_000,
        metavar="N",
        help="the body size of a huge fault (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM. The first stdout line is the URL, for scripts."""
    # The handler only flips a flag: calling Event.set() from a handler can deadlock if the
    # signal lands while the main thread holds the event's own lock inside wait().
    stop_requested: list[int] = []
    tick = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)

    def on_request(record: RequestRecord) -> None:
        kind = record.fault or (record.result_type or "").removeprefix("image/") or "-"
        print(f"{record.status} {record.ms:.0f} ms {kind}", file=sys.stderr, flush=True)

    sandbox = Sandbox(
        host=args.host,
        port=args.port,
        keys=args.key or (),
        credits=args.credits,
        rpm=args.rpm,
        latency=args.latency,
        fail_rate=args.fail_rate,
        hang_seconds=args.hang_seconds,
        trickle_seconds=args.trickle_seconds,
        huge_bytes=args.huge_bytes,
        on_request=on_request,
    )
    sandbox.add_faults(*args.fault)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sandbox.start()
        print(sandbox.url, flush=True)
        print(
            f"keys: {len(sandbox.keys) or 'any'}, "
            f"credits: {'unlimited' if args.credits is None else args.credits} per key, "
            f"rpm: {sandbox.rpm or 'unlimited'}, latency: {sandbox.latency:g} s, "
            f"fail rate: {sandbox.fail_rate:g}, planned faults: {len(args.fault)}",
            flush=True,
        )
        while not stop_requested:
            tick.wait(0.2)
        print(f"stopping on {signal.Signals(stop_requested[0]).name}", file=sys.stderr, flush=True)
    finally:
        sandbox.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
