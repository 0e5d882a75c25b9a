"""Output recipes (issue 11): steps on a cut-out's lazy image between `imaging.cutout` and
`imaging.write_output`, all at the original's resolution and streaming like it.

    subject_box(cutout)            the tight box around the visible pixels (from the answer's
                                   own alpha, scaled to the cut-out: `subject_in`)
    expand(box, pixels, percent)   a margin: percent of the box's width left and right, of its
                                   height above and below, as remove.bg's crop_margin
    crop(image, box)               the box, padded with transparency where it leaves the image
    fit(image, w, h, upscale=)     scaled (premultiplied, lanczos3) to fit inside w x h
    place(image, w, h, position)   on an exact w x h canvas
    on_background(image, colour)   flattened onto a colour, edges blended by their alpha
    mask_only(image)               the alpha alone, as a greyscale image
    render(cutout, recipe)         the steps above in the order a recipe names them
    keep(cutout, path)             the cut-out's pixels computed once, into memory or an
                                   uncompressed TIFF, for several outputs of one file
    kept(cutout, pixels)           the same cut-out on those pixels (header and metadata its
                                   own, pixels identical, nothing decoded again)

A recipe's colours are sRGB: a CMYK cut-out is converted through its profile before it is
flattened or scaled (ink values do not blend like light).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pyvips

from watchfolder.config.settings import POSITIONS
from watchfolder.imaging.compose import Cutout, answer_mask, scale_to, to_srgb
from watchfolder.imaging.inspect import vips_name

SUBJECT_THRESHOLD = 16  # alpha (of 255) from which a pixel counts as part of the subject

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    width: int
    height: int


@dataclass(frozen=True)
class Recipe:
    """One output's image steps (naming and format are the caller's)."""

    crop_to_subject: bool = False
    margin_pixels: int = 0
    margin_percent: float = 0.0
    size: tuple[int, int] | None = None  # exact canvas; the subject is scaled to fit inside
    position: str = "center"
    max_size: int | None = None  # long edge; never upscales
    background: Colour | None = None  # None: transparent
    mask: bool = False


def render(cutout: Cutout, recipe: Recipe) -> pyvips.Image:
    """The image of one output: crop, margin, canvas or long edge, then background/mask."""
    image = cutout.image
    if recipe.crop_to_subject:  # the margin belongs to the crop, as in remove.bg
        box = subject_box(cutout) or Box(0, 0, image.width, image.height)
        image = crop(image, expand(box, recipe.margin_pixels, recipe.margin_percent))
    if recipe.mask:
        image = mask_only(image)
    if recipe.size is not None:
        image = place(fit(image, *recipe.size), *recipe.size, recipe.position)
    elif recipe.max_size is not None:
        image = fit(image, recipe.max_size, recipe.max_size, upscale=False)
    if recipe.background is not None and not recipe.mask:
        image = on_background(image, recipe.background)
    return image


def subject_box(cutout: Cutout, threshold: int = SUBJECT_THRESHOLD) -> Box | None:
    """The smallest box holding every pixel with alpha >= `threshold`, or None (no subject),
    in the cut-out's pixels: `subject_in` at the cut-out's size."""
    return subject_in(cutout.answer, cutout.image.width, cutout.image.height, threshold)


def subject_in(answer: Path, width: int, height: int,
               threshold: int = SUBJECT_THRESHOLD) -> Box | None:
    """The subject's box in an image of `width` x `height` cut out with `answer`.

    Found on the answer's own alpha, at the answer's resolution (the original is not
    decoded, nothing is scaled up for it), then scaled to `width` x `height` outwards: the
    box holds every pixel the scaled-up alpha can show, give or take the scale's rounding
    (a pixel or two of a 45 MP original). The answer's box is remembered for the file.
    """
    stat = answer.stat()
    found = _answer_subject(str(answer), stat.st_size, stat.st_mtime_ns, threshold)
    if found is None:
        return None
    (left, top, box_width, box_height), (answer_width, answer_height) = found
    if (answer_width, answer_height) == (width, height):
        return Box(left, top, box_width, box_height)
    sx, sy = width / answer_width, height / answer_height
    x0, y0 = max(0, math.floor(left * sx)), max(0, math.floor(top * sy))
    x1 = min(width, math.ceil((left + box_width) * sx))
    y1 = min(height, math.ceil((top + box_height) * sy))
    return Box(x0, y0, x1 - x0, y1 - y0)


@functools.lru_cache(maxsize=8)
def _answer_subject(answer: str, size: int, mtime_ns: int, threshold: int
                    ) -> tuple[tuple[int, int, int, int], tuple[int, int]] | None:
    """(box, answer's size) on the answer's alpha; keyed by size and mtime too, so a file
    replaced under the same name is looked at afresh."""
    del size, mtime_ns  # part of the cache key only
    alpha = answer_mask(Path(answer))
    left, top, box_width, box_height = alpha.find_trim(threshold=threshold - 0.5,
                                                       background=[0], line_art=True)
    if box_width <= 0 or box_height <= 0:
        return None
    return (left, top, box_width, box_height), (alpha.width, alpha.height)


def expand(box: Box, pixels: int = 0, percent: float = 0.0) -> Box:
    """`box` grown by `pixels` on every side plus `percent` of its width (left and right)
    and of its height (above and below)."""
    dx = pixels + math.floor(box.width * percent / 100 + 0.5)
    dy = pixels + math.floor(box.height * percent / 100 + 0.5)
    return Box(box.left - dx, box.top - dy, box.width + 2 * dx, box.height + 2 * dy)


def crop(image: pyvips.Image, box: Box) -> pyvips.Image:
    """The pixels of `box`; where it reaches past the image, transparent (or black)."""
    return image.embed(-box.left, -box.top, box.width, box.height, extend="background",
                       background=[0] * image.bands)


def fit(image: pyvips.Image, width: int, height: int, *, upscale: bool = True) -> pyvips.Image:
    """`image` scaled to fit inside `width` x `height` keeping its shape (lanczos3 down,
    bicubic up); colour is scaled premultiplied by alpha, so transparent pixels do not
    bleed into the edge: in 8 bits for an 8-bit image, in floating point for a 16-bit one."""
    scale = min(width / image.width, height / image.height)
    if not upscale:
        scale = min(scale, 1.0)
    target = (max(1, min(width, round(image.width * scale))),
              max(1, min(height, round(image.height * scale))))
    if target == (image.width, image.height):
        return image
    if image.interpretation == "cmyk":
        image = to_srgb(image)
    fmt, interpretation = image.format, image.interpretation
    alpha = image.hasalpha()
    if fmt == "uchar":
        # 8-bit images are scaled in 8 bits, premultiplied as Pillow scales RGBA: libvips's
        # resize then takes its integer (vector) path, about ten times faster than in float
        # (this step 0.13 against 0.36 s of CPU for a 45 MP cut-out's 1600 px web output).
        # That path is within 3-4 levels of the float one on a sharp edge, and colours under
        # a nearly clear alpha keep fewer bits; they show at that alpha's weight.
        work = (image.premultiply(max_alpha=255) + 0.5).cast("uchar") if alpha else image
        work = scale_to(work, *target)
        if alpha:
            work = (work.unpremultiply(max_alpha=255) + 0.5).cast("uchar")
        return work.copy(interpretation=interpretation)
    peak = 65535 if fmt == "ushort" else 255
    work = image.premultiply(max_alpha=peak) if alpha else image.cast("float")
    work = scale_to(work, *target)
    if alpha:
        work = work.unpremultiply(max_alpha=peak)
    return (work + 0.5).cast(fmt).copy(interpretation=interpretation)


def place(image: pyvips.Image, width: int, height: int,
          position: str = "center") -> pyvips.Image:
    """`image` on a transparent `width` x `height` canvas at `position`."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, not {position!r}")
    free_x, free_y = width - image.width, height - image.height
    x = 0 if "left" in position else free_x if "right" in position else free_x // 2
    y = 0 if position.startswith("top") else free_y if position.startswith("bottom") \
        else free_y // 2
    return image.embed(x, y, width, height, extend="background", background=[0] * image.bands)


def on_background(image: pyvips.Image, colour: Colour) -> pyvips.Image:
    """`image` flattened onto an sRGB colour: each pixel blends by its alpha, so the soft
    edge stays soft. Greyscale stays grey on a grey colour and becomes RGB otherwise."""
    if image.interpretation == "cmyk" or (
            image.interpretation in ("b-w", "grey16") and len(set(colour)) > 1):
        image = to_srgb(image)
    if not image.hasalpha():
        return image
    fmt, interpretation = image.format, image.interpretation
    peak = 65535 if fmt == "ushort" else 255
    background = [c * peak / 255 for c in colour[:image.bands - 1]]
    flat = image.flatten(background=background, max_alpha=peak)
    return (flat + 0.5).cast(fmt).copy(interpretation=interpretation)


def mask_only(image: pyvips.Image) -> pyvips.Image:
    """The alpha as a greyscale image (white: subject), at the image's depth."""
    alpha = image[image.bands - 1]
    return alpha.copy(interpretation="grey16" if alpha.format == "ushort" else "b-w")


# What libvips keeps in an image's own header: the rest (loader's fields, metadata) is copied
# from the cut-out onto the pixels read back, so savers see the image they would have seen.
_BUILTIN = frozenset(("width", "height", "bands", "format", "coding", "interpretation",
                      "xoffset", "yoffset", "xres", "yres", "filename"))


def keep(cut: Cutout, path: Path | None = None) -> pyvips.Image:
    """Compute `cut.image` once, for several outputs of one file: into memory (`path` None),
    or into `path`, an uncompressed TIFF of its pixels only, written under a temp name and
    renamed (a file at `path` is always whole); the pixels, for `kept`. The file is not
    fsynced: it is a cache of one file's outputs; the spool's clean-up at start removes one
    a crash left.

    Uncompressed because it is read back at the speed of a copy (a 45 MP RGBA: 179 MB,
    about 0.2 s of CPU a read, against about 1 s to decode the original and scale up the
    alpha again); TIFF rather than libvips's own .v because libvips maps a .v file whole
    into memory when reading it, and a 150 MP 16-bit cut-out must not be held whole in RAM:
    a TIFF is read a strip at a time.
    """
    if path is None:
        return cut.image.copy_memory()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        cut.image.tiffsave(vips_name(temp), compression="none", keep=0,
                           bigtiff=cut.image.width * cut.image.height * cut.image.bands * (
                               2 if cut.image.format == "ushort" else 1) > 3_500_000_000)
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)
    return kept_pixels(path)


def kept_pixels(path: Path) -> pyvips.Image:
    """The pixels `keep` wrote to `path`, streamed."""
    return pyvips.Image.new_from_file(vips_name(path), access="sequential")


def kept(cut: Cutout, pixels: pyvips.Image) -> Cutout:
    """`cut` with the `pixels` `keep` made of it (in memory, or read back from its file):
    the same size, bands, depth, colour space, resolution, header fields and metadata, so
    every step and saver makes the same bytes as from `cut` itself."""
    header = cut.image
    if (pixels.width, pixels.height, pixels.bands, pixels.format) != (
            header.width, header.height, header.bands, header.format):
        raise ValueError("the pixels kept are not this cut-out's")
    image = pixels.copy(interpretation=header.interpretation, xres=header.xres,
                        yres=header.yres, xoffset=header.xoffset, yoffset=header.yoffset)
    for name in image.get_fields():
        if name not in _BUILTIN:
            image.remove(name)
    for name in header.get_fields():
        if name not in _BUILTIN:
            image.set_type(header.get_typeof(name), name, header.get(name))
    return replace(cut, image=image)
