"""The studio path's pixels: the proxy sent to the API, and the full-resolution cut-out.

    make_proxy(path, source, dest)   -> Proxy    upright, sRGB, 8-bit, within 25 MP and 30 MB
    cutout(path, source, answer)     -> Cutout   lazy: the original's own pixels with the
                                                 answer's alpha scaled up to their size
    write_output(image, fmt, dest, metadata) -> Output    png, webp, jpeg or tiff
    compose(...)                     cutout, then write_output

Output recipes (issue 11: crop, background, canvas, long edge, mask) are steps on
`Cutout.image` between `cutout` and `write_output`.

Everything is a libvips pipeline that streams from the files: an image is computed in small
regions as the encoder pulls them, so memory follows the width of the image, not its area.
The exceptions are rotations (EXIF orientation 5..8 read the source out of order; libvips
then decodes it to a temporary file or memory) and HEIC, which libheif decodes whole.
The colour channels are the original's, never resampled: only the alpha is scaled up.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pyvips

from watchfolder.config.settings import IMAGE_FORMATS
from watchfolder.errors import BadResult, InputRejected
from watchfolder.files import atomic
from watchfolder.imaging import metadata as meta
from watchfolder.imaging.inspect import (
    FAIL_ON,
    MAX_BYTES,
    MAX_PIXELS,
    Source,
    open_image,
    vips_name,
)
from watchfolder.imaging.metadata import Metadata

PROXY_QUALITIES = (92, 85, 75)  # JPEG qualities tried in turn to stay under 30 MB
# No optimize_coding anywhere: libjpeg then holds every DCT coefficient of the image
# (300 MB for a 25 MP proxy) to build its Huffman tables, for files about 5 % smaller.
JPEG_QUALITY, WEBP_QUALITY = 92, 90
# WEBP's encoder effort (0-6), libvips's default: on a 45 MP file's 1600 px output lower
# efforts saved no CPU worth having (the encode is 0.16 s of the output's 0.45) and 0 made
# it six times bigger; 6 took 3.4 times the CPU for 4 % fewer bytes (BENCHMARKS.md, "Encoder
# effort"); `effort:` sets another per output.
WEBP_EFFORT = 4
# Deflate levels of PNG and TIFF outputs, chosen by the size/time table in BENCHMARKS.md
# ("Encoder effort"; libvips's zlib-ng, where level 1 is its quick strategy, with static
# Huffman codes, and 2 its fast one). Level 6, zlib's own default, costs about 2.5 times level 3
# for files 13-15 % smaller; level 1 doubles the bytes. The PNG, the file a studio delivers,
# keeps 3; the TIFF, the retoucher's working file (opened and saved again in an editor),
# takes 2: about 15 % less CPU in its encoder for 6 % more bytes on an 8-bit cut-out (45 MP:
# 37.9 against 35.7 MB), 12 % more on a 16-bit one (100 MP: 162 against 145 MB).
# Adaptive row filters made noisy photographs bigger and slower. `compression:` in the config
# sets another level (1-9) per inbox or output.
PNG_COMPRESSION = 3
TIFF_COMPRESSION = 2
WEBP_MAX_SIDE, JPEG_MAX_SIDE = 16383, 65535
# Perceptual, as Pillow and most viewers: for matrix profiles (Adobe RGB, ProPhoto) it is
# the same as relative colorimetric; for CMYK it keeps the shadows (relative colorimetric
# without black-point compensation lifts them).
INTENT = "perceptual"
_KEEP = 1 | 2 | 4 | 8  # libvips ForeignKeep: exif, xmp, iptc, icc (not "other")
_BIGTIFF_ABOVE = 3_500_000_000  # uncompressed bytes; classic TIFF offsets stop at 4 GiB


def default_threads() -> int:
    """One core is left to the daemon (requests, small files), the rest to libvips."""
    return max(1, (os.cpu_count() or 2) - 1)


def configure(threads: int | None = None) -> int:
    """Limit libvips: `threads` worker threads per image pipeline (default: cores - 1).

    With N composites running at once, local work uses at most N x threads cores; the
    operation cache is off (images.py), so nothing decoded outlives its file. Returns the
    thread count set.
    """
    count = threads if threads is not None else default_threads()
    pyvips.concurrency_set(max(1, count))
    return max(1, count)


configure()  # importing the module sets the default; the daemon may call it again


# --------------------------------------------------------------------------- proxy


@dataclass(frozen=True)
class Proxy:
    """The image sent to the API instead of the original."""

    mime: str
    width: int
    height: int
    size: int  # bytes


def proxy_box(source: Source, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The largest size of the upright source's shape within `max_pixels` (the API's 25 MP)."""
    width, height = source.upright
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def make_proxy(path: Path, source: Source, dest: Path, *, max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> Proxy:
    """Write the proxy of `source` to `dest` (atomically) as a high-quality JPEG.

    Upright, converted to sRGB through the embedded profile (CMYK included), 8-bit, any
    transparency flattened onto white (the API then cuts the subject out afresh; the
    original's alpha is kept at compose time), shrunk with lanczos3 to fit 25 MP, and
    re-encoded smaller if it would pass 30 MB. The same input gives the same bytes.
    A smaller `max_pixels` trades mask resolution for a little speed (a 45 MP JPEG: 0.61 s
    to 25 MP, 0.44 s to 11 MP, one core).
    Raises InputRejected("corrupt") if the source does not decode.
    """
    max_pixels = min(max_pixels, MAX_PIXELS)
    box = proxy_box(source, max_pixels)
    while min(box) >= 16:
        probe = _proxy_image(path, source, box)  # lazy: only its size is looked at
        while probe.width * probe.height > max_pixels:  # thumbnail rounds each side
            box = (box[0] - 1, box[1] - 1)
            probe = _proxy_image(path, source, box)
        for quality in PROXY_QUALITIES:
            # A streamed image is read once: each encoding needs a fresh pipeline.
            image = _proxy_image(path, source, box)
            try:
                size = atomic.write_atomically(dest, _jpeg_writer(image, quality))
            except pyvips.Error as exc:
                raise _decode_error(exc) from None
            if size <= max_bytes:
                return Proxy("image/jpeg", image.width, image.height, size)
        box = (box[0] * 4 // 5, box[1] * 4 // 5)  # noise beats JPEG: fewer pixels
    raise InputRejected("too_large", f"no proxy under {max_bytes / 1e6:.1f} MB could be made "
                                     f"of this image")


def _jpeg_writer(image: pyvips.Image, quality: int) -> Callable[[Path], None]:
    def write(temp: Path) -> None:
        # No metadata: the API gets pixels only (sRGB, untagged, upright).
        image.jpegsave(vips_name(temp), Q=quality, keep=0)

    return write


def _proxy_image(path: Path, source: Source, box: tuple[int, int]) -> pyvips.Image:
    profile = {}
    if source.colour == "cmyk" or (source.icc is not None and not source.icc_srgb):
        # Through the embedded profile (or libvips's CMYK one), after shrinking.
        profile = {"output_profile": "srgb", "intent": INTENT}
    width, height = box
    try:
        if source.format == "heic":
            image = open_image(path, source).thumbnail_image(width, height=height,
                                                             size="down", **profile)
        else:
            # Shrink-on-load where the format has it (JPEG decodes at 1/2, 1/4, 1/8 scale);
            # the orientation is applied after shrinking, where it is cheap.
            image = pyvips.Image.thumbnail(vips_name(path), width, height=height, size="down",
                                           fail_on=FAIL_ON, **profile)
    except pyvips.Error as exc:
        raise _decode_error(exc) from None
    colour_bands = 1 if image.interpretation in ("b-w", "grey16") else \
        4 if image.interpretation == "cmyk" else 3
    image = image.extract_band(0, n=min(image.bands, colour_bands + 1))
    if image.bands > colour_bands:
        peak = 65535 if image.format == "ushort" else 255
        image = image.flatten(background=[peak] * colour_bands, max_alpha=peak)
    if image.interpretation == "cmyk":  # a CMYK file whose profile libvips would not take
        image = image.icc_transform("srgb", input_profile="cmyk", intent=INTENT)
    return image.colourspace("srgb").cast("uchar")


def _decode_error(exc: pyvips.Error) -> InputRejected:
    return InputRejected("corrupt", f"the image does not decode completely (truncated or "
                                    f"corrupt): {str(exc.detail or exc).strip()[:200]}")


# --------------------------------------------------------------------------- cut-out


@dataclass(frozen=True)
class Cutout:
    """The full-resolution result before encoding: a lazy image and what goes with it.

    `image` is upright, at the original's size, in its colour space (RGB, grey or CMYK) and
    bit depth (uchar or ushort), with the alpha as its last band. `metadata.icc` is the
    profile of those colours. `image` streams from the files and can be computed once: make
    a new Cutout for each output (it costs nothing until written).
    """

    image: pyvips.Image
    metadata: Metadata
    answer: Path  # the API's answer it took its alpha from (recipes find the subject in it)


def load_shrink(source: Source, scale: float) -> int:
    """The shrink-on-load factor (1, 2, 4 or 8) for an output `scale` times the original's
    size: a JPEG decodes at 1/2, 1/4 or 1/8 scale in the DCT, for a fraction of the time.
    At least twice the output's pixels a side are kept, as libvips's thumbnail does, so the
    lanczos3 that follows still does the fine filtering. Other formats: 1."""
    if source.format != "jpeg" or scale <= 0:
        return 1
    return next((k for k in (8, 4, 2) if 2 * k <= 1 / scale), 1)


def cutout(original: Path, source: Source, answer: Path, *, alpha_only: bool = False,
           shrink: int = 1) -> Cutout:
    """The original's own pixels with the API answer's alpha scaled up to their size.

    `answer` is the API's answer for the proxy (PNG or WEBP, with alpha), already checked
    by inspect_result. If the original has an alpha of its own, the result's is the product
    of both (clear in either, clear in the result). With `alpha_only`, `image` is that alpha
    alone, as greyscale (a mask output): when the original has no alpha of its own, it is
    made from the answer alone and the original's pixels are never decoded. Raises
    InputRejected("corrupt") if the original does not open, BadResult if the answer no
    longer does, ValueError if the answer has no alpha (asked for as JPEG) or not the
    original's shape: bugs, not bad luck. `shrink` (see `load_shrink`): the cut-out at
    1/shrink of the original's size, the original decoded at that scale (a small output).
    """
    if alpha_only and not source.alpha:
        width, height = source.upright
        alpha = answer_alpha(Path(answer), width, height, sixteen=source.bits == 16)
        grey = alpha.copy(interpretation="grey16" if source.bits == 16 else "b-w")
        metadata = replace(meta.read_metadata(original), icc=None)  # no colours, no profile
        return Cutout(meta.attach(grey, metadata), metadata, Path(answer))
    upright = source.orientation == 1
    image = open_image(original, source, access="sequential" if upright else "random",
                       shrink=shrink)
    if not upright:
        image = image.autorot()  # reads the orientation the loader found; drops the tag
    width, height = source.upright if shrink == 1 else (image.width, image.height)
    colours = image.extract_band(0, n=source.colour_bands)
    peak = 65535 if source.bits == 16 else 255

    alpha = answer_alpha(Path(answer), width, height, sixteen=source.bits == 16)
    if image.bands > source.colour_bands:  # the original's own transparency
        own = image[source.colour_bands].cast("float")
        alpha = (own * alpha.cast("float") / peak + 0.5).cast(alpha.format)

    interpretation = {("rgb", 8): "srgb", ("rgb", 16): "rgb16", ("grey", 8): "b-w",
                      ("grey", 16): "grey16"}.get((source.colour, source.bits), "cmyk")
    result = colours.bandjoin(alpha).copy(interpretation=interpretation)
    metadata = replace(meta.read_metadata(original), icc=source.icc)
    if alpha_only:
        grey = result[result.bands - 1].copy(
            interpretation="grey16" if source.bits == 16 else "b-w")
        return Cutout(meta.attach(grey, replace(metadata, icc=None)),
                      replace(metadata, icc=None), Path(answer))
    return Cutout(meta.attach(result, metadata), metadata, Path(answer))


def answer_alpha(answer: Path, width: int, height: int, *, sixteen: bool = False) -> pyvips.Image:
    """The answer's alpha at `width` x `height` (uchar, or ushort when `sixteen`), scaled
    up with a bicubic interpolator and clipped to range; lazy and streaming."""
    mask = answer_mask(answer)
    mw, mh = mask.width, mask.height
    if abs(mw / mh - width / height) > 0.02 * width / height + 2 / min(mw, mh):
        raise ValueError(f"the answer is {mw}x{mh}, not the shape of the {width}x{height} "
                         f"original")
    if sixteen:  # scale in float so the upsampled edge uses the 16-bit steps
        mask = mask.cast("float") * 257
    if (mw, mh) != (width, height):
        mask = scale_to(mask, width, height)
    if sixteen:
        mask = (mask + 0.5).cast("ushort")  # cast clips to 0..65535
    return mask


def answer_mask(answer: Path) -> pyvips.Image:
    """The answer's alpha at the answer's size (uchar), decoded into memory once for all the
    outputs of a file (a 25 MP answer: 25 MB; the last two answers are kept, each under its
    size and mtime, so a file replaced under the same name is read afresh).

    This decode is also the studio path's check that the answer decodes completely (send
    checks all but that: `inspect_result(decode=False)`): BadResult, as send would raise,
    if it does not."""
    stat = Path(answer).stat()
    return _answer_mask(str(answer), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _answer_mask(answer: str, size: int, mtime_ns: int) -> pyvips.Image:
    del size, mtime_ns  # part of the cache key only
    try:
        source = pyvips.Image.new_from_file(vips_name(Path(answer)), access="sequential",
                                            fail_on=FAIL_ON)
        if not source.hasalpha():
            raise ValueError("the API's answer has no alpha channel (was it asked for JPEG?); "
                             "the studio path needs PNG or WEBP answers")
        mask = source[source.bands - 1]
        if mask.format == "ushort":
            mask = (mask >> 8).cast("uchar")
        return mask.copy_memory()
    except pyvips.Error as exc:
        raise BadResult(f"the API answered 200 but the body does not decode completely: "
                        f"{str(exc.detail or exc).strip()[:200]}", 200) from None


def scale_to(image: pyvips.Image, width: int, height: int) -> pyvips.Image:
    """`image` scaled to exactly `width` x `height`, pixel centres aligned (as Pillow does).

    Up: bicubic interpolation through an affine that maps centre to centre (libvips's
    resize maps output x to input x/s - 0.5 when enlarging, which moves everything half an
    output pixel right and down). Down: lanczos3 (resize's reduce is centre-aligned).
    """
    sx, sy = width / image.width, height / image.height
    if (sx, sy) == (1, 1):
        return image
    if sx < 1 and sy < 1:
        image = image.resize(sx, vscale=sy, kernel="lanczos3")
        if (image.width, image.height) == (width, height):
            return image
        return image.gravity("north-west", width, height, extend="copy")  # rounding
    return image.affine([sx, 0, 0, sy], interpolate=pyvips.Interpolate.new("bicubic"),
                        odx=(sx - 1) / 2, ody=(sy - 1) / 2, oarea=[0, 0, width, height],
                        extend="copy")


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Output:
    """A written result."""

    path: Path
    format: str
    width: int
    height: int
    bits: int
    size: int  # bytes


def compose(original: Path, source: Source, answer: Path, dest: Path, fmt: str, *,
            quality: int | None = None, compression: int | None = None) -> Output:
    """The full-resolution cut-out of `original`, written to `dest` as `fmt`."""
    result = cutout(original, source, answer)
    return write_output(result.image, fmt, dest, result.metadata, quality=quality,
                        compression=compression)


def write_output(image: pyvips.Image, fmt: str, dest: Path, metadata: Metadata, *,
                 quality: int | None = None, compression: int | None = None,
                 effort: int | None = None) -> Output:
    """Encode `image` (colour bands, then alpha if any) as `fmt` to `dest`, atomically.

    `compression`: the deflate level of png and tiff (1-9; None: PNG_COMPRESSION,
    TIFF_COMPRESSION); `quality`: jpeg and webp's; `effort`: webp's (0-6; None:
    WEBP_EFFORT).
    png: 8 or 16-bit as the image, alpha, ICC, EXIF, XMP. tiff: the same, deflate, CMYK
    kept, IPTC. webp: 8-bit, alpha, ICC, EXIF, XMP. jpeg: 8-bit, flattened onto white, ICC,
    EXIF, XMP, IPTC. CMYK becomes RGB through its profile except in TIFF; greyscale becomes
    RGB in WEBP only. Raises InputRejected("output_too_large") when the format cannot hold
    the size, OSError when writing fails.
    """
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"output format must be one of {IMAGE_FORMATS}, not {fmt!r}")
    limit = {"webp": WEBP_MAX_SIDE, "jpeg": JPEG_MAX_SIDE}.get(fmt)
    if limit and max(image.width, image.height) > limit:
        raise InputRejected("output_too_large",
                            f"{fmt.upper()} holds at most {limit} pixels a side and the "
                            f"result is {image.width}x{image.height}; choose png or tiff")
    colour_bands = _colour_bands(image)
    space = {1: b"GRAY", 3: b"RGB ", 4: b"CMYK"}[colour_bands]
    if metadata.icc is not None and meta.icc_space(metadata.icc) != space:
        # A step changed the colour space (a mask, CMYK made RGB): the image's own profile
        # if it has a fitting one, else none.
        own = _blob(image, "icc-profile-data")
        metadata = replace(metadata, icc=own if own and meta.icc_space(own) == space else None)
    image = meta.attach(image, metadata)
    if (colour_bands == 4 and fmt != "tiff") or (colour_bands == 1 and fmt == "webp"):
        image = to_srgb(image)
        metadata = replace(metadata, icc=_blob(image, "icc-profile-data"))
    if fmt == "jpeg" and image.hasalpha():
        peak = 65535 if image.format == "ushort" else 255
        image = image.flatten(background=[peak] * (image.bands - 1), max_alpha=peak)
    if fmt in ("jpeg", "webp") and image.format == "ushort":
        image = _eight_bit(image)

    def save(temp: Path) -> None:
        target = vips_name(temp)
        if fmt == "png":
            image.pngsave(target, compression=compression or PNG_COMPRESSION, keep=_KEEP)
        elif fmt == "webp":
            image.webpsave(target, Q=quality or WEBP_QUALITY,
                           effort=WEBP_EFFORT if effort is None else effort, keep=_KEEP)
        elif fmt == "jpeg":
            meta.with_iptc(image, metadata.iptc).jpegsave(
                target, Q=quality or JPEG_QUALITY, keep=_KEEP)
        else:
            big = image.width * image.height * image.bands * (
                2 if image.format == "ushort" else 1) > _BIGTIFF_ABOVE
            image.tiffsave(target, compression="deflate", predictor="horizontal",
                           level=compression or TIFF_COMPRESSION, bigtiff=big, keep=_KEEP)
            meta.add_tiff_metadata(temp, metadata.exif, metadata.iptc)

    try:
        size = atomic.write_atomically(dest, save)
    except pyvips.Error as exc:
        raise OSError(f"could not write {Path(dest).name}: "
                      f"{str(exc.detail or exc).strip()[:200]}") from None
    return Output(Path(dest), fmt, image.width, image.height,
                  16 if image.format == "ushort" else 8, size)


def _colour_bands(image: pyvips.Image) -> int:
    if image.interpretation == "cmyk":
        return 4
    if image.interpretation in ("b-w", "grey16"):
        return 1
    return 3


def to_srgb(image: pyvips.Image) -> pyvips.Image:
    """RGB through the image's profile (or libvips's CMYK fallback), keeping depth and
    alpha; the result carries the sRGB profile."""
    depth = 16 if image.format == "ushort" else 8
    if image.get_typeof("icc-profile-data") or image.interpretation == "cmyk":
        fallback = "cmyk" if image.interpretation == "cmyk" else "srgb"
        return image.icc_transform("srgb", input_profile=fallback, embedded=True, depth=depth,
                                   intent=INTENT)
    return image.colourspace("rgb16" if depth == 16 else "srgb")


def _eight_bit(image: pyvips.Image) -> pyvips.Image:
    # 16-bit samples made from 8-bit ones (x * 257) come back exactly with >> 8.
    interpretation = {"rgb16": "srgb", "grey16": "b-w"}.get(image.interpretation,
                                                            image.interpretation)
    return (image >> 8).cast("uchar").copy(interpretation=interpretation)


def _blob(image: pyvips.Image, name: str) -> bytes | None:
    return bytes(image.get(name)) if image.get_typeof(name) else None
