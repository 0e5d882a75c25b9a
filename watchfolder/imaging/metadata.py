"""Capture metadata (EXIF, XMP, IPTC) and the ICC profile: read from an original, carried
into results.

Two ways in: the studio path hands a `Metadata` to the encoder (imaging.write_output); the
fast path adds it to the API's answer without re-encoding a pixel (`carry_metadata`: PNG
chunks, WEBP RIFF chunks, JPEG APP segments are inserted; image data is copied byte for
byte). EXIF is rebuilt from a list of capture tags (camera, dates, exposure, creator,
copyright, GPS), orientation 1, without the maker note and thumbnail, whose offsets and
pixels would no longer be right.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import pyvips
from PIL import ExifTags, Image, TiffImagePlugin

from watchfolder.files import atomic
from watchfolder.imaging import containers
from watchfolder.imaging.inspect import describe_profile, vips_name

_EXIF_PREFIX = b"Exif\x00\x00"
_XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
_ICC_JPEG = b"ICC_PROFILE\x00"
_PHOTOSHOP = b"Photoshop 3.0\x00"
_XMP_PNG_KEYWORD = b"XML:com.adobe.xmp"
_JPEG_SEGMENT_MAX = 65533

# IFD0 tags that describe the capture rather than the stored pixels.
_IFD0_CAPTURE = {
    0x010E,  # ImageDescription
    0x010F, 0x0110,  # Make, Model
    0x011A, 0x011B, 0x0128,  # X/YResolution, ResolutionUnit
    0x0131, 0x0132,  # Software, DateTime
    0x013B, 0x013C,  # Artist, HostComputer
    0x4746, 0x4749,  # Rating, RatingPercent
    0x8298,  # Copyright
    0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F,  # Windows title, comment, author, keywords, subject
}
_EXIF_DROPPED = {0x927C, 0xA005}  # MakerNote (self-relative offsets), Interop pointer
_ORIENTATION = 0x0112
_IPTC_TAG = 33723


@dataclass(frozen=True)
class Metadata:
    """What a result inherits from its original. `exif` is TIFF-structured (no "Exif" prefix),
    `iptc` is IPTC-IIM records (as TIFF stores them, without JPEG's Photoshop wrapper)."""

    exif: bytes | None = field(default=None, repr=False)
    xmp: bytes | None = field(default=None, repr=False)
    iptc: bytes | None = field(default=None, repr=False)
    icc: bytes | None = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return any((self.exif, self.xmp, self.iptc, self.icc))


def read_metadata(path: Path) -> Metadata:
    """The metadata of an image file, from its header (no pixels decoded)."""
    path = Path(path)
    with path.open("rb") as handle:
        kind = containers.sniff(handle.read(containers.HEAD_BYTES)).kind
    header = pyvips.Image.new_from_file(vips_name(path))  # reads the header only
    exif = _blob(header, "exif-data")
    if kind == "tiff":
        # libvips does not read a TIFF's EXIF (capture tags in IFD0, an EXIF sub-IFD).
        exif = _tiff_exif(path)
    iptc = _blob(header, "iptc-data")
    if iptc is not None and iptc.startswith(_PHOTOSHOP):
        iptc = iim_from_photoshop(iptc)
    return Metadata(exif=normalise_exif(exif) if exif else None, xmp=_blob(header, "xmp-data"),
                    iptc=iptc or None, icc=_blob(header, "icc-profile-data"))


def _blob(image: pyvips.Image, name: str) -> bytes | None:
    return bytes(image.get(name)) if image.get_typeof(name) else None


def _tiff_exif(path: Path) -> bytes | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # Through the plugin: Image.open's decompression-bomb check would refuse a large
            # studio file, whose pixels libvips checked already and Pillow never decodes.
            with TiffImagePlugin.TiffImageFile(path) as image:
                exif = image.getexif()
                exif.get_ifd(ExifTags.IFD.Exif)
                exif.get_ifd(ExifTags.IFD.GPSInfo)
                return exif.tobytes()
        except (OSError, ValueError, SyntaxError, struct.error):
            return None


def normalise_exif(blob: bytes) -> bytes | None:
    """Keep the capture tags of an EXIF block, set orientation 1; None if nothing is left.

    Damaged EXIF is dropped rather than failing the file: metadata is carried on a best
    effort, pixels are not.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            original = Image.Exif()
            original.load(blob if blob.startswith(_EXIF_PREFIX) else _EXIF_PREFIX + blob)
            exif_ifd = {tag: value for tag, value in original.get_ifd(ExifTags.IFD.Exif).items()
                        if tag not in _EXIF_DROPPED}
            gps_ifd = dict(original.get_ifd(ExifTags.IFD.GPSInfo))
            result = Image.Exif()
            for tag, value in original.items():
                if tag in _IFD0_CAPTURE:
                    result[tag] = value
            if not result and not exif_ifd and not gps_ifd:
                return None
            result[_ORIENTATION] = 1
            if exif_ifd:
                result[ExifTags.IFD.Exif] = exif_ifd
            if gps_ifd:
                result[ExifTags.IFD.GPSInfo] = gps_ifd
            return result.tobytes()[len(_EXIF_PREFIX):]
        except (OSError, ValueError, SyntaxError, TypeError, KeyError, struct.error):
            return None


def iim_from_photoshop(block: bytes) -> bytes | None:
    """The IPTC-IIM records of a Photoshop image-resource block (JPEG APP13), if any."""
    pos = len(_PHOTOSHOP)
    while pos + 12 <= len(block) and block[pos:pos + 4] == b"8BIM":
        resource = int.from_bytes(block[pos + 4:pos + 6], "big")
        name_length = block[pos + 6]
        pos += 6 + (name_length + 2) // 2 * 2  # Pascal string padded to even length
        size = int.from_bytes(block[pos:pos + 4], "big")
        data = block[pos + 4:pos + 4 + size]
        if resource == 0x0404:
            return data
        pos += 4 + (size + 1) // 2 * 2
    return None


def photoshop_from_iim(iim: bytes) -> bytes:
    """Wrap IPTC-IIM records in the Photoshop resource block JPEG's APP13 expects."""
    return (_PHOTOSHOP + b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(iim)) + iim
            + (b"\x00" if len(iim) & 1 else b""))


def icc_space(icc: bytes) -> bytes:
    """The colour space signature of an ICC profile: b"RGB ", b"GRAY", b"CMYK"..."""
    return icc[16:20]


# --------------------------------------------------------------------------- studio path


def attach(image: pyvips.Image, metadata: Metadata, *, exif_prefix: bool = True) -> pyvips.Image:
    """A copy of `image` carrying exactly `metadata` (everything else of the kind removed)."""
    out = image.copy()
    for name in out.get_fields():
        if name in ("exif-data", "xmp-data", "iptc-data", "icc-profile-data", "orientation") \
                or name.startswith("exif-"):
            out.remove(name)
    blob = pyvips.GValue.blob_type
    if metadata.exif:
        out.set_type(blob, "exif-data",
                     (_EXIF_PREFIX if exif_prefix else b"") + metadata.exif)
    if metadata.xmp:
        out.set_type(blob, "xmp-data", metadata.xmp)
    if metadata.icc:
        out.set_type(blob, "icc-profile-data", metadata.icc)
    return out


def with_iptc(image: pyvips.Image, iptc: bytes | None) -> pyvips.Image:
    """Set libvips's iptc-data the way its JPEG saver writes it verbatim (APP13 holds a
    Photoshop resource block)."""
    if not iptc:
        return image
    out = image.copy()
    out.set_type(pyvips.GValue.blob_type, "iptc-data", photoshop_from_iim(iptc))
    return out


def add_tiff_metadata(path: Path, exif: bytes | None, iptc: bytes | None) -> bool:
    """Add capture tags, an EXIF sub-IFD and IPTC to the first directory of a TIFF we wrote.

    libvips writes no EXIF into TIFF, and cuts IPTC to a quarter (it counts the tag in
    32-bit words, libtiff in bytes). The new tags and their data are appended, then a
    merged copy of the first directory, and the header is pointed at it; the image data is
    not touched. Returns False (and changes nothing) for BigTIFF.
    """
    tags: dict[int, object] = {}
    if exif:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = Image.Exif()
            parsed.load(_EXIF_PREFIX + exif)
            tags = {tag: value for tag, value in parsed.items()
                    if tag not in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo, _ORIENTATION)}
            for pointer in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
                sub = dict(parsed.get_ifd(pointer))
                if sub:
                    tags[pointer] = sub
    if iptc:
        tags[_IPTC_TAG] = iptc
    if not tags:
        return True
    with path.open("r+b") as handle:
        reader = containers.TiffReader(handle)
        if reader.big:
            return False
        old, next_page = reader.directory(reader.first)
        header = b"II*\x00" if reader.order == "<" else b"MM\x00*"
        ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh=header + b"\x00" * 4)
        for tag, value in tags.items():
            if tag not in old:
                ifd[tag] = value
                if tag == _IPTC_TAG:
                    ifd.tagtype[tag] = 7  # UNDEFINED: bytes as they are
        end = _append_at_even(handle)
        extra = ifd.tobytes(end)  # offsets inside are absolute, for this position
        handle.write(extra)
        count = int.from_bytes(extra[:2], "little" if reader.order == "<" else "big")
        new_entries = [extra[2 + 12 * i:14 + 12 * i] for i in range(count)]
        old_entries = [struct.pack(reader.order + "HHI", e.tag, e.type, e.count) + e.raw
                       for e in old.values()]
        merged = sorted(old_entries + new_entries,
                        key=lambda entry: struct.unpack(reader.order + "H", entry[:2])[0])
        directory = _append_at_even(handle)
        handle.write(struct.pack(reader.order + "H", len(merged)) + b"".join(merged)
                     + struct.pack(reader.order + "I", next_page))
        handle.seek(4)
        handle.write(struct.pack(reader.order + "I", directory))
    return True


def _append_at_even(handle: BinaryIO) -> int:
    end = handle.seek(0, os.SEEK_END)
    if end & 1:
        handle.write(b"\x00")
        end += 1
    return end


# --------------------------------------------------------------------------- fast path


def carry_metadata(answer: Path, original: Path, dest: Path) -> None:
    """Write `answer` to `dest` with the original's EXIF, XMP (and IPTC, ICC) added.

    The answer's image data (IDAT, VP8/VP8L/ALPH, JPEG scans) is copied byte for byte. The
    original's ICC profile is added only if it is sRGB: the API's pixels are sRGB, and a
    file with another profile that went fast anyway (studio path off) must not claim it.
    Written beside `dest` and renamed into place. Raises ValueError if `answer` is not a
    PNG, WEBP or JPEG.
    """
    atomic.write_atomically(dest, lambda temp: write_with_metadata(answer, original, temp))


def write_with_metadata(answer: Path, original: Path, temp: Path, *,
                        metadata: Metadata | None = None) -> atomic.Written:
    """`carry_metadata`'s content written straight into `temp`, a file of ours nobody reads
    yet (not renamed, not fsynced); its size and SHA-256, taken as it is written.

    `metadata`: the original's, when the caller knows it already (an inspection that found
    none); read from `original`'s header otherwise.
    """
    if metadata is None:
        metadata = read_metadata(original)
    if metadata.icc is not None and not (describe_profile(metadata.icc) or (False, ""))[0]:
        metadata = replace(metadata, icc=None)
    answer = Path(answer)
    with answer.open("rb") as handle, \
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        kind = containers.sniff(bytes(data[:64])).kind
        if kind == "png":
            parts = _png_with(data, metadata)
        elif kind == "webp":
            parts = _webp_with(data, metadata)
        elif kind == "jpeg":
            parts = _jpeg_with(data, metadata)
        else:
            raise ValueError(f"{answer.name} is not a PNG, WEBP or JPEG")
        try:
            return atomic.write_hashed(temp, parts)
        finally:  # the mmap cannot close while views into it are alive
            for part in parts:
                if isinstance(part, memoryview):
                    part.release()


Part = bytes | memoryview


def _png_with(data: mmap.mmap, metadata: Metadata) -> list[Part]:
    chunks = list(containers.png_chunks(data))
    view = memoryview(data)
    added = []
    if metadata.icc:
        added.append(containers.png_chunk(b"iCCP", b"ICC profile\x00\x00"
                                          + zlib.compress(metadata.icc)))
    if metadata.exif:
        added.append(containers.png_chunk(b"eXIf", metadata.exif))
    if metadata.xmp:
        added.append(containers.png_chunk(
            b"iTXt", _XMP_PNG_KEYWORD + b"\x00\x00\x00\x00\x00" + metadata.xmp))
    replaced = {b"eXIf"} if metadata.exif else set()
    if metadata.icc:
        replaced |= {b"iCCP", b"sRGB"}  # one colour space statement: the profile
    parts: list[Part] = [containers.PNG_SIGNATURE]
    for chunk in chunks:
        body = view[chunk.data_start:chunk.data_start + chunk.length]
        if chunk.type in replaced or (metadata.xmp and chunk.type == b"iTXt"
                                      and bytes(body[:18]) == _XMP_PNG_KEYWORD + b"\x00"):
            continue
        parts.append(view[chunk.start:chunk.end])
        if chunk.type == b"IHDR":  # iCCP must precede PLTE and IDAT: right after IHDR
            parts.extend(added)
    return parts


_VP8X_ICC, _VP8X_ALPHA, _VP8X_EXIF, _VP8X_XMP = 0x20, 0x10, 0x08, 0x04


def _webp_with(data: mmap.mmap, metadata: Metadata) -> list[Part]:
    chunks = list(containers.riff_chunks(data))
    view = memoryview(data)
    width, height = containers.webp_size(data)
    flags = 0
    for chunk in chunks:
        if chunk.type == b"VP8X":
            flags = data[chunk.data_start] & ~(_VP8X_ICC | _VP8X_EXIF | _VP8X_XMP)
    if containers.webp_alpha(data):
        flags |= _VP8X_ALPHA
    kept = [view[c.start:c.end] for c in chunks
            if c.type not in (b"VP8X", b"ICCP", b"EXIF", b"XMP ")]
    flags |= (_VP8X_ICC if metadata.icc else 0) | (_VP8X_EXIF if metadata.exif else 0) \
        | (_VP8X_XMP if metadata.xmp else 0)
    vp8x = containers.riff_chunk(b"VP8X", bytes((flags, 0, 0, 0))
                                 + (width - 1).to_bytes(3, "little")
                                 + (height - 1).to_bytes(3, "little"))
    body: list[Part] = [b"WEBP", vp8x]
    if metadata.icc:
        body.append(containers.riff_chunk(b"ICCP", metadata.icc))
    body.extend(kept)
    if metadata.exif:
        body.append(containers.riff_chunk(b"EXIF", metadata.exif))
    if metadata.xmp:
        body.append(containers.riff_chunk(b"XMP ", metadata.xmp))
    size = sum(len(part) for part in body)
    return [b"RIFF", struct.pack("<I", size), *body]


def _jpeg_with(data: mmap.mmap, metadata: Metadata) -> list[Part]:
    segments, scan = containers.jpeg_segments(data)
    view = memoryview(data)
    added = []
    if metadata.exif and len(_EXIF_PREFIX) + len(metadata.exif) <= _JPEG_SEGMENT_MAX:
        added.append(containers.jpeg_segment(0xE1, _EXIF_PREFIX + metadata.exif))
    if metadata.xmp and len(_XMP_JPEG) + len(metadata.xmp) <= _JPEG_SEGMENT_MAX:
        added.append(containers.jpeg_segment(0xE1, _XMP_JPEG + metadata.xmp))
    if metadata.icc:
        added.extend(_icc_segments(metadata.icc))
    if metadata.iptc:
        added.append(containers.jpeg_segment(0xED, photoshop_from_iim(metadata.iptc)))

    def replaced(segment: containers.Segment) -> bool:
        payload = bytes(view[segment.start + 4:min(segment.end, segment.start + 40)])
        return ((segment.marker == 0xE1 and metadata.exif is not None
                 and payload.startswith(_EXIF_PREFIX))
                or (segment.marker == 0xE1 and metadata.xmp is not None
                    and payload.startswith(_XMP_JPEG))
                or (segment.marker == 0xE2 and metadata.icc is not None
                    and payload.startswith(_ICC_JPEG))
                or (segment.marker == 0xED and metadata.iptc is not None))

    parts: list[Part] = [b"\xff\xd8"]
    rest = [s for s in segments if not replaced(s)]
    if rest and rest[0].marker == 0xE0:  # JFIF's APP0 stays first
        parts.append(view[rest[0].start:rest[0].end])
        rest = rest[1:]
    parts.extend(added)
    parts.extend(view[s.start:s.end] for s in rest)
    parts.append(view[scan:])
    return parts


def _icc_segments(icc: bytes) -> list[bytes]:
    room = _JPEG_SEGMENT_MAX - len(_ICC_JPEG) - 2
    pieces = [icc[i:i + room] for i in range(0, len(icc), room)]
    if len(pieces) > 255:
        return []
    return [containers.jpeg_segment(0xE2, _ICC_JPEG + bytes((n, len(pieces))) + piece)
            for n, piece in enumerate(pieces, 1)]
