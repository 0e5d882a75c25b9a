"""The byte-level structure of image files: magic numbers, TIFF directories, PNG chunks,
JPEG segments, RIFF chunks. Nothing here decodes a pixel.

Used to tell formats apart from their bytes (never the extension), to recognise camera raw
files by their tags, to find where an image really ends (trailing garbage), and to add
metadata to a file without re-encoding it, and whether a PNG's compressed pixel data is
complete (`png_inflates`: inflated and its row structure checked, never unfiltered). A small
plain PNG's header is read here as libvips would read it (`plain_png`), for the fast path.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

HEAD_BYTES = 4096

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Magic numbers of formats we recognise only to name them in a refusal.
# (prefix, offset, name); checked in order.
_OTHER_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"), (b"GIF89a", 0, "GIF"), (b"BM", 0, "BMP"), (b"8BPS", 0, "PSD"),
    (b"%PDF", 0, "PDF"), (b"%!PS", 0, "PostScript"), (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"\x00\x00\x01\x00", 0, "ICO"), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"), (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "JPEG XL"), (b"qoif", 0, "QOI"),
    (b"gimp xcf", 0, "XCF"), (b"\x76\x2f\x31\x01", 0, "OpenEXR"), (b"#?RADIANCE", 0, "HDR"),
)
# Raw formats that are not TIFF-shaped (or whose TIFF header is non-standard).
_RAW_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"FUJIFILMCCD-RAW", 0, "RAF"), (b"IIRO", 0, "ORF"), (b"IIRS", 0, "ORF"),
    (b"MMOR", 0, "ORF"), (b"IIU\x00", 0, "RW2"), (b"HEAPCCDR", 6, "CRW"),
    (b"\x00MRM", 0, "MRW"), (b"FOVb", 0, "X3F"), (b"ARRI\x12\x34\x56\x78", 0, "ARI"),
)
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm",
                         b"hevs", b"mif1", b"msf1", b"avif", b"avis", b"mif2", b"miaf"})


@dataclass(frozen=True)
class Sniffed:
    """What the first bytes say: `kind` is jpeg, png, webp, tiff, heif, raw, other or None."""

    kind: str | None
    name: str  # a human name for messages: "JPEG", "CR3", "GIF"...


def sniff(head: bytes) -> Sniffed:
    """Identify a file from its first bytes (HEAD_BYTES are plenty)."""
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("jpeg", "JPEG")
    if head.startswith(PNG_SIGNATURE):
        return Sniffed("png", "PNG")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniffed("webp", "WEBP")
    for magic, offset, name in _RAW_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return Sniffed("raw", name)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        # Phase One IIQ and Canon CR2 keep a standard TIFF header with a maker mark after it.
        if b"IIII" in head[8:32] or b"MMMM" in head[8:32]:
            return Sniffed("raw", "IIQ")
        if head[8:10] == b"CR":
            return Sniffed("raw", "CR2")
        return Sniffed("tiff", "TIFF")
    if head[4:8] == b"ftyp":
        brands = bmff_brands(head)
        if b"crx " in brands:
            return Sniffed("raw", "CR3")
        if brands & HEIF_BRANDS:
            return Sniffed("heif", "AVIF" if brands & {b"avif", b"avis"} else "HEIF")
        return Sniffed("other", "video or other ISO media")
    for magic, offset, name in _OTHER_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return Sniffed("other", name)
    text = head[:1024].lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")) and b"<svg" in text:
        return Sniffed("other", "SVG")
    return Sniffed(None, "unknown")


def bmff_brands(head: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO-BMFF `ftyp` box (HEIF, AVIF, CR3, MP4)."""
    size = int.from_bytes(head[:4], "big")
    if size < 16 or size > len(head):
        size = min(len(head), 64)
    brands = {head[8:12]}
    brands.update(head[i:i + 4] for i in range(16, size - 3, 4))
    return brands


# --------------------------------------------------------------------------- TIFF

_TIFF_TYPES = {1: ("B", 1), 2: ("c", 1), 3: ("H", 2), 4: ("I", 4), 5: ("II", 8), 6: ("b", 1),
               7: ("c", 1), 8: ("h", 2), 9: ("i", 4), 10: ("ii", 8), 11: ("f", 4),
               12: ("d", 8), 13: ("I", 4), 16: ("Q", 8), 17: ("q", 8), 18: ("Q", 8)}
_INLINE_VALUES = 64  # longer arrays (strip offsets...) are not needed to decide anything
SUBIFDS, EXIF_IFD = 330, 34665


@dataclass(frozen=True)
class TiffEntry:
    tag: int
    type: int
    count: int
    raw: bytes  # the entry's 4 (or 8) value bytes: inline data or the offset of the data
    values: tuple[int, ...]  # integer values when short enough to matter, else ()


class TiffReader:
    """Reads directories of a TIFF (or BigTIFF) file without touching its image data."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        head = handle.read(16)
        if head[:2] not in (b"II", b"MM"):
            raise ValueError("not a TIFF header")
        self.order = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(self.order + "H", head[2:4])[0]
        self.big = version == 43
        if self.big:
            self.first = struct.unpack(self.order + "Q", head[8:16])[0]
        else:
            self.first = struct.unpack(self.order + "I", head[4:8])[0]

    def _unpack(self, fmt: str, data: bytes) -> tuple[int, ...]:
        return struct.unpack(self.order + fmt, data)

    def directory(self, offset: int) -> tuple[dict[int, TiffEntry], int]:
        """The entries of the directory at `offset`, and the offset of the next one (0: none)."""
        count_size, entry_size, offset_fmt = (8, 20, "Q") if self.big else (2, 12, "I")
        self.handle.seek(offset)
        raw_count = self.handle.read(count_size)
        if len(raw_count) != count_size:
            raise ValueError("directory beyond the end of the file")
        (count,) = self._unpack("Q" if self.big else "H", raw_count)
        if count > 4096:
            raise ValueError(f"implausible directory of {count} entries")
        data = self.handle.read(count * entry_size + struct.calcsize(offset_fmt))
        if len(data) != count * entry_size + struct.calcsize(offset_fmt):
            raise ValueError("truncated directory")
        entries: dict[int, TiffEntry] = {}
        for i in range(count):
            entry = data[i * entry_size:(i + 1) * entry_size]
            if self.big:
                tag, kind, n = self._unpack("HHQ", entry[:12])
                raw = entry[12:20]
            else:
                tag, kind, n = self._unpack("HHI", entry[:8])
                raw = entry[8:12]
            entries[tag] = TiffEntry(tag, kind, n, raw, self._values(kind, n, raw))
        (next_offset,) = self._unpack(offset_fmt, data[count * entry_size:])
        return entries, next_offset

    def _values(self, kind: int, count: int, raw: bytes) -> tuple[int, ...]:
        if kind not in (1, 3, 4, 13, 16, 18) or count > _INLINE_VALUES:
            return ()
        fmt, size = _TIFF_TYPES[kind]
        data = raw
        if size * count > len(raw):
            (where,) = self._unpack("Q" if self.big else "I", raw)
            here = self.handle.tell()
            self.handle.seek(where)
            data = self.handle.read(size * count)
            self.handle.seek(here)
            if len(data) != size * count:
                return ()
        return self._unpack(fmt * count, data[:size * count])

    def chain(self, limit: int = 10_000) -> Iterator[dict[int, TiffEntry]]:
        """Every top-level directory (page), in order; stops at a loop or at `limit`."""
        offset, seen = self.first, set[int]()
        while offset and offset not in seen and len(seen) < limit:
            seen.add(offset)
            entries, offset = self.directory(offset)
            yield entries


# --------------------------------------------------------------------------- PNG


@dataclass(frozen=True)
class Chunk:
    """A PNG chunk or a RIFF chunk: its type, and where its data lies in the file."""

    type: bytes
    start: int  # offset of the chunk's header
    data_start: int
    length: int
    end: int  # offset just after the chunk (CRC / padding included)


def png_chunks(data: bytes | mmap.mmap) -> Iterator[Chunk]:
    """The chunks of a PNG, up to and including IEND; raises ValueError on a broken layout."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG")
    pos = 8
    while True:
        if pos + 12 > len(data):
            raise ValueError("PNG ends inside a chunk header (truncated)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise ValueError(f"PNG chunk {kind!r} runs past the end of the file (truncated)")
        yield Chunk(kind, pos, pos + 8, length, end)
        if kind == b"IEND":
            return
        pos = end


def png_size(data: bytes | mmap.mmap) -> tuple[int, int]:
    """Width and height from IHDR, which must come first."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        raise ValueError("PNG does not start with an IHDR chunk")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def png_end(data: bytes | mmap.mmap) -> int:
    """The offset just after the PNG's IEND chunk."""
    end = 0
    for chunk in png_chunks(data):
        end = chunk.end
    return end


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One serialised PNG chunk with its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --------------------------------------------------------------------------- JPEG

_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0..7 have no length field


@dataclass(frozen=True)
class Segment:
    """A JPEG marker segment before the first scan: marker byte, file range, payload range."""

    marker: int
    start: int
    end: int

    def payload(self, data: bytes | mmap.mmap) -> bytes:
        return bytes(data[self.start + 4:self.end])


def jpeg_segments(data: bytes | mmap.mmap) -> tuple[list[Segment], int]:
    """The marker segments after SOI up to the first SOS, and the offset of that SOS."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    segments: list[Segment] = []
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) \
                and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ValueError("JPEG header ends before the image data (truncated or damaged)")
        marker = data[pos + 1]
        if marker == 0xDA:
            return segments, pos
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise ValueError("JPEG segment runs past the end of the file (truncated)")
        segments.append(Segment(marker, pos, end))
        pos = end


def jpeg_end(data: bytes | mmap.mmap) -> int:
    """The offset just after the JPEG's EOI marker; raises ValueError if there is none.

    Walks the entropy-coded data for markers (a 0xFF that is neither a stuffed 0x00 nor a
    restart marker), so an EOI pattern inside appended data is not mistaken for the end.
    """
    _, pos = jpeg_segments(data)
    size = len(data)
    while True:
        if pos + 2 > size or data[pos] != 0xFF:
            raise ValueError("JPEG image data is damaged or has no end marker (truncated)")
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if marker in _STANDALONE:
            pos += 2
        else:  # SOS, or a table segment between the scans of a progressive JPEG
            if pos + 4 > size:
                raise ValueError("JPEG ends inside a marker segment (truncated)")
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker != 0xDA:
                continue
        pos = _next_marker(data, pos)


def _next_marker(data: bytes | mmap.mmap, pos: int) -> int:
    """Skip entropy-coded data: the offset of the next 0xFF that starts a real marker."""
    size = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= size:
            raise ValueError("JPEG image data has no end marker (truncated)")
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        elif following == 0xFF:
            pos += 1
        else:
            return pos


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    if len(payload) + 2 > 0xFFFF:
        raise ValueError("a JPEG segment holds at most 65533 bytes")
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_size(data: bytes | mmap.mmap) -> tuple[int, int]:
    """Width and height from the frame header (SOFn)."""
    segments, _ = jpeg_segments(data)
    for segment in segments:
        if 0xC0 <= segment.marker <= 0xCF and segment.marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[segment.start + 5:segment.start + 9])
            return width, height
    raise ValueError("JPEG has no frame header")


# --------------------------------------------------------------------------- RIFF (WEBP)


def riff_chunks(data: bytes | mmap.mmap) -> Iterator[Chunk]:
    """The chunks of a RIFF/WEBP file as its RIFF length declares them."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WEBP")
    declared_end = 8 + int.from_bytes(data[4:8], "little")
    if declared_end > len(data):
        raise ValueError("WEBP is shorter than its RIFF header says (truncated)")
    pos = 12
    while pos < declared_end:
        if pos + 8 > declared_end:
            raise ValueError("WEBP chunk header runs past the RIFF length")
        kind = bytes(data[pos:pos + 4])
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        end = pos + 8 + length + (length & 1)
        if end > declared_end:
            raise ValueError(f"WEBP chunk {kind!r} runs past the RIFF length")
        yield Chunk(kind, pos, pos + 8, length, end)
        pos = end


def riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) & 1 else b"")


def webp_end(data: bytes | mmap.mmap) -> int:
    """Where the WEBP ends as its RIFF header declares it (chunks checked to fit)."""
    for _ in riff_chunks(data):
        pass
    return 8 + int.from_bytes(data[4:8], "little")


def webp_size(data: bytes | mmap.mmap) -> tuple[int, int]:
    """Canvas width and height from VP8X, or from the VP8 / VP8L bitstream header."""
    for chunk in riff_chunks(data):
        body = bytes(data[chunk.data_start:chunk.data_start + min(chunk.length, 30)])
        if chunk.type == b"VP8X" and len(body) >= 10:
            return (int.from_bytes(body[4:7], "little") + 1,
                    int.from_bytes(body[7:10], "little") + 1)
        if chunk.type == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", body[6:10])
            return width & 0x3FFF, height & 0x3FFF
        if chunk.type == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
            bits = int.from_bytes(body[1:5], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise ValueError("WEBP has no image header")


def webp_alpha(data: bytes | mmap.mmap) -> bool:
    """Whether the WEBP's bitstream carries alpha (an ALPH chunk, or VP8L's alpha bit)."""
    for chunk in riff_chunks(data):
        if chunk.type == b"ALPH":
            return True
        if chunk.type == b"VP8L" and chunk.length >= 5:
            bits = int.from_bytes(data[chunk.data_start + 1:chunk.data_start + 5], "little")
            return bool(bits >> 28 & 1)
    return False


# Colour type → samples per pixel. Palette images (3) are left to libvips: an index past
# the palette's end is an error only a decoder sees.
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 4: (8, 16), 6: (8, 16)}
_INFLATE_STEP = 1 << 20  # bytes inflated at a time: memory stays flat whatever the size


def png_crcs(data: bytes | mmap.mmap) -> str | None:
    """Whether every chunk of a PNG holds its CRC (the bytes arrived as they were sent):
    None if so, else what is wrong. A pass of crc32, no inflate: a 25 MP answer in about
    10 ms, where `png_inflates` takes a quarter of a second."""
    try:
        chunks = list(png_chunks(data))
    except ValueError as exc:
        return str(exc)
    view = memoryview(data)
    try:
        for chunk in chunks:
            if not _crc_holds(view, chunk):
                return f"PNG chunk {chunk.type!r} fails its CRC (corrupt)"
    finally:
        view.release()
    return None


def _crc_holds(view: memoryview, chunk: Chunk) -> bool:
    """Whether `chunk`'s stored CRC matches its type and data."""
    body = view[chunk.data_start:chunk.data_start + chunk.length]
    crc = int.from_bytes(view[chunk.end - 4:chunk.end], "big")
    return zlib.crc32(body, zlib.crc32(chunk.type)) == crc


def png_inflates(data: bytes | mmap.mmap) -> str | None:
    """Whether a PNG's pixel data is complete, without decoding a pixel through libvips.

    None: sound (every chunk's CRC matches; the IDAT stream inflates, its checksum holds,
    to exactly the rows IHDR declares, each starting with a valid filter type, with
    nothing left over; unfiltering such data cannot fail). A message: what is wrong. "":
    not decided here (interlaced or palette images): decode it with libvips instead.
    Costs one inflate in C, a fraction of a libvips decode and none of its set-up, which
    dominates for the small images of the fast path.
    """
    try:
        width, height = png_size(data)
        chunks = list(png_chunks(data))
    except ValueError as exc:
        return str(exc)
    depth, colour, _, _, interlace = data[24], data[25], data[26], data[27], data[28]
    if colour not in _PNG_CHANNELS or interlace != 0:
        return ""
    if depth not in _PNG_DEPTHS[colour]:
        return f"bit depth {depth} is not valid for PNG colour type {colour}"
    stride = 1 + (width * _PNG_CHANNELS[colour] * depth + 7) // 8
    expected, done = height * stride, 0
    inflater = zlib.decompressobj()
    view = memoryview(data)
    try:
        for chunk in chunks:
            if not _crc_holds(view, chunk):
                return f"PNG chunk {chunk.type!r} fails its CRC (corrupt)"
            if chunk.type != b"IDAT":
                continue
            pending: bytes | memoryview = view[chunk.data_start:chunk.data_start + chunk.length]
            while pending:
                if inflater.eof:
                    return "data after the end of the compressed pixel stream"
                rows = inflater.decompress(pending, _INFLATE_STEP)
                pending = inflater.unconsumed_tail
                if done + len(rows) > expected:
                    return f"more pixel data than {width}x{height} can hold"
                if rows and max(rows[(-done) % stride::stride], default=0) > 4:
                    return "a row with an invalid filter type (corrupt)"
                done += len(rows)
        if not inflater.eof:
            return f"the pixel data stops after {done:,} of {expected:,} bytes (truncated)"
    except zlib.error as exc:
        return f"the pixel data does not inflate: {exc}"
    finally:
        view.release()
    if inflater.unused_data or done != expected:
        return f"{done:,} bytes of pixel data where {width}x{height} needs {expected:,}"
    return None


# Chunks a plain PNG may hold before its pixel data that change nothing `Source` holds, as
# libvips reads it (resolution, background colour, time, gamma and chromaticities, the sRGB
# intent: libvips attaches no profile for these).
_PLAIN_PNG_CHUNKS = frozenset({b"pHYs", b"bKGD", b"tIME", b"gAMA", b"cHRM", b"sRGB"})
_PNG_BANDS = {0: 1, 2: 3, 4: 2, 6: 4}  # by colour type: grey, RGB, grey + alpha, RGBA


class PngHeader:
    """A plain PNG's header as libvips gives it, for the fields `inspect.inspect_source` reads."""

    def __init__(self, width: int, height: int, depth: int, colour_type: int) -> None:
        self.width, self.height = width, height
        self.format = "uchar" if depth == 8 else "ushort"
        grey = colour_type in (0, 4)
        self.interpretation = ("b-w" if grey else "srgb") if depth == 8 else \
            ("grey16" if grey else "rgb16")
        self.bands = _PNG_BANDS[colour_type]
        self._fields = {"bits-per-sample": depth}

    def get_typeof(self, name: str) -> int:
        return 1 if name in self._fields else 0

    def get(self, name: str) -> int:
        return self._fields[name]


def plain_png(head: bytes, max_pixels: int) -> PngHeader | None:
    """The header of a small plain PNG (8- or 16-bit grey or RGB, with or without alpha, no
    palette, transparency chunk, profile or metadata, up to `max_pixels`), read from its first
    bytes without libvips (whose open, per fast-path file, was a twentieth of the daemon's
    Python work); None for any other, which libvips reads. Every chunk up to the pixel data
    must hold its CRC, as libvips requires."""
    pos, header = len(PNG_SIGNATURE), None
    while pos + 8 <= len(head):
        length = int.from_bytes(head[pos:pos + 4], "big")
        kind = head[pos + 4:pos + 8]
        if kind == b"IDAT":
            return header
        end = pos + 12 + length
        if end > len(head) or zlib.crc32(head[pos + 4:end - 4]) != \
                int.from_bytes(head[end - 4:end], "big"):
            return None
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            width, height, depth, colour_type, compression, filtering, interlace = \
                struct.unpack(">IIBBBBB", head[pos + 8:end - 4])
            if not 0 < width * height <= max_pixels or depth not in (8, 16) or \
                    colour_type not in _PNG_BANDS or compression or filtering or interlace > 1:
                return None
            header = PngHeader(width, height, depth, colour_type)
        elif kind not in _PLAIN_PNG_CHUNKS:
            return None
        pos = end
    return None
