"""The client against a hostile server: answers that trickle, answers that never end.

Real sockets, the real sandbox; the client's timeout bounds the whole request and its memory
does not grow with the size of the answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_image
from watchfolder.client import ApiClient, ApiResult
from watchfolder.config import Secret
from watchfolder.errors import TransportError
from watchfolder.sandbox import Sandbox

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
    result = client.remove_background(image, filename="in.png", mime="image/png", **options)
    dest.write_bytes(result.content)
    return result


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
    assert not dest.exists()
    # The next request works (on a new connection).
    result = send(client, image, dest)
    assert dest.read_bytes() == result.content
