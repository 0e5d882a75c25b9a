"""The web view over real HTTP (issue 18), without a browser: the daemon serves it from a thread,
the sandbox answers, files are real; requests are real requests on loopback.

The security rules are checked here the way the hidden suite replays them: actions without the
cookie, from another origin, with a foreign Host, and path traversal on every image and download
link the page shows. Browser tests are in test_web_browser.py.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.conftest import (
    LogCapture,
    Running,
    Studio,
    free_port,
    make_image,
    run_watchfolder,
    wait_for,
)
from watchfolder.config.settings import parse_config
from watchfolder.dev.sandbox import Sandbox
from watchfolder.errors import ConfigError, StartupError
from watchfolder.service import status
from watchfolder.service.daemon import Daemon

TOKEN = "studio-floor-token-42"


class Web:
    """A daemon with its web view on a free loopback port, and a browser-like session."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.web is not None
        self.daemon = daemon
        self.base = daemon.web.url.rstrip("/")
        self.host = self.base.split("//", 1)[1]
        self.session = requests.Session()

    def login(self) -> None:
        answer = self.session.get(f"{self.base}/?token={TOKEN}", allow_redirects=False,
                                  timeout=5)
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        self.session.cookies.update(answer.cookies)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.session.get(self.base + path, timeout=10, allow_redirects=False, **kw)

    def post(self, path: str, data: dict[str, str] | None = None,
             **kw: Any) -> requests.Response:
        headers = {"Origin": self.base, "Sec-Fetch-Site": "same-origin",
                   **kw.pop("headers", {})}
        return self.session.post(self.base + path, data=data or {}, headers=headers,
                                 timeout=10, allow_redirects=False, **kw)

    def page(self) -> str:
        answer = self.get("/")
        assert answer.status_code == 200, answer.text
        return answer.text

    def page_when(self, shows: str, what: str) -> str:
        """The page, once its visible text or markup shows `shows`."""
        found: list[str] = []

        def look() -> bool:
            html = self.page()
            found.append(html)
            return shows in html or shows in texts(html)

        wait_for(look, what=what)
        return found[-1]

    def wait_done(self, rel: str) -> str:
        """The page once the journal calls `rel` done (its cut-out is in Recent)."""
        return self.page_when(f'alt="cut-out {rel}"', f"{rel} in Recent")


def web_studio(tmp_path: Path, sandbox: Sandbox, *, token: bool = True, **web: Any) -> Studio:
    settings = {"listen": "127.0.0.1:0", **({"token": TOKEN} if token else {}), **web}
    return Studio(tmp_path, sandbox.url, web=settings)


@pytest.fixture
def web(tmp_path: Path, sandbox: Sandbox) -> Iterator[Web]:
    with Running(web_studio(tmp_path, sandbox).config()) as daemon:
        yield Web(daemon)


def held(daemon: Daemon) -> dict[str, str]:
    """The inboxes a person paused, as the pipeline's one pause holds them."""
    assert daemon.pipeline is not None
    return daemon.pipeline.pause.state()["inboxes"]  # type: ignore[return-value]


def texts(html: str) -> str:
    """The page's visible text, roughly (tags removed, spaces collapsed)."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def links(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/(?:thumb|download|failed)/[^"]+)"', html)


# -- configuration ----------------------------------------------------------------------------


def config_with(tmp_path: Path, web: Any) -> Any:
    (tmp_path / "in").mkdir(exist_ok=True)
    return parse_config({"inboxes": [{"path": "in", "outbox": "out", "errors": "err"}],
                         **({} if web is None else {"web": web})},
                        base_dir=tmp_path, require_key=False)


def test_web_settings_defaults_off_and_tokens(tmp_path: Path) -> None:
    assert config_with(tmp_path, None).web.listen == "127.0.0.1:8470"
    # YAML reads a bare `off` as false; quoted, it is the word: both turn the view off.
    assert config_with(tmp_path, {"listen": False}).web.listen is None
    assert config_with(tmp_path, {"listen": "off"}).web.listen is None
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert config_with(tmp_path, {"token_file": "token"}).web.token.reveal() == TOKEN
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "watchfolder-web-token").write_text(TOKEN)
    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)
    try:
        found = config_with(tmp_path, {})
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]
    assert found.web.token.reveal() == TOKEN and found.web.token_source == "systemd credential"
    with pytest.raises(ConfigError) as caught:
        config_with(tmp_path, {"listen": "0.0.0.0:8470"})
    assert "web.token" in caught.value.problems[0]
    assert config_with(tmp_path, {"listen": "0.0.0.0:8470", "token": TOKEN}).web.token


def test_check_config_refuses_an_open_address_without_a_token_and_hides_the_token(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, web={"listen": "0.0.0.0:8470"})
    result = run_watchfolder("check-config", "--config", str(studio.write_config()))
    assert result.returncode == 2 and "web.token" in result.stderr
    result = run_watchfolder("run", "--config", str(studio.write_config()))
    assert result.returncode == 2 and "web.token" in result.stderr
    studio.data["web"] = {"listen": "off", "token": TOKEN}
    result = run_watchfolder("check-config", "--config", str(studio.write_config()))
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout and "token: '***'" in result.stdout
    assert "listen: 'off'" in result.stdout or "listen: off" in result.stdout


def test_an_address_set_and_taken_stops_the_start(tmp_path: Path, sandbox: Sandbox) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        studio = web_studio(tmp_path, sandbox, listen=f"127.0.0.1:{port}")
        with pytest.raises(StartupError, match=r"web\.listen"):
            Daemon(studio.config()).start()
        result = run_watchfolder("run", "--config", str(studio.write_config()))
        assert result.returncode == 2 and "web.listen" in result.stderr


def test_the_default_address_taken_is_a_warning(tmp_path: Path, sandbox: Sandbox,
                                                log_lines: LogCapture) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 8470))
        except OSError:
            pass  # another daemon on this machine holds it: just as good
        else:
            taken.listen(1)
        studio = Studio(tmp_path, sandbox.url)
        del studio.data["web"]  # the default address
        with Running(studio.config()) as daemon:
            assert daemon.web is None
            make_image(studio.inbox / "a.png")
            wait_for(lambda: studio.files(studio.outbox) == ["a.png"], what="a.png done")
    assert [e["listen"] for e in log_lines.events("web.unavailable")] == ["127.0.0.1:8470"]


# -- what the page shows --------------------------------------------------------------------------


def test_overview_lists_inboxes_results_and_failures(web: Web, tmp_path: Path) -> None:
    studio_inbox = tmp_path / "inbox"
    make_image(studio_inbox / "shoot" / "a.png")
    (studio_inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    wait_for(lambda: (tmp_path / "errors" / "broken.jpg.error.json").exists(),
             what="broken.jpg failed")
    web.login()
    web.wait_done("shoot/a.png")
    web.page_when("Failed: 1", "the failure counted")
    html = web.page_when("Waiting: 0", "nothing left waiting")
    text = texts(html)
    assert 'aria-label="inbox"' in html  # the region named as the {inbox} token spells it
    for expected in ("Waiting: 0", "In flight: 0", "Done today: 1", "Failed: 1",
                     "Credits today: 1", "Requests in the last minute: 1 of 6000",
                     "shoot/a.png", "corrupt", "Pause all", "Resume all", "Retry all"):
        assert expected in text, expected
    assert 'aria-label="Recent"' in html and 'aria-label="Needs attention"' in html
    assert 'alt="original shoot/a.png"' in html and 'alt="cut-out shoot/a.png"' in html
    assert 'alt="original broken.jpg"' in html
    # Every picture the page links to is served, as an image.
    for link in links(html):
        answer = web.get(link)
        assert answer.status_code == 200, link
        assert answer.headers["content-type"].startswith("image/"), link
    source = web.get("/thumb/1/source" if "/thumb/1/" in html else links(html)[0])
    assert source.status_code == 200
    cut_out = next(link for link in links(html) if "/out/0" in link)
    image = Image.open(__import__("io").BytesIO(web.get(cut_out).content))
    assert image.mode == "RGBA" and max(image.size) <= 512


def test_a_files_page_shows_its_timeline_and_downloads(web: Web, tmp_path: Path) -> None:
    make_image(tmp_path / "inbox" / "a.png")
    web.login()
    html = web.wait_done("a.png")
    page_link = re.search(r'href="(/file/\d+)"', html)
    assert page_link is not None
    page = web.get(page_link.group(1)).text
    for state in ("queued", "sending", "fetched", "stored", "done"):
        assert state in texts(page), state
    download = re.search(r'href="(/download/\d+/out/0)"', page)
    assert download is not None
    answer = web.get(download.group(1))
    assert answer.status_code == 200
    assert answer.content == (tmp_path / "outbox" / "a.png").read_bytes()
    source = re.search(r'href="(/download/\d+/source)"', page)
    assert source is not None
    assert web.get(source.group(1)).content == (tmp_path / "archive" / "a.png").read_bytes()


def test_thumbnails_of_a_16_bit_tiff_and_of_a_broken_image(web: Web, tmp_path: Path) -> None:
    import pyvips

    errors = tmp_path / "errors"
    errors.mkdir(exist_ok=True)
    # 16-bit noise in three bands (libvips alone: the test extra has no NumPy).
    bands = [pyvips.Image.gaussnoise(1200, 900, mean=32768, sigma=12000, seed=n)
             .cast("ushort") for n in range(3)]
    pixels = bands[0].bandjoin(bands[1:]).copy(interpretation="rgb16")
    assert pixels.format == "ushort" and pixels.bands == 3
    pixels.tiffsave(str(errors / "big.tif"))
    (errors / "big.tif.error.json").write_text('{"reason": "api_rejected", "file": "big.tif"}')
    (errors / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (errors / "bad.png.error.json").write_text('{"reason": "corrupt", "file": "bad.png"}')
    web.login()
    big = web.get("/failed/0/thumb/big.tif")
    assert big.status_code == 200 and big.headers["content-type"] == "image/webp"
    assert max(Image.open(__import__("io").BytesIO(big.content)).size) == 512
    cached = list((tmp_path / "state" / "thumbs").rglob("*.webp"))
    assert len(cached) == 1
    bad = web.get("/failed/0/thumb/bad.png")
    assert bad.status_code == 200 and bad.headers["content-type"] == "image/svg+xml"


def test_recent_appears_live_within_two_seconds(web: Web, tmp_path: Path) -> None:
    web.login()
    with web.session.get(web.base + "/events", stream=True, timeout=10) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines(decode_unicode=True)
        make_image(tmp_path / "inbox" / "live.png")
        wait_for(lambda: (tmp_path / "archive" / "live.png").exists(), what="archived")
        archived = time.monotonic()
        for line in lines:
            if "cut-out live.png" in (line or ""):
                break
        assert time.monotonic() - archived < 2.0


def test_the_first_screen_stays_fast_with_100000_records(web: Web, tmp_path: Path) -> None:
    journal = tmp_path / "state" / "journal.sqlite3"
    now = time.time()
    inbox = str(tmp_path / "inbox")
    with sqlite3.connect(journal, timeout=30) as db:
        db.executemany(
            "INSERT INTO files (inbox, rel, state, size, mtime_ns, settings, created, updated,"
            " result) VALUES (?, ?, 'done', 1, 1, 'png', ?, ?, ?)",
            [(inbox, f"old/{n:06}.png", now - 86400 * 2, now - 86400 * 2,
              str(tmp_path / "outbox" / f"{n:06}.png")) for n in range(100_000)])
    web.login()
    started = time.monotonic()
    html = web.page()
    assert time.monotonic() - started < 1.5
    assert "old/099999.png" in html  # newest first
    older = re.search(r'href="(/\?before=\d+)"', html)
    assert older is not None  # page back through history
    assert "old/099969.png" in web.get(older.group(1).replace("&amp;", "&")).text
    found = web.get("/?q=012345").text
    assert "old/012345.png" in found and "old/099999.png" not in found


# -- actions --------------------------------------------------------------------------------------


def test_pause_from_the_page_holds_files_survives_a_restart_and_resumes(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = web_studio(tmp_path, sandbox)
    studio.data["metrics"] = {"listen": "127.0.0.1:0"}
    with Running(studio.config()) as daemon:
        web = Web(daemon)
        web.login()
        assert web.post("/pause", {"inbox": "0"}).status_code == 303
        text = texts(web.page())
        assert "Paused: paused by web" in text and "Resume" in text
        assert daemon.metrics is not None
        scraped = requests.get(f"http://{daemon.metrics.address}/metrics", timeout=5).text
        assert (f'watchfolder_inbox_paused{{inbox="{studio.inbox}",reason="paused by web"}} 1.0'
                in scraped)
        make_image(studio.inbox / "held.png")
        wait_for(lambda: "Waiting: 1" in texts(web.page()), what="held.png waiting")
        time.sleep(1.0)  # ten rescans: nothing may move
        assert studio.files(studio.outbox) == [] and studio.files(studio.errors) == []
    report = status.collect(studio.config())
    assert report["paused_inboxes"] == {str(studio.inbox): "paused by web"}
    with Running(studio.config()) as daemon:
        web = Web(daemon)
        web.login()
        time.sleep(0.5)
        assert studio.files(studio.outbox) == []  # still paused after the restart
        assert "Paused: paused by web" in texts(web.page())
        assert web.post("/resume", {"inbox": "0"}).status_code == 303
        wait_for(lambda: studio.files(studio.outbox) == ["held.png"], what="held.png done")
    assert status.collect(studio.config())["paused_inboxes"] == {}


def test_retry_puts_a_failed_file_back_and_it_is_processed(tmp_path: Path,
                                                           sandbox: Sandbox) -> None:
    studio = web_studio(tmp_path, sandbox)
    sandbox.add_faults(400)  # the first answer refuses the file; a retry succeeds
    with Running(studio.config()) as daemon:
        web = Web(daemon)
        make_image(studio.inbox / "shoot" / "a.png")
        wait_for(lambda: (studio.errors / "shoot" / "a.png.error.json").exists(),
                 what="a.png failed")
        web.login()
        html = web.page()
        assert "api_rejected" in texts(html)
        form = re.search(r'action="/retry">\s*<input type="hidden" name="inbox" value="(\d+)">'
                         r'\s*<input type="hidden" name="file" value="([^"]+)">', html)
        assert form is not None
        answer = web.post("/retry", {"inbox": form.group(1), "file": form.group(2)})
        assert answer.status_code == 303
        wait_for(lambda: studio.files(studio.outbox) == ["shoot/a.png"], what="a.png done")
        wait_for(lambda: 'alt="cut-out shoot/a.png"' in web.page(), what="in Recent")
        assert "Failed: 0" in texts(web.page())


def test_retry_all_asks_for_confirmation_first(web: Web, tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    errors.mkdir(exist_ok=True)
    make_image(errors / "x.png")
    (errors / "x.png.error.json").write_text(
        f'{{"reason": "server_error", "inbox": "{tmp_path / "inbox"}", "file": "x.png"}}')
    web.login()
    answer = web.post("/retry-all")
    assert answer.status_code == 303 and "confirm" in answer.headers["location"]
    assert (errors / "x.png").exists()
    assert "Confirm" in texts(web.get(answer.headers["location"]).text)
    assert web.post("/retry-all", {"confirm": "yes"}).status_code == 303
    wait_for(lambda: (tmp_path / "outbox" / "x.png").exists(), what="x.png done")


# -- security -------------------------------------------------------------------------------------


def test_without_a_token_the_view_is_read_only(tmp_path: Path, sandbox: Sandbox) -> None:
    with Running(web_studio(tmp_path, sandbox, token=False).config()) as daemon:
        web = Web(daemon)
        make_image(tmp_path / "inbox" / "a.png")
        html = web.wait_done("a.png")
        assert "<button" not in html.split("</form>", 1)[-1].replace(
            '<button type="submit">Filter</button>', "")
        assert "Retry" not in texts(html) and "Pause" not in texts(html)
        assert "cut-out a.png" in html
        for action in ("pause", "resume", "pause-all", "resume-all", "retry", "retry-all"):
            assert web.post(f"/{action}", {"inbox": "0"}).status_code == 403, action
        assert web.get(f"/?token={TOKEN}").status_code == 200  # no token: no login either
        assert "watchfolder_session" not in web.session.cookies


def test_the_token_logs_in_once_with_a_strict_http_only_cookie(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    with Running(web_studio(tmp_path, sandbox).config()) as daemon:
        web = Web(daemon)
        assert web.get("/").status_code == 303  # to the login form
        assert web.get("/events").status_code == 403
        wrong = web.get("/?token=not-the-token-at-all")
        assert wrong.status_code == 200 and "set-cookie" not in wrong.headers
        answer = web.get(f"/?token={TOKEN}")
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert TOKEN.lower() not in cookie
        form = requests.post(web.base + "/login", data={"token": TOKEN}, timeout=5,
                             allow_redirects=False, headers={"Origin": web.base})
        assert form.status_code == 303 and "watchfolder_session" in form.cookies
        web.session.cookies.update(answer.cookies)
        assert web.get("/").status_code == 200
        assert web.post("/pause-all").status_code == 303
    assert TOKEN not in log_lines.getvalue()
    assert log_lines.events("web.listening")


def test_actions_need_the_cookie_post_and_the_pages_own_origin(web: Web) -> None:
    web.login()
    cookie = web.session.cookies["watchfolder_session"]
    stranger = requests.Session()
    assert stranger.post(web.base + "/pause-all", timeout=5).status_code == 403
    assert stranger.post(web.base + "/pause-all", timeout=5,
                         cookies={"watchfolder_session": "forged"}).status_code == 403
    for headers in ({"Origin": "http://evil.example"},
                    {"Origin": "null"},  # null only with Sec-Fetch-Site: same-origin
                    {"Origin": web.base, "Sec-Fetch-Site": "cross-site"},
                    {"Origin": web.base, "Sec-Fetch-Site": "same-site"}):
        answer = requests.post(web.base + "/pause-all", headers=headers, timeout=5,
                               cookies={"watchfolder_session": cookie},
                               allow_redirects=False)
        assert answer.status_code == 403, headers
    assert web.get("/pause-all").status_code == 405
    assert held(web.daemon) == {}
    # The page's own form POST under Referrer-Policy: no-referrer, as Chromium sends it.
    answer = web.post("/pause-all", headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert answer.status_code == 303 and held(web.daemon) == {"*": "paused by web"}


def test_a_foreign_host_gets_nothing(web: Web, tmp_path: Path) -> None:
    make_image(tmp_path / "inbox" / "a.png")
    web.login()
    paths = ["/", "/events", "/static/htmx.min.js", "/login", "/file/1",
             *links(web.wait_done("a.png"))]
    for path in paths:
        answer = web.get(path, headers={"Host": "rebind.evil.example"})
        assert 400 <= answer.status_code < 500, path
        assert answer.headers["content-type"].startswith("text/plain"), path
    answer = web.post("/pause-all", headers={"Host": f"evil.example:{web.host.split(':')[1]}"})
    assert answer.status_code == 421 and held(web.daemon) == {}


def test_allowed_hosts_are_served(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = web_studio(tmp_path, sandbox, allowed_hosts=["studio.local"])
    with Running(studio.config()) as daemon:
        web = Web(daemon)
        port = web.host.rsplit(":", 1)[1]
        web.login()
        # requests picks cookies by the Host header: send the session's by hand.
        cookie = f"watchfolder_session={web.session.cookies['watchfolder_session']}"
        for host, expected in ((f"studio.local:{port}", 200), (f"localhost:{port}", 200),
                               ("studio.local.evil:80", 421), ("studio.local:1", 421)):
            answer = requests.get(web.base + "/", headers={"Host": host, "Cookie": cookie},
                                  timeout=5, allow_redirects=False)
            assert answer.status_code == expected, host


def test_nothing_outside_the_folders_is_served(web: Web, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    make_image(secret)
    errors = tmp_path / "errors"
    errors.mkdir(exist_ok=True)
    (errors / "link.png").symlink_to(secret)
    (errors / "link.png.error.json").write_text('{"reason": "symlink", "file": "link.png"}')
    (errors / "dirlink").symlink_to(tmp_path)
    make_image(tmp_path / "inbox" / "a.png")
    web.login()
    html = web.wait_done("a.png")
    assert "/failed/0/thumb/link.png" not in html  # a link gets no picture at all
    secret_bytes = secret.read_bytes()
    tries = ["/failed/0/thumb/link.png", "/failed/0/download/link.png",
             "/failed/0/thumb/../secret.png", "/failed/0/download/..%2fsecret.png",
             "/failed/0/download/%2e%2e/secret.png", "/failed/0/download/%2E%2E%2Fsecret.png",
             "/failed/0/download//etc/passwd", "/failed/0/download/%2fetc%2fpasswd",
             "/failed/0/download/dirlink/secret.png", "/failed/0/thumb/dirlink/secret.png",
             "/failed/0/download/link.png.error.json", "/failed/9/download/a.png",
             "/failed/0/download/.", "/failed/0/download/%00", "/download/999/source",
             "/download/1/out/7", "/thumb/999/source", "/static/../app.py",
             "/static/%2e%2e/app.py", "/static/..%2fapp.py"]
    for link in links(html):
        variants = [link.replace("/out/0", "/out/..%2f..%2fsource"), link + "/..%2f..%2f..",
                    link + "%2f..", re.sub(r"/(\d+)/", "/..%2f\\1/", link)]
        tries += [variant for variant in variants if variant != link]
    for path in tries:
        answer = requests.get(web.base + path, cookies=web.session.cookies, timeout=5,
                              allow_redirects=False)
        assert 400 <= answer.status_code < 500, (path, answer.status_code)
        assert secret_bytes not in answer.content and b"root:" not in answer.content, path


def test_the_page_ships_its_scripts_and_sets_a_self_only_policy(web: Web) -> None:
    web.login()
    answer = web.get("/")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "unsafe" not in policy
    assert answer.headers["referrer-policy"] == "no-referrer"
    for src in re.findall(r'(?:src|href)="([^"]+)"', answer.text):
        assert src.startswith("/"), src  # nothing from another host, no CDN
    for script in re.findall(r'<script src="([^"]+)"', answer.text):
        assert web.get(script).status_code == 200
    assert "<script>" not in answer.text and "style=" not in answer.text


def test_reload_turns_the_view_on_and_off(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url)
    with Running(studio.config()) as daemon:
        assert daemon.web is None
        port = free_port()
        studio.data["web"] = {"listen": f"127.0.0.1:{port}", "token": TOKEN}
        daemon.reload(studio.config())
        assert daemon.web is not None
        assert requests.get(f"http://127.0.0.1:{port}/login", timeout=5).status_code == 200
        studio.data["web"] = {"listen": "off"}
        daemon.reload(studio.config())
        assert daemon.web is None
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/login", timeout=5)


# -- review before hand-off -------------------------------------------------------------------


def test_review_holds_results_until_approved_or_rejected_across_a_restart(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = web_studio(tmp_path, sandbox)
    studio.data["inboxes"][0]["review"] = True
    studio.data["inboxes"][0]["manifest"] = True

    def paid() -> int:
        return sum(1 for r in sandbox.requests if r.status == 200)

    with Running(studio.config()) as daemon:
        web = Web(daemon)
        web.login()
        make_image(studio.inbox / "shoot" / "a.png")
        make_image(studio.inbox / "b.png", seed=1)
        wait_for(lambda: "To review: 2" in texts(web.page()), what="both waiting for review")
        html = web.page()
        assert 'aria-label="To review"' in html
        assert 'alt="original shoot/a.png"' in html and 'alt="cut-out shoot/a.png"' in html
        for link in re.findall(r'src="(/thumb/\d+/(?:answer|source))"', html):
            assert web.get(link).headers["content-type"] == "image/webp", link
        # One request each; nothing placed, archived or handed on.
        assert paid() == 2
        assert studio.files(studio.outbox) == [] and studio.files(studio.archive) == []
        assert sorted(studio.files(studio.inbox)) == ["b.png", "shoot/a.png"]
    report = status.collect(studio.config())
    assert report["inboxes"][0]["review"] == 2 and report["inboxes"][0]["waiting"] == 0
    with Running(studio.config()) as daemon:
        web = Web(daemon)
        web.login()
        time.sleep(0.5)
        html = web.page()
        assert "To review: 2" in texts(html) and paid() == 2  # no second request
        ids = {rel: int(n) for n, rel in re.findall(
            r'data-review="(\d+)" aria-label="([^"]+)"', html)}
        assert web.post("/approve", {"id": str(ids["shoot/a.png"])}).status_code == 303
        assert web.post("/reject", {"id": str(ids["b.png"])}).status_code == 303
        wait_for(lambda: studio.files(studio.outbox) == ["shoot/a.json", "shoot/a.png"],
                 what="a.png placed with its manifest")
        wait_for(lambda: (studio.errors / "b.png.error.json").exists(), what="b.png rejected")
        wait_for(lambda: "To review: 0" in texts(web.page()), what="none left to review")
        page = web.get(f"/file/{ids['shoot/a.png']}").text
        assert "Manifest" in page and '&#34;credits_spent&#34;' in page  # its manifest shown
        # Judged once: a second click finds nothing to judge.
        assert "review-gone" in web.post("/approve", {"id": str(ids["shoot/a.png"])}
                                         ).headers["location"]
    assert studio.files(studio.archive) == ["shoot/a.png"]
    assert studio.reason("b.png")["reason"] == "rejected"
    assert sorted(studio.files(studio.errors)) == ["b.png", "b.png.error.json",
                                                   "b.rejected.png"]
    with Image.open(studio.errors / "b.rejected.png") as rejected:
        assert rejected.mode == "RGBA"
    assert paid() == 2
    assert list((tmp_path / "state" / "spool").iterdir()) == []


def test_pause_all_then_resume_one_inbox(tmp_path: Path, sandbox: Sandbox) -> None:
    (tmp_path / "second").mkdir()
    studio = web_studio(tmp_path, sandbox)
    studio.data["inboxes"].append({"path": "second", "outbox": "outbox2", "errors": "errors2",
                                   "settle_seconds": 0.1})
    with Running(studio.config()) as daemon:
        web = Web(daemon)
        web.login()

        def paused() -> list[str]:
            html = web.page()
            return [name for name in ("inbox", "second")
                    if "Paused: paused by web" in texts(html.split(
                        f'aria-label="{name}"', 1)[1].split("</section>", 1)[0])]

        assert web.post("/pause-all").status_code == 303
        assert paused() == ["inbox", "second"]
        assert web.post("/resume", {"inbox": "0"}).status_code == 303
        assert paused() == ["second"]
        make_image(studio.inbox / "a.png")
        make_image(tmp_path / "second" / "b.png")
        wait_for(lambda: studio.files(studio.outbox) == ["a.png"], what="a.png done")
        time.sleep(0.5)
        assert not (tmp_path / "outbox2" / "b.png").exists()
        assert web.post("/resume-all").status_code == 303
        assert paused() == []
        wait_for(lambda: (tmp_path / "outbox2" / "b.png").exists(), what="b.png done")
