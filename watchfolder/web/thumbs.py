"""Thumbnails for the web view: libvips shrink-on-load, at most 512 px, cached by content.

`Thumbnails.get` returns WEBP bytes (alpha kept, so a cut-out shows over the page's
checkerboard) for an opened file. A thumbnail is made with `pyvips.Image.thumbnail`, which
decodes a JPEG or WEBP already shrunk and streams other formats, so even a 100 MP 16-bit TIFF
never sits whole in memory. Made thumbnails are cached under `state_dir/thumbs/`, named by the
file's SHA-256 when the journal knows it, else by its identity on disk (resolved path, size,
mtime, inode): a file changed in place gets a new thumbnail.

Only a few are made at a time (one per two cores, at least one): the page waits for a
thumbnail, the pipeline never waits for the page. A file that does not decode gets the
placeholder, never an error page.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

import structlog

from watchfolder.web.paths import Opened

log = structlog.get_logger("watchfolder")

SIZE = 512
PLACEHOLDER = (Path(__file__).parent / "static" / "placeholder.svg").read_bytes()


class Thumbnails:
    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "thumbs"
        self._gate = threading.BoundedSemaphore(max(1, (os.cpu_count() or 2) // 2))

    def get(self, opened: Opened, sha256: str | None = None) -> tuple[bytes, str]:
        """(bytes, media type) of the file's thumbnail; the placeholder when it won't decode."""
        key = sha256 or hashlib.sha256(
            f"{opened.real}|{opened.size}|{opened.mtime_ns}|{opened.inode}".encode(
                "utf-8", "surrogateescape")).hexdigest()
        cached = self.folder / key[:2] / f"{key}.webp"
        with contextlib.suppress(OSError):
            return cached.read_bytes(), "image/webp"
        with self._gate:
            with contextlib.suppress(OSError):  # made by another request meanwhile
                return cached.read_bytes(), "image/webp"
            data = _make(opened)
        if data is None:
            return PLACEHOLDER, "image/svg+xml"
        with contextlib.suppress(OSError):  # a full state_dir costs the cache, not the page
            cached.parent.mkdir(parents=True, exist_ok=True)
            temp = cached.with_name(f".{cached.name}.{threading.get_ident()}.tmp")
            temp.write_bytes(data)
            temp.replace(cached)
        return data, "image/webp"


def _make(opened: Opened) -> bytes | None:
    import pyvips

    try:
        image = pyvips.Image.thumbnail(opened.proc_path, SIZE, height=SIZE, size="down",
                                       fail_on="error")
        if image.interpretation not in ("srgb", "b-w") or image.format != "uchar":
            image = image.colourspace("srgb")  # 16-bit, CMYK, Lab: what a browser shows
        if image.format != "uchar":
            image = image.cast("uchar")
        return bytes(image.webpsave_buffer(Q=82, strip=True))
    except pyvips.Error as exc:
        log.debug("web.thumbnail_failed", error=str(exc).splitlines()[0] if str(exc) else "")
        return None
