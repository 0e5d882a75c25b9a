"""The manifest: its schema, its bytes, its id."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from watchfolder import __version__
from watchfolder.handoff.manifest import (
    OutputFacts,
    SourceFacts,
    build_manifest,
    manifest_id,
    manifest_json,
)

PARIS_WINTER = timezone(timedelta(hours=1))
FINISHED = datetime(2025, 3, 1, 14, 2, 3, 250000, tzinfo=PARIS_WINTER)
SOURCE = SourceFacts(path="/srv/studio/inbox/chaussures/été.jpg", inbox="/srv/studio/inbox",
                     moved_to="/srv/studio/archive/chaussures/été.jpg", sha256="ab" * 32,
                     width=6000, height=4000)
OUTPUTS = (
    OutputFacts(path="/srv/studio/outbox/chaussures/été.png", format="png", width=6000,
                height=4000, sha256="cd" * 32),
    OutputFacts(path="/srv/studio/outbox/chaussures/été_white.jpg", format="jpeg", width=2000,
                height=2000, sha256="ef" * 32),
)


def done_manifest() -> dict[str, object]:
    return build_manifest(manifest_id="m-1", event="done", source=SOURCE, outputs=OUTPUTS,
                          credits_spent=1, credits_remaining=4321, finished_at=FINISHED,
                          timings_ms={"api": 2300.4, "total": 2950.6})


def test_done_manifest_has_the_contract_keys_in_a_fixed_order() -> None:
    manifest = done_manifest()
    assert list(manifest) == ["version", "id", "event", "source", "outputs", "credits_spent",
                              "credits_remaining", "finished_at", "reason", "message",
                              "watchfolder_version", "timings_ms"]
    assert manifest["version"] == 1
    assert manifest["event"] == "done"
    assert manifest["source"] == {"path": SOURCE.path, "inbox": "/srv/studio/inbox",
                                  "moved_to": SOURCE.moved_to, "sha256": "ab" * 32,
                                  "width": 6000, "height": 4000}
    assert manifest["outputs"] == [
        {"path": OUTPUTS[0].path, "format": "png", "width": 6000, "height": 4000,
         "sha256": "cd" * 32},
        {"path": OUTPUTS[1].path, "format": "jpeg", "width": 2000, "height": 2000,
         "sha256": "ef" * 32},
    ]
    assert manifest["finished_at"] == "2025-03-01T14:02:03.250+01:00"
    assert manifest["watchfolder_version"] == __version__
    assert manifest["timings_ms"] == {"api": 2300, "total": 2951}
    assert manifest["reason"] is None and manifest["message"] is None


def test_failed_manifest_has_reason_and_message_and_no_outputs() -> None:
    manifest = build_manifest(
        manifest_id="m-2", event="failed",
        source=SourceFacts(path="/srv/studio/inbox/broken.jpg", inbox="/srv/studio/inbox",
                           moved_to="/srv/studio/errors/broken.jpg"),
        credits_spent=0, credits_remaining=None, finished_at=FINISHED,
        reason="undecodable", message="not an image Pillow can read")
    assert manifest["event"] == "failed"
    assert manifest["outputs"] == []
    assert manifest["reason"] == "undecodable"
    assert manifest["message"] == "not an image Pillow can read"
    assert manifest["source"]["sha256"] is None  # type: ignore[index]
    assert manifest["credits_remaining"] is None


def test_json_bytes_are_utf8_stable_and_end_with_a_newline() -> None:
    data = manifest_json(done_manifest())
    assert data.endswith(b"}\n")
    assert "été.png".encode() in data  # not escaped to \u00e9
    assert data == manifest_json(done_manifest())
    assert json.loads(data) == done_manifest()
    assert list(json.loads(data)) == list(done_manifest())


@pytest.mark.parametrize("change, complaint", [
    ({"finished_at": datetime(2025, 3, 1, 14, 2, 3)}, "offset"),  # naive: no offset
    ({"event": "finished"}, "event"),
    ({"outputs": ()}, "at least one output"),
    ({"reason": "late"}, "no reason"),
    ({"event": "failed"}, "no outputs"),
    ({"credits_spent": -1}, "negative"),
    ({"source": SourceFacts(path="inbox/a.jpg")}, "absolute"),
])
def test_misuse_is_refused(change: dict[str, object], complaint: str) -> None:
    facts: dict[str, object] = {"manifest_id": "m", "event": "done", "source": SOURCE,
                                "outputs": OUTPUTS, "credits_spent": 1,
                                "credits_remaining": 1, "finished_at": FINISHED, **change}
    with pytest.raises(ValueError, match=complaint):
        build_manifest(**facts)  # type: ignore[arg-type]


def test_manifest_id_is_stable_for_one_processing_and_new_for_a_new_drop() -> None:
    first = manifest_id("/srv/studio/inbox", "a.jpg", 7, 1740834123.25)
    assert first == manifest_id("/srv/studio/inbox", "a.jpg", 7, 1740834123.25)  # a restart
    assert first != manifest_id("/srv/studio/inbox", "a.jpg", 8, 1740834190.5)  # dropped again
    assert len(first) == 36
    with pytest.raises(ValueError):
        manifest_id()


def test_a_file_name_that_is_not_utf8_survives_the_round_trip() -> None:
    raw_name = b"/srv/studio/inbox/caf\xe9.jpg"  # Latin-1, as an old camera share writes it
    path = os.fsdecode(raw_name)
    manifest = build_manifest(
        manifest_id="m-3", event="failed", source=SourceFacts(path=path), credits_spent=0,
        credits_remaining=None, finished_at=FINISHED, reason="undecodable", message="x")
    data = manifest_json(manifest)
    data.decode("utf-8")  # still valid UTF-8
    assert os.fsencode(json.loads(data)["source"]["path"]) == raw_name
