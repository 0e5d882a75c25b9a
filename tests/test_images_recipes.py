"""Recipe steps on a real cut-out: subject box and margin to the pixel, exact canvases,
long edges, white backgrounds with the subject's own pixels, masks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import pyvips

from watchfolder.dev.samples import adobe_rgb_tiff
from watchfolder.errors import InputRejected
from watchfolder.imaging.compose import Cutout, cutout, write_output
from watchfolder.imaging.inspect import inspect_source
from watchfolder.imaging.recipes import (
    Box,
    Recipe,
    crop,
    expand,
    fit,
    mask_only,
    on_background,
    place,
    render,
    subject_box,
)

WIDTH, HEIGHT = 600, 400
SUBJECT = Box(150, 100, 200, 120)  # where the answer's alpha is opaque


def make_pair(tmp_path: Path, *, sixteen: bool = False) -> tuple[Path, Path]:
    """An original and an answer whose alpha is exactly SUBJECT, at the original's size."""
    original = tmp_path / "original.tif"
    if sixteen:
        original.write_bytes(adobe_rgb_tiff(WIDTH, HEIGHT))
    else:
        gradient = pyvips.Image.xyz(WIDTH, HEIGHT)
        rgb = (gradient[0] * 255 / WIDTH).bandjoin(gradient[1] * 255 / HEIGHT).bandjoin(90)
        rgb.cast("uchar").copy(interpretation="srgb").tiffsave(str(original))
    alpha = pyvips.Image.black(WIDTH, HEIGHT).draw_rect(
        255, SUBJECT.left, SUBJECT.top, SUBJECT.width, SUBJECT.height, fill=True)
    answer = tmp_path / "answer.png"
    (pyvips.Image.black(WIDTH, HEIGHT, bands=3) + 128).bandjoin(alpha).cast("uchar").copy(
        interpretation="srgb").pngsave(str(answer))
    return original, answer


def fresh(original: Path, answer: Path) -> Cutout:
    return cutout(original, inspect_source(original), answer)


def computed(image: pyvips.Image) -> pyvips.Image:
    """The pipeline computed once into memory, so a test can look at it many times (a
    streamed image can be read once)."""
    return image.copy_memory()


def test_subject_box_and_margins_to_the_pixel(tmp_path: Path) -> None:
    original, answer = make_pair(tmp_path)
    assert subject_box(fresh(original, answer)) == SUBJECT
    assert expand(SUBJECT, 10) == Box(140, 90, 220, 140)
    assert expand(SUBJECT, percent=5) == Box(140, 94, 220, 132)  # 5 % of 200 and of 120
    image = computed(render(fresh(original, answer),
                            Recipe(crop_to_subject=True, margin_percent=5)))
    assert (image.width, image.height) == (220, 132)
    alpha = image[3]
    assert alpha.crop(10, 6, 200, 120).min() == 255  # the subject, whole
    assert alpha.crop(0, 0, 10, 132).max() == 0 and alpha.crop(0, 0, 220, 6).max() == 0
    # The colour is the original's own, at the same place.
    source = pyvips.Image.new_from_file(str(original))
    assert image.getpoint(10, 6)[:3] == source.getpoint(150, 100)


def test_margin_past_the_edge_is_transparent(tmp_path: Path) -> None:
    original, answer = make_pair(tmp_path)
    image = computed(crop(fresh(original, answer).image,
                          Box(-20, -10, WIDTH + 40, HEIGHT + 20)))
    assert (image.width, image.height) == (WIDTH + 40, HEIGHT + 20)
    assert image[3].crop(0, 0, 20, HEIGHT + 20).max() == 0


@pytest.mark.parametrize(("position", "corner"), [("center", (0, 100)), ("bottom", (0, 200)),
                                                   ("top", (0, 0))])
def test_exact_canvas_and_position(tmp_path: Path, position: str,
                                   corner: tuple[int, int]) -> None:
    original, answer = make_pair(tmp_path)
    image = computed(render(fresh(original, answer),
                            Recipe(crop_to_subject=True, size=(500, 500), position=position)))
    assert (image.width, image.height) == (500, 500)
    # 200x120 scaled up to fit 500 wide: 500x300, placed as asked.
    x, y = corner
    assert image[3].crop(x, y, 500, 300).min() == 255
    outside = image[3].crop(0, 0, 500, y) if y else image[3].crop(0, 300, 500, 200)
    assert outside.max() == 0


def test_white_background_keeps_the_subject_pixels(tmp_path: Path) -> None:
    original, answer = make_pair(tmp_path)
    image = computed(render(fresh(original, answer), Recipe(background=(255, 255, 255))))
    assert image.bands == 3
    assert image.getpoint(5, 5) == [255, 255, 255]
    source = pyvips.Image.new_from_file(str(original))
    inside = image.crop(SUBJECT.left, SUBJECT.top, SUBJECT.width, SUBJECT.height)
    expected = source.crop(SUBJECT.left, SUBJECT.top, SUBJECT.width, SUBJECT.height)
    assert (inside - expected).abs().max() == 0
    out = write_output(image, "jpeg", tmp_path / "white.jpg", fresh(original, answer).metadata)
    decoded = pyvips.Image.new_from_file(str(out.path))
    assert min(decoded.getpoint(5, 5)) >= 253  # white, to within JPEG's rounding


def test_long_edge_never_upscales_and_keeps_16_bits(tmp_path: Path) -> None:
    original, answer = make_pair(tmp_path, sixteen=True)
    image = render(fresh(original, answer), Recipe(max_size=300))
    assert (image.width, image.height, image.format) == (300, 200, "ushort")
    same = render(fresh(original, answer), Recipe(max_size=5000))
    assert (same.width, same.height) == (WIDTH, HEIGHT)
    scaled = fit(fresh(original, answer).image, 1200, 1200)
    assert (scaled.width, scaled.height) == (1200, 800)


def test_mask_only(tmp_path: Path) -> None:
    original, answer = make_pair(tmp_path, sixteen=True)
    result = fresh(original, answer)
    mask = mask_only(result.image)
    out = write_output(mask, "png", tmp_path / "mask.png", result.metadata)
    written = computed(pyvips.Image.new_from_file(str(out.path)))
    assert (written.bands, written.format, written.interpretation) == (1, "ushort", "grey16")
    assert written.crop(SUBJECT.left, SUBJECT.top, SUBJECT.width, SUBJECT.height).min() == 65535
    assert written.getpoint(5, 5) == [0]
    assert not written.get_typeof("icc-profile-data")  # an RGB profile does not fit a mask


def test_a_mask_is_made_from_the_answer_alone(tmp_path: Path) -> None:
    tiff, answer = make_pair(tmp_path)
    original = tmp_path / "original.jpg"
    pyvips.Image.new_from_file(str(tiff)).jpegsave(str(original), Q=90)
    source = inspect_source(original)
    whole = computed(mask_only(fresh(original, answer).image))
    # The original's pixels are not read for a mask: cut short after it was inspected (its
    # header kept), a cut-out of it no longer decodes, its mask still does, to the same
    # pixels.
    data = original.read_bytes()
    original.write_bytes(data[:len(data) // 2])
    with pytest.raises((pyvips.Error, InputRejected)):
        computed(cutout(original, source, answer).image)
    alone = cutout(original, source, answer, alpha_only=True)
    out = write_output(mask_only(alone.image), "png", tmp_path / "mask.png", alone.metadata)
    written = computed(pyvips.Image.new_from_file(str(out.path)))
    assert (written.width, written.height, written.bands) == (WIDTH, HEIGHT, 1)
    assert (written - whole).abs().max() == 0
    assert written.crop(SUBJECT.left, SUBJECT.top, SUBJECT.width, SUBJECT.height).min() == 255
    assert not written.get_typeof("icc-profile-data")


def test_place_and_background_on_grey(tmp_path: Path) -> None:
    grey = (pyvips.Image.black(10, 10) + 100).bandjoin(255).cast("uchar").copy(
        interpretation="b-w")
    assert on_background(place(grey, 20, 10, "left"), (255, 255, 255)).getpoint(15, 5) == [255]
    assert on_background(place(grey, 20, 10, "right"), (255, 0, 0)).getpoint(0, 5) == \
        [255, 0, 0]
    with pytest.raises(ValueError, match="position"):
        place(grey, 20, 10, "middle")


def test_a_small_output_starts_from_a_smaller_decode_with_the_same_look(tmp_path: Path) -> None:
    from watchfolder.config.settings import OutputConfig
    from watchfolder.imaging.compose import load_shrink
    from watchfolder.pipeline.outputs import _cutout, _render

    # A detailed JPEG original (a gradient with stripes) and its answer, 4x its 400x300 size.
    width, height = 1600, 1200
    xyz = pyvips.Image.xyz(width, height)
    stripes = ((xyz[0] / 7).sin() * 60 + 128)
    rgb = (xyz[0] * 255 / width).bandjoin(xyz[1] * 255 / height).bandjoin(stripes)
    original = tmp_path / "original.jpg"
    rgb.cast("uchar").copy(interpretation="srgb").jpegsave(str(original), Q=95)
    alpha = pyvips.Image.black(width // 4, height // 4).draw_circle(
        255, width // 8, height // 8, height // 10, fill=True)
    answer = tmp_path / "answer.png"
    (pyvips.Image.black(width // 4, height // 4, bands=3) + 90).bandjoin(alpha).cast(
        "uchar").copy(interpretation="srgb").pngsave(str(answer))
    source = inspect_source(original)

    assert load_shrink(source, 200 / width) == 4  # 8x smaller: decoded at 1/4, 400x300
    assert load_shrink(source, 500 / width) == 1  # 3.2x smaller: at full size
    assert cutout(original, source, answer, shrink=4).image.width == width // 4
    spec = OutputConfig(format="png", max_size=200)
    _render("studio", original, answer, spec, 3, tmp_path / "small.png")
    small = computed(pyvips.Image.new_from_file(str(tmp_path / "small.png")))
    full = computed(render(fresh(original, answer), Recipe(max_size=200)))
    assert (small.width, small.height, small.bands) == (full.width, full.height, 4) == \
        (200, 150, 4)
    difference = (small.cast("float") - full.cast("float")).abs()
    assert difference.avg() < 1.5, difference.avg()  # the same picture, to rounding
    assert difference[3].max() <= 16  # the edge of the subject where it should be

    # Cropped to the subject (a disc of 960 px at full size, 10% margin: 1152 px) on a 60 px
    # square: decoded at 1/8, the same picture.
    spec = OutputConfig(format="png", crop="subject", margin="10%", size=(60, 60),
                        background=(255, 255, 255))
    assert _cutout("studio", original, answer, spec)[1] == 8
    _render("studio", original, answer, spec, 3, tmp_path / "square.png")
    square = computed(pyvips.Image.new_from_file(str(tmp_path / "square.png")))
    full = computed(render(fresh(original, answer), Recipe(
        crop_to_subject=True, margin_percent=10, size=(60, 60), background=(255, 255, 255))))
    assert (square.width, square.height, square.bands) == (full.width, full.height, 3)
    difference = (square.cast("float") - full.cast("float")).abs()
    assert difference.avg() < 3, difference.avg()


def test_the_subject_box_comes_from_the_answer_at_its_own_size(tmp_path: Path) -> None:
    from watchfolder.imaging.compose import answer_alpha
    from watchfolder.imaging.recipes import subject_in

    # An answer at half the original's size, its subject a soft-edged disc.
    half = pyvips.Image.black(WIDTH // 2, HEIGHT // 2).draw_circle(
        255, 120, 70, 40, fill=True).gaussblur(1.5)
    answer = tmp_path / "answer.png"
    (pyvips.Image.black(WIDTH // 2, HEIGHT // 2, bands=3) + 128).bandjoin(half).cast(
        "uchar").copy(interpretation="srgb").pngsave(str(answer))
    box = subject_in(answer, WIDTH, HEIGHT)
    # The box found on the alpha scaled up to full size (how it was found before).
    left, top, width, height = answer_alpha(answer, WIDTH, HEIGHT).find_trim(
        threshold=15.5, background=[0], line_art=True)
    assert box is not None
    assert box.left <= left and box.top <= top  # it holds the whole subject...
    assert box.left + box.width >= left + width and box.top + box.height >= top + height
    assert max(left - box.left, top - box.top, box.left + box.width - left - width,
               box.top + box.height - top - height) <= 2  # ...to a pixel or two
    assert subject_in(answer, WIDTH // 2, HEIGHT // 2) == Box(*half.find_trim(
        threshold=15.5, background=[0], line_art=True))


@pytest.mark.parametrize("in_memory", [True, False])
def test_full_size_outputs_share_one_decode_of_the_original(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_memory: bool) -> None:
    import os
    from types import SimpleNamespace

    from watchfolder.config.settings import parse_config
    from watchfolder.pipeline import outputs

    if not in_memory:  # as a cut-out too big to hold in memory is kept
        monkeypatch.setattr(outputs, "SHARED_IN_MEMORY", 0)

    tiff, made_answer = make_pair(tmp_path)
    inbox_dir, spool = tmp_path / "inbox", tmp_path / "spool"
    inbox_dir.mkdir()
    spool.mkdir()
    original = inbox_dir / "shot.jpg"
    pyvips.Image.new_from_file(str(tiff)).jpegsave(str(original), Q=90)
    answer = made_answer.rename(spool / "answer.png")
    recipe = [{"format": "png"},
              {"name": "{dir}/{stem}_web.{ext}", "format": "webp", "max_size": 100},
              {"name": "{dir}/{stem}_mask.{ext}", "format": "png", "mask": True},
              {"name": "{dir}/{stem}_retouch.{ext}", "format": "tiff"}]
    inbox = parse_config({"api": {"key": "test-key-0123456789"}, "state_dir": "state",
                          "inboxes": [{"path": "inbox", "outbox": "outbox", "errors": "errors",
                                       "outputs": recipe}]}, base_dir=tmp_path).inboxes[0]
    source = inspect_source(original)
    # What each output is when made on its own (the original decoded for each; the WEBP at
    # 1/2), at the levels the makers use (the inbox's: each format's default).
    expected = []
    for index, spec in enumerate(inbox.outputs):
        alone = tmp_path / f"alone{index}.{spec.ext}"
        outputs._render("studio", original, answer, spec, inbox.compression, alone,
                        source=source)
        expected.append(alone.read_bytes())

    record = SimpleNamespace(route="studio", size=original.stat().st_size, sha256="0" * 64)
    cutouts = outputs.SharedCutouts()  # the pipeline's, on its Context
    makers = [outputs.maker(record, inbox, "shot.jpg", answer, index, [],  # type: ignore[arg-type]
                            unchanged=True, source=source, cutouts=cutouts)
              for index in range(len(recipe))]
    made = [tmp_path / f"made{index}.{spec.ext}" for index, spec in enumerate(inbox.outputs)]
    # Held in memory, every output reads it (the small WEBP too) and they may be encoded
    # together; in a file, the full-size ones read it one by one and the WEBP decodes the
    # original at 1/2.
    assert [m.together for m in makers] == [in_memory] * 4
    makers[0].produce(made[0])
    if not in_memory:
        makers[1].produce(made[1])
    kept_files = list(spool.glob("*.cutout.tif"))
    held = [key for key in cutouts.held() if key.parent == spool]
    # The full-size cut-out is kept for the next ones, in memory or beside the answer.
    assert (len(held), len(kept_files)) == ((1, 0) if in_memory else (0, 1))
    # The original's pixels can no longer be decoded (same size and time: the same file to
    # the daemon): the outputs that read the cut-out are still made, from the one kept, the
    # WEBP among them when it is held in memory: the original is decoded once per file.
    stat, data = original.stat(), original.read_bytes()
    original.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))
    os.utime(original, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises((pyvips.Error, InputRejected)):
        computed(cutout(original, source, answer).image)
    for index in (1, 2, 3) if in_memory else (2, 3):
        makers[index].produce(made[index])
    full_size = [0, 2, 3]  # the same bytes as alone, whichever way they were made
    assert [made[n].read_bytes() for n in full_size] == [expected[n] for n in full_size]
    assert list(spool.iterdir()) == [answer], "the last one to read it removed it"
    assert not [key for key in cutouts.held() if key.parent == spool]
    if not in_memory:
        assert made[1].read_bytes() == expected[1]
        return
    # The WEBP from the held cut-out: the same size, bands and picture as alone, to a few
    # levels on the subject's edge (the cut-out scaled down instead of a decode at 1/2).
    web = computed(pyvips.Image.new_from_file(str(made[1])))
    alone_web = computed(pyvips.Image.new_from_file(str(tmp_path / "alone1.webp")))
    assert (web.width, web.height, web.bands) == (alone_web.width, alone_web.height, 4) \
        == (100, 67, 4)
    on_white = [computed(image.flatten(background=[255, 255, 255]).cast("float"))
                for image in (web, alone_web)]
    difference = (on_white[0] - on_white[1]).abs()
    assert difference.avg() < 1.0, difference.avg()
    assert difference.max() <= 24, difference.max()
    alpha = (web[3].cast("float") - alone_web[3].cast("float")).abs()
    assert alpha.max() <= 12, alpha.max()


def test_one_full_size_output_and_a_small_one_share_the_cut_out_held_in_memory(
        tmp_path: Path) -> None:
    from types import SimpleNamespace

    from watchfolder.config.settings import parse_config
    from watchfolder.pipeline import outputs

    tiff, answer = make_pair(tmp_path)
    (tmp_path / "inbox").mkdir()
    original = tmp_path / "inbox" / "shot.jpg"
    pyvips.Image.new_from_file(str(tiff)).jpegsave(str(original), Q=90)

    def makers(recipe: list[dict[str, object]]) -> list[outputs.Maker]:
        inbox = parse_config({"api": {"key": "test-key-0123456789"}, "state_dir": "state",
                              "inboxes": [{"path": "inbox", "outbox": "outbox",
                                           "errors": "errors", "outputs": recipe}]},
                             base_dir=tmp_path).inboxes[0]
        record = SimpleNamespace(route="studio", size=original.stat().st_size,
                                 sha256="0" * 64)
        return [outputs.maker(record, inbox, "shot.jpg", answer, index, [],  # type: ignore[arg-type]
                              unchanged=True, cutouts=outputs.SharedCutouts())
                for index in range(len(recipe))]

    web = {"name": "{stem}_web.{ext}", "format": "webp", "max_size": 100}
    # The PNG computes the cut-out into memory, the WEBP (else a decode at 1/2) reads it.
    assert [m.together for m in makers([{"format": "png"}, web])] == [True, True]
    # Small outputs alone decode the original small, each: no full-size cut-out is made.
    assert [m.together for m in makers([web, {**web, "name": "{stem}_w2.{ext}"}])] == \
        [False, False]


def test_outputs_read_from_memory_are_encoded_two_at_a_time() -> None:
    import threading

    from watchfolder.pipeline.outputs import ENCODED_AT_ONCE, encode_together

    assert ENCODED_AT_ONCE == 2
    both = threading.Barrier(2, timeout=5)  # broken unless two run at the same time
    running: list[int] = []
    lock = threading.Lock()

    def job(n: int) -> int:
        with lock:
            running.append(n)
        both.wait()
        return n * 10

    assert encode_together([lambda n=n: job(n) for n in range(4)]) == [0, 10, 20, 30]
    assert sorted(running) == [0, 1, 2, 3]

    def fails() -> int:
        raise OSError("disk full")

    ended: list[str] = []

    def slow() -> int:
        threading.Event().wait(0.2)
        ended.append("slow")
        return 1

    with pytest.raises(OSError, match="disk full"):
        encode_together([fails, slow])
    assert ended == ["slow"], "raised once every job had ended"


def test_outputs_encoded_together_compute_their_cut_out_once(tmp_path: Path) -> None:
    import threading

    from watchfolder.pipeline.outputs import SharedCutouts, encode_together

    cutouts = SharedCutouts()
    computing = threading.Event()
    calls: list[int] = []

    def compute() -> pyvips.Image:
        calls.append(1)
        computing.set()
        threading.Event().wait(0.3)  # the other one asks meanwhile
        return pyvips.Image.black(8, 8)

    for ask in ("make", "get"):
        key = tmp_path / f"answer.png.{ask}.cutout.tif"
        computing.clear()
        calls.clear()

        def later(key: Path = key, ask: str = ask) -> pyvips.Image | None:
            assert computing.wait(5)
            return cutouts.make_once(key, compute) if ask == "make" else cutouts.get(key)

        first, second = encode_together([lambda key=key: cutouts.make_once(key, compute),
                                          later])
        assert calls == [1], "computed once"
        assert second is first, f"{ask}: waited for the one being computed"
        cutouts.drop(key)
        assert cutouts.get(key) is None
    assert cutouts.held() == []


def test_a_files_cut_outs_are_let_go_when_it_is_stored_or_failed(tmp_path: Path) -> None:
    from watchfolder.journal.db import FileRecord
    from watchfolder.pipeline.outputs import SHARED_SUFFIX, SharedCutouts

    cutouts = SharedCutouts()
    answer = tmp_path / "7.png"
    on_disk = answer.with_name(f"{answer.name}.full{SHARED_SUFFIX}")
    on_disk.write_bytes(b"pixels")
    cutouts.put(answer.with_name(f"{answer.name}.other{SHARED_SUFFIX}"), pyvips.Image.black(8, 8))
    record = FileRecord(id=7, inbox="in", rel="a.jpg", state="failed", size=1, mtime_ns=1,
                        settings="", spool=str(answer), route="fast")
    cutouts.forget_file(record)
    assert cutouts.held() and on_disk.exists(), "a fast-path file keeps none: nothing listed"
    cutouts.forget_file(dataclasses.replace(record, route="studio"))
    assert cutouts.held() == [] and not on_disk.exists()


def test_an_8_bit_cut_out_is_scaled_in_8_bits_with_the_look_of_float(tmp_path: Path) -> None:
    # 8-bit premultiplied, as Pillow scales RGBA; against libvips's float resample of the
    # same premultiplied pixels, composited on white: the same picture, a few edge pixels
    # off by up to 16 levels (libvips's 8-bit lanczos3 is 3-4 levels off its float one on a
    # sharp alpha edge, and a colour under a nearly clear alpha keeps fewer bits).
    original, answer = make_pair(tmp_path)
    image = computed(fresh(original, answer).image.gaussblur(0.8).cast("uchar"))
    small = fit(image, 230, 230)
    assert (small.width, small.height, small.format) == (230, 153, "uchar")
    work = image.premultiply(max_alpha=255).resize(230 / WIDTH, kernel="lanczos3")
    exact = work.unpremultiply(max_alpha=255)

    def on_white(im: pyvips.Image) -> pyvips.Image:
        im = im.cast("float")
        return im[0:3] * im[3] / 255 + 255 * (1 - im[3] / 255)

    difference = (on_white(small) - on_white(exact)).abs()
    assert difference.avg() < 0.2, difference.avg()
    assert difference.max() <= 16, difference.max()
