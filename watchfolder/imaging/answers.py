"""Whether an API answer is sound, checked before anything is made of it.

    inspect_result(path or bytes, w, h) -> ext   header first (an image bomb is never
                                                 decoded), no bytes after the image's end,
                                                 then a full decode (a PNG's:
                                                 containers.png_inflates); `decode=False`
                                                 checks a PNG's CRCs instead and leaves the
                                                 decode for later
    answer_decodes(path)                         that decode, later (store), off the path
                                                 between an answer and the next request
    max_answer_bytes(w, h)                       a bound for streaming the answer to disk

A bad answer is `BadResult` (a transient failure: it is asked for again).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyvips

from watchfolder.errors import BadResult
from watchfolder.imaging import containers
from watchfolder.imaging.inspect import API_FORMATS, FAIL_ON, vips_message, vips_name

# PNG's worst case is the raw samples (no compression, 4 bytes a pixel and a filter byte a
# row) plus zlib's stored-block and chunk framing (< 1 % with 8 KB IDAT chunks); JPEG and
# lossless WEBP stay under that. The fixed part leaves room for metadata and an ICC profile.
_ANSWER_SLACK, _ANSWER_FIXED = 1.02, 4 * 1024 * 1024


def max_answer_bytes(width: int, height: int) -> int:
    """A safe upper bound for the size of a cut-out answer of `width` x `height`."""
    raw = height * (1 + 4 * width)
    return math.ceil(raw * _ANSWER_SLACK) + _ANSWER_FIXED


def inspect_result(answer: Path | bytes, width: int, height: int, *,
                   decode: bool = True) -> str:
    """Check an API answer; return its extension (png, jpg, webp) or raise BadResult.

    The declared size is read from the header before anything is decoded, so an image bomb
    (a small file declaring a huge canvas) is refused cheaply; then the image must decode
    completely and nothing may follow its end (PNG after IEND, JPEG after EOI, WEBP after its
    RIFF length). Bytes are accepted while the pipeline still holds answers in memory.
    With `decode=False`, everything but the decode is checked (and a PNG's CRCs): for an
    answer whose decode is checked later, off the path between an answer and the next
    request, with the same BadResult (`answer_decodes`, or the studio path's composite,
    `compose.answer_mask`, which decodes it once for both).
    """
    if isinstance(answer, bytes):
        return _inspect_answer(answer, width, height, lambda: pyvips.Image.new_from_buffer(
            answer, "", access="sequential", fail_on=FAIL_ON), decode)
    path = Path(answer)
    with _mapped(path) as data:
        return _inspect_answer(data, width, height, lambda: pyvips.Image.new_from_file(
            vips_name(path), access="sequential", fail_on=FAIL_ON), decode)


def _inspect_answer(data: bytes | mmap.mmap, width: int, height: int,
                    decoder: Callable[[], pyvips.Image], decode: bool = True) -> str:
    kind = containers.sniff(bytes(data[:64])).kind
    if kind not in API_FORMATS:
        raise BadResult("the API answered 200 but the body is not a PNG, JPEG or WEBP image",
                        200)
    try:
        if kind == "png":
            size = containers.png_size(data)
            end = containers.png_end(data)
        elif kind == "jpeg":
            size = containers.jpeg_size(data)
        else:
            size = containers.webp_size(data)
            end = containers.webp_end(data)
    except ValueError as exc:
        raise BadResult(f"the API answered 200 but the body is not a complete image: {exc}",
                        200) from None
    if size != (width, height):
        raise BadResult(f"the result is {size[0]}x{size[1]} but the input is {width}x{height}",
                        200)
    try:
        if kind == "jpeg":  # walking the scans costs a pass: only once the size is right
            end = containers.jpeg_end(data)
    except ValueError as exc:
        raise BadResult(f"the API answered 200 but the body is not a complete image: {exc}",
                        200) from None
    if end != len(data):
        raise BadResult(f"the API's answer has {len(data) - end} bytes after the end of the "
                        f"image", 200)
    if not decode:
        problem = containers.png_crcs(data) if kind == "png" else None
        if problem:
            raise BadResult(f"the API answered 200 but the body does not decode completely: "
                            f"{problem}", 200)
    else:
        _decodes(data, kind, decoder)
    return API_FORMATS[kind][1]


def answer_decodes(answer: Path) -> None:
    """The rest of an answer's check after `inspect_result(decode=False)`: it decodes
    completely (BadResult, as that check would raise, if not)."""
    with _mapped(answer) as data:
        _decodes(data, containers.sniff(bytes(data[:64])).kind or "",
                 lambda: pyvips.Image.new_from_file(vips_name(answer), access="sequential",
                                                    fail_on=FAIL_ON))


@contextmanager
def _mapped(answer: Path) -> Iterator[mmap.mmap]:
    """An answer's file, mapped read-only (BadResult when it is empty: nothing to map)."""
    with answer.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise BadResult("the API answered 200 with an empty body", 200)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def _decodes(data: bytes | mmap.mmap, kind: str, decoder: Callable[[], pyvips.Image]) -> None:
    problem = containers.png_inflates(data) if kind == "png" else ""
    if problem:
        raise BadResult(f"the API answered 200 but the body does not decode completely: "
                        f"{problem}", 200)
    if problem == "":  # not a PNG, or one png_inflates leaves to libvips
        try:
            image = decoder()
            image.avg()
        except pyvips.Error as exc:
            raise BadResult(f"the API answered 200 but the body does not decode completely: "
                            f"{vips_message(exc)}", 200) from None
