"""`watchfolder demo --once`: the first thing a new user runs must really work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyvips
from PIL import Image


def test_demo_once_produces_real_cutouts(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "watchfolder", "demo", "--once", "--dir",
                           str(folder), "--rpm", "600"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error report" in done.stdout and str(folder / "outbox") in done.stdout
    results = sorted((folder / "outbox").glob("*.png"))
    assert len(results) == 7, "five web-ready shots and two studio originals"
    for result in results:
        with Image.open(result) as image:
            alpha = image.convert("RGBA").getchannel("A")
            histogram = alpha.histogram()
            pixels = image.width * image.height
            assert alpha.getpixel((2, 2)) == 0, f"{result.name}: backdrop corner knocked out"
            assert histogram[0] > 0.4 * pixels, f"{result.name}: most of the backdrop is clear"
            assert histogram[255] > 0.03 * pixels, f"{result.name}: an opaque subject remains"
    originals = sorted((folder / "archive").iterdir())
    assert len(originals) == 7
    assert sorted(p.stem for p in originals) == sorted(r.stem for r in results)
    report = json.loads((folder / "errors" / "broken.jpg.error.json").read_text())
    assert report["reason"] == "corrupt"
    assert list((folder / "inbox").iterdir()) == []
    # The studio originals: full size, upright, 16-bit kept; the summary names them.
    with Image.open(folder / "outbox" / "camera-sideways.png") as camera:
        assert camera.size == (6000, 4500)
    retouch = pyvips.Image.new_from_file(str(folder / "outbox" / "retouch-adobe-rgb-16bit.png"))
    assert (retouch.format, retouch.bands) == ("ushort", 4)
    assert retouch.get_typeof("icc-profile-data") != 0
    assert "studio path      camera-sideways.jpg, retouch-adobe-rgb-16bit.tif" in done.stdout


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "watchfolder", "demo", "--once", "--dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode != 0
    assert "not a demo folder" in done.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
