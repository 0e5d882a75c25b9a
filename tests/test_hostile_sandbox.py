"""The sandbox's hostile faults: answers that trickle and answers that never end.

The client's defences against them are tested in test_hostile_client.py; here, that the
sandbox really sends what its docstring promises, over a bare socket.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from watchfolder.dev.sandbox import Sandbox, add_arguments

KEY = "hostile-key-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[Sandbox]:
    with Sandbox(keys=(KEY,), rpm=None, trickle_seconds=0.1) as running:
        yield running


@pytest.fixture
def sandbox(server: Sandbox) -> Iterator[Sandbox]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def image(tmp_path: Path) -> bytes:
    return make_image(tmp_path / "in.png").read_bytes()


def _raw_answer(sandbox: Sandbox, image: bytes) -> tuple[bytes, float]:
    """POST over a bare socket; everything the server sends until it closes, and how long."""
    boundary = "hostile"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image_file\"; "
            f"filename=\"in.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /remove-background/v1 HTTP/1.1\r\nHost: sandbox\r\nx-api-key: {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection(sandbox.address, timeout=10) as connection:
        connection.sendall(head + body)
        received = b""
        while chunk := connection.recv(1 << 20):
            received += chunk
    return received, time.monotonic() - started


def test_trickle_faults_pace_their_bytes_and_stop_after_hang_seconds(
        sandbox: Sandbox, image: bytes) -> None:
    sandbox.hang_seconds = 0.5
    sandbox.add_faults("trickle", "trickle-headers")
    received, elapsed = _raw_answer(sandbox, image)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert 2 <= len(body) <= 5 and 0.4 < elapsed < 2, (len(body), elapsed)
    received, elapsed = _raw_answer(sandbox, image)
    assert 2 <= len(received) <= 5 and b"HTTP/1.1 200 OK".startswith(received)
    assert [r.fault for r in sandbox.requests] == ["trickle", "trickle-headers"]


def test_huge_faults_send_an_image_then_zeros_with_or_without_a_length(
        sandbox: Sandbox, image: bytes) -> None:
    sandbox.huge_bytes = 3_000_000
    sandbox.add_faults("huge", "huge-unsized")
    for sized in (True, False):
        received, _ = _raw_answer(sandbox, image)
        head, _, body = received.partition(b"\r\n\r\n")
        assert (b"Content-Length: 3000000" in head) is sized
        assert len(body) == 3_000_000 and body.startswith(b"\x89PNG")
        assert body.endswith(bytes(1000))


def test_sandbox_cli_takes_the_hostile_knobs() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--fault", "trickle", "--fault", "huge-unsized",
                              "--trickle-seconds", "0.5", "--huge-bytes", "1000",
                              "--hang-seconds", "3"])
    assert (args.fault, args.trickle_seconds, args.huge_bytes, args.hang_seconds) == (
        ["trickle", "huge-unsized"], 0.5, 1000, 3.0)
    text = " ".join(parser.format_help().split())
    assert "one byte every --trickle-seconds" in text and "--huge-bytes" in text
