"""What an image file is and whether the API takes it as it is (an answer's soundness:
answers.py).

Decisions come from the bytes, never the extension. `inspect_source` reads the header with
libvips (pyvips), which decodes nothing until asked (a small plain PNG's header is parsed
from the bytes sniffed, as libvips would read it: `containers.plain_png`), then decodes the
whole image once, streaming, so a truncated file is refused before a request is spent:

    inspect_source(path)  -> Source    route "fast" (send the bytes as they are) or "studio"
                                       (send a proxy, compose at full size: see imaging.py)

Refusals are `InputRejected(reason, message)` with a message that names the fix:
`empty`, `not_an_image`, `corrupt`, `raw`, `unsupported_format`; with the studio path off,
also `too_many_pixels` and `too_large`.

libvips decodes JPEG, PNG, WEBP, TIFF and AVIF; the pyvips-binary wheel has no HEVC
decoder, so HEIC (phones) is decoded by pillow-heif, whose wheel carries libheif with one.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import math
import mmap
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pillow_heif
import pyvips
from PIL import ImageCms

from watchfolder.config.settings import EXTENSIONS
from watchfolder.errors import InputRejected
from watchfolder.imaging import containers

MAX_BYTES = 30_000_000  # "30 MB" read strictly, as the sandbox does: no request wasted on a 400
MAX_PIXELS = 25_000_000
# The studio path streams any size, but a header declaring a gigapixel canvas is more likely
# a decompression bomb than a photograph (the largest backs are 150 MP); refused, not decoded.
MAX_SOURCE_PIXELS = 500_000_000
# libvips stops at errors (a truncated JPEG otherwise decodes with a grey bottom, silently).
FAIL_ON = "error"

def vips_name(path: Path | str) -> str:
    """A name libvips can open or write for `path`.

    pyvips passes file names to libvips as UTF-8 and reads them back as UTF-8, so a name that
    is not (from an old Windows or Mac client, a zip archive) is reached through a symbolic
    link with a plain name, made once per path and kept for the life of the process.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return text
    raw = os.fsencode(os.path.abspath(text))  # noqa: PTH100 - bytes in, bytes out, no resolving
    suffix = Path(text).suffix if Path(text).suffix.isascii() else ""
    alias = _aliases() / f"{hashlib.sha1(raw).hexdigest()}{suffix}"  # noqa: S324 - a name
    if not os.path.lexists(alias):
        os.symlink(raw, os.fsencode(alias))  # noqa: PTH211 - the target is bytes
    return str(alias)


@functools.cache
def _aliases() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="watchfolder-names-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# What the API takes and answers in: the MIME type it is sent as, the extension it is saved as.
API_FORMATS = {fmt: (f"image/{fmt}", EXTENSIONS[fmt]) for fmt in ("jpeg", "png", "webp")}
_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tiff": "TIFF", "heic": "HEIC",
          "avif": "AVIF"}
_COLOUR_BANDS = {"grey": 1, "rgb": 3, "cmyk": 4}
_INTERPRETATIONS = {"b-w": "grey", "grey16": "grey", "srgb": "rgb", "rgb16": "rgb",
                    "rgb": "rgb", "cmyk": "cmyk"}
_SRGB_COLORANTS = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))

Route = Literal["fast", "studio"]


@dataclass(frozen=True)
class Source:
    """An input image as inspected: enough to route it and to process it.

    `width` x `height` is the stored size; `upright` applies the EXIF orientation.
    `studio_reasons` says why the API cannot take the file as it is; empty on the fast path.
    """

    format: str  # jpeg, png, webp, tiff, heic, avif
    file_size: int
    width: int
    height: int
    orientation: int  # EXIF / TIFF orientation, 1..8 (1: upright as stored)
    bits: int  # per sample as decoded: 8 or 16 (10- and 12-bit HEIF decode to 16)
    stored_bits: int  # per sample as stored: 1 to 16
    colour: str  # rgb, grey or cmyk
    alpha: bool
    bands: int  # as decoded, alpha and extra channels included
    palette: bool
    icc: bytes | None = field(repr=False)
    icc_srgb: bool  # untagged counts as sRGB; a tagged file must carry an sRGB profile
    icc_name: str | None
    pages: int
    studio_reasons: tuple[str, ...]
    # EXIF, XMP or IPTC in its header: with no ICC profile either, an output has nothing of
    # the original's to carry, so the header is not read again for it.
    tagged: bool = True

    @property
    def route(self) -> Route:
        return "studio" if self.studio_reasons else "fast"

    @property
    def reason(self) -> str:
        """Why the studio path, in a few words ("45.0 MP, over the API's 25 MP; 16-bit")."""
        return "; ".join(self.studio_reasons)

    @property
    def upright(self) -> tuple[int, int]:
        """Width and height once the orientation is applied (5..8 swap the sides)."""
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def mime(self) -> str:
        """The MIME type to send on the fast path."""
        return API_FORMATS[self.format][0]

    @property
    def colour_bands(self) -> int:
        return _COLOUR_BANDS[self.colour]


def inspect_source(path: Path, *, studio: bool = True, verify: bool = True) -> Source:
    """Inspect an input from its bytes; route it fast or studio, or raise InputRejected.

    `verify=False` reads the header only (for a file already checked, or one whose next step
    decodes it anyway, as making a proxy does).

    With `studio=False` (an inbox that wants the API's exact pixels only), a file the API
    cannot take as it is raises InputRejected naming every problem at once; files it takes
    go fast, as they are (16-bit, tagged or rotated ones included, as before the studio path).
    """
    path = Path(path)
    file_size = path.stat().st_size
    if file_size == 0:
        raise InputRejected("empty", "the file is empty (0 bytes); was the copy interrupted?")
    with path.open("rb") as handle:
        head = handle.read(containers.HEAD_BYTES)
        sniffed = containers.sniff(head)
        if sniffed.kind == "tiff":
            raw = _tiff_raw(handle, head)
            if raw:
                _refuse_raw(raw)
    if sniffed.kind is None:
        raise InputRejected("not_an_image", "the file is not an image (expected JPEG, PNG, "
                                            "WEBP, TIFF, HEIC or AVIF)")
    if sniffed.kind == "raw":
        _refuse_raw(sniffed.name)
    if sniffed.kind == "other":
        raise InputRejected("unsupported_format",
                            f"{sniffed.name} files are not supported; export it as JPEG, PNG, "
                            f"WEBP or TIFF")

    header = (containers.plain_png(head, MAX_PIXELS) if sniffed.kind == "png" else None) \
        or _header(path)
    fmt = _format(sniffed.kind, header)
    width, height = header.width, header.height
    if width * height > MAX_SOURCE_PIXELS:
        raise InputRejected("too_many_pixels",
                            f"the image declares {width}x{height} ({width * height / 1e6:.0f} "
                            f"MP), more than the {MAX_SOURCE_PIXELS // 1_000_000} MP this "
                            f"daemon processes; resize it first")
    if header.format not in ("uchar", "ushort"):
        depth = "floating-point" if header.format in ("float", "double") else "32-bit"
        raise InputRejected("unsupported_format",
                            f"{depth} {_NAMES[fmt]} images are not supported; export it with "
                            f"8 or 16 bits per channel")
    colour = _INTERPRETATIONS.get(header.interpretation)
    if colour is None or header.bands < _COLOUR_BANDS[colour]:
        raise InputRejected("unsupported_format",
                            f"{header.interpretation} {_NAMES[fmt]} images are not supported; "
                            f"export it in RGB, greyscale or CMYK")

    orientation = _int_field(header, "orientation", 1)
    if fmt in ("heic", "avif") or not 1 <= orientation <= 8:
        orientation = 1  # HEIF's own transforms are applied by the decoder
    icc, icc_srgb, icc_name = _profile(header)
    source = Source(
        format=fmt, file_size=file_size, width=width, height=height, orientation=orientation,
        bits=8 if header.format == "uchar" else 16,
        stored_bits=_int_field(header, "bits-per-sample", 8 if header.format == "uchar" else 16),
        colour=colour,
        alpha=header.bands > _COLOUR_BANDS[colour], bands=header.bands,
        palette=bool(_int_field(header, "palette", 0)), icc=icc, icc_srgb=icc_srgb,
        icc_name=icc_name, pages=_int_field(header, "n-pages", 1), studio_reasons=(),
        tagged=any(header.get_typeof(name) for name in _CARRIED),
    )
    api_problems = _api_problems(source)
    if not studio:
        if api_problems:
            _refuse_for_api(source, api_problems)
        reasons: list[str] = []
    else:
        reasons = [text for _, text in api_problems] + _fidelity_problems(source)
    if verify:
        verify_decodes(path, source)
    return replace(source, studio_reasons=tuple(reasons))


# The header fields metadata.read_metadata carries to the outputs (besides the ICC profile).
_CARRIED = ("exif-data", "xmp-data", "iptc-data")


def _refuse_raw(name: str) -> None:
    raise InputRejected("raw", f"a camera raw file ({name}); export a TIFF or JPEG from your "
                               f"raw developer (Lightroom, Capture One, ...) and drop that")


def _header(path: Path) -> pyvips.Image:
    try:
        # Opening reads the header only; pixels are decoded when something asks for them.
        return pyvips.Image.new_from_file(vips_name(path), access="sequential", fail_on=FAIL_ON)
    except pyvips.Error as exc:
        raise InputRejected("corrupt", f"the image header is damaged: {vips_message(exc)}; "
                                       f"export or copy it again") from None


def _format(kind: str, header: pyvips.Image) -> str:
    if kind == "heif":
        return "avif" if _str_field(header, "heif-compression", "") == "av1" else "heic"
    return kind


def _int_field(image: pyvips.Image, name: str, default: int) -> int:
    return int(image.get(name)) if image.get_typeof(name) else default


def _str_field(image: pyvips.Image, name: str, default: str) -> str:
    return str(image.get(name)) if image.get_typeof(name) else default


def _api_problems(source: Source) -> list[tuple[str, str]]:
    """(reason code, short text) for each limit of the API the file breaks, worst first."""
    problems = []
    if source.format not in API_FORMATS:
        problems.append(("unsupported_format", _NAMES[source.format]))
    if source.width * source.height > MAX_PIXELS:
        problems.append(("too_many_pixels",
                         f"{source.megapixels:.1f} MP, over the API's 25 MP"))
    if source.file_size > MAX_BYTES:
        problems.append(("too_large", f"{source.file_size / 1e6:.1f} MB, over the API's 30 MB"))
    return problems


def _fidelity_problems(source: Source) -> list[str]:
    """What the API would take but get wrong: depth, colour, orientation."""
    problems = []
    if source.bits > 8:
        problems.append(f"{max(source.stored_bits, 9)}-bit")
    if source.colour == "cmyk":
        problems.append("CMYK")
    elif source.icc is not None and not source.icc_srgb:
        problems.append(f"{source.icc_name or 'non-sRGB'} profile")
    if source.orientation != 1:
        problems.append(f"EXIF orientation {source.orientation}")
    return problems


def _refuse_for_api(source: Source, problems: list[tuple[str, str]]) -> None:
    """One refusal naming every problem: a TIFF is not told to shrink before it is told
    TIFFs are refused anyway."""
    what, fixes = [], []
    for code, _ in problems:
        if code == "unsupported_format":
            what.append(f"{_NAMES[source.format]} is not accepted")
            fixes.append("convert it to PNG, JPEG or WEBP")
        elif code == "too_many_pixels":
            what.append(f"{source.width}x{source.height} ({source.megapixels:.1f} MP) is over "
                        f"the API's 25 MP")
            fixes.append("resize it to 25 MP or less")
        else:
            what.append(f"{source.file_size / 1e6:.1f} MB is over the API's 30 MB")
            fixes.append("export it under 30 MB")
    size = f"{source.file_size / 1e6:.1f} MB" if source.file_size >= 100_000 else \
        f"{source.file_size / 1e3:.0f} KB"
    message = (f"a {size} {_NAMES[source.format]} of {source.width}x{source.height}: "
               f"{' and '.join(what)}; {', '.join(fixes)} (or turn the studio path on for "
               f"this inbox)")
    raise InputRejected(problems[0][0], message)


def _profile(header: pyvips.Image) -> tuple[bytes | None, bool, str | None]:
    """The embedded ICC profile, whether it is sRGB, and its description; a profile lcms
    cannot read is ignored, as a viewer would."""
    if not header.get_typeof("icc-profile-data"):
        return None, True, None
    icc = bytes(header.get("icc-profile-data"))
    described = describe_profile(icc)
    if described is None:
        return None, True, None
    return icc, *described


def describe_profile(icc: bytes) -> tuple[bool, str | None] | None:
    """(is it sRGB, its description) for an ICC profile; None if lcms cannot read it.

    sRGB is recognised by its colorants, since descriptions vary between vendors.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile
    except (OSError, ImageCms.PyCMSError, ValueError):
        return None
    name = (profile.profile_description or "").strip() or None
    if profile.xcolor_space.strip() != "RGB":
        return False, name
    colorants = [c[0] for c in (profile.red_colorant, profile.green_colorant,
                                profile.blue_colorant) if c is not None]
    if len(colorants) != 3:  # a table-based profile: trust the name
        return "srgb" in (name or "").lower(), name
    srgb = all(math.dist(c, want) < 0.005
               for c, want in zip(colorants, _SRGB_COLORANTS, strict=True))
    return srgb, name


# --------------------------------------------------------------------------- raw detection

_DNG_VERSION, _NEW_SUBFILE_TYPE, _PHOTOMETRIC, _COMPRESSION, _MAKE = 50706, 254, 262, 259, 271
_CFA_PHOTOMETRIC = {32803, 34892}  # colour filter array, linear raw
_RAW_COMPRESSION = {6, 34713, 32767, 32769, 32770, 34892, 65000}  # old-JPEG thumbnails, NEF,
# Sony ARW, lossy DNG, Kodak: found in raw files, not in what raw developers export
_MAKER_TAGS = {0xC634, 0x7000, 0x7200, 0x7221, 0x828D, 0x828E, 0x8290, 0xC5D8, 0xC6D3}
# DNGPrivateData (Sony, Pentax), SonyRawFileType, SR2 private/subIFDs, CFA pattern tags,
# Kodak IFD, Sony/Leica/Epson maker data


def _tiff_raw(handle: io.BufferedReader, head: bytes) -> str | None:
    """The raw format a TIFF-shaped file is, from its tags; None for a real TIFF.

    Raw files are TIFF containers too, but their first directory is a reduced-resolution
    preview (NewSubfileType 1) or carries DNGVersion or a maker's private tags, and the
    sensor data hides in SubIFDs with a colour-filter-array photometric.
    """
    try:
        handle.seek(0)
        reader = containers.TiffReader(handle)
        first, _ = reader.directory(reader.first)
        if _DNG_VERSION in first:
            return "DNG"
        make = _ascii(handle, reader, first.get(_MAKE))
        name = _raw_name(make)
        if first.get(_NEW_SUBFILE_TYPE, None) and first[_NEW_SUBFILE_TYPE].values[:1] == (1,):
            return name
        if _MAKER_TAGS & first.keys():
            return name
        if set(first[_PHOTOMETRIC].values if _PHOTOMETRIC in first else ()) & _CFA_PHOTOMETRIC:
            return name
        if set(first[_COMPRESSION].values if _COMPRESSION in first else ()) & _RAW_COMPRESSION:
            return name
        for offset in first[containers.SUBIFDS].values if containers.SUBIFDS in first else ():
            sub, _ = reader.directory(offset)
            if set(sub[_PHOTOMETRIC].values if _PHOTOMETRIC in sub else ()) & _CFA_PHOTOMETRIC:
                return name
    except (ValueError, OSError, KeyError, IndexError):
        return None  # not parseable here: libvips will judge it
    return None


def _ascii(handle: io.BufferedReader, reader: containers.TiffReader,
           entry: containers.TiffEntry | None) -> str:
    if entry is None or entry.type != 2 or entry.count > 256:
        return ""
    data = entry.raw
    if entry.count > len(entry.raw):
        handle.seek(int.from_bytes(entry.raw, "little" if reader.order == "<" else "big"))
        data = handle.read(entry.count)
    return data[:entry.count].split(b"\0")[0].decode("latin-1").strip()


def _raw_name(make: str) -> str:
    known = {"NIKON": "NEF", "SONY": "ARW", "CANON": "CR2", "PENTAX": "PEF", "SAMSUNG": "SRW",
             "HASSELBLAD": "3FR", "PHASE ONE": "IIQ", "LEAF": "MOS", "KODAK": "DCR",
             "EPSON": "ERF", "MAMIYA": "MEF", "LEICA": "RWL", "PANASONIC": "RW2",
             "OLYMPUS": "ORF", "FUJIFILM": "RAF"}
    for maker, name in known.items():
        if make.upper().startswith(maker):
            return name
    return "TIFF-based raw"


# --------------------------------------------------------------------------- decoding


def open_image(path: Path, source: Source, *, access: str = "sequential",
               shrink: int = 1) -> pyvips.Image:
    """The source's first image as a lazy pyvips image, as stored (not yet upright).

    `sequential` streams top to bottom with a few scanlines in memory; `random` is for
    rotations, which need to read across the whole height. `shrink` (2, 4, 8; JPEG only)
    decodes at that fraction of the size.
    """
    if source.format == "heic":
        return _decode_heic(path)
    options = {"shrink": shrink} if shrink > 1 and source.format == "jpeg" else {}
    try:
        return pyvips.Image.new_from_file(vips_name(path), access=access, fail_on=FAIL_ON,
                                          **options)
    except pyvips.Error as exc:
        raise InputRejected("corrupt", f"the image cannot be read: {vips_message(exc)}") \
            from None


def _decode_heic(path: Path) -> pyvips.Image:
    """Decode a HEVC-coded HEIF with libheif (pillow-heif) into a pyvips image in memory.

    libheif decodes whole images; phone photos are 12 to 48 MP, so that is bounded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            heif = pillow_heif.open_heif(str(path), convert_hdr_to_8bit=False)
            data = heif.data  # decodes
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputRejected("corrupt", f"the HEIC image does not decode completely "
                                       f"(truncated or corrupt): {exc}") from None
    mode, (width, height), stride = heif.mode, heif.size, heif.stride
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode.split(";")[0]]
    sample = 2 if ";16" in mode else 1
    row = width * bands * sample
    raw = bytes(data) if stride == row else b"".join(
        bytes(data[y * stride:y * stride + row]) for y in range(height))
    image = pyvips.Image.new_from_memory(raw, width, height, bands,
                                         "ushort" if sample == 2 else "uchar")
    interpretation = ("grey16" if sample == 2 else "b-w") if bands == 1 else \
        ("rgb16" if sample == 2 else "srgb")
    image = image.copy(interpretation=interpretation)
    icc = heif.info.get("icc_profile")
    if icc:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", bytes(icc))
    return image


def verify_decodes(path: Path, source: Source, data: bytes | None = None) -> None:
    """Decode the whole image once, streaming; raise InputRejected("corrupt") if it fails.

    `data`, when given, is the file's content already read (the fast path sends those very
    bytes): it is checked instead of reading the file again, so what is checked is what is
    sent. A JPEG is decoded at 1/8 scale: every byte of its stream is still read, so
    truncation is caught, for a fraction of the time and memory. A PNG is checked by
    containers' `png_inflates` (its pixel data inflated to the exact size, every chunk's CRC),
    without libvips.
    """
    try:
        if source.format == "heic":
            _decode_heic(path)
            return
        if source.format == "png":
            if data is not None:
                problem = containers.png_inflates(data)
            else:
                with path.open("rb") as handle, \
                        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    problem = containers.png_inflates(mapped)
            if problem is None:
                return
            if problem:
                raise InputRejected("corrupt", f"the image does not decode completely "
                                               f"(truncated or corrupt): {problem}; copy it "
                                               f"again")
        options = {"shrink": 8} if source.format == "jpeg" else {}
        if data is not None:
            image = pyvips.Image.new_from_buffer(data, "", access="sequential",
                                                 fail_on=FAIL_ON, **options)
        else:
            image = pyvips.Image.new_from_file(vips_name(path), access="sequential",
                                               fail_on=FAIL_ON, **options)
        image.avg()
    except pyvips.Error as exc:
        raise InputRejected("corrupt", f"the image does not decode completely (truncated or "
                                       f"corrupt): {vips_message(exc)}; copy it again") \
            from None


def vips_message(exc: pyvips.Error) -> str:
    """libvips' first line about what went wrong."""
    lines = [line.strip() for line in str(exc.detail or exc.message).splitlines()
             if line.strip()]
    return lines[0] if lines else "unreadable"
