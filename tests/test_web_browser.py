"""The web view in a real browser (issue 18): Chromium from the distribution, driven by
Playwright by roles and accessible names only, as a person on the studio floor uses it.

Chromium is `/usr/bin/chromium` (`apt-get install chromium`; `.ci/run` installs it); Playwright
never downloads a browser of its own. `WATCHFOLDER_WEB_SCREENSHOT=docs/web-view.png` keeps the
screenshot the demo test takes (the README's picture).
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Running, Studio, make_image, wait_for
from watchfolder.dev.sandbox import Sandbox

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token-7"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def page() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Chromium is missing: `apt-get install chromium` (.ci/run does it as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            yield context.new_page()
        finally:
            browser.close()


class Demo:
    """`watchfolder demo` in a subprocess, its output read line by line."""

    def __init__(self, folder: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watchfolder", "demo", "--dir", str(folder), "--rpm", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each line as it is printed
        self.lines: list[str] = []
        self._partial = b""
        self._selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        self._selector.register(self.process.stdout, selectors.EVENT_READ)

    def wait_line(self, pattern: str, timeout: float = 60, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines if re.search(pattern, line)]
            if len(found) >= count:
                return found[count - 1]
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                pytest.fail(f"no line matching {pattern!r}:\n" + "".join(self.lines))
            if self._selector.select(min(left, 0.5)):
                assert self.process.stdout is not None
                # Raw reads: a buffered reader would keep lines the selector never reports.
                *complete, self._partial = (self._partial + os.read(
                    self.process.stdout.fileno(), 65536)).split(b"\n")
                self.lines += [line.decode("utf-8", "replace") + "\n" for line in complete]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._selector.close()
        if self.process.stdout is not None:
            self.process.stdout.close()


def test_demo_watch_retry_and_pause_in_a_browser(tmp_path: Path, page: Any) -> None:
    from playwright.sync_api import expect

    demo = Demo(tmp_path / "demo")
    try:
        line = demo.wait_line(r"^web ")
        url = line.split()[1]
        assert re.match(r"http://127\.0\.0\.1:\d+/\?token=\S+$", url), line
        page.goto(url)
        assert page.url.endswith("/") and "token" not in page.url  # logged in, then redirected
        recent = page.get_by_role("region", name="Recent", exact=True)
        # The samples appear as they finish, without reloading the page.
        cut_out = recent.get_by_role("img", name="cut-out red-mug on white.jpg", exact=True)
        expect(cut_out).to_be_visible(timeout=60_000)
        expect(recent.get_by_role("img", name="original red-mug on white.jpg",
                                  exact=True)).to_be_visible()
        expect(recent.get_by_role("img", name="cut-out camera-sideways.jpg",
                                  exact=True)).to_be_visible(timeout=60_000)
        demo.wait_line(r"failed\s+broken\.jpg")
        attention = page.get_by_role("region", name="Needs attention", exact=True)
        broken = attention.get_by_role("listitem").filter(has_text="broken.jpg")
        expect(broken).to_be_visible(timeout=5_000)
        expect(broken).to_contain_text("corrupt")
        inbox = page.get_by_role("region", name="inbox", exact=True)
        expect(inbox).to_contain_text("Done today: 7")
        expect(inbox).to_contain_text("Failed: 1")
        expect(page.get_by_text(re.compile(r"^Credits today: \d+$"))).to_be_visible()
        images = page.get_by_role("img")
        for index in range(images.count()):  # every picture loaded before the screenshot
            expect(images.nth(index)).to_have_js_property("complete", True)
        screenshot = tmp_path / "web-view.png"
        page.screenshot(path=str(screenshot), full_page=True)
        keep = os.environ.get("WATCHFOLDER_WEB_SCREENSHOT")
        if keep:
            shutil.copyfile(screenshot, ROOT / keep)

        # Retry the broken one: it is processed again (and, broken as it is, fails again).
        broken.get_by_role("button", name=re.compile(r"^Retry")).click()
        demo.wait_line(r"failed\s+broken\.jpg", count=2)
        expect(attention.get_by_role("listitem").filter(has_text="broken.jpg")).to_be_visible()

        # Pause the inbox from the page: a new file waits.
        inbox.get_by_role("button", name=re.compile(r"^Pause")).click()
        expect(inbox).to_contain_text("Paused: paused by web")
        make_image(tmp_path / "demo" / "inbox" / "later.png")
        expect(inbox).to_contain_text("Waiting: 1", timeout=10_000)
        time.sleep(1.0)
        assert not (tmp_path / "demo" / "outbox" / "later.png").exists()
        inbox.get_by_role("button", name=re.compile(r"^Resume")).click()
        expect(recent.get_by_role("img", name="cut-out later.png", exact=True)).to_be_visible(
            timeout=30_000)
    finally:
        demo.stop()


def test_retry_in_the_browser_sends_the_file_again(tmp_path: Path, sandbox: Sandbox,
                                                   page: Any) -> None:
    from playwright.sync_api import expect

    studio = Studio(tmp_path, sandbox.url, web={"listen": "127.0.0.1:0", "token": TOKEN})
    sandbox.add_faults(400)  # refused once; the retry succeeds
    with Running(studio.config()) as daemon:
        assert daemon.web is not None
        page.goto(f"{daemon.web.url}?token={TOKEN}")
        make_image(studio.inbox / "shoot" / "a.png")
        attention = page.get_by_role("region", name="Needs attention", exact=True)
        failed = attention.get_by_role("listitem").filter(has_text="shoot/a.png")
        expect(failed).to_contain_text("api_rejected", timeout=15_000)
        failed.get_by_role("button", name=re.compile(r"^Retry")).click()
        recent = page.get_by_role("region", name="Recent", exact=True)
        expect(recent.get_by_role("img", name="cut-out shoot/a.png", exact=True)).to_be_visible(
            timeout=15_000)
        expect(attention.get_by_role("listitem")).to_have_count(0)
        wait_for(lambda: studio.files(studio.outbox) == ["shoot/a.png"], timeout=30,
                 what="a.png done")
        # Its own page: the original, the cut-out and its downloads.
        recent.get_by_role("link", name="shoot/a.png").click()
        expect(page.get_by_role("img", name="original shoot/a.png", exact=True)).to_be_visible()
        expect(page.get_by_role("img", name="cut-out shoot/a.png", exact=True)).to_be_visible()
        expect(page.get_by_role("link", name=re.compile(r"^Download"))).to_have_count(2)


def test_read_only_without_a_token_has_no_buttons(tmp_path: Path, sandbox: Sandbox,
                                                  page: Any) -> None:
    from playwright.sync_api import expect

    studio = Studio(tmp_path, sandbox.url, web={"listen": "127.0.0.1:0"})
    with Running(studio.config()) as daemon:
        assert daemon.web is not None
        (studio.inbox / "bad.png").write_bytes(b"not a png")
        page.goto(daemon.web.url)
        attention = page.get_by_role("region", name="Needs attention", exact=True)
        expect(attention.get_by_role("listitem")).to_have_count(1, timeout=15_000)
        for word in ("Retry", "Pause", "Resume", "Retry all", "Pause all"):
            expect(page.get_by_role("button", name=re.compile(f"^{word}"))).to_have_count(0)


def test_review_with_the_keyboard(tmp_path: Path, sandbox: Sandbox, page: Any) -> None:
    from playwright.sync_api import expect

    studio = Studio(tmp_path, sandbox.url, web={"listen": "127.0.0.1:0", "token": TOKEN})
    studio.data["inboxes"][0]["review"] = True
    with Running(studio.config()) as daemon:
        assert daemon.web is not None
        page.goto(f"{daemon.web.url}?token={TOKEN}")
        make_image(studio.inbox / "keep.png")
        make_image(studio.inbox / "redo.png", seed=2)
        review = page.get_by_role("region", name="To review", exact=True)
        expect(review.get_by_role("listitem")).to_have_count(2, timeout=15_000)
        expect(review.get_by_role("img", name="cut-out keep.png", exact=True)).to_be_visible()
        keep = review.get_by_role("listitem", name="keep.png", exact=True)
        keep.focus()
        page.keyboard.press("a")
        expect(review.get_by_role("listitem")).to_have_count(1, timeout=15_000)
        wait_for(lambda: studio.files(studio.outbox) == ["keep.png"], timeout=30,
                 what="keep.png placed")
        redo = review.get_by_role("listitem", name="redo.png", exact=True)
        expect(redo).to_be_focused()  # back at #review, the next one waiting has the focus
        page.keyboard.press("r")
        wait_for(lambda: (studio.errors / "redo.rejected.png").exists(), timeout=30,
                 what="redo rejected")
        expect(review.get_by_role("listitem")).to_have_count(0, timeout=15_000)
        attention = page.get_by_role("region", name="Needs attention", exact=True)
        expect(attention.get_by_role("listitem").filter(has_text="rejected")).to_be_visible(
            timeout=15_000)
