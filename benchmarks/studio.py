"""The studio path's local work per file, libvips (watchfolder.imaging) beside Pillow.

    python -m benchmarks.studio                  # 45 MP JPEG (upright and sideways), 100 MP
                                                 # 16-bit TIFF; about 3 minutes on 2 cores
    python -m benchmarks.studio --quick          # 12 and 27 MP stand-ins: seconds
    python -m benchmarks.studio --threads 2      # libvips threads per pipeline (default:
                                                 # cores - 1, what the daemon uses)

`python -m benchmarks.run --only studio_local` puts the first and last of these in the report;
this module also makes the harness's studio inputs (`CACHE`: made once, kept between runs)
and measures a recipe's outputs (`recipe_child`, for the `recipe_local` case).

Local work is what the daemon does around the one request: the proxy (upright, sRGB, 8-bit,
within 25 MP, JPEG), then the full-size composite (the original's pixels, the answer's alpha
scaled up) written as PNG. The answer is made once per case by the sandbox from the proxy,
outside the timing, and both sides compose with the same answer.

Each case runs in its own process, so its peak RSS is its own: VmHWM, the kernel's count
(mapped files included), read by the child at its end. Not ru_maxrss: Linux keeps that
across exec, so a child forked from this (big) parent would report the parent's size.

The Pillow side is what a careful Pillow program does: exif_transpose, ImageCms to sRGB,
LANCZOS to 25 MP, the answer's alpha scaled up with BICUBIC, putalpha, PNG with the
profile and EXIF, at the same zlib level. No numpy is needed for it. Pillow holds colour at
8 bits, so its composite of a 16-bit TIFF is 8-bit (the libvips one keeps 16 bits).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Studio inputs are big (a 100 MP 16-bit TIFF is 115 MB deflated) and slow to make: they are
# made once and kept here between runs. Cases hard-link them into their inboxes (the daemon
# moves its link to the archive; the cached one stays).
CACHE = Path(os.environ.get("WATCHFOLDER_BENCH_CACHE",
                            Path(tempfile.gettempdir()) / "watchfolder-bench-cache"))
PNG_COMPRESSION = 3  # imaging.PNG_COMPRESSION, for the Pillow side too (no libvips import)

# name: (width, height, kind, orientation)
FULL = {
    "45 MP JPEG": (8192, 5464, "jpeg", 1),
    "45 MP JPEG, orientation 6": (8192, 5464, "jpeg", 6),
    "100 MP 16-bit TIFF": (11608, 8708, "tiff", 1),
}
QUICK = {
    "12 MP JPEG, orientation 6": (4000, 3000, "jpeg", 6),
    "27 MP 16-bit TIFF": (6000, 4500, "tiff", 1),
}


# --------------------------------------------------------------------------- inputs


def make_input(folder: Path, name: str, width: int, height: int, kind: str,
               orientation: int) -> Path:
    """A studio shot with sensor-like noise (so files compress like photographs do)."""
    import pyvips  # only here: the children that benchmark Pillow must not load libvips

    from watchfolder.dev.samples import adobe_rgb_profile, studio_image

    path = folder / (name.replace(" ", "_").replace(",", "") + (".jpg" if kind == "jpeg"
                                                                  else ".tif"))
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)  # a fresh cache has no folder yet
    # Draw small, scale up in libvips: a 100 MP Pillow drawing would take a minute.
    small = studio_image(-(-width // 8), -(-height // 8), "white" if kind == "jpeg" else "grey",
                         "mug" if kind == "jpeg" else "bottle", 5, colour="red")
    base = pyvips.Image.new_from_memory(small.tobytes(), small.width, small.height, 3, "uchar")
    base = base.resize(8, kernel="linear").crop(0, 0, width, height).copy(
        interpretation="srgb")
    noise = pyvips.Image.gaussnoise(width, height, sigma=2.5, mean=0, seed=1)
    image = (base.cast("float") + noise).cast("uchar").copy(interpretation="srgb")
    temp = path.with_suffix(".tmp")
    if kind == "jpeg":
        if orientation == 6:
            image = image.rot270()  # stored sideways, as a camera held upright stores it
        image = image.copy()
        image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
        image.jpegsave(str(temp), Q=92)
    else:
        profile = folder / "adobe-rgb.icc"
        profile.write_bytes(adobe_rgb_profile())
        adobe = image.icc_transform(str(profile), input_profile="srgb", embedded=False,
                                    depth=16)
        adobe.tiffsave(str(temp), compression="deflate", predictor="horizontal")
    temp.rename(path)
    return path


def make_answer(folder: Path, original: Path) -> tuple[Path, int, int]:
    """The sandbox's answer for our proxy (made once, untimed, shared by both sides)."""
    from PIL import Image

    from watchfolder.dev.sandbox import remove_backdrop
    from watchfolder.imaging import libraries
    from watchfolder.imaging.compose import make_proxy
    from watchfolder.imaging.inspect import inspect_source

    libraries.configure()
    answer = original.with_suffix(".answer.png")
    proxy_path = original.with_suffix(".proxy.jpg")
    proxy = make_proxy(original, inspect_source(original), proxy_path)
    if not answer.exists():
        with Image.open(proxy_path) as image:
            remove_backdrop(image).save(answer, "PNG", compress_level=1)
    return answer, proxy.width, proxy.height


def unique_copies(name: str, count: int) -> list[Path]:
    """`count` files with the pixels of the `name` input and bytes of their own (cached).

    Unique bytes matter: watchfolder reuses the result of identical content without a
    request. A JPEG gets a comment segment (before its tables, after the EXIF), a TIFF its
    own XResolution (72.0000n dpi): neither reaches the proxy (sent without metadata), so
    every copy's proxy is the same image, and so is the sandbox's answer.
    """
    width, height, kind, orientation = FULL[name]
    base = make_input(CACHE / "studio", name, width, height, kind, orientation)
    folder = CACHE / base.stem
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{n:05d}{base.suffix}" for n in range(count)]
    missing = [(n, path) for n, path in enumerate(paths) if not path.exists()]
    if missing:
        data = base.read_bytes() if kind == "jpeg" else b""
        for n, path in missing:
            temp = path.with_name(f".{path.name}.tmp")
            if kind == "jpeg":
                temp.write_bytes(_with_comment(data, f"watchfolder-bench {n}".encode()))
            else:
                shutil.copyfile(base, temp)
                _set_xresolution(temp, 720_000 + n, 10_000)
            temp.rename(path)
        os.sync()  # written now, not flushed while a daemon is being measured
    return paths


def _with_comment(jpeg: bytes, text: bytes) -> bytes:
    """`jpeg` with a COM segment inserted before its first non-APPn segment."""
    at = 2
    while 0xE0 <= jpeg[at + 1] <= 0xEF or jpeg[at + 1] == 0xFE:
        at += 2 + struct.unpack(">H", jpeg[at + 2:at + 4])[0]
    return jpeg[:at] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + jpeg[at:]


def _set_xresolution(tiff: Path, numerator: int, denominator: int) -> None:
    """Overwrite the XResolution rational of a little-endian classic TIFF's first IFD."""
    with tiff.open("r+b") as handle:
        head = handle.read(8)
        if head[:4] != b"II*\x00":
            raise ValueError(f"{tiff}: not a little-endian classic TIFF")
        handle.seek(struct.unpack("<I", head[4:])[0])
        for _ in range(struct.unpack("<H", handle.read(2))[0]):
            tag, kind, count, offset = struct.unpack("<HHII", handle.read(12))
            if tag == 282 and kind == 5 and count == 1:
                handle.seek(offset)
                handle.write(struct.pack("<II", numerator, denominator))
                return
    raise ValueError(f"{tiff}: no XResolution to make it unique")


# --------------------------------------------------------------------------- children


def run_vips(original: Path, answer: Path, out: Path, threads: int | None) -> dict[str, Any]:
    from watchfolder.imaging import compose as imaging
    from watchfolder.imaging import libraries
    from watchfolder.imaging.inspect import inspect_source

    libraries.configure()
    imaging.configure(threads)
    times = {}
    # CPU seconds too (every thread of this process): the machine's limit for studio files
    # is cores / CPU per file, whatever else runs beside the benchmark (issue 17).
    cpu: dict[str, float] = {}
    start, cpu0 = time.perf_counter(), time.process_time()
    # The header only, as the daemon's `prepare` does for a studio file: making its proxy
    # decodes it whole anyway (a separate decode check would be work the daemon never does).
    source = inspect_source(original, verify=False)
    times["inspect"] = time.perf_counter() - start
    cpu["inspect"] = time.process_time() - cpu0
    mark, cpu_mark = time.perf_counter(), time.process_time()
    proxy = imaging.make_proxy(original, source, out.with_suffix(".proxy.jpg"))
    times["proxy"] = time.perf_counter() - mark
    cpu["proxy"] = time.process_time() - cpu_mark
    mark, cpu_mark = time.perf_counter(), time.process_time()
    result = imaging.compose(original, source, answer, out, "png")
    times["compose"] = time.perf_counter() - mark
    cpu["compose"] = time.process_time() - cpu_mark
    times["total"] = time.perf_counter() - start
    cpu["total"] = time.process_time() - cpu0
    return {"times": times, "cpu": cpu, "proxy": [proxy.width, proxy.height],
            "bits": result.bits,
            "size": [result.width, result.height], "bytes": result.size}


def run_pillow(original: Path, answer: Path, out: Path, box: tuple[int, int]) -> dict[str, Any]:
    from PIL import Image, ImageCms, ImageOps

    Image.MAX_IMAGE_PIXELS = None
    times = {}
    start = time.perf_counter()
    with Image.open(original) as opened:
        opened.load()  # the check that it decodes: Pillow has no streaming decode
        times["inspect"] = time.perf_counter() - start
        mark = time.perf_counter()
        image = ImageOps.exif_transpose(opened)
        icc = opened.info.get("icc_profile")
        exif = opened.getexif()
        exif[0x0112] = 1
    srgb = image
    if icc:
        converted = ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                              ImageCms.createProfile("sRGB"), outputMode="RGB")
        if converted is None:  # only with inPlace=True
            raise RuntimeError("ImageCms returned no image")
        srgb = converted
    proxy = srgb.resize(box, Image.Resampling.LANCZOS) if srgb.size != box else srgb
    proxy.save(out.with_suffix(".proxy.jpg"), "JPEG", quality=92)
    del srgb, proxy
    times["proxy"] = time.perf_counter() - mark
    mark = time.perf_counter()
    with Image.open(answer) as mask_source:
        alpha = mask_source.getchannel("A").resize(image.size, Image.Resampling.BICUBIC)
    image.putalpha(alpha)
    del alpha
    image.save(out, "PNG", compress_level=PNG_COMPRESSION, icc_profile=icc, exif=exif.tobytes())
    times["compose"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start
    return {"times": times, "proxy": list(box), "bits": 8, "size": list(image.size),
            "bytes": out.stat().st_size}


def recipe_child(original: Path, answer: Path, out: Path,
                 outputs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Make every output of a recipe (None: the default one output) from `answer`, as the
    daemon's `store` step does: results.maker, then placed (written beside its name,
    fsynced, its SHA-256 taken, linked), those that read the cut-out held in memory two at
    a time (`encode_together`; their CPU is reported together). The journal's commits are
    not counted."""
    from types import SimpleNamespace

    from watchfolder.config.settings import parse_config
    from watchfolder.files.place import Destinations, sha256_file
    from watchfolder.imaging.inspect import inspect_source
    from watchfolder.pipeline import outputs as results

    inbox = out / "inbox"
    for folder in (inbox, out / "outbox"):  # the daemon makes its roots at start-up
        folder.mkdir(parents=True, exist_ok=True)
    source = inbox / original.name
    if not source.exists():
        os.link(original, source)
    box: dict[str, Any] = {"path": str(inbox), "outbox": str(out / "outbox"),
                           "errors": str(out / "errors")}
    if outputs:
        box["outputs"] = outputs
    config = parse_config({"api": {"key": "bench-key-0123456789"},
                           "state_dir": str(out / "state"), "inboxes": [box]}, base_dir=out)
    settings = config.inboxes[0]
    # What the pipeline's record holds by then (the file's SHA-256 is taken at `prepare`).
    record = SimpleNamespace(route="studio", size=source.stat().st_size,
                             sha256=sha256_file(source))
    destinations = Destinations()
    cutouts = results.SharedCutouts()  # the pipeline's (its Context's), one per daemon
    made = []
    start = time.perf_counter()
    cpu = time.process_time()
    # As `prepare` does: the original inspected once, its facts handed to every output.
    facts = inspect_source(source, studio=True, verify=False)

    def place(maker: Any) -> dict[str, Any]:
        mark, mark_cpu = time.perf_counter(), time.process_time()
        path, _ = destinations.place_new(
            maker.root, "outbox", maker.target, None, produce=maker.produce,
            claim=lambda name, digest: None, ours=lambda name: False, need=maker.need)
        fmt, width, height = results.image_facts(path)
        return {"name": path.name, "format": fmt, "size": [width, height],
                "bytes": path.stat().st_size, "seconds": time.perf_counter() - mark,
                "cpu_s": time.process_time() - mark_cpu}

    together = []
    for index in range(len(settings.outputs) or 1):
        maker = results.maker(record, settings, source.name, answer, index,  # type: ignore[arg-type]
                              [], unchanged=True, source=facts, cutouts=cutouts)
        if maker.together:  # as `store` does: made together after the others
            together.append(maker)
        else:
            made.append(place(maker))
    mark, mark_cpu = time.perf_counter(), time.process_time()
    for output in results.encode_together([partial(place, maker) for maker in together]):
        # Made at the same time: the process's CPU is theirs together, not each one's.
        made.append({**output, "cpu_s": None, "together": True})
    return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "outputs": made, "together": {"outputs": len(together),
                                          "seconds": time.perf_counter() - mark,
                                          "cpu_s": time.process_time() - mark_cpu}}


def child(args: argparse.Namespace) -> None:
    original, answer = Path(args.original), Path(args.answer)
    out = Path(args.out)
    if args.side == "recipe":
        result = recipe_child(original, answer, out, json.loads(args.recipe))
    elif args.side == "vips":
        result = run_vips(original, answer, out, args.threads)
    else:
        result = run_pillow(original, answer, out, (args.box[0], args.box[1]))
    result["peak_mb"] = peak_rss_mb()
    print(json.dumps(result))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(side: str, original: Path, answer: Path, box: tuple[int, int], out: Path,
            threads: int | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.studio", "--child", side,
               "--original", str(original), "--answer", str(answer), "--out", str(out),
               "--box", str(box[0]), str(box[1])]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} child failed on {original.name}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    return result


def measure_recipe(original: Path, answer: Path, out: Path,
                   outputs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """`recipe_child` in a process of its own (its peak RSS is its own); `out` is emptied."""
    command = [sys.executable, "-m", "benchmarks.studio", "--child", "recipe",
               "--original", str(original), "--answer", str(answer), "--out", str(out),
               "--recipe", json.dumps(outputs)]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"recipe child failed on {original.name}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studio")
    parser.add_argument("--quick", action="store_true", help="small stand-ins (seconds)")
    parser.add_argument("--threads", type=int, default=None,
                        help="libvips threads per pipeline (default: cores - 1)")
    parser.add_argument("--dir", default=None, help="keep inputs here between runs")
    parser.add_argument("--child", choices=("vips", "pillow", "recipe"), help=argparse.SUPPRESS)
    parser.add_argument("--original", help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--box", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="null", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return

    folder = Path(args.dir or tempfile.mkdtemp(prefix="watchfolder-studio-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    cases = QUICK if args.quick else FULL
    print(f"studio path, local work per file; {os.cpu_count()} cores; inputs in {folder}")
    header = (f"{'case':28} {'side':7} {'inspect':>8} {'proxy':>7} {'compose':>8} "
              f"{'total':>7} {'peak RSS':>9}  output")
    print(header)
    print("-" * len(header))
    for name, (width, height, kind, orientation) in cases.items():
        original = make_input(folder, name, width, height, kind, orientation)
        answer, pw, ph = make_answer(folder, original)
        results = {}
        for side in ("vips", "pillow"):
            result = measure(side, original, answer, (pw, ph), folder / f"out-{side}.png",
                             args.threads)
            results[side] = result
            t = result["times"]
            print(f"{name:28} {side:7} {t['inspect']:7.2f}s {t['proxy']:6.2f}s "
                  f"{t['compose']:7.2f}s {t['total']:6.2f}s {result['peak_mb']:7.0f} MB  "
                  f"{result['size'][0]}x{result['size'][1]} {result['bits']}-bit PNG, "
                  f"{result['bytes'] / 1e6:.0f} MB")
        vips, pillow = results["vips"], results["pillow"]
        print(f"{'':28} {'ratio':7} Pillow / libvips: time "
              f"{pillow['times']['total'] / vips['times']['total']:.1f}x, peak RSS "
              f"{pillow['peak_mb'] / vips['peak_mb']:.1f}x   "
              f"({os.path.getsize(original) / 1e6:.0f} MB input, proxy {pw}x{ph}, "
              f"{pw * ph / 1e6:.1f} MP)")
    print(f"libvips threads per pipeline: {args.threads or max(1, (os.cpu_count() or 2) - 1)}"
          f"; pixels: {math.prod(next(iter(cases.values()))[:2]) / 1e6:.0f} MP first case")


if __name__ == "__main__":
    main()
