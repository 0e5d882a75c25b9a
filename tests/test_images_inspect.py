"""inspect_source and inspect_result on real files of every kind, made here with Pillow,
pyvips and pillow-heif: routes, reasons, refusals, image bombs, trailing garbage."""

from __future__ import annotations

import dataclasses
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pillow_heif
import pytest
import pyvips
from PIL import Image, TiffImagePlugin

from watchfolder.dev.samples import (
    adobe_rgb_profile,
    adobe_rgb_tiff,
    camera_jpeg,
    studio_image,
    write_samples,
)
from watchfolder.errors import BadResult, InputRejected
from watchfolder.imaging import containers
from watchfolder.imaging.answers import answer_decodes, inspect_result, max_answer_bytes
from watchfolder.imaging.compose import answer_mask
from watchfolder.imaging.inspect import MAX_BYTES, MAX_PIXELS, inspect_source
from watchfolder.imaging.metadata import read_metadata


def shot(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    return studio_image(width, height, "white", "box", seed, colour="blue")


def save(path: Path, image: Image.Image, fmt: str, **options: object) -> Path:
    image.save(path, fmt, **options)
    return path


def vips_of(image: Image.Image) -> pyvips.Image:
    bands = len(image.getbands())
    out = pyvips.Image.new_from_memory(image.tobytes(), image.width, image.height, bands,
                                       "uchar")
    return out.copy(interpretation="srgb" if bands >= 3 else "b-w")


def rejected(path: Path, *, studio: bool = True) -> InputRejected:
    with pytest.raises(InputRejected) as caught:
        inspect_source(path, studio=studio)
    return caught.value


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_plain_api_formats_go_fast(tmp_path: Path, fmt: str) -> None:
    path = save(tmp_path / "shot", shot(), fmt)  # no extension: the bytes decide
    source = inspect_source(path)
    assert source.route == "fast" and source.reason == ""
    assert source.format == fmt.lower() and source.mime == f"image/{fmt.lower()}"
    assert (source.width, source.height, source.upright) == (320, 240, (320, 240))
    assert (source.bits, source.colour, source.alpha, source.orientation) == (8, "rgb", False, 1)
    assert source.file_size == path.stat().st_size


def test_palette_grey_alpha_and_srgb_tagged_files_go_fast(tmp_path: Path) -> None:
    palette = inspect_source(save(tmp_path / "p.png", shot().convert("P"), "PNG"))
    assert palette.palette and palette.route == "fast"
    grey = inspect_source(save(tmp_path / "g.jpg", shot().convert("L"), "JPEG"))
    assert grey.colour == "grey" and grey.route == "fast"
    alpha = inspect_source(save(tmp_path / "a.png", shot().convert("RGBA"), "PNG"))
    assert alpha.alpha and alpha.bands == 4 and alpha.route == "fast"
    srgb_icc = vips_of(shot()).icc_transform("srgb", input_profile="srgb", embedded=False)
    srgb_icc.jpegsave(str(tmp_path / "s.jpg"))
    tagged = inspect_source(tmp_path / "s.jpg")
    assert tagged.icc is not None and tagged.icc_srgb and tagged.route == "fast"


# --------------------------------------------------------------------------- studio path


def test_reasons_name_what_the_api_would_get_wrong(tmp_path: Path) -> None:
    tiff = tmp_path / "adobe.tif"
    tiff.write_bytes(adobe_rgb_tiff(400, 300))
    source = inspect_source(tiff)
    assert source.route == "studio"
    assert source.studio_reasons == ("TIFF", "16-bit", "Adobe RGB (1998) compatible profile")
    assert source.icc == adobe_rgb_profile() and not source.icc_srgb and source.bits == 16

    rotated = tmp_path / "r.jpg"
    rotated.write_bytes(camera_jpeg(300, 200, orientation=6))
    source = inspect_source(rotated)
    assert source.reason == "EXIF orientation 6"
    assert (source.width, source.height, source.upright) == (200, 300, (300, 200))

    adobe_jpeg = save(tmp_path / "a.jpg", shot(), "JPEG", icc_profile=adobe_rgb_profile())
    assert inspect_source(adobe_jpeg).reason == "Adobe RGB (1998) compatible profile"

    cmyk = save(tmp_path / "c.jpg", shot().convert("CMYK"), "JPEG")
    assert inspect_source(cmyk).reason == "CMYK" and inspect_source(cmyk).colour == "cmyk"

    sixteen = tmp_path / "16.png"
    (vips_of(shot()) * 257).cast("ushort").copy(interpretation="rgb16").pngsave(str(sixteen))
    assert inspect_source(sixteen).reason == "16-bit"


def test_oversize_jpeg_reason_and_real_file_size(tmp_path: Path) -> None:
    # 27 MP of flat studio paper compresses to little; pad the file past 30 MB with a
    # comment segment so both API limits are broken at once.
    path = tmp_path / "big.jpg"
    data = camera_jpeg(6000, 4500, orientation=1)
    padding = b"".join(containers.jpeg_segment(0xFE, b"x" * 65000) for _ in range(480))
    path.write_bytes(data[:2] + padding + data[2:])
    size = path.stat().st_size
    assert size > MAX_BYTES
    source = inspect_source(path)
    assert source.studio_reasons == ("27.0 MP, over the API's 25 MP",
                                     f"{size / 1e6:.1f} MB, over the API's 30 MB")
    refusal = rejected(path, studio=False)
    assert refusal.reason == "too_many_pixels"
    assert f"a {size / 1e6:.1f} MB JPEG of 6000x4500" in refusal.message
    assert "27.0 MP) is over the API's 25 MP and" in refusal.message
    assert "over the API's 30 MB" in refusal.message


def test_heic_avif_and_multipage_tiff(tmp_path: Path) -> None:
    heic = tmp_path / "phone"
    pillow_heif.from_pillow(shot(320, 240)).save(str(heic), quality=90)
    source = inspect_source(heic)
    assert (source.format, source.route, source.reason) == ("heic", "studio", "HEIC")
    avif = tmp_path / "web"
    vips_of(shot()).heifsave(str(avif), compression="av1")
    assert inspect_source(avif).format == "avif"
    pages = tmp_path / "pages.tif"
    shot(320, 240).save(pages, "TIFF", save_all=True, append_images=[shot(100, 80, 1)])
    source = inspect_source(pages)
    assert (source.pages, source.width, source.height) == (2, 320, 240)


def test_studio_off_refuses_with_every_problem_in_one_message(tmp_path: Path) -> None:
    tiff = tmp_path / "t.tif"
    tiff.write_bytes(adobe_rgb_tiff(400, 300))
    refusal = rejected(tiff, studio=False)
    assert refusal.reason == "unsupported_format"
    assert "TIFF is not accepted" in refusal.message and "convert it to PNG" in refusal.message
    # The API takes these as they are: with the studio path off they go as before.
    rotated = tmp_path / "r.jpg"
    rotated.write_bytes(camera_jpeg(300, 200, orientation=6))
    assert inspect_source(rotated, studio=False).route == "fast"
    heic = tmp_path / "h.heic"
    pillow_heif.from_pillow(shot()).save(str(heic))
    assert rejected(heic, studio=False).reason == "unsupported_format"


# --------------------------------------------------------------------------- refusals


def test_empty_text_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert rejected(tmp_path / "empty.jpg").reason == "empty"
    (tmp_path / "notes.png").write_text("not an image at all\n" * 20)
    assert rejected(tmp_path / "notes.png").reason == "not_an_image"
    for name, fmt in (("cut.jpg", "JPEG"), ("cut.png", "PNG"), ("cut.webp", "WEBP")):
        whole = io.BytesIO()
        shot(640, 480).save(whole, fmt)
        (tmp_path / name).write_bytes(whole.getvalue()[: whole.tell() * 2 // 3])
        assert rejected(tmp_path / name).reason == "corrupt", name
    tiff = adobe_rgb_tiff(800, 600, compression="lzw")
    (tmp_path / "cut.tif").write_bytes(tiff[: len(tiff) // 2])
    assert rejected(tmp_path / "cut.tif").reason == "corrupt"


@pytest.mark.parametrize(("name", "make"), [
    ("GIF", lambda img, out: img.save(out, "GIF")),
    ("BMP", lambda img, out: img.save(out, "BMP")),
    ("PDF", lambda img, out: img.save(out, "PDF")),
    ("PSD", lambda img, out: out.write(b"8BPS\x00\x01" + bytes(40))),
    ("SVG", lambda img, out: out.write(b'<?xml version="1.0"?>\n<svg xmlns="x"></svg>')),
])
def test_other_formats_are_named_in_the_refusal(tmp_path: Path, name: str, make: object) -> None:
    path = tmp_path / "file.jpg"
    with path.open("wb") as out:
        make(shot(), out)  # type: ignore[operator]
    refusal = rejected(path)
    assert refusal.reason == "unsupported_format" and refusal.message.startswith(name)


def tiff_with(path: Path, tags: dict[int, tuple[int, object]], size: tuple[int, int]) -> Path:
    info = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, (kind, value) in tags.items():
        info[tag] = value
        info.tagtype[tag] = kind
    shot(*size).save(path, "TIFF", tiffinfo=info)
    return path


def test_tiff_shaped_raw_files_are_recognised_by_their_tags(tmp_path: Path) -> None:
    # A fake DNG: a small preview first, tagged with DNGVersion.
    dng = tiff_with(tmp_path / "IMG_0001.tif", {50706: (1, b"\x01\x04\x00\x00"),
                                                254: (4, 1)}, (256, 171))
    refusal = rejected(dng)
    assert refusal.reason == "raw" and "(DNG)" in refusal.message
    assert "export a TIFF or JPEG from your raw developer" in refusal.message
    # A NEF-like file: reduced-resolution first directory from a known maker.
    nef = tiff_with(tmp_path / "DSC_0001.tif", {254: (4, 1), 271: (2, "NIKON CORPORATION")},
                    (160, 120))
    assert "(NEF)" in rejected(nef).message
    # A Sony ARW-like file: full-size first directory, but Sony's private tags.
    arw = tiff_with(tmp_path / "DSC_0002.tif", {0xC634: (1, b"SONY DSC \x00"),
                                                271: (2, "SONY")}, (160, 120))
    assert "(ARW)" in rejected(arw).message
    # A TIFF exported from a raw developer is a TIFF.
    fine = tiff_with(tmp_path / "export.tif", {271: (2, "Canon"), 305: (2, "Capture One")},
                     (160, 120))
    assert inspect_source(fine).format == "tiff"


@pytest.mark.parametrize(("head", "name"), [
    (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom", "CR3"),
    (b"II*\x00\x10\x00\x00\x00CR\x02\x00", "CR2"),
    (b"FUJIFILMCCD-RAW 0201FF383501", "RAF"),
    (b"IIRO\x08\x00\x00\x00", "ORF"),
    (b"IIU\x00\x18\x00\x00\x00", "RW2"),
    (b"II*\x00\x08\x00\x00\x00IIII\x00\x00\x00\x00", "IIQ"),
])
def test_raw_headers(tmp_path: Path, head: bytes, name: str) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(head + bytes(2048))
    refusal = rejected(path)
    assert refusal.reason == "raw" and f"({name})" in refusal.message


def test_big_declared_canvas_is_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(40000, 40000))
    refusal = rejected(path)
    assert refusal.reason == "too_many_pixels" and "40000x40000" in refusal.message


# --------------------------------------------------------------------------- answers


def png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header declares a huge canvas; its data would not even decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (containers.PNG_SIGNATURE + containers.png_chunk(b"IHDR", ihdr)
            + containers.png_chunk(b"IDAT", zlib.compress(bytes(4_000_000)))
            + containers.png_chunk(b"IEND", b""))


def answer(tmp_path: Path, fmt: str, size: tuple[int, int] = (320, 240)) -> Path:
    image = shot(*size).convert("RGB" if fmt == "JPEG" else "RGBA")
    path = tmp_path / f"answer.{fmt.lower()}"
    image.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return path


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("WEBP", "webp")])
def test_sound_answers_pass(tmp_path: Path, fmt: str, ext: str) -> None:
    path = answer(tmp_path, fmt)
    assert inspect_result(path, 320, 240) == ext
    assert inspect_result(path.read_bytes(), 320, 240) == ext


def test_jpeg_answers_pass_baseline_and_progressive(tmp_path: Path) -> None:
    for progressive in (False, True):
        path = tmp_path / "a.jpg"
        shot().save(path, "JPEG", progressive=progressive)
        assert inspect_result(path, 320, 240) == "jpg"


def test_image_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(20000, 20000))
    assert path.stat().st_size < 50_000
    with pytest.raises(BadResult, match=r"20000x20000 but the input is 512x512"):
        inspect_result(path, 512, 512)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_trailing_garbage_is_refused(tmp_path: Path, fmt: str) -> None:
    path = answer(tmp_path, fmt)
    clean = path.read_bytes()
    # Garbage that itself looks like the end of an image must not fool the check.
    path.write_bytes(clean + b"\xff\xd9 garbage IEND\xaeB`\x82\xff\xd9")
    with pytest.raises(BadResult, match="bytes after the end"):
        inspect_result(path, 320, 240)
    # A second image appended (an MPO-like JPEG, two PNGs) is garbage too.
    path.write_bytes(clean + clean)
    with pytest.raises(BadResult):
        inspect_result(path, 320, 240)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_and_wrong_size_answers_are_refused(tmp_path: Path, fmt: str) -> None:
    path = answer(tmp_path, fmt, (640, 480))
    with pytest.raises(BadResult, match="640x480 but the input is 320x240"):
        inspect_result(path, 320, 240)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(BadResult):
        inspect_result(path, 640, 480)


def test_corrupt_data_of_the_right_size_is_refused(tmp_path: Path) -> None:
    path = answer(tmp_path, "PNG")
    data = bytearray(path.read_bytes())
    idat = next(c for c in containers.png_chunks(bytes(data)) if c.type == b"IDAT")
    data[idat.data_start + 20] ^= 0xFF  # the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(BadResult, match="does not decode"):
        inspect_result(path, 320, 240)


def test_non_image_answers_are_refused(tmp_path: Path) -> None:
    gif = tmp_path / "a.gif"
    shot().save(gif, "GIF")
    with pytest.raises(BadResult, match="not a PNG, JPEG or WEBP"):
        inspect_result(gif, 320, 240)
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(BadResult, match="empty"):
        inspect_result(tmp_path / "e", 320, 240)


def test_answer_bound_holds_for_incompressible_answers(tmp_path: Path) -> None:
    width, height = 300, 200
    noise = Image.frombytes("RGBA", (width, height), bytes(
        (i * 2654435761 >> 7) & 0xFF for i in range(width * height * 4)))
    bound = max_answer_bytes(width, height)
    for fmt, options in (("PNG", {"compress_level": 0}), ("WEBP", {"lossless": True}),
                         ("JPEG", {"quality": 100, "subsampling": 0})):
        out = io.BytesIO()
        (noise.convert("RGB") if fmt == "JPEG" else noise).save(out, fmt, **options)
        assert out.tell() < bound, fmt
    assert max_answer_bytes(5000, 5000) > 100_000_000 > max_answer_bytes(5000, 5000) - 10_000_000


def test_demo_samples_include_the_studio_path(tmp_path: Path) -> None:
    paths = write_samples(tmp_path, studio=True)
    routes = {p.name: inspect_source(p).reason for p in paths if p.name != "broken.jpg"}
    assert routes["camera-sideways.jpg"] == "27.0 MP, over the API's 25 MP; EXIF orientation 6"
    assert routes["retouch-adobe-rgb-16bit.tif"] == (
        "TIFF; 16-bit; Adobe RGB (1998) compatible profile")
    assert sum(reason == "" for reason in routes.values()) == 5  # the others go fast
    assert len(write_samples(tmp_path / "plain")) == 6  # without studio: as before


def test_mpo_is_a_jpeg_going_fast(tmp_path: Path) -> None:
    path = tmp_path / "stereo.jpg"
    shot().save(path, "MPO", save_all=True, append_images=[shot(seed=1)])
    source = inspect_source(path)
    assert (source.format, source.route, source.mime) == ("jpeg", "fast", "image/jpeg")


def framed_png(width: int, height: int, rows: bytes, *, cut: int = 0) -> bytes:
    """An RGBA PNG of `width` x `height` around raw `rows` (filter bytes included), every
    chunk's CRC right: only a decode of the pixel data can tell what is wrong with it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    stream = zlib.compress(rows)
    return (containers.PNG_SIGNATURE + containers.png_chunk(b"IHDR", ihdr)
            + containers.png_chunk(b"IDAT", stream[:len(stream) - cut])
            + containers.png_chunk(b"IEND", b""))


def test_well_framed_pngs_with_wrong_pixel_data_are_refused(tmp_path: Path) -> None:
    width, height = 64, 48
    row = bytes([1]) + bytes(range(256))  # filter "sub", 64 RGBA pixels
    sound = framed_png(width, height, row * height)
    broken = {
        "stream cut short": framed_png(width, height, row * height, cut=9),
        "rows missing": framed_png(width, height, row * (height - 1)),
        "rows too many": framed_png(width, height, row * (height + 1)),
        "bad filter type": framed_png(width, height, row * 20 + bytes([7]) + row[1:]
                                      + row * (height - 21)),
    }
    path = tmp_path / "a.png"
    path.write_bytes(sound)
    assert inspect_result(path, width, height) == "png"
    assert inspect_source(path).route == "fast"
    assert pyvips.Image.new_from_file(str(path), fail_on="error").avg() > 0  # truly sound
    for what, data in broken.items():
        path.write_bytes(data)
        with pytest.raises(BadResult, match="does not decode completely"):
            inspect_result(path, width, height)
        with pytest.raises(BadResult, match="does not decode completely"):
            inspect_result(data, width, height)
        assert rejected(path).reason == "corrupt", what


def test_without_the_decode_all_else_is_checked_and_the_composite_decode_refuses(
        tmp_path: Path) -> None:
    """`decode=False` (every answer on arrival): size, end and CRCs are still checked;
    what only a decode finds is refused later, by `answer_decodes` (store) or a studio
    answer's `answer_mask`, with the same BadResult."""
    width, height = 64, 48
    row = bytes([1]) + bytes(range(256))
    path = tmp_path / "a.png"
    broken = {
        "stream cut short": framed_png(width, height, row * height, cut=9),
        "rows missing": framed_png(width, height, row * (height - 1)),
        "bad filter type": framed_png(width, height, row * 20 + bytes([7]) + row[1:]
                                      + row * (height - 21)),
    }
    for what, data in broken.items():
        path = tmp_path / f"{what}.png"
        path.write_bytes(data)
        assert inspect_result(path, width, height, decode=False) == "png", what
        for later in (answer_mask, answer_decodes):
            with pytest.raises(BadResult, match="does not decode completely") as caught:
                later(path)
            assert caught.value.reason == "bad_result" and caught.value.status == 200, what
    sound = framed_png(width, height, row * height)
    (tmp_path / "sound.png").write_bytes(sound)
    answer_decodes(tmp_path / "sound.png")  # nothing to say
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadResult, match="empty body"):
        answer_decodes(tmp_path / "empty.png")
    with pytest.raises(BadResult, match="32x48 but the input is 64x48"):
        inspect_result(framed_png(32, height, row[:129] * height), width, height, decode=False)
    with pytest.raises(BadResult, match="bytes after the end"):
        inspect_result(sound + b"junk", width, height, decode=False)
    flipped = bytearray(sound)
    idat = next(c for c in containers.png_chunks(sound) if c.type == b"IDAT")
    flipped[idat.data_start + 5] ^= 0xFF
    with pytest.raises(BadResult, match="fails its CRC"):
        inspect_result(bytes(flipped), width, height, decode=False)


def test_importing_the_daemon_leaves_the_image_libraries_as_they_are() -> None:
    """No process-wide setting changes at import: Pillow's decompression-bomb guard keeps its
    default and libvips keeps its cache until `libraries.configure()` is called (the daemon
    does, at start)."""
    code = ("import pyvips; from PIL import Image; default = Image.MAX_IMAGE_PIXELS; "
            "import watchfolder.cli, watchfolder.service.daemon, watchfolder.pipeline.outputs; "
            "print(Image.MAX_IMAGE_PIXELS == default, pyvips.cache_get_max() > 0); "
            "from watchfolder.imaging import libraries; libraries.configure(); "
            "print(Image.MAX_IMAGE_PIXELS == default, pyvips.cache_get_max())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True True", "True 0"]


def test_tiff_metadata_is_read_with_pillows_guard_on(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The TIFF directory is read without Pillow's decompression-bomb check, which would
    refuse a large studio file (its pixels are never decoded by Pillow): shown here with the
    guard's limit lowered below this small file's size."""
    path = tmp_path / "shot.tif"
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"  # Make
    Image.new("RGB", (160, 120), "white").save(path, "TIFF", exif=exif)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    metadata = read_metadata(path)
    assert metadata.exif is not None and b"Camera Maker" in metadata.exif


def _plain_png(head: bytes) -> containers.PngHeader | None:
    return containers.plain_png(head, MAX_PIXELS)


def _plain_pngs(tmp_path: Path) -> dict[str, bytes]:
    """Plain PNGs of every kind `_plain_png` reads itself, some with the ancillary chunks it
    lets through."""
    made: dict[str, bytes] = {}
    for mode in ("L", "LA", "RGB", "RGBA", "I;16"):
        buffer = io.BytesIO()
        Image.new(mode, (40, 30)).save(buffer, "PNG", dpi=(300, 300))
        made[mode] = buffer.getvalue()
    rgb = pyvips.Image.black(40, 30, bands=3).cast("ushort").copy(interpretation="rgb16")
    made["RGB 16-bit"] = rgb.pngsave_buffer(keep="none")
    made["RGBA 16-bit, interlaced"] = rgb.bandjoin(65535).copy(
        interpretation="rgb16").pngsave_buffer(interlace=True, keep="none")
    extra = b"".join(containers.png_chunk(kind, body) for kind, body in (
        (b"sRGB", b"\0"), (b"gAMA", struct.pack(">I", 45455)),
        (b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)),
        (b"bKGD", struct.pack(">3H", 255, 255, 255)), (b"tIME", struct.pack(">HBBBBB", 2026,
                                                                            12, 5, 3, 40, 0))))
    made["RGB with sRGB, gAMA, cHRM, bKGD, tIME"] = made["RGB"][:33] + extra + made["RGB"][33:]
    return made


def test_a_plain_png_header_is_read_without_libvips_as_libvips_reads_it(tmp_path: Path) -> None:
    """The fast path's header of a small plain PNG comes from its first bytes, not a libvips
    open (a twentieth of the daemon's Python work per file): the same `Source` as libvips
    gives, forced here by a private chunk that only libvips reads."""
    for name, data in _plain_pngs(tmp_path).items():
        assert _plain_png(data[:containers.HEAD_BYTES]) is not None, name
        plain, other = tmp_path / "plain.png", tmp_path / "other.png"
        plain.write_bytes(data)
        private = containers.png_chunk(b"prVt", b"libvips reads this one")
        other.write_bytes(data[:33] + private + data[33:])
        assert _plain_png(other.read_bytes()[:containers.HEAD_BYTES]) is None
        read, by_libvips = inspect_source(plain), inspect_source(other)
        assert read.file_size + len(private) == by_libvips.file_size
        assert dataclasses.replace(read, file_size=by_libvips.file_size) == by_libvips, name


def test_a_png_header_read_without_libvips_is_refused_as_libvips_refuses_it(
        tmp_path: Path) -> None:
    """A damaged chunk before the pixel data, a palette, transparency or a profile, more than
    25 MP: left to libvips, which refuses or reads it as before."""
    data = _plain_pngs(tmp_path)["RGB"]
    broken = data[:29] + bytes([data[29] ^ 1]) + data[30:]  # IHDR's CRC
    assert _plain_png(broken) is None
    (tmp_path / "broken.png").write_bytes(broken)
    with pytest.raises(InputRejected) as refused:
        inspect_source(tmp_path / "broken.png")
    assert refused.value.reason == "corrupt"
    for mode in ("P", "1"):
        buffer = io.BytesIO()
        Image.new(mode, (40, 30)).save(buffer, "PNG")
        assert _plain_png(buffer.getvalue()) is None, mode
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "PNG", transparency=(0, 0, 0))
    assert _plain_png(buffer.getvalue()) is None
    huge = containers.PNG_SIGNATURE + containers.png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 6000, 5000, 8, 2, 0, 0, 0)) + data[33:]
    assert _plain_png(huge) is None
