"""Making the outputs of one file from the API's one answer, before they are placed.

    heavy(route, inbox, index, reused)   whether output `index` is local image work (the
                                         pipeline's local lane): the studio path, TIFF and
                                         recipes encode; a copy or the fast path do not
    maker(record, inbox, rel, answer, index, reused, unchanged, source, cutouts) -> Maker
                                         how to write output `index`, where, and the bytes
                                         it needs (`source`: the original as inspected
                                         before, if known: not inspected again;
                                         `cutouts`: the pipeline's SharedCutouts)
    SharedCutouts                        the full-size cut-outs held in memory for a
                                         recipe's outputs (one per pipeline, on its Context)
    encode_together(jobs)                the outputs made beside one another when the
                                         file's cut-out is held in memory (every output
                                         of the file: `Maker.together`), two at a time
    manifest_for(record, src, event, made, upright)
                                         the manifest (manifest.py) of a finished file;
                                         `made`: the `Output`s written in this run (their
                                         headers are not read again)
    sidecar(record, inbox, rel, suffix)  where its manifest or done marker goes

What each output is:
- reused: a copy of the earlier identical file (no request was sent);
- no recipe, fast path: the API's answer with the original's capture metadata added, its
  pixels untouched (imaging's `write_with_metadata`, hashed as it is written);
  `output_format: tiff` re-encodes it;
- no recipe, studio path: the full-resolution cut-out of the original (imaging's `compose`);
- a recipe's output: its steps (recipes.py) on that cut-out, or on the answer (fast path).
If the original changed or vanished after it was sent, the answer is the result as it is.

Each output of a recipe is made from the smallest read that serves it: a small one from the
original decoded at a fraction of its size (`load_shrink`), a mask from the answer's alpha
alone, and the others from the full-size cut-out. When two or more outputs read that
full-size cut-out (a PNG and a TIFF, a mask, a crop), it is computed once, by the first of
them (recipes' `keep`: the original decoded and the alpha scaled up once per file), kept in
memory up to `SHARED_IN_MEMORY` bytes (by the pipeline's `SharedCutouts`) or else as an
uncompressed TIFF beside the answer in the spool, read by each, and let go by the last. A
big one is not kept when the spool's disk lacks the room (`SHARED_RESERVE` kept free): each
output then composes on its own.

Held in memory, the cut-out also serves the file's small outputs (a web WEBP, a thumbnail):
the original is then decoded once per file, and averaging the pixels in memory costs less
than a second decode at a fraction of the size (a 45 MP JPEG's 1600 px WEBP, encoded: about
0.45 against 0.65 s of CPU). Such an output's pixels are the full-size cut-out scaled down,
so they differ by a few levels, on the subject's edge, from the same output made alone
(from a decode at 1/2, 1/4 or 1/8), and its size may differ by a pixel's rounding; its
depth, profile and metadata do not. Full-size outputs are the same bytes either way.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pyvips

from watchfolder.config.settings import EXTENSIONS, InboxConfig, OutputConfig
from watchfolder.errors import WatchfolderError
from watchfolder.handoff.manifest import OutputFacts, SourceFacts, build_manifest, manifest_id
from watchfolder.imaging.compose import (
    Cutout,
    Output,
    compose,
    cutout,
    load_shrink,
    write_output,
)
from watchfolder.imaging.inspect import Source, inspect_source, vips_name
from watchfolder.imaging.metadata import Metadata, read_metadata, write_with_metadata
from watchfolder.imaging.recipes import (
    Box,
    Recipe,
    expand,
    keep,
    kept,
    kept_pixels,
    render,
    subject_in,
)
from watchfolder.journal.db import FileRecord

T = TypeVar("T")
DEFAULT_OUTPUT = OutputConfig()  # no recipe: one output named {dir}/{stem}.{ext}
# Left free on the spool's disk beside a shared full-size cut-out (a 45 MP RGBA one is
# 179 MB, a 150 MP 16-bit one 1.2 GB), so that answers still find room while it exists.
SHARED_RESERVE = 512 << 20


@dataclass(frozen=True)
class Maker:
    produce: Callable[[Path], object]  # writes the output to the path it is given (an
    # `Output` when it encodes one, None for a copy)
    root: Path  # the outbox it goes to
    target: Path  # its name there, before collisions
    need: int  # about the bytes it takes
    # Whether it is made beside the file's other outputs (`encode_together`), after those
    # made alone: it reads the cut-out held in memory (computed by the first that needs it).
    together: bool = False


def heavy(route: str | None, inbox: InboxConfig, index: int, reused: list[str]) -> bool:
    if reused:
        return False
    return route == "studio" or bool(inbox.outputs) or inbox.output_format == "tiff"


def maker(record: FileRecord, inbox: InboxConfig, rel: str, answer: Path, index: int,
          reused: list[str], *, unchanged: bool, cutouts: SharedCutouts,
          source: Source | None = None) -> Maker:
    spec = inbox.outputs[index] if inbox.outputs else None
    src = inbox.path / rel

    def where(ext: str) -> tuple[Path, Path]:
        root = (spec.outbox if spec else None) or inbox.outbox
        name = (spec or DEFAULT_OUTPUT).path(
            rel, ext, inbox=inbox.path.name, sha256=record.sha256 or "",
            date=datetime.now().astimezone().strftime("%Y-%m-%d"))
        return root, root / name

    if reused:
        earlier = Path(reused[index])
        return Maker(partial(shutil.copyfile, earlier), *where(earlier.suffix[1:]),
                     earlier.stat().st_size)
    size = answer.stat().st_size
    if not unchanged:
        return Maker(partial(shutil.copyfile, answer), *where(answer.suffix[1:]), size)
    if spec is not None:
        try:  # once per output: it may inspect the original
            sharing = _sharing(record.route, inbox, src, answer, source)
        except (OSError, ValueError, WatchfolderError, pyvips.Error):
            sharing = None  # the output itself says what is wrong, when it is made
        shared = _shared(sharing, src, answer, index, cutouts)
        return Maker(partial(_render, record.route, src, answer, spec,
                             spec.compression or inbox.compression, source=source,
                             shared=shared),
                     *where(spec.ext), 2 * record.size + 8 * size,
                     together=shared is not None and shared.held is not None)
    fmt = inbox.output_format
    if record.route == "studio":
        source = source or inspect_source(src, studio=True, verify=False)
        return Maker(partial(compose, src, source, answer, fmt=fmt,
                             compression=inbox.compression),
                     *where(EXTENSIONS[fmt]), 2 * record.size + 4 * source.width * source.height)
    if fmt == "tiff":
        return Maker(partial(_answer_as_tiff, answer, src, compression=inbox.compression),
                     *where("tif"), 4 * size)
    # Written straight into place_new's temp (already a private name it fsyncs and places),
    # hashed as it is written; an inspection that found nothing to carry spares a header read.
    bare = source is not None and not source.tagged and source.icc is None
    return Maker(partial(write_with_metadata, answer, src, metadata=Metadata() if bare else None),
                 *where(answer.suffix[1:]), 2 * size)


# A kept cut-out up to this size is held in memory (a 45 MP RGBA one: 179 MB), bigger ones
# (a 100 MP 16-bit one: 930 MB) go to the spool's disk and are read a strip at a time.
# Memory saves about 0.4 s of CPU on a 45 MP file's five outputs (no write, no reads back).
SHARED_IN_MEMORY = 256 << 20
# Held in memory at once by one pipeline, whatever its number of local workers (one per
# worker on 2 cores): memory is the bound.
HELD_AT_MOST = 2


class SharedCutouts:
    """The full-size cut-outs held in memory for the recipes' outputs that read them, each
    under its `Shared.path`, at most `at_most` at once: memory is the bound, whatever the
    number of local workers. The oldest is dropped first when more are put (its file's
    remaining outputs then compose on their own; a reader holding it keeps its pixels until
    it is written), and one whose last reader never ran (its file failed, or the daemon
    stopped) when its file is forgotten (`forget`)."""

    def __init__(self, at_most: int = HELD_AT_MOST) -> None:
        self._at_most = at_most
        self._held: dict[Path, pyvips.Image] = {}
        self._making: dict[Path, threading.Lock] = {}  # held while one is being computed
        self._lock = threading.Lock()

    def get(self, key: Path) -> pyvips.Image | None:
        """The pixels held under `key` (waiting for them while they are being computed), or
        None."""
        with self._lock:
            making = self._making.get(key)
        if making is not None:
            with making:
                pass
        with self._lock:
            return self._held.get(key)

    def make_once(self, key: Path, compute: Callable[[], pyvips.Image]) -> pyvips.Image:
        """The pixels held under `key`, computed by `compute` and held if they are not: by
        one caller at a time (the outputs encoded together wait for the first one's)."""
        with self._lock:
            making = self._making.setdefault(key, threading.Lock())
        try:
            with making:
                with self._lock:
                    pixels = self._held.get(key)
                if pixels is None:
                    pixels = compute()
                    self.put(key, pixels)
                return pixels
        finally:
            with self._lock:
                if self._making.get(key) is making:
                    del self._making[key]

    def put(self, key: Path, pixels: pyvips.Image) -> None:
        with self._lock:
            self._held[key] = pixels
            while len(self._held) > self._at_most:  # oldest first (dicts keep their order)
                del self._held[next(iter(self._held))]

    def drop(self, key: Path) -> None:
        with self._lock:
            self._held.pop(key, None)

    def held(self) -> list[Path]:
        """The keys of the cut-outs held now, oldest first."""
        with self._lock:
            return list(self._held)

    def forget_file(self, record: FileRecord) -> None:
        """`forget` the cut-outs kept for `record`'s answer (the file was stored or failed).
        Only the studio path keeps any: a fast-path file's spool is not listed for one."""
        if record.route == "studio":
            self.forget(record.spool)

    def forget(self, answer: str | None) -> None:
        """Let go of any full-size cut-out kept for the spooled `answer` (a file that failed
        or was stored: its last reader may not have run), in memory or beside it. None (no
        spool): nothing to do."""
        if not answer:
            return
        spooled = Path(answer)
        with self._lock:
            for key in [key for key in self._held if key.parent == spooled.parent
                        and key.name.startswith(f"{spooled.name}.")]:
                del self._held[key]
        for path in spooled.parent.glob(f"{glob.escape(spooled.name)}.*{SHARED_SUFFIX}"):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Shared:
    """The full-size cut-out of one file, kept for the recipe's outputs that read it: in
    memory (`held`) up to SHARED_IN_MEMORY bytes, else as a file beside the answer."""

    path: Path  # its key; the uncompressed TIFF beside the answer when not in memory
    held: SharedCutouts | None  # where it is held in memory; None: in the file at `path`
    make: bool  # this output computes it when it is not there (another one reads it after)
    last: bool  # this output lets it go once written

    def pixels(self) -> pyvips.Image | None:
        """The pixels kept, or None (not made yet, or dropped)."""
        if self.held is not None:
            return self.held.get(self.path)
        return kept_pixels(self.path) if self.path.exists() else None

    def keep(self, cut: Cutout) -> pyvips.Image:
        """Compute `cut` once and keep it; its pixels."""
        if self.held is None:
            return keep(cut, self.path)
        return self.held.make_once(self.path, partial(keep, cut))

    def release(self) -> None:
        if self.held is not None:
            self.held.drop(self.path)
        else:
            self.path.unlink(missing_ok=True)


# A file's outputs made together (its cut-out held in memory) are made this many at a time:
# the threads one output streamed from the original keeps busy (libvips's pixel thread and
# its encoder's write-behind), where each of these, once the cut-out is made, spends its
# time in its encoder alone (zlib for a PNG or a TIFF). Beside the cut-out, memory holds
# only their encoders' buffers (and a small output's scaled pixels).
ENCODED_AT_ONCE = 2


def encode_together(jobs: list[Callable[[], T]]) -> list[T]:
    """Run `jobs` (outputs of one file that read its cut-out held in memory, the first
    computing it while the next waits), ENCODED_AT_ONCE at a time; their results in order.
    An exception is raised once every job has ended, none left running."""
    if len(jobs) < 2:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=ENCODED_AT_ONCE, thread_name_prefix="encode") as pool:
        futures = [pool.submit(job) for job in jobs]
    return [future.result() for future in futures]


def _shared(sharing: tuple[list[int], int] | None, src: Path, answer: Path, index: int,
            cutouts: SharedCutouts) -> Shared | None:
    """Output `index`'s part in sharing the full-size cut-out (`sharing`: see `_sharing`):
    None when fewer than two of the recipe's outputs read it, when this one does not, or when
    it is kept on disk and the spool's disk lacks the room for it (each output then composes
    on its own, as before)."""
    if sharing is None or index not in sharing[0]:
        return None
    readers, need = sharing
    in_memory = need <= SHARED_IN_MEMORY
    try:
        if not in_memory and shutil.disk_usage(answer.parent).free < need + SHARED_RESERVE:
            return None
        stat, answered = src.stat(), answer.stat()
    except OSError:
        return None  # the output itself says what is wrong, when it is made
    # Named after the original and the answer it is made of: a file replaced since is not
    # taken for it.
    key = hashlib.sha256(repr((str(src), stat.st_size, stat.st_mtime_ns, answered.st_size,
                               answered.st_mtime_ns)).encode()).hexdigest()[:16]
    # Held in memory, its readers are encoded together (`encode_together`): whichever needs
    # it first computes it, the others wait for it, the last one included. In a file, they
    # are made one by one, and a last reader that finds none composes on its own.
    return Shared(answer.with_name(f"{answer.name}.{key}{SHARED_SUFFIX}"),
                  cutouts if in_memory else None,
                  make=in_memory or index != readers[-1], last=index == readers[-1])


SHARED_SUFFIX = ".cutout.tif"


def _sharing(route: str | None, inbox: InboxConfig, src: Path, answer: Path,
             source: Source | None) -> tuple[list[int], int] | None:
    """(the outputs that read the full-size cut-out, its bytes) when two or more of the
    recipe's outputs read it on the studio path, else None: those at full size, and when
    it is held in memory (up to SHARED_IN_MEMORY bytes) the small ones too, as long as one
    output needs it at full size (small ones alone decode the original smaller)."""
    if route != "studio":
        return None
    source = source or inspect_source(src, studio=True, verify=False)
    readers = [n for n, spec in enumerate(inbox.outputs) if _shrink(spec, source, answer) == 1]
    width, height = source.upright
    need = width * height * (source.colour_bands + 1) * source.bits // 8
    if readers and need <= SHARED_IN_MEMORY:
        readers = list(range(len(inbox.outputs)))
    if len(readers) < 2:
        return None
    return readers, need


def _shrink(spec: OutputConfig, source: Source, answer: Path) -> int:
    """The scale (1, 2, 4, 8) an output of `spec` reads the original at on the studio path:
    an output a fraction of the original's size (`size`, `max_size`; after the crop to the
    subject, if any) starts from the original decoded smaller (`load_shrink`); a mask and
    everything else from the full-size cut-out."""
    box = spec.size or ((spec.max_size, spec.max_size) if spec.max_size else None)
    if box is None or spec.mask:
        return 1
    width, height = source.upright
    if spec.crop == "subject":
        subject = subject_in(answer, width, height) or Box(0, 0, width, height)
        subject = expand(subject, spec.margin_pixels(), spec.margin_percent())
        width, height = subject.width, subject.height
    return load_shrink(source, min(box[0] / width, box[1] / height))


def _cutout(route: str | None, src: Path, answer: Path, spec: OutputConfig,
            source: Source | None = None, shared: Shared | None = None) -> tuple[Cutout, int]:
    """The cut-out (studio path), or the answer with the original's metadata (fast path):
    what a recipe's steps work on, and the shrink it was made at (`_shrink`). On the studio
    path, a mask is the alpha alone (the original's colours are not decoded) unless the
    full-size cut-out is `shared`: then it, like every output that reads it (all of them
    when it is held in memory, small ones included), reads the cut-out kept for the file
    (computing it first if it is the first to need it); a small one reads it averaged down
    by its shrink (its size then within a pixel of the decode at 1/shrink's)."""
    if route != "studio":
        image = pyvips.Image.new_from_file(vips_name(answer), access="sequential")
        return Cutout(image, replace(read_metadata(src), icc=None), answer), 1
    source = source or inspect_source(src, studio=True, verify=False)
    shrink = _shrink(spec, source, answer)
    if shared is None:
        return cutout(src, source, answer, alpha_only=spec.mask, shrink=shrink), shrink
    whole = cutout(src, source, answer)  # lazy: only its header is read here
    pixels = shared.pixels()
    if pixels is None:
        if not shared.make:
            return cutout(src, source, answer, alpha_only=spec.mask), 1
        pixels = shared.keep(whole)
    held = kept(whole, pixels)
    if shrink == 1:
        return held, 1
    # A small output: the held pixels averaged by `shrink` (a box, as the JPEG decode at
    # 1/shrink it replaces averages in the DCT), so the lanczos3 that follows works on twice
    # the output's pixels a side, not on all 45 MP (its premultiply is in floating point).
    return replace(held, image=held.image.shrink(shrink, shrink)), shrink


def _render(route: str | None, src: Path, answer: Path, spec: OutputConfig,
            compression: int | None,
            dest: Path, *, source: Source | None = None, shared: Shared | None = None
            ) -> Output:
    """One output of a recipe, written to `dest`."""
    cut, shrink = _cutout(route, src, answer, spec, source, shared)
    image = render(cut, Recipe(
        crop_to_subject=spec.crop == "subject",
        margin_pixels=round(spec.margin_pixels() / shrink),  # the original's pixels
        margin_percent=spec.margin_percent(), size=spec.size, position=spec.position,
        max_size=spec.max_size, background=spec.background, mask=spec.mask))
    if spec.dpi:
        image = image.copy(xres=spec.dpi / 25.4, yres=spec.dpi / 25.4)
    made = write_output(image, spec.format, dest, cut.metadata, quality=spec.quality,
                        compression=compression, effort=spec.effort)
    if shared is not None and shared.last:
        shared.release()
    return made


def _answer_as_tiff(answer: Path, original: Path, dest: Path, *,
                    compression: int | None) -> Output:
    """The API's answer (8-bit sRGB with alpha) as a TIFF with the original's metadata."""
    image = pyvips.Image.new_from_file(vips_name(answer), access="sequential")
    return write_output(image, "tiff", dest, replace(read_metadata(original), icc=None),
                 compression=compression)


def image_facts(path: Path, *, upright: bool = False) -> tuple[str | None, int | None,
                                                              int | None]:
    """(format, width, height) from an image's header; Nones when it cannot be read."""
    try:
        header = pyvips.Image.new_from_file(vips_name(path))
    except pyvips.Error:
        return None, None, None
    loader = str(header.get("vips-loader")) if header.get_typeof("vips-loader") else ""
    fmt = next((name for name in ("png", "webp", "jpeg", "tiff", "heif") if name in loader),
               None)
    width, height = header.width, header.height
    if upright and header.get_typeof("orientation") and header.get("orientation") in (5, 6, 7,
                                                                                        8):
        width, height = height, width
    return fmt, width, height


def manifest_for(record: FileRecord, src: Path, event: str,
                 made: list[Output | None] | None = None,
                 upright: tuple[int, int] | None = None) -> dict[str, Any]:
    """The manifest of a finished (done or failed) file, from its journal record, the
    outputs written in this run and the original's upright size if it was inspected (what
    is not known is read from the files' headers: a copy, or after a restart)."""
    outputs = []
    entries = record.placed() if event == "done" else []
    for index, entry in enumerate(entries):
        if entry is None:
            continue
        out = made[index] if made and index < len(made) else None
        fmt: str | None
        width: int | None
        height: int | None
        if out is not None and str(out.path) == entry[0]:
            fmt, width, height = out.format, out.width, out.height
        else:
            fmt, width, height = image_facts(Path(entry[0]))
        outputs.append(OutputFacts(entry[0], fmt or Path(entry[0]).suffix[1:], width or 0,
                                   height or 0, entry[1]))
    original = next((Path(p) for p in (record.archive, str(src), record.error_path)
                     if p and os.path.lexists(p)), src)
    if upright is None:
        _, width, height = image_facts(original, upright=True)
    else:
        width, height = upright
    return build_manifest(
        manifest_id=manifest_id(record.inbox, record.rel, record.id, record.created),
        event=event,
        source=SourceFacts(path=str(src), inbox=record.inbox,
                           moved_to=record.archive or record.error_path,
                           sha256=record.sha256, width=width, height=height),
        outputs=outputs,
        credits_spent=0 if record.reuse_from or not record.result_sha else 1,
        credits_remaining=record.credits, finished_at=datetime.now().astimezone(),
        reason=record.reason if event == "failed" else None,
        message=record.message if event == "failed" else None)


def sidecar(record: FileRecord, inbox: InboxConfig, rel: str, suffix: str) -> Path:
    """`<outbox>/<dir>/<stem><suffix>` (a manifest, a done marker), with the `-N` the file's
    first output took on a collision."""
    placed = record.placed()[0]
    assert placed is not None, "a sidecar is written once the first output is placed"
    first = Path(placed[0])
    spec = inbox.outputs[0] if inbox.outputs else DEFAULT_OUTPUT
    intended = PurePosixPath(spec.path(
        rel, first.suffix[1:], inbox=inbox.path.name, sha256=record.sha256 or "",
        date=datetime.now().astimezone().strftime("%Y-%m-%d")))
    taken = re.fullmatch(re.escape(intended.stem) + r"(-\d+)", first.stem)
    source = PurePosixPath(rel)
    return inbox.outbox.joinpath(*source.parent.parts,
                                 f"{source.stem}{taken[1] if taken else ''}{suffix}")


def rejected_cutout(answer: Path, fmt: str) -> bytes:
    """The API's answer as a file of the inbox's (first) output format, for a result a person
    rejected: put beside the original in errors, for retouching by hand."""
    import pyvips

    image = pyvips.Image.new_from_file(str(answer), access="sequential")
    if fmt == "jpeg" and image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    suffix = {"png": ".png", "webp": ".webp", "jpeg": ".jpg", "tiff": ".tif"}[fmt]
    return bytes(image.write_to_buffer(suffix))
