"""Generated studio-style product shots, for the demo, the tests and the benchmarks.

Each image is a plain backdrop (white or grey seamless paper, or a green screen) with a
faint gradient and mottle, and one or two solid-colour objects kept well away from the
border: the kind of picture a hot folder receives and the sandbox's modest knock-out can
handle. Everything is drawn from a seed, so the same call gives the same pixels.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

__all__ = ["BACKDROPS", "SUBJECTS", "studio_image", "write_samples"]

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


def _write_atomically(path: Path, data: bytes) -> None:
    # A watching daemon ignores dot-files, and the rename makes the real name appear complete.
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temp.replace(path)  # atomic within one folder, like os.replace


def write_samples(folder: Path) -> list[Path]:
    """Write five sample shots (JPEG, PNG, WEBP) and one truncated ``broken.jpg``.

    Files appear atomically, so a daemon watching ``folder`` never sees half a file.
    The broken one is there on purpose: a real hot folder receives those too.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, (name, width, height, backdrop, subject, colour, fmt) in enumerate(_SAMPLES):
        image = studio_image(width, height, backdrop, subject, seed, colour=colour)
        path = folder / name
        _write_atomically(path, _encode(image, fmt))
        paths.append(path)

    whole = _encode(studio_image(640, 480, "white", "box", 99, colour="black"), "JPEG")
    broken = folder / "broken.jpg"
    _write_atomically(broken, whole[: len(whole) // 3])
    paths.append(broken)
    return paths
