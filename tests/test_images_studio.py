"""The studio path end to end on real files: proxy, the sandbox's knock-out of the proxy as
the API's answer, the full-resolution composite, checked pixel by pixel; and the fast
path's metadata added to an answer without touching its image data."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import pillow_heif
import pytest
import pyvips
from PIL import Image, ImageCms, ImageOps

from watchfolder.config.settings import EXTENSIONS, parse_config
from watchfolder.dev.samples import adobe_rgb_profile, adobe_rgb_tiff, camera_jpeg, studio_image
from watchfolder.dev.sandbox import remove_backdrop
from watchfolder.errors import InputRejected
from watchfolder.imaging import compose as imaging
from watchfolder.imaging import containers
from watchfolder.imaging.answers import inspect_result
from watchfolder.imaging.compose import Output, Proxy, compose, cutout, make_proxy, write_output
from watchfolder.imaging.inspect import (
    MAX_BYTES,
    MAX_PIXELS,
    Source,
    inspect_source,
    verify_decodes,
    vips_name,
)
from watchfolder.imaging.metadata import (
    Metadata,
    carry_metadata,
    read_metadata,
    write_with_metadata,
)

XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
       b'02/22-rdf-syntax-ns#"><rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/">'
       b"<dc:creator>Studio Seven</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>")
IPTC = b"\x1c\x02\x00\x00\x02\x00\x04\x1c\x02\x74\x00\x0e(c) Studio 7!!"  # 2:116 copyright


def shot(width: int = 480, height: int = 360, seed: int = 0) -> Image.Image:
    return studio_image(width, height, "white", "box", seed, colour="blue")


def vips_of(image: Image.Image) -> pyvips.Image:
    bands = len(image.getbands())
    out = pyvips.Image.new_from_memory(image.tobytes(), image.width, image.height, bands,
                                       "uchar")
    return out.copy(interpretation="srgb" if bands >= 3 else "b-w")


def read(path: Path) -> pyvips.Image:
    return pyvips.Image.new_from_file(vips_name(path))  # libvips takes names as UTF-8 only


def blob(image: pyvips.Image, name: str) -> bytes | None:
    return bytes(image.get(name)) if image.get_typeof(name) else None


def answer_for(proxy: Path, dest: Path) -> Path:
    """What the sandbox (standing in for the API) answers for the proxy."""
    with Image.open(proxy) as image:
        remove_backdrop(image).save(dest, "PNG", compress_level=1)
    return dest


def run(tmp_path: Path, original: Path, *fmts: str,
        max_pixels: int = MAX_PIXELS) -> tuple[Source, Proxy, Path, list[Output]]:
    """inspect, proxy, answer, compose: the studio path as the pipeline runs it."""
    source = inspect_source(original)
    assert source.route == "studio"
    proxy = make_proxy(original, source, tmp_path / "proxy.jpg", max_pixels=max_pixels)
    check_proxy(tmp_path / "proxy.jpg", proxy, source, max_pixels)
    answer = answer_for(tmp_path / "proxy.jpg", tmp_path / "answer.png")
    assert inspect_result(answer, proxy.width, proxy.height) == "png"
    outputs = [compose(original, source, answer, tmp_path / f"out.{EXTENSIONS[f]}", f)
               for f in fmts or ("png",)]
    return source, proxy, answer, outputs


def check_proxy(path: Path, proxy: Proxy, source: Source, max_pixels: int) -> None:
    image = read(path)
    assert proxy.mime == "image/jpeg" and path.read_bytes()[:3] == b"\xff\xd8\xff"
    assert (image.width, image.height) == (proxy.width, proxy.height)
    assert proxy.width * proxy.height <= MAX_PIXELS and proxy.size == path.stat().st_size
    assert proxy.size <= MAX_BYTES
    assert (image.bands, image.format, image.interpretation) == (3, "uchar", "srgb")
    assert blob(image, "icc-profile-data") is None  # untagged: sRGB, as the API assumes
    assert image.get_typeof("orientation") == 0 or image.get("orientation") == 1
    width, height = source.upright
    assert abs(proxy.width / proxy.height - width / height) < 0.02  # upright, same shape
    if width * height <= max_pixels:
        assert (proxy.width, proxy.height) == (width, height)
    else:
        assert max_pixels * 0.98 < proxy.width * proxy.height <= max_pixels


def reference_alpha(answer: Path, size: tuple[int, int], peak: int) -> pyvips.Image:
    """The answer's alpha scaled up by Pillow, independently of libvips."""
    with Image.open(answer) as image:
        alpha = image.getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.BICUBIC)
    ref = vips_of(alpha)
    return ref * 257 if peak == 65535 else ref


def agreement(a: pyvips.Image, b: pyvips.Image, tolerance: float) -> float:
    return float(((a.cast("float") - b).abs() <= tolerance).avg()) / 255


def check_alpha(out: pyvips.Image, answer: Path, peak: int) -> pyvips.Image:
    alpha = out[out.bands - 1].copy_memory()
    ref = reference_alpha(answer, (out.width, out.height), peak).copy_memory()
    assert agreement(alpha, ref, 16 * peak / 255) >= 0.98
    # And along the soft edge itself, where scaling shows (a few % of the pixels).
    edge = (ref > 0) & (ref < peak)
    close = ((alpha.cast("float") - ref).abs() <= 16 * peak / 255) & edge
    assert float(close.avg()) >= 0.95 * float(edge.avg())
    # The knock-out did its job: backdrop clear at the corners, the subject opaque.
    assert alpha.getpoint(2, 2) == [0] and alpha.getpoint(out.width - 3, out.height - 3) == [0]
    assert alpha.getpoint(out.width // 2, out.height // 2) == [peak]
    return alpha


def max_difference_where_opaque(a: pyvips.Image, b: pyvips.Image, alpha: pyvips.Image,
                                peak: int) -> float:
    opaque = (alpha == peak) / 255
    return float(((a.cast("float") - b).abs() * opaque).max())


def upright_decode(path: Path) -> pyvips.Image:
    return pyvips.Image.new_from_file(str(path)).autorot()


# --------------------------------------------------------------------------- 16-bit TIFF


def test_adobe_rgb_16bit_tiff_keeps_depth_profile_and_colours(tmp_path: Path) -> None:
    original = tmp_path / "retouch.tif"
    original.write_bytes(adobe_rgb_tiff(900, 600))
    # A small proxy (300x200), so the alpha is scaled up 3x as for a 200 MP original.
    source, proxy, answer, (png, tif) = run(tmp_path, original, "png", "tiff",
                                            max_pixels=60_000)
    assert (proxy.width, proxy.height) == (300, 200)
    before = read(original)
    for output in (png, tif):
        out = read(output.path)
        assert (out.width, out.height, out.bands, out.format) == (900, 600, 4, "ushort")
        assert output.bits == 16 and out.interpretation == "rgb16"
        assert blob(out, "icc-profile-data") == adobe_rgb_profile() == source.icc
        alpha = check_alpha(out, answer, 65535)
        assert max_difference_where_opaque(out[0:3], before, alpha, 65535) == 0
    # Really 16-bit: values that are not 8-bit ones scaled up survive.
    assert float((read(png.path)[0:3] % 257 != 0).avg()) > 0
    with Image.open(tif.path) as image:
        assert image.tag_v2[259] in (8, 32946)  # deflate


def test_jpeg_and_webp_of_a_16bit_source_are_8bit_with_its_profile(tmp_path: Path) -> None:
    original = tmp_path / "retouch.tif"
    original.write_bytes(adobe_rgb_tiff(600, 400))
    _, _, answer, (jpg, webp) = run(tmp_path, original, "jpeg", "webp")
    before8 = (read(original) >> 8).cast("uchar")
    out = read(jpg.path)
    assert (out.bands, out.format, jpg.bits) == (3, "uchar", 8)
    assert blob(out, "icc-profile-data") == adobe_rgb_profile()
    assert out.getpoint(2, 2) == [255, 255, 255]  # flattened onto white
    centre = (300, 200)
    assert max(abs(a - b) for a, b in zip(out.getpoint(*centre), before8.getpoint(*centre),
                                           strict=True)) <= 4
    out = read(webp.path)
    assert (out.bands, out.format) == (4, "uchar")
    assert blob(out, "icc-profile-data") == adobe_rgb_profile()
    check_alpha(out, answer, 255)


# --------------------------------------------------------------------------- CMYK


def test_cmyk_jpeg_becomes_rgb_through_its_profile_and_stays_cmyk_in_tiff(
        tmp_path: Path) -> None:
    rgb = vips_of(shot())
    cmyk = rgb.icc_transform("cmyk", input_profile="srgb", embedded=False)
    original = tmp_path / "print.jpg"
    cmyk.jpegsave(str(original), Q=95)
    cmyk_icc = blob(read(original), "icc-profile-data")
    assert cmyk_icc is not None
    _, _, answer, (png, tif) = run(tmp_path, original, "png", "tiff")

    # PNG: RGB, converted through the CMYK file's own profile (checked with Pillow's lcms).
    out = read(png.path)
    assert (out.bands, out.interpretation) == (4, "srgb")
    converted = inspect_source(png.path)
    assert converted.icc is not None and converted.icc_srgb  # tagged with an sRGB profile
    with Image.open(original) as cmyk_image:
        expected = ImageCms.profileToProfile(
            cmyk_image, ImageCms.ImageCmsProfile(io.BytesIO(cmyk_icc)),
            ImageCms.createProfile("sRGB"), outputMode="RGB")
    alpha = check_alpha(out, answer, 255)
    assert max_difference_where_opaque(out[0:3], vips_of(expected), alpha, 255) <= 3
    # and the paper is still white-ish (a naive 255 - ink conversion would be far off).
    assert min(out[0:3].getpoint(10, 10)) >= 225

    # TIFF: still CMYK, the original's own ink values and profile.
    out = read(tif.path)
    assert (out.bands, out.interpretation) == (5, "cmyk")
    assert blob(out, "icc-profile-data") == cmyk_icc
    alpha = check_alpha(out, answer, 255)
    assert max_difference_where_opaque(out[0:4], read(original), alpha, 255) == 0


# --------------------------------------------------------------------------- phones, web


def test_heic_from_a_phone(tmp_path: Path) -> None:
    original = tmp_path / "IMG_1234.HEIC"
    pillow_heif.from_pillow(shot(640, 480)).save(str(original), quality=92)
    source, _, answer, (png,) = run(tmp_path, original)
    assert source.format == "heic"
    out = read(png.path)
    assert (out.width, out.height, out.bands, out.format) == (640, 480, 4, "uchar")
    decoded = pillow_heif.open_heif(str(original)).to_pillow()
    alpha = check_alpha(out, answer, 255)
    assert max_difference_where_opaque(out[0:3], vips_of(decoded), alpha, 255) == 0


def test_10bit_heic_keeps_its_depth(tmp_path: Path) -> None:
    original = tmp_path / "hdr.heic"
    samples = (vips_of(shot()) * 257).cast("ushort").write_to_memory()
    pillow_heif.from_bytes("RGB;16", (480, 360), samples).save(str(original), quality=90)
    source, _, answer, (png,) = run(tmp_path, original)
    assert (source.reason, source.bits, source.stored_bits) == ("HEIC; 10-bit", 16, 10)
    out = read(png.path)
    assert (out.format, out.interpretation, out.bands) == ("ushort", "rgb16", 4)
    check_alpha(out, answer, 65535)


def test_avif_and_every_tiff_compression(tmp_path: Path) -> None:
    originals = []
    avif = tmp_path / "web.avif"
    vips_of(shot()).heifsave(str(avif), compression="av1", Q=90)
    originals.append(avif)
    for compression in ("none", "lzw", "deflate", "jpeg"):
        path = tmp_path / f"{compression}.tif"
        vips_of(shot(seed=1)).tiffsave(str(path), compression=compression)
        originals.append(path)
    for original in originals:
        folder = tmp_path / original.stem
        folder.mkdir()
        _, _, answer, (png,) = run(folder, original)
        out = read(png.path)
        alpha = check_alpha(out, answer, 255)
        assert max_difference_where_opaque(out[0:3], read(original), alpha, 255) == 0, original


def test_multipage_tiff_uses_its_first_page(tmp_path: Path) -> None:
    original = tmp_path / "pages.tif"
    shot(480, 360).save(original, "TIFF", save_all=True,
                        append_images=[studio_image(200, 150, "grey", "mug", 3)])
    _, _, answer, (png,) = run(tmp_path, original)
    out = read(png.path)
    assert (out.width, out.height) == (480, 360)
    alpha = check_alpha(out, answer, 255)
    assert max_difference_where_opaque(out[0:3], vips_of(shot(480, 360)), alpha, 255) == 0


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_comes_out_upright_with_its_exif(tmp_path: Path,
                                                           orientation: int) -> None:
    original = tmp_path / "camera.jpg"
    original.write_bytes(camera_jpeg(600, 400, orientation=orientation))
    source, _, answer, (png, jpg) = run(tmp_path, original, "png", "jpeg")
    assert (source.width, source.height, source.upright) == (400, 600, (600, 400))
    out = read(png.path)
    assert (out.width, out.height) == (600, 400)
    with Image.open(original) as stored:
        upright = ImageOps.exif_transpose(stored)
    alpha = check_alpha(out, answer, 255)
    assert max_difference_where_opaque(out[0:3], vips_of(upright), alpha, 255) == 0
    for output in (png, jpg):
        with Image.open(output.path) as image:
            exif = image.getexif()
            assert exif.get(0x0112, 1) == 1
            assert (exif[0x010F], exif[0x0110]) == ("Canon", "Canon EOS R5")
            assert exif[0x8298] == "(c) Watchfolder Studio"
            assert exif.get_ifd(0x8769)[0x9003] == "2024:05:06 07:08:09"


def test_oversize_sideways_camera_jpeg(tmp_path: Path) -> None:
    original = tmp_path / "R5_0001.jpg"
    original.write_bytes(camera_jpeg(6000, 4500, orientation=6))  # 27 MP, stored 4500x6000
    source, proxy, answer, (png,) = run(tmp_path, original)
    assert source.reason == "27.0 MP, over the API's 25 MP; EXIF orientation 6"
    assert proxy.width > proxy.height and proxy.width * proxy.height > 0.99 * MAX_PIXELS
    out = read(png.path)
    assert (out.width, out.height, out.bands) == (6000, 4500, 4)
    alpha = check_alpha(out, answer, 255)
    assert max_difference_where_opaque(out[0:3], upright_decode(original), alpha, 255) == 0


# --------------------------------------------------------------------------- PNG, grey


def test_16bit_png_with_its_own_alpha(tmp_path: Path) -> None:
    rgb = vips_of(shot()) * 257 + 91  # not multiples of 257: real 16-bit values
    own = pyvips.Image.black(480, 360).cast("ushort").draw_rect(65535, 0, 0, 400, 360,
                                                                 fill=True)  # right strip clear
    original = tmp_path / "sixteen.png"
    rgb.bandjoin(own).cast("ushort").copy(interpretation="rgb16").pngsave(str(original))
    _, _, answer, (png,) = run(tmp_path, original)
    out = read(png.path)
    assert (out.bands, out.format, out.interpretation) == (4, "ushort", "rgb16")
    alpha = out[3]
    assert float(alpha.crop(400, 0, 80, 360).max()) == 0  # the original's clear strip stays
    mask = reference_alpha(answer, (480, 360), 65535)
    assert agreement(alpha.crop(0, 0, 400, 360), mask.crop(0, 0, 400, 360), 16 * 257) >= 0.98
    opaque = alpha == 65535
    assert float(opaque.avg()) > 0
    assert max_difference_where_opaque(out[0:3], read(original)[0:3], alpha, 65535) == 0


def test_palette_png_and_grey_16bit_tiff(tmp_path: Path) -> None:
    palette = tmp_path / "palette.png"
    shot().convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(palette)
    source = inspect_source(palette)
    assert source.palette and source.route == "fast"
    proxy = make_proxy(palette, source, tmp_path / "p.jpg")
    answer = answer_for(tmp_path / "p.jpg", tmp_path / "pa.png")
    out = compose(palette, source, answer, tmp_path / "p-out.png", "png")
    image = read(out.path)
    with Image.open(palette) as expected:
        reference = vips_of(expected.convert("RGB"))
    alpha = check_alpha(image, answer, 255)
    assert max_difference_where_opaque(image[0:3], reference, alpha, 255) == 0
    assert (proxy.width, proxy.height) == (480, 360)

    grey = tmp_path / "grey.tif"
    (vips_of(shot().convert("L")) * 257 + 3).cast("ushort").copy(
        interpretation="grey16").tiffsave(str(grey), compression="lzw")
    folder = tmp_path / "grey"
    folder.mkdir()
    source, _, answer, (png, webp) = run(folder, grey, "png", "webp")
    assert source.reason == "TIFF; 16-bit" and source.colour == "grey"
    out = read(png.path)
    assert (out.bands, out.format, out.interpretation) == (2, "ushort", "grey16")
    alpha = check_alpha(out, answer, 65535)
    assert max_difference_where_opaque(out[0], read(grey), alpha, 65535) == 0
    assert read(webp.path).bands == 4  # WEBP holds RGB only


# --------------------------------------------------------------------------- metadata


def tagged_jpeg(path: Path, icc: bytes | None) -> Path:
    image = vips_of(shot()).copy()
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x8298] = "Nikon", "Z8", "(c) Studio 7"
    exif[0x8769] = {0x9003: "2023:02:03 04:05:06"}
    image.set_type(pyvips.GValue.blob_type, "exif-data", exif.tobytes())
    image.set_type(pyvips.GValue.blob_type, "xmp-data", XMP)
    image.set_type(pyvips.GValue.blob_type, "iptc-data",
                   b"Photoshop 3.0\x008BIM\x04\x04\x00\x00" + struct.pack(">I", len(IPTC))
                   + IPTC)
    if icc:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", icc)
    image.jpegsave(str(path), Q=95, keep=15)
    return path


def check_exif(path: Path) -> None:
    with Image.open(path) as image:
        exif = image.getexif()
        assert (exif[0x010F], exif[0x0110], exif[0x8298]) == ("Nikon", "Z8", "(c) Studio 7")
        assert exif.get(0x0112, 1) == 1
        assert exif.get_ifd(0x8769)[0x9003] == "2023:02:03 04:05:06"


def test_capture_metadata_reaches_every_output_format(tmp_path: Path) -> None:
    original = tagged_jpeg(tmp_path / "tagged.jpg", adobe_rgb_profile())
    _, _, _, outputs = run(tmp_path, original, "png", "webp", "jpeg", "tiff")
    for output in outputs:
        check_exif(output.path)
        out = read(output.path)
        assert XMP in (blob(out, "xmp-data") or b""), output.format
        assert blob(out, "icc-profile-data") == adobe_rgb_profile(), output.format
    jpeg = next(o for o in outputs if o.format == "jpeg")
    assert IPTC in jpeg.path.read_bytes()
    tiff = next(o for o in outputs if o.format == "tiff")
    assert IPTC in tiff.path.read_bytes()
    assert (blob(read(tiff.path), "iptc-data") or b"").startswith(IPTC)
    # The TIFF's new EXIF directory did not disturb its pixels.
    assert read(tiff.path).avg() == read(outputs[0].path).avg()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_fast_path_metadata_without_touching_the_answers_pixels(tmp_path: Path,
                                                                fmt: str) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    original = tagged_jpeg(tmp_path / "tagged.jpg", srgb)
    source = inspect_source(original)
    assert source.route == "fast" and source.icc_srgb
    with Image.open(original) as image:
        cut = remove_backdrop(image)
    answer = tmp_path / f"answer.{fmt.lower()}"
    if fmt == "JPEG":
        cut.convert("RGB").save(answer, fmt, quality=90)
    else:
        cut.save(answer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    dest = tmp_path / f"result.{fmt.lower()}"
    carry_metadata(answer, original, dest)

    assert image_data(answer, fmt) == image_data(dest, fmt)
    check_exif(dest)
    out = read(dest)
    assert XMP in (blob(out, "xmp-data") or b"")
    assert blob(out, "icc-profile-data") == srgb
    with Image.open(answer) as before, Image.open(dest) as after:
        assert before.tobytes() == after.tobytes() and before.mode == after.mode
    assert inspect_result(dest, 480, 360) == {"PNG": "png", "WEBP": "webp", "JPEG": "jpg"}[fmt]
    if fmt == "JPEG":
        assert IPTC in dest.read_bytes()


def test_the_fast_paths_output_is_hashed_as_written_and_a_bare_original_not_read_again(
        tmp_path: Path) -> None:
    """The store step takes the output's SHA-256 from the bytes it writes (no read back),
    and an original whose inspection found nothing to carry gives its metadata as empty."""
    tagged = tagged_jpeg(tmp_path / "tagged.jpg", None)
    bare = tmp_path / "bare.png"
    shot().save(bare, "PNG")
    assert inspect_source(tagged).tagged
    assert not inspect_source(bare).tagged and inspect_source(bare).icc is None
    answer = tmp_path / "answer.png"
    with Image.open(tagged) as image:
        remove_backdrop(image).save(answer, "PNG")

    written = write_with_metadata(answer, tagged, tmp_path / "out.png")
    data = (tmp_path / "out.png").read_bytes()
    assert (written.size, written.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    check_exif(tmp_path / "out.png")
    # What the caller says the original holds is what is carried: nothing read from it.
    empty = write_with_metadata(answer, tagged, tmp_path / "empty.png", metadata=Metadata())
    assert read_metadata(tmp_path / "empty.png") == Metadata()
    assert empty.sha256 == hashlib.sha256(answer.read_bytes()).hexdigest(), "answer as is"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_fast_path_checks_the_bytes_it_read_not_the_file_again(tmp_path: Path,
                                                                   fmt: str) -> None:
    """prepare reads a fast-path file once: the decode check runs on the bytes that are
    hashed and sent, so a file cut short on disk after that read does not matter, and a
    read that came short is refused even if the file is whole by now."""
    path = tmp_path / f"shot.{fmt.lower()}"
    shot().save(path, fmt)
    whole = path.read_bytes()
    source = inspect_source(path)
    path.write_bytes(whole[:len(whole) // 2])
    verify_decodes(path, source, whole)
    path.write_bytes(whole)
    with pytest.raises(InputRejected) as caught:
        verify_decodes(path, source, whole[:len(whole) // 2])
    assert caught.value.reason == "corrupt"


def image_data(path: Path, fmt: str) -> bytes:
    data = path.read_bytes()
    if fmt == "PNG":
        return b"".join(data[c.data_start:c.data_start + c.length]
                        for c in containers.png_chunks(data) if c.type == b"IDAT")
    if fmt == "WEBP":
        return b"".join(data[c.start:c.end] for c in containers.riff_chunks(data)
                        if c.type in (b"VP8 ", b"VP8L", b"ALPH"))
    _, scan = containers.jpeg_segments(data)
    return data[scan:]


def test_read_metadata_of_a_tiff_gets_its_exif(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x8298] = "Nikon", "Z8", "(c) Studio 7"
    exif[0x0112] = 6
    exif[0x8769] = {0x9003: "2023:02:03 04:05:06"}
    shot().save(tmp_path / "t.tif", "TIFF", exif=exif.tobytes())
    metadata = read_metadata(tmp_path / "t.tif")
    assert metadata.exif is not None
    parsed = Image.Exif()
    parsed.load(b"Exif\x00\x00" + metadata.exif)
    assert (parsed[0x010F], parsed[0x0112]) == ("Nikon", 1)
    assert 0x0111 not in parsed and 0x0100 not in parsed  # no strip offsets, no sizes


# --------------------------------------------------------------------------- edges


def test_proxy_is_deterministic_and_shrinks_to_fit_its_byte_budget(tmp_path: Path) -> None:
    noise = vips_of(Image.effect_noise((800, 600), 90).convert("RGB"))
    original = tmp_path / "noise.tif"
    noise.tiffsave(str(original))
    source = inspect_source(original)
    first = make_proxy(original, source, tmp_path / "a.jpg")
    second = make_proxy(original, source, tmp_path / "b.jpg")
    assert (tmp_path / "a.jpg").read_bytes() == (tmp_path / "b.jpg").read_bytes()
    assert first == second
    small = make_proxy(original, source, tmp_path / "c.jpg", max_bytes=100_000)
    assert small.size <= 100_000 < first.size
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_answer_without_alpha_is_refused(tmp_path: Path) -> None:
    original = tmp_path / "o.tif"
    vips_of(shot()).tiffsave(str(original))
    source = inspect_source(original)
    make_proxy(original, source, tmp_path / "p.jpg")
    with pytest.raises(ValueError, match="no alpha"):
        cutout(original, source, tmp_path / "p.jpg")


def test_write_output_of_a_mask_only_image(tmp_path: Path) -> None:
    # The seam for recipes: anything done to Cutout.image can be written.
    original = tmp_path / "retouch.tif"
    original.write_bytes(adobe_rgb_tiff(300, 200))
    source = inspect_source(original)
    make_proxy(original, source, tmp_path / "p.jpg")
    answer = answer_for(tmp_path / "p.jpg", tmp_path / "a.png")
    result = cutout(original, source, answer)
    mask = result.image[3].copy(interpretation="grey16")
    out = write_output(mask, "png", tmp_path / "mask.png", result.metadata)
    image = read(out.path)
    assert (image.bands, image.format) == (1, "ushort")
    assert blob(image, "icc-profile-data") is None  # an RGB profile does not fit a mask
    assert float(image.max()) == 65535 and float(image.min()) == 0


def test_thread_knob() -> None:
    try:
        assert imaging.configure(1) == 1 and pyvips.concurrency_get() == 1
    finally:
        imaging.configure()
    assert pyvips.concurrency_get() == imaging.default_threads()


def test_fast_path_never_claims_a_profile_the_answer_is_not_in(tmp_path: Path) -> None:
    # With the studio path off an Adobe RGB JPEG goes as it is; the API answers sRGB pixels.
    original = tagged_jpeg(tmp_path / "adobe.jpg", adobe_rgb_profile())
    assert inspect_source(original, studio=False).route == "fast"
    answer = tmp_path / "answer.png"
    with Image.open(original) as image:
        remove_backdrop(image).save(answer, icc_profile=None)  # the API's pixels: untagged
    carry_metadata(answer, original, tmp_path / "result.png")
    out = read(tmp_path / "result.png")
    assert blob(out, "icc-profile-data") is None
    assert XMP in (blob(out, "xmp-data") or b"")


@pytest.mark.parametrize("kind", ["tiff", "heic", "jpeg"])
def test_names_that_are_not_utf8(tmp_path: Path, kind: str) -> None:
    # libvips takes names as UTF-8; an old Mac client writes Latin-1 (caf\xe9).
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    original = folder / os.fsdecode(b"\xff\xfe photo")
    if kind == "tiff":
        original.write_bytes(adobe_rgb_tiff(300, 200))
    elif kind == "heic":
        pillow_heif.from_pillow(shot(300, 200)).save(str(original))
    else:
        original.write_bytes(camera_jpeg(300, 200, orientation=6))
    _, proxy, answer, outputs = run(folder, original, "png", "jpeg", "webp", "tiff")
    assert [o.path.parent for o in outputs] == [folder] * 4
    assert all((o.width, o.height) == (300, 200) for o in outputs)
    assert inspect_result(answer, proxy.width, proxy.height) == "png"
    carry_metadata(answer, original, folder / os.fsdecode(b"r\xe9sult.png"))
    assert read_metadata(folder / os.fsdecode(b"r\xe9sult.png")) is not None


def test_deflate_level_of_png_and_tiff_outputs_is_chosen(tmp_path: Path) -> None:
    # A noisy photograph's worth of detail, with a soft alpha: what levels differ on.
    noise = pyvips.Image.gaussnoise(400, 300, sigma=40, mean=128)
    image = noise.bandjoin([noise.rot180(), noise.fliphor(), noise.flipver()]).cast(
        "uchar").copy(interpretation="srgb")
    for fmt in ("png", "tiff"):
        sizes = {}
        for level in (1, 9):
            out = write_output(image, fmt, tmp_path / f"{level}.{fmt}", Metadata(),
                               compression=level)
            written = pyvips.Image.new_from_file(str(out.path))
            assert (written - image).abs().max() == 0  # lossless at every level
            sizes[level] = out.size
        assert sizes[9] < sizes[1], (fmt, sizes)
    config = parse_config({"api": {"key": "k" * 20}, "state_dir": str(tmp_path / "s"),
                           "inboxes": [{"path": str(tmp_path), "outbox": "/o", "errors": "/e",
                                        "compression": 6,
                                        "outputs": [{"format": "tiff", "compression": 1},
                                                    {"format": "png"}]}]}, base_dir=tmp_path)
    inbox = config.inboxes[0]
    assert (inbox.compression, inbox.outputs[0].compression, inbox.outputs[1].compression) \
        == (6, 1, None)


def _grainy_gradient(width: int, height: int) -> pyvips.Image:
    """An 8-bit sRGB gradient with some grain: encoder settings tell apart on its bytes."""
    xyz = pyvips.Image.xyz(width, height)
    grain = pyvips.Image.gaussnoise(width, height, sigma=3, mean=0)
    return ((xyz[0] * 255 / width + grain).bandjoin([xyz[1] * 255 / height + grain,
                                                      grain + 90, grain + 200])
            ).cast("uchar").copy(interpretation="srgb")


def test_each_format_has_its_default_deflate_level(tmp_path: Path) -> None:
    # The level each format is written at when the config names none (the size/time table
    # in BENCHMARKS.md chose them): PNG 3, TIFF 2, told apart by their bytes on a gradient
    # with some grain (noise alone is stored alike at both).
    image = _grainy_gradient(400, 300)
    assert (imaging.PNG_COMPRESSION, imaging.TIFF_COMPRESSION) == (3, 2)
    for fmt, default in (("png", 3), ("tiff", 2)):
        made = {level: write_output(image, fmt, tmp_path / f"{fmt}{level}", Metadata(),
                                    compression=level).path.read_bytes()
                for level in (None, 2, 3)}
        assert made[None] == made[default], fmt
        assert made[2] != made[3], fmt  # the levels do differ on this image
    # The inbox names none by default, so each output takes its format's; a level in the
    # config is the one used, for every format.
    config = parse_config({"api": {"key": "k" * 20}, "state_dir": str(tmp_path / "s"),
                           "inboxes": [{"path": str(tmp_path), "outbox": "/o", "errors": "/e",
                                        "outputs": [{"format": "tiff"},
                                                    {"format": "tiff", "compression": 3,
                                                     "name": "{stem}_3.{ext}"}]}]},
                          base_dir=tmp_path)
    assert config.inboxes[0].compression is None
    assert config.inboxes[0].outputs[1].compression == 3


def test_webp_effort_is_the_default_unless_an_output_names_one(tmp_path: Path) -> None:
    from watchfolder.pipeline.outputs import _render

    image = _grainy_gradient(300, 200)
    made = {effort: write_output(image, "webp", tmp_path / f"{effort}.webp", Metadata(),
                                 effort=effort).path.read_bytes() for effort in (None, 0, 4)}
    assert imaging.WEBP_EFFORT == 4
    assert made[None] == made[4] != made[0]
    # A recipe's `effort:` reaches the encoder.
    original, answer = tmp_path / "original.png", tmp_path / "answer.png"
    image.pngsave(str(original))
    image.bandjoin(255).cast("uchar").copy(interpretation="srgb").pngsave(str(answer))
    config = parse_config({"api": {"key": "k" * 20}, "state_dir": str(tmp_path / "s"),
                           "inboxes": [{"path": str(tmp_path), "outbox": "/o", "errors": "/e",
                                        "outputs": [{"format": "webp", "effort": 0},
                                                    {"format": "webp", "name": "{stem}_4.{ext}"}
                                                    ]}]}, base_dir=tmp_path)
    specs = config.inboxes[0].outputs
    assert (specs[0].effort, specs[1].effort) == (0, None)
    sizes = [_render("studio", original, answer, spec, None, tmp_path / f"out{n}.webp").size
             for n, spec in enumerate(specs)]
    assert sizes[0] != sizes[1]  # effort 0 is another encoding of the same pixels
