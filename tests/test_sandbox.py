"""Contract tests for the sandbox: real HTTP over loopback with ``requests``, no mocks.

One sandbox serves the whole module; every test starts from ``reset()`` (initial knobs, no
credits spent, empty log and fault plan) and changes the knobs it needs at runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

import watchfolder
from watchfolder.dev import sandbox as sandbox_module
from watchfolder.dev.samples import studio_image, write_samples
from watchfolder.dev.sandbox import FAULTS, RequestRecord, Sandbox

KEY = "test-key-0123"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def server() -> Iterator[Sandbox]:
    # huge_bytes: test_every_named_fault_is_recorded reads the huge answers whole.
    with Sandbox(keys=(KEY,), rpm=None, hang_seconds=1.0, huge_bytes=1_000_000) as running:
        yield running


@pytest.fixture
def sandbox(server: Sandbox) -> Iterator[Sandbox]:
    server.reset()
    yield server
    server.reset()


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def shot(fmt: str = "PNG", size: tuple[int, int] = (96, 64), backdrop: str = "white") -> bytes:
    return encode(studio_image(*size, backdrop=backdrop, subject="box", colour="red"), fmt)


PNG = shot()


def post(
    sandbox: Sandbox,
    image: bytes | None = PNG,
    *,
    key: str | None = KEY,
    accept: str | None = None,
    filename: str = "shot.png",
    content_type: str = "image/png",
    transparency: str | None = None,
    session: requests.Session | None = None,
    timeout: float = TIMEOUT,
) -> requests.Response:
    headers = {}
    if key is not None:
        headers["x-api-key"] = key
    if accept is not None:
        headers["Accept"] = accept
    files: dict[str, Any] = {}
    if image is not None:
        files["image_file"] = (filename, image, content_type)
    if transparency is not None:
        files["transparency_handling"] = (None, transparency)
    if not files:
        files["something_else"] = (None, "x")
    sender = session or requests
    return sender.post(sandbox.url, headers=headers, files=files, timeout=timeout)


def decode(response: requests.Response) -> Image.Image:
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def assert_error(response: requests.Response, status: int, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert fragment.lower() in response.json()["error"].lower()


def border_alpha(alpha: Image.Image) -> set[int]:
    width, height = alpha.size
    values = {alpha.getpixel((x, y)) for x in range(width) for y in (0, height - 1)}
    values |= {alpha.getpixel((x, y)) for y in range(height) for x in (0, width - 1)}
    return {int(v) for v in values}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 200


def test_default_answer_is_a_png_of_the_same_size(sandbox: Sandbox) -> None:
    response = post(sandbox, shot("JPEG", (120, 90)), content_type="image/jpeg")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png"
    assert response.headers["x-credits-consumed"] == "1"
    assert "x-remaining-credits" not in response.headers  # unlimited credits
    image = decode(response)
    assert (image.format, image.size, image.mode) == ("PNG", (120, 90), "RGBA")


@pytest.mark.parametrize(
    ("accept", "content_type", "pil_format"),
    [
        ("image/png", "image/png", "PNG"),
        ("image/webp", "image/webp", "WEBP"),
        ("image/jpg", "image/jpeg", "JPEG"),
        ("image/jpeg", "image/jpeg", "JPEG"),
        ("*/*", "image/png", "PNG"),
        ("image/*", "image/png", "PNG"),
        ("", "image/png", "PNG"),
        ("text/html, image/webp;q=0.5, image/jpg;q=0.9", "image/jpeg", "JPEG"),
    ],
)
def test_accept_chooses_the_result_format(
    sandbox: Sandbox, accept: str, content_type: str, pil_format: str
) -> None:
    response = post(sandbox, accept=accept)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    image = decode(response)
    assert image.format == pil_format
    assert image.size == (96, 64)
    assert sandbox.requests[-1].result_type == content_type


def test_large_image_at_the_limit_is_processed_quickly(sandbox: Sandbox) -> None:
    # Exactly 25 MP is allowed; a 1-bit PNG keeps the upload tiny.
    image = encode(Image.new("1", (5000, 5000), 1), "PNG", compress_level=1)
    started = time.monotonic()
    response = post(sandbox, image, accept="image/jpeg", timeout=30)
    assert response.status_code == 200
    assert decode(response).size == (5000, 5000)
    assert time.monotonic() - started < 10


# --------------------------------------------------------------------------- 400


def test_missing_image_file_is_400(sandbox: Sandbox) -> None:
    assert_error(post(sandbox, None, transparency="discard_alpha_layer"), 400, "image_file")


def test_invalid_transparency_handling_is_400(sandbox: Sandbox) -> None:
    assert_error(post(sandbox, transparency="keep_it"), 400, "transparency_handling")


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        (encode(Image.new("RGB", (8, 8)), "GIF"), "image/gif"),
        (encode(Image.new("RGB", (8, 8)), "BMP"), "image/bmp"),
        (b"just some text, not a picture\n", "text/plain"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"),  # PNG signature, nonsense after
    ],
    ids=["gif", "bmp", "text", "fake-png"],
)
def test_input_that_is_not_png_jpeg_or_webp_is_400(
    sandbox: Sandbox, payload: bytes, content_type: str
) -> None:
    assert_error(post(sandbox, payload, content_type=content_type), 400, "PNG, JPEG or WEBP")


def test_truncated_image_is_400(sandbox: Sandbox) -> None:
    whole = shot("JPEG", (200, 150))
    assert_error(post(sandbox, whole[: len(whole) // 2]), 400, "decoded")


def test_over_30_mb_is_400(sandbox: Sandbox) -> None:
    payload = PNG + b"\0" * (30_000_001 - len(PNG))
    assert_error(post(sandbox, payload, timeout=30), 400, "30 MB")
    assert sandbox.requests[-1].size == 30_000_001


def test_over_25_megapixels_is_400_without_decoding(sandbox: Sandbox) -> None:
    image = encode(Image.new("1", (5001, 5001)), "PNG", compress_level=1)
    assert len(image) < 1_000_000
    assert_error(post(sandbox, image), 400, "25 megapixels")


def test_body_that_is_not_multipart_is_400(sandbox: Sandbox) -> None:
    response = requests.post(
        sandbox.url,
        data=PNG,
        headers={"x-api-key": KEY, "Content-Type": "image/png"},
        timeout=TIMEOUT,
    )
    assert_error(response, 400, "multipart")


# --------------------------------------------------------------------------- keys, credits


@pytest.mark.parametrize("key", [None, ""])
def test_missing_key_is_401(sandbox: Sandbox, key: str | None) -> None:
    response = post(sandbox, key=key)
    assert_error(response, 401)
    assert response.json() == {"error": "No api key provided"}


def test_unknown_key_is_403_and_never_echoed(sandbox: Sandbox) -> None:
    response = post(sandbox, key="revoked-secret-42")
    assert_error(response, 403)
    assert "revoked-secret-42" not in response.text
    assert "revoked-secret-42" not in str(dict(response.headers))


def test_without_configured_keys_any_key_is_accepted(sandbox: Sandbox) -> None:
    sandbox.keys = ()
    assert post(sandbox, key="whatever").status_code == 200
    assert_error(post(sandbox, key=None), 401)


def test_credits_count_down_then_402(sandbox: Sandbox) -> None:
    sandbox.credits = 2
    first = post(sandbox)
    assert (first.status_code, first.headers["x-remaining-credits"]) == (200, "1")
    assert_error(post(sandbox, None), 400)  # a failed call spends nothing
    second = post(sandbox)
    assert (second.status_code, second.headers["x-remaining-credits"]) == (200, "0")
    assert second.headers["x-credits-consumed"] == "1"
    refused = post(sandbox)
    assert_error(refused, 402, "credits")
    assert refused.headers["x-remaining-credits"] == "0"
    assert sandbox.credits_left(KEY) == 0

    sandbox.set_credits(KEY, 1)
    again = post(sandbox)
    assert (again.status_code, again.headers["x-remaining-credits"]) == (200, "0")


def test_credits_are_per_key(sandbox: Sandbox) -> None:
    sandbox.keys = ("a", "b")
    sandbox.credits = 1
    assert post(sandbox, key="a").status_code == 200
    assert post(sandbox, key="a").status_code == 402
    assert post(sandbox, key="b").status_code == 200
    assert (sandbox.credits_left("a"), sandbox.credits_left("b")) == (0, 0)
    sandbox.set_credits(None, None)
    assert sandbox.credits_left("a") is None
    assert "x-remaining-credits" not in post(sandbox, key="a").headers


# --------------------------------------------------------------------------- 429


def test_rate_limit_answers_429_with_retry_after(sandbox: Sandbox) -> None:
    sandbox.rpm = 3
    assert [post(sandbox).status_code for _ in range(3)] == [200, 200, 200]
    limited = post(sandbox)
    assert_error(limited, 429)
    # The oldest request leaves the 60 s window in just under a minute.
    assert 58 <= int(limited.headers["Retry-After"]) <= 60
    assert sandbox.max_in_window(60.0) == 3
    assert sandbox.count(429) == 1
    sandbox.keys = ()
    assert post(sandbox, key="another-key").status_code == 200  # limits are per key


def test_requests_refused_for_other_reasons_still_count_towards_the_limit(
    sandbox: Sandbox,
) -> None:
    sandbox.rpm = 2
    assert post(sandbox, None).status_code == 400
    assert post(sandbox).status_code == 200
    assert post(sandbox).status_code == 429
    assert sandbox.max_in_window(60.0, statuses=None) == 3
    assert sandbox.max_in_window(60.0, statuses=(200, 400)) == 2


def test_max_in_window_finds_the_busiest_window(sandbox: Sandbox) -> None:
    def record(at: float, status: int = 200) -> RequestRecord:
        return RequestRecord(at, KEY, status, None, None, None, None, None, None)

    times = [0.0, 10.0, 59.9, 60.0, 61.0, 130.0]
    sandbox.requests.extend(record(t) for t in times)
    sandbox.requests.append(record(30.0, status=429))
    assert sandbox.max_in_window(60.0) == 4  # 10.0 .. 61.0
    assert sandbox.max_in_window(60.0, statuses=(200, 429)) == 5
    assert sandbox.max_in_window(1.0) == 2
    assert sandbox.count() == 7
    assert sandbox.count(429) == 1


# --------------------------------------------------------------------------- 406, order


@pytest.mark.parametrize("accept", ["image/gif", "application/json", "image/png;q=0"])
def test_unacceptable_accept_is_406(sandbox: Sandbox, accept: str) -> None:
    assert_error(post(sandbox, accept=accept), 406, "Accept")


@pytest.mark.parametrize(
    ("setup", "request_args", "status"),
    [
        ({"credits": 0}, {"key": None}, 401),
        ({"credits": 0}, {"key": "unknown"}, 403),
        ({"credits": 0}, {"image": None}, 402),
        ({}, {"image": None, "accept": "image/gif"}, 400),
        ({}, {"image": b"not an image", "accept": "image/gif"}, 400),
        ({}, {"image": shot("JPEG")[:300], "accept": "image/gif"}, 400),
    ],
    ids=[
        "401-before-402",
        "403-before-402",
        "402-before-400",
        "400-before-406",
        "not-an-image-before-406",
        "undecodable-before-406",
    ],
)
def test_checks_come_in_the_documented_order(
    sandbox: Sandbox, setup: dict[str, Any], request_args: dict[str, Any], status: int
) -> None:
    for name, value in setup.items():
        setattr(sandbox, name, value)
    assert post(sandbox, **request_args).status_code == status


def test_429_comes_before_402(sandbox: Sandbox) -> None:
    sandbox.rpm = 1
    sandbox.credits = 0
    assert post(sandbox).status_code == 402
    assert post(sandbox).status_code == 429


# --------------------------------------------------------------------------- transparency


def cut_out(fmt: str) -> bytes:
    image = studio_image(96, 64, subject="circle", colour="blue").convert("RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 30, 20))
    return encode(image, fmt, lossless=True) if fmt == "WEBP" else encode(image, fmt)


@pytest.mark.parametrize(("fmt", "content_type"), [("PNG", "image/png"), ("WEBP", "image/webp")])
@pytest.mark.parametrize("transparency", [None, "return_input_if_non_opaque"])
def test_non_opaque_input_comes_back_unchanged(
    sandbox: Sandbox, fmt: str, content_type: str, transparency: str | None
) -> None:
    image = cut_out(fmt)
    response = post(sandbox, image, accept="image/jpg", transparency=transparency)
    assert response.status_code == 200
    assert response.content == image
    assert response.headers["Content-Type"] == content_type
    assert response.headers["x-credits-consumed"] == "1"


def test_discard_alpha_layer_processes_the_image(sandbox: Sandbox) -> None:
    image = cut_out("PNG")
    response = post(sandbox, image, accept="image/webp", transparency="discard_alpha_layer")
    assert response.status_code == 200
    assert response.content != image
    assert response.headers["Content-Type"] == "image/webp"
    result = decode(response)
    assert (result.format, result.size) == ("WEBP", (96, 64))
    assert sandbox.requests[-1].transparency_handling == "discard_alpha_layer"


def test_opaque_alpha_channel_is_processed(sandbox: Sandbox) -> None:
    image = encode(studio_image(96, 64).convert("RGBA"))
    response = post(sandbox, image)
    assert response.status_code == 200
    assert response.content != image


@pytest.mark.parametrize(
    ("backdrop", "fmt"), [("white", "JPEG"), ("grey", "PNG"), ("green", "WEBP")]
)
@pytest.mark.parametrize("subject", ["circle", "mug", "pair"])
def test_knock_out_clears_the_backdrop_and_keeps_the_subject(
    sandbox: Sandbox, backdrop: str, fmt: str, subject: str
) -> None:
    source = studio_image(320, 240, backdrop=backdrop, subject=subject, seed=7)
    response = post(sandbox, encode(source, fmt, quality=85))
    assert response.status_code == 200
    alpha = decode(response).getchannel("A")
    assert border_alpha(alpha) == {0}
    assert alpha.getpixel((160, 120)) == 255
    histogram = alpha.histogram()
    assert histogram[0] > 0.5 * 320 * 240  # most of the frame is backdrop
    assert histogram[255] > 0.05 * 320 * 240


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("status", [400, 401, 402, 403, 406, 429, 500, 503])
def test_status_fault_answers_that_status_with_json(sandbox: Sandbox, status: int) -> None:
    sandbox.add_faults(status)
    response = post(sandbox)
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)
    if status == 429:
        assert response.headers["Retry-After"] == "1"
    assert sandbox.requests[-1].fault == str(status)


def test_faults_are_consumed_in_order_before_any_check(sandbox: Sandbox) -> None:
    sandbox.add_faults(500, "500-empty")
    assert sandbox.pending_faults == [500, "500-empty"]
    assert post(sandbox, key=None).status_code == 500  # no key, yet the fault answers
    assert post(sandbox, key=None).content == b""
    assert post(sandbox, key=None).status_code == 401  # the plan is used up
    assert sandbox.pending_faults == []
    assert [r.fault for r in sandbox.requests] == ["500", "500-empty", None]


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Sandbox().add_faults("explode")
    with pytest.raises(ValueError, match="unknown fault"):
        Sandbox().add_faults(200)


def test_429_date_fault_sends_an_http_date(sandbox: Sandbox) -> None:
    sandbox.add_faults("429-date")
    response = post(sandbox)
    assert response.status_code == 429
    when = parsedate_to_datetime(response.headers["Retry-After"])
    ahead = (when - datetime.now(timezone.utc)).total_seconds()
    assert -0.5 < ahead <= 2.5


def test_429_none_fault_has_no_retry_after(sandbox: Sandbox) -> None:
    sandbox.add_faults("429-none")
    response = post(sandbox)
    assert response.status_code == 429
    assert "Retry-After" not in response.headers


def test_500_empty_fault_has_an_empty_body(sandbox: Sandbox) -> None:
    sandbox.add_faults("500-empty")
    response = post(sandbox)
    assert (response.status_code, response.content) == (500, b"")


def test_500_html_fault_is_not_json(sandbox: Sandbox) -> None:
    sandbox.add_faults("500-html")
    response = post(sandbox)
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.exceptions.JSONDecodeError):
        response.json()


def test_reset_fault_resets_the_connection(sandbox: Sandbox) -> None:
    sandbox.add_faults("reset")
    with pytest.raises(requests.exceptions.ConnectionError):
        post(sandbox)
    assert (sandbox.requests[-1].status, sandbox.requests[-1].fault) == (0, "reset")
    assert post(sandbox).status_code == 200  # the server itself is fine


def test_hang_fault_times_the_client_out(sandbox: Sandbox) -> None:
    sandbox.add_faults("hang")
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(sandbox, timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert sandbox.requests[-1].fault == "hang"


def test_truncated_fault_sends_half_the_promised_body(sandbox: Sandbox) -> None:
    sandbox.add_faults("truncated")
    try:
        response = post(sandbox)
    except requests.exceptions.RequestException:
        return  # requests noticed the short body itself: the expected outcome
    assert len(response.content) < int(response.headers["Content-Length"])


def test_truncated_fault_sends_half_then_closes(sandbox: Sandbox) -> None:
    # A raw socket shows exactly what was sent, which requests would rather hide.
    sandbox.add_faults("truncated")
    body, content_type = multipart(PNG)
    head = (
        f"POST /remove-background/v1 HTTP/1.1\r\nHost: sandbox\r\nx-api-key: {KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(sandbox.address, timeout=TIMEOUT) as connection:
        connection.sendall(head.encode() + body)
        received = b""
        while chunk := connection.recv(65536):  # until the server closes
            received += chunk
    headers, _, content = received.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200")
    promised = int(re.search(rb"Content-Length: (\d+)", headers)[1])  # type: ignore[index]
    assert len(content) == promised // 2


def test_garbage_fault_is_a_200_that_does_not_decode(sandbox: Sandbox) -> None:
    sandbox.add_faults("garbage")
    response = post(sandbox)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png"
    with pytest.raises(Image.UnidentifiedImageError):
        decode(response)


def test_wrong_size_fault_is_a_valid_image_of_other_dimensions(sandbox: Sandbox) -> None:
    sandbox.add_faults("wrong-size")
    response = post(sandbox)
    assert response.status_code == 200
    image = decode(response)
    assert image.format == "PNG"
    assert image.size != (96, 64)


def test_every_named_fault_is_recorded(sandbox: Sandbox) -> None:
    sandbox.hang_seconds = 0.0
    sandbox.add_faults(*FAULTS)
    for _ in FAULTS:
        with contextlib.suppress(requests.exceptions.RequestException):  # reset, hang, ...
            post(sandbox, timeout=2)
    assert [r.fault for r in sandbox.requests] == list(FAULTS)


def test_fail_rate_one_always_fails_without_spending_credits(sandbox: Sandbox) -> None:
    sandbox.fail_rate = 1.0
    sandbox.credits = 1
    assert_error(post(sandbox), 500)
    assert sandbox.credits_left(KEY) == 1
    sandbox.fail_rate = 0.0
    assert post(sandbox).status_code == 200


# --------------------------------------------------------------------------- HTTP


def test_keep_alive_serves_many_requests_on_one_connection(sandbox: Sandbox) -> None:
    with requests.Session() as session:
        statuses = [
            post(sandbox, session=session).status_code,
            post(sandbox, None, session=session).status_code,
            session.get(sandbox.url, timeout=TIMEOUT).status_code,
            post(sandbox, accept="image/gif", session=session).status_code,
            session.post(sandbox.url + "/nope", data=b"x" * 5000, timeout=TIMEOUT).status_code,
            post(sandbox, accept="image/webp", session=session).status_code,
        ]
    assert statuses == [200, 400, 405, 406, 404, 200]
    assert len({r.connection for r in sandbox.requests}) == 1


def multipart(image: bytes, filename: str = "raw.png") -> tuple[bytes, str]:
    """A multipart body built by hand, for requests that bypass requests' own encoder."""
    boundary = "sandbox-test-boundary"
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image_file"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    tail = f"\r\n--{boundary}--\r\n"
    return head.encode() + image + tail.encode(), f"multipart/form-data; boundary={boundary}"


def test_chunked_upload_is_read_whole(sandbox: Sandbox) -> None:
    body, content_type = multipart(PNG, "chunked.png")
    with requests.Session() as session:
        for _ in range(2):
            response = session.post(
                sandbox.url,
                data=(body[i : i + 1000] for i in range(0, len(body), 1000)),
                headers={"x-api-key": KEY, "Content-Type": content_type},
                timeout=TIMEOUT,
            )
            assert response.status_code == 200
            assert decode(response).size == (96, 64)
    assert sandbox.requests[-1].filename == "chunked.png"


def test_other_paths_are_404_and_other_methods_405(sandbox: Sandbox) -> None:
    base = sandbox.url.removesuffix("/remove-background/v1")
    assert_error(requests.post(base + "/v2", timeout=TIMEOUT), 404)
    assert_error(requests.get(base + "/", timeout=TIMEOUT), 404)
    for method in ("GET", "PUT", "DELETE"):
        response = requests.request(method, sandbox.url, timeout=TIMEOUT)
        assert_error(response, 405)
        assert response.headers["Allow"] == "POST"
    assert requests.head(sandbox.url, timeout=TIMEOUT).status_code == 405
    assert sandbox.requests == []  # only API calls are recorded


def test_latency_is_added_to_each_answer(sandbox: Sandbox) -> None:
    sandbox.latency = 0.3
    started = time.monotonic()
    assert post(sandbox).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert sandbox.requests[-1].ms >= 300


def test_latency_counts_the_sandboxs_own_work(sandbox: Sandbox) -> None:
    """`latency` is the time from the request to the answer, as a client reads it: the cut-out
    the sandbox computes is part of it, not added to it (which cost the throughput benchmark
    2 % at 0.2 s)."""
    image = shot("PNG", (800, 600))
    sandbox.latency = 0.0
    assert post(sandbox, image).status_code == 200
    work = sandbox.requests[-1].ms
    assert work >= 20, "an image big enough for the sandbox's work to show"
    sandbox.latency = 0.5
    assert post(sandbox, image).status_code == 200
    answered = sandbox.requests[-1].ms
    assert 500 <= answered < 500 + work / 2, f"the work ({work:.0f} ms) was added to latency"


def test_records_describe_each_request(sandbox: Sandbox) -> None:
    image = shot("WEBP")
    post(
        sandbox,
        image,
        accept="image/jpg",
        filename="café shot.webp",
        content_type="image/webp",
        transparency="discard_alpha_layer",
    )
    record = sandbox.requests[-1]
    assert record.status == 200
    assert record.key == KEY
    assert record.accept == "image/jpg"
    assert record.transparency_handling == "discard_alpha_layer"
    assert record.filename == "café shot.webp"
    assert record.content_type == "image/webp"
    assert record.size == len(image)
    assert record.sha256 is not None and len(record.sha256) == 64
    assert record.result_type == "image/jpeg"
    assert KEY not in repr(record)


def test_stop_ends_idle_and_hanging_connections_and_all_threads() -> None:
    errors: list[BaseException] = []
    threads_before = set(threading.enumerate())
    local = Sandbox(hang_seconds=30.0).start()

    def hang() -> None:
        try:
            post(local, key="k", timeout=20)
        except requests.exceptions.RequestException as exc:
            errors.append(exc)

    with requests.Session() as idle:
        assert post(local, key="k", session=idle).status_code == 200  # stays open
        local.add_faults("hang")
        client = threading.Thread(target=hang)
        client.start()
        deadline = time.monotonic() + 5
        while not local.requests[1:] and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        local.stop()
        assert time.monotonic() - started < 2
        client.join(5)
    assert not client.is_alive()
    assert len(errors) == 1
    assert not set(threading.enumerate()) - threads_before
    local.stop()  # idempotent


def test_context_manager_starts_and_stops() -> None:
    with Sandbox(keys=["k"]) as local:
        assert local.url.startswith("http://127.0.0.1:")
        assert local.url.endswith("/remove-background/v1")
        assert post(local, key="k").status_code == 200
        assert local.wait_idle(5)
    with pytest.raises(RuntimeError):
        _ = local.url


# --------------------------------------------------------------------------- samples


def test_samples_are_written_atomically_and_one_is_broken(sandbox: Sandbox, tmp_path: Path) -> None:
    paths = write_samples(tmp_path / "inbox")
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == sorted(
        p.name for p in paths
    )  # no temp files left behind
    formats = set()
    for path in paths:
        if path.name == "broken.jpg":
            assert_error(post(sandbox, path.read_bytes(), filename=path.name), 400)
            continue
        with Image.open(path) as image:
            formats.add(image.format)
            assert image.mode == "RGB"
        response = post(sandbox, path.read_bytes(), filename=path.name)
        assert response.status_code == 200
        alpha = decode(response).getchannel("A")
        width, height = alpha.size
        assert border_alpha(alpha) == {0}
        assert alpha.getpixel((width // 2, height // 2)) == 255
    assert formats == {"JPEG", "PNG", "WEBP"}
    assert "broken.jpg" in {p.name for p in paths}


def test_studio_image_is_deterministic_and_validates() -> None:
    assert studio_image(seed=3).tobytes() == studio_image(seed=3).tobytes()
    assert studio_image(seed=3).tobytes() != studio_image(seed=4).tobytes()
    with pytest.raises(ValueError, match="backdrop"):
        studio_image(backdrop="purple")


# --------------------------------------------------------------------------- CLI


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="watchfolder sandbox")
    sandbox_module.add_arguments(parser)
    return parser


def test_cli_arguments_and_help() -> None:
    parser = make_parser()
    args = parser.parse_args([])
    assert (args.host, args.port, args.rpm, args.credits) == ("127.0.0.1", 8765, 60, None)
    assert (args.key, args.fault, args.latency, args.fail_rate) == ([], [], 0.0, 0.0)
    args = parser.parse_args(["--key", "a", "--key", "b", "--fault", "503", "--fault", "reset"])
    assert (args.key, args.fault) == (["a", "b"], [503, "reset"])
    help_text = " ".join(parser.format_help().split())
    assert "Clipdrop" in help_text
    assert "not a neural model" in help_text


def test_cli_rejects_unknown_faults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--fault", "explode"])
    assert "unknown fault" in capsys.readouterr().err


def test_run_prints_the_url_first_logs_without_keys_and_stops_on_sigterm() -> None:
    secret = "cli-secret-key-987"
    code = (
        "import argparse, sys\n"
        "from watchfolder.dev import sandbox\n"
        "parser = argparse.ArgumentParser()\n"
        "sandbox.add_arguments(parser)\n"
        "sys.exit(sandbox.run(parser.parse_args(sys.argv[1:])))\n"
    )
    root = str(Path(watchfolder.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-c", code, "--port", "0", "--key", secret, "--credits", "5"]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            summary = process.stdout.readline()
            assert url.startswith("http://127.0.0.1:")
            assert url.endswith("/remove-background/v1")
            response = requests.post(
                url, headers={"x-api-key": secret}, files={"image_file": PNG}, timeout=TIMEOUT
            )
            assert response.status_code == 200
            assert response.headers["x-remaining-credits"] == "4"
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0
    assert "keys: 1" in summary
    assert secret not in summary + out + err
    assert "200" in err
