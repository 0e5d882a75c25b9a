"""Local checks of an input before any request is spent, and of a result before it is written.

Decisions come from the bytes, never the extension. Size and pixel count are read from the
header before anything is decoded, so a huge file is refused cheaply; then the image must
decode completely (a truncated upload would waste a credit on a 400 or a broken result).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from watchfolder.errors import BadResult, InputRejected

MAX_BYTES = 30_000_000  # "30 MB" read strictly, as the sandbox does: no request wasted on a 400
MAX_PIXELS = 25_000_000
# Our own MAX_PIXELS check runs on the header before any decoding; Pillow's bomb guard would
# only warn (or raise) later and less precisely.
Image.MAX_IMAGE_PIXELS = None

# Pillow format → (MIME type sent to the API, extension of a result in that format)
FORMATS = {"PNG": ("image/png", "png"), "JPEG": ("image/jpeg", "jpg"),
           "MPO": ("image/jpeg", "jpg"),  # camera JPEGs with a second frame: still JPEG
           "WEBP": ("image/webp", "webp")}


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mime: str
    width: int
    height: int


def inspect_input(data: bytes) -> ImageInfo:
    """Return what the API needs to know, or raise InputRejected with a reason code."""
    if not data:
        raise InputRejected("empty", "the file is empty (0 bytes); was the copy interrupted?")
    if len(data) > MAX_BYTES:
        raise InputRejected("too_large", f"the file is {len(data) / 1e6:.1f} MB; the API "
                                         f"accepts at most 30 MB: export it smaller")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputRejected("not_an_image", "the file is not an image Pillow can read "
                                            "(expected PNG, JPEG or WEBP)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputRejected("corrupt", f"the image header is damaged: {exc}") from None
    with image:
        fmt = image.format or "unknown"
        if fmt not in FORMATS:
            raise InputRejected("unsupported_format",
                                f"{fmt} images are not accepted by the API; convert it to PNG, "
                                f"JPEG or WEBP")
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InputRejected("too_many_pixels",
                                f"the image is {width}x{height} ({width * height / 1e6:.1f} MP); "
                                f"the API accepts at most 25 MP, resize it first")
        try:
            if fmt in ("JPEG", "MPO"):
                # Decoding at 1/8 scale still reads every byte of the stream, so truncation is
                # caught, for a fraction of the memory and time.
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputRejected("corrupt", f"the image does not decode completely "
                                           f"(truncated or corrupt): {exc}") from None
    mime, _ = FORMATS[fmt]
    return ImageInfo(format=fmt, mime=mime, width=width, height=height)


def inspect_result(data: bytes, width: int, height: int) -> str:
    """Check a 200 body decodes to an image of the input's size; return its file extension."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or "unknown"
            size = image.size
            image.load()
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as exc:
        raise BadResult(f"the API answered 200 but the body is not a complete image: "
                        f"{type(exc).__name__}", 200) from None
    if fmt not in FORMATS:
        raise BadResult(f"the API answered a {fmt} image, not PNG, JPEG or WEBP", 200)
    if size != (width, height):
        raise BadResult(f"the result is {size[0]}x{size[1]} but the input is {width}x{height}",
                        200)
    return FORMATS[fmt][1]
