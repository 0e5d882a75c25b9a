"""Generated studio-style product shots, for the demo, the tests and the benchmarks.

Each image is a plain backdrop (white or grey seamless paper, or a green screen) with a
faint gradient and mottle, and one or two solid-colour objects kept well away from the
border: the kind of picture a hot folder receives and the sandbox's modest knock-out can
handle. Everything is drawn from a seed, so the same call gives the same pixels.
"""

from __future__ import annotations

import io
import random
import struct
import tempfile
from pathlib import Path

import pyvips
from PIL import Image, ImageChops, ImageDraw

from watchfolder.files.atomic import write_atomic

__all__ = ["BACKDROPS", "SUBJECTS", "adobe_rgb_profile", "adobe_rgb_tiff", "camera_jpeg",
           "studio_image", "write_samples"]

Colour = tuple[int, int, int]

BACKDROPS: dict[str, Colour] = {
    "white": (246, 246, 244),
    "grey": (150, 152, 155),
    "green": (30, 170, 70),
}
SUBJECTS = ("circle", "box", "mug", "bottle", "pair")

# Subject colours far from every backdrop, so a knock-out never eats the subject.
_PALETTE: dict[str, Colour] = {
    "red": (200, 35, 40),
    "blue": (35, 70, 190),
    "orange": (235, 120, 20),
    "purple": (120, 40, 150),
    "teal": (0, 120, 130),
    "black": (25, 25, 30),
}


def _shade(colour: Colour, factor: float) -> Colour:
    r, g, b = (min(255, max(0, round(c * factor))) for c in colour)
    return r, g, b


def _backdrop(size: tuple[int, int], colour: Colour, rng: random.Random) -> Image.Image:
    """A seamless-paper look: a few percent darker towards the bottom, plus soft mottle."""
    width, height = size
    top = Image.new("RGB", size, _shade(colour, 1.01))
    bottom = Image.new("RGB", size, _shade(colour, 0.96))
    gradient = Image.linear_gradient("L").resize(size)
    paper = Image.composite(bottom, top, gradient)
    # Low-frequency noise in 0..4, shifted to -2..+2 by add()'s offset.
    cells = (max(2, width // 40), max(2, height // 40))
    noise = Image.frombytes("L", cells, bytes(rng.randrange(5) for _ in range(cells[0] * cells[1])))
    mottle = noise.resize(size, Image.Resampling.BICUBIC).convert("RGB")
    return ImageChops.add(paper, mottle, scale=1.0, offset=-2)


def studio_image(
    width: int = 640,
    height: int = 480,
    backdrop: str = "white",
    subject: str = "circle",
    seed: int = 0,
    *,
    colour: Colour | str | None = None,
) -> Image.Image:
    """An opaque RGB product shot; the image centre is always on the subject.

    ``backdrop`` is one of BACKDROPS, ``subject`` one of SUBJECTS. ``colour`` (an RGB tuple
    or a palette name such as "red") fixes the subject colour; otherwise the seed picks it.
    """
    if backdrop not in BACKDROPS:
        raise ValueError(f"backdrop must be one of {sorted(BACKDROPS)}, not {backdrop!r}")
    if subject not in SUBJECTS:
        raise ValueError(f"subject must be one of {SUBJECTS}, not {subject!r}")
    if width < 32 or height < 32:
        raise ValueError("studio images need at least 32x32 pixels")
    rng = random.Random(seed)
    if colour is None:
        colour = rng.choice(list(_PALETTE.values()))
    elif isinstance(colour, str):
        colour = _PALETTE[colour]

    image = _backdrop((width, height), BACKDROPS[backdrop], rng)
    draw = ImageDraw.Draw(image)
    cx = width / 2 + rng.uniform(-0.03, 0.03) * width
    cy = height / 2 + rng.uniform(-0.03, 0.03) * height
    # Half-extent of the subject: at most 30 % of the smaller side, so it stays well inside.
    r = min(width, height) * rng.uniform(0.22, 0.3)
    dark = _shade(colour, 0.7)

    if subject == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif subject == "box":
        draw.rectangle((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8), fill=colour)
        draw.polygon(  # a darker side face, for a little depth
            [
                (cx + r, cy - r * 0.8),
                (cx + r * 1.15, cy - r * 0.95),
                (cx + r * 1.15, cy + r * 0.65),
                (cx + r, cy + r * 0.8),
            ],
            fill=dark,
        )
    elif subject == "mug":
        # A solid handle: a ring would enclose backdrop the knock-out cannot reach.
        draw.rounded_rectangle(
            (cx + r * 0.5, cy - r * 0.45, cx + r * 1.05, cy + r * 0.35), r * 0.2, fill=dark
        )
        draw.rounded_rectangle(
            (cx - r * 0.75, cy - r, cx + r * 0.75, cy + r), r * 0.12, fill=colour
        )
        draw.ellipse((cx - r * 0.75, cy - r * 1.1, cx + r * 0.75, cy - r * 0.9), fill=dark)
    elif subject == "bottle":
        draw.rounded_rectangle(
            (cx - r * 0.45, cy - r * 0.5, cx + r * 0.45, cy + r), r * 0.15, fill=colour
        )
        draw.rectangle((cx - r * 0.15, cy - r, cx + r * 0.15, cy - r * 0.45), fill=colour)
        draw.rectangle((cx - r * 0.18, cy - r * 1.05, cx + r * 0.18, cy - r * 0.9), fill=dark)
    else:  # pair: a box behind, a ball in front covering the centre
        second = rng.choice([c for c in _PALETTE.values() if c != colour])
        draw.rectangle((cx - r, cy - r, cx + r * 0.2, cy + r * 0.3), fill=second)
        draw.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=colour)
    return image


# (file name, width, height, backdrop, subject, colour, Pillow format)
_SAMPLES = (
    ("red-mug on white.jpg", 800, 600, "white", "mug", "red", "JPEG"),
    ("blue-box on grey.png", 640, 480, "grey", "box", "blue", "PNG"),
    ("orange-bottle on green.webp", 600, 800, "green", "bottle", "orange", "WEBP"),
    ("teal-ball on white.png", 512, 512, "white", "circle", "teal", "PNG"),
    ("purple-pair on grey.jpg", 1024, 768, "grey", "pair", "purple", "JPEG"),
)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write_samples(folder: Path, *, studio: bool = False) -> list[Path]:
    """Write five sample shots (JPEG, PNG, WEBP) and one truncated ``broken.jpg``.

    Files appear atomically, so a daemon watching ``folder`` never sees half a file.
    The broken one is there on purpose: a real hot folder receives those too. With
    ``studio``, two files for the studio path as well: a 27 MP camera JPEG stored sideways
    (EXIF orientation 6) and a 16-bit Adobe RGB TIFF.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, (name, width, height, backdrop, subject, colour, fmt) in enumerate(_SAMPLES):
        image = studio_image(width, height, backdrop, subject, seed, colour=colour)
        path = folder / name
        write_atomic(_encode(image, fmt), path)
        paths.append(path)

    whole = _encode(studio_image(640, 480, "white", "box", 99, colour="black"), "JPEG")
    broken = folder / "broken.jpg"
    write_atomic(whole[: len(whole) // 3], broken)
    paths.append(broken)
    if studio:
        camera = folder / "camera-sideways.jpg"
        write_atomic(camera_jpeg(), camera)
        retouch = folder / "retouch-adobe-rgb-16bit.tif"
        write_atomic(adobe_rgb_tiff(), retouch)
        paths += [camera, retouch]
    return paths


# --------------------------------------------------------------------------- studio files

# EXIF a camera writes: who, what, when; the orientation says "rotate 90° clockwise to view".
_CAMERA_EXIF = {0x010F: "Canon", 0x0110: "Canon EOS R5", 0x013B: "Watchfolder Studio",
                0x8298: "(c) Watchfolder Studio", 0x0132: "2024:05:06 07:08:09"}
_CAMERA_EXIF_IFD = {0x9003: "2024:05:06 07:08:09", 0x829A: (1, 125), 0x8827: 100}


def camera_jpeg(width: int = 6000, height: int = 4500, *, seed: int = 7,
                orientation: int = 6) -> bytes:
    """A camera-size JPEG (27 MP by default, over the API's 25 MP) of a ``width`` x
    ``height`` upright shot, stored as a camera held upright stores it: pixels sideways
    and an EXIF orientation (6, or 8 for the other way round), with capture EXIF."""
    image = studio_image(width, height, "white", "mug", seed, colour="red")
    stored = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
              3: Image.Transpose.ROTATE_180, 1: None}[orientation]
    if stored is not None:
        image = image.transpose(stored)
    exif = Image.Exif()
    for tag, value in _CAMERA_EXIF.items():
        exif[tag] = value
    exif[0x0112] = orientation
    exif[0x8769] = dict(_CAMERA_EXIF_IFD)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def adobe_rgb_tiff(width: int = 3000, height: int = 2000, *, seed: int = 8,
                   compression: str = "deflate") -> bytes:
    """A 16-bit TIFF in Adobe RGB (1998), as raw developers export for retouching: the
    sRGB shot converted through lcms, with the profile embedded."""
    shot = studio_image(width, height, "grey", "bottle", seed, colour="teal")
    srgb = pyvips.Image.new_from_memory(shot.tobytes(), width, height, 3, "uchar")
    with tempfile.TemporaryDirectory() as folder:
        profile = Path(folder) / "adobe-rgb.icc"
        profile.write_bytes(adobe_rgb_profile())
        adobe = srgb.copy(interpretation="srgb").icc_transform(
            str(profile), input_profile="srgb", embedded=False, depth=16)
        return bytes(adobe.tiffsave_buffer(compression=compression, predictor="horizontal"))


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def adobe_rgb_profile() -> bytes:
    """A minimal ICC v2 matrix/TRC profile with Adobe RGB (1998)'s primaries and gamma
    (563/256), D50-adapted as in Adobe's own profile; lcms and libvips accept it."""
    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)

    def desc(text: str) -> bytes:
        ascii_ = text.encode("ascii") + b"\0"
        return (b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_
                + b"\0" * 8 + b"\0" * 3 + b"\0" * 67)  # no Unicode, no ScriptCode text

    gamma = b"curv\0\0\0\0" + struct.pack(">IH", 1, 563) + b"\0\0"
    tags = [(b"desc", desc("Adobe RGB (1998) compatible")),
            (b"cprt", b"text\0\0\0\0No copyright, use freely\0"),
            (b"wtpt", xyz(0.96420, 1.0, 0.82491)),
            (b"rXYZ", xyz(0.60974, 0.31111, 0.01947)),
            (b"gXYZ", xyz(0.20528, 0.62567, 0.06087)),
            (b"bXYZ", xyz(0.14919, 0.06322, 0.74457)),
            (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        body = body.ljust((len(body) + 3) // 4 * 4, b"\0")
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"none" + bytes((2, 0x10, 0, 0))
              + b"mntrRGB XYZ " + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp"
              + b"\0" * 24 + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.82491)
              + b"none" + b"\0" * 44)
    return header + table + data
