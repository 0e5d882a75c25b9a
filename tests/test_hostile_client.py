"""The client against a hostile server: answers that trickle, answers that never end.

Real sockets, the real sandbox; the client's timeout bounds the whole request and its memory
does not grow with the size of the answer.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_image
from watchfolder.config.settings import Secret
from watchfolder.dev.sandbox import Sandbox
from watchfolder.errors import BadResult, EndpointMissing, TransportError
from watchfolder.pipeline.client import SMALL_BODY, ApiClient, ApiResult, max_result_bytes

KEY = "hostile-key-0123456789"
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server() -> Iterator[Sandbox]:
    with Sandbox(keys=(KEY,), rpm=None, hang_seconds=30.0, trickle_seconds=0.1,
                 huge_bytes=20_000_000) as running:
        yield running


@pytest.fixture
def sandbox(server: Sandbox) -> Iterator[Sandbox]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[ApiClient]:
    api = ApiClient(sandbox.url, Secret(KEY), timeout=TIMEOUT, connect_timeout=TIMEOUT)
    yield api
    api.close()


@pytest.fixture
def image(tmp_path: Path) -> bytes:
    return make_image(tmp_path / "in.png").read_bytes()


def send(client: ApiClient, image: bytes, dest: Path, **options: int) -> ApiResult:
    return client.remove_background(image, filename="in.png", mime="image/png", dest=dest,
                                    **options)


@pytest.mark.parametrize("fault", ["trickle", "trickle-headers"])
def test_a_trickling_answer_is_dropped_when_the_timeout_is_over(
        client: ApiClient, sandbox: Sandbox, image: bytes, tmp_path: Path, fault: str) -> None:
    # One byte every 0.1 s never trips a socket timeout of 1 s: only a bound on the whole
    # request stops it (the sandbox would go on for 30 s).
    sandbox.add_faults(fault)
    dest = tmp_path / "result.png"
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        send(client, image, dest)
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT + 1.0, f"the request held its slot for {elapsed:.1f} s"
    assert "within 1 s" in caught.value.message and "whole request" in caught.value.message
    assert KEY not in str(caught.value)
    assert not dest.exists(), "no partial result is left behind"
    # The next request works (on a new connection).
    result = send(client, image, dest)
    assert dest.read_bytes() and result.size == dest.stat().st_size


def test_a_result_is_streamed_to_the_file_with_its_size_and_hash(
        client: ApiClient, sandbox: Sandbox, image: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "spool" / "1.png"
    dest.parent.mkdir()
    first = client.remove_background(image, filename="in.png", mime="image/png", dest=dest,
                                     max_bytes=max_result_bytes(160, 120, len(image)))
    data = dest.read_bytes()
    # A small answer is kept in memory too (checked without reading the file back).
    assert first.path == dest and first.body == data and len(data) <= SMALL_BODY
    assert (first.size, first.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert first.content == data and first.content_type == "image/png"
    assert first.credits_consumed == 1
    # Without a file the body stays in memory, same checks; the connection is kept alive.
    second = client.remove_background(image, filename="in.png", mime="image/png")
    assert second.path is None and second.content == data
    assert second.sha256 == first.sha256
    assert len({r.connection for r in sandbox.requests}) == 1


def test_a_large_result_is_only_in_its_file(client: ApiClient, tmp_path: Path) -> None:
    noise = Image.frombytes("RGB", (400, 300), random.Random(7).randbytes(400 * 300 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    dest = tmp_path / "big.png"
    result = client.remove_background(buffer.getvalue(), filename="in.png", mime="image/png",
                                      dest=dest)
    assert result.size == dest.stat().st_size > SMALL_BODY
    assert result.body is None and result.content == dest.read_bytes()


@pytest.mark.parametrize("fault", ["huge", "huge-unsized"])
def test_an_answer_larger_than_the_bound_is_not_read(
        client: ApiClient, sandbox: Sandbox, image: bytes, tmp_path: Path, fault: str) -> None:
    sandbox.add_faults(fault)
    dest = tmp_path / "result.png"
    bound = max_result_bytes(160, 120, len(image))
    assert bound < sandbox.huge_bytes
    with pytest.raises(BadResult) as caught:
        send(client, image, dest, max_bytes=bound)
    assert caught.value.status == 200 and caught.value.reason == "bad_result"
    assert "too large" in caught.value.message and KEY not in str(caught.value)
    assert not dest.exists()


def test_a_300_mb_answer_is_streamed_with_flat_memory(sandbox: Sandbox, image: bytes,
                                                      tmp_path: Path) -> None:
    """The whole 300 MB body goes to the file (the bound allows it here); the client's peak
    RSS (VmHWM, in a child process of its own) grows by far less than the body."""
    size = 300_000_000
    sandbox.huge_bytes = size
    sandbox.add_faults("huge")
    source, dest = tmp_path / "in.png", tmp_path / "huge.png"
    source.write_bytes(image)
    script = f"""
import json
from pathlib import Path
from watchfolder.pipeline.client import ApiClient
from watchfolder.config.settings import Secret

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

client = ApiClient({sandbox.url!r}, Secret({KEY!r}), timeout=60)
data = Path({str(source)!r}).read_bytes()
before = hwm()
result = client.remove_background(data, filename="in.png", mime="image/png",
                                  dest=Path({str(dest)!r}), max_bytes={size + 1})
print(json.dumps({{"before": before, "after": hwm(), "size": result.size,
                  "sha256": result.sha256}}))
client.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["size"] == size == dest.stat().st_size
    digest = hashlib.sha256()
    with dest.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    assert report["sha256"] == digest.hexdigest()
    growth = (report["after"] - report["before"]) / 2**20
    assert growth < 48, f"peak RSS grew by {growth:.0f} MB for a 300 MB answer"
    dest.unlink()


def test_requests_in_flight_share_one_deadline_thread(client: ApiClient, sandbox: Sandbox,
                                                      image: bytes, tmp_path: Path) -> None:
    """The whole-request bound is kept by one watchdog thread per client, not a thread per
    request; it ends when the client is closed."""
    sandbox.latency = 0.4
    seen: list[int] = []
    results: list[ApiResult] = []

    def one(n: int) -> None:
        results.append(send(client, image, tmp_path / f"result{n}.png"))

    senders = [threading.Thread(target=one, args=(n,)) for n in range(3)]
    for sender in senders:
        sender.start()
    while any(sender.is_alive() for sender in senders):
        seen.append(sum(1 for t in threading.enumerate() if "deadline" in t.name))
        time.sleep(0.02)
    for sender in senders:
        sender.join()
    assert len(results) == 3
    assert max(seen) == 1, f"{max(seen)} deadline threads for 3 requests in flight"
    client.close()
    assert not [t for t in threading.enumerate() if "deadline" in t.name]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A real HTTP server for what the sandbox cannot be: a redirect, a proxy. It records
    each request's line and headers and answers with the server's `answer`."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        self.server.seen.append((self.path, dict(self.headers)))  # type: ignore[attr-defined]
        status, headers, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_redirect_is_not_followed_and_the_key_stays_home(
        recorder: http.server.HTTPServer, sandbox: Sandbox, image: bytes,
        tmp_path: Path) -> None:
    """An api.url that redirects (a moved endpoint, a captive portal) is a configuration
    problem that pauses sending, never a request with the key to wherever it points."""
    port = recorder.server_address[1]
    recorder.answer = (307, {"Location": sandbox.url}, b"")  # type: ignore[attr-defined]
    api = ApiClient(f"http://127.0.0.1:{port}/remove-background/v1", Secret(KEY),
                    timeout=TIMEOUT, connect_timeout=TIMEOUT)
    try:
        with pytest.raises(EndpointMissing) as caught:
            send(api, image, tmp_path / "result.png")
    finally:
        api.close()
    assert caught.value.status == 307 and sandbox.url in caught.value.message
    assert KEY not in str(caught.value)
    assert not sandbox.requests, "the redirect was followed: the key went along"
    assert not (tmp_path / "result.png").exists()


def test_the_environment_proxy_is_used(recorder: http.server.HTTPServer, image: bytes,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY is honoured as requests honours it (read once per client)."""
    port = recorder.server_address[1]
    answer = make_image(tmp_path / "answer.png").read_bytes()
    recorder.answer = (200, {"Content-Type": "image/png"}, answer)  # type: ignore[attr-defined]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    api = ApiClient("http://api.invalid/remove-background/v1", Secret(KEY), timeout=TIMEOUT,
                    connect_timeout=TIMEOUT)
    try:
        result = send(api, image, tmp_path / "result.png")
    finally:
        api.close()
    assert result.size == len(answer)
    path, headers = recorder.seen[0]  # type: ignore[attr-defined]
    assert path == "http://api.invalid/remove-background/v1"
    assert headers["x-api-key"] == KEY and headers["User-Agent"].startswith("watchfolder/")


def test_finished_requests_do_not_pile_up_in_the_deadline_watchdog(
        sandbox: Sandbox, image: bytes, tmp_path: Path) -> None:
    # The watchdog is woken only by a deadline that comes first, so a finished request's
    # deadline used to stay in its heap until it fell due: at 100 requests a second and a
    # 120 s timeout, 12,000 of them (5 MB, growing over the first two minutes of a backlog).
    api = ApiClient(sandbox.url, Secret(KEY), timeout=120, connect_timeout=TIMEOUT)
    try:
        for n in range(60):
            send(api, image, tmp_path / f"result{n}.png")
        assert api.watchdog.watched <= 1
    finally:
        api.close()
