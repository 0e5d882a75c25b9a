"""The manifest: what one processing of one source file produced, as one JSON document.

Pure: plain facts in, a dict and its bytes out. Placing the file (`<outbox>/<dir>/<stem>.json`,
no-clobber, before the `.done` marker) is the outbox's job; hooks and the webhook
(hooks.py, deliveries.py) receive the same bytes.

Schema, version 1 (keys always present, in this order; new keys may be added within a
version, so readers should ignore keys they do not know):

    {
      "version": 1,
      "id": "5b0f7c1e-...",            # names this processing of this file: a new drop (even of
                                       # the same content at the same path) gets a new id;
                                       # retries and restarts keep it. Deduplicate on it.
      "event": "done",                 # "done" or "failed"
      "source": {
        "path": "/srv/studio/inbox/shoes/a.jpg",  # where the file was dropped (absolute)
        "inbox": "/srv/studio/inbox",             # the inbox it was dropped in
        "moved_to": "/srv/studio/archive/shoes/a.jpg",  # where it is now (archive or errors
                                                  # folder); null when it stayed in place
        "sha256": "9f86d0...",                    # hex; null if it could not be read
        "width": 6000, "height": 4000             # pixels; null if it could not be decoded
      },
      "outputs": [                     # every output of the recipe, in recipe order;
        {                              # empty for "failed"
          "path": "/srv/studio/outbox/shoes/a.png",
          "format": "png",             # png, webp, jpeg, tiff
          "width": 6000, "height": 4000,
          "sha256": "2c26b4..."
        }
      ],
      "credits_spent": 1,              # what this file cost: 0 when an earlier answer was reused
      "credits_remaining": 4321,       # last known; null if unknown
      "finished_at": "2025-03-01T14:02:03.250+01:00",  # ISO 8601 with the local offset
      "reason": null,                  # "failed" only: a short machine code (as in the
      "message": null,                 # errors folder's reason file) and a sentence for people
      "watchfolder_version": "0.2.0",
      "timings_ms": {"wait": 120, "api": 2300, "outputs": 410, "total": 2950}
    }

The JSON text is UTF-8 (paths are not escaped to ASCII), indented by two spaces, keys in the
order above, and ends with a newline: the same facts always give the same bytes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from watchfolder import __version__

MANIFEST_VERSION = 1
DONE, FAILED = "done", "failed"
EVENTS = (DONE, FAILED)

# Fixed so that the same facts give the same id in every process and release.
_ID_NAMESPACE = uuid.UUID("8f6a3c52-4b8e-4f0e-9a57-2d1c0b7e6a91")


@dataclass(frozen=True)
class SourceFacts:
    """The source file as it was processed."""

    path: str
    inbox: str | None = None
    moved_to: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class OutputFacts:
    """One output of the recipe, as placed in the outbox."""

    path: str
    format: str
    width: int
    height: int
    sha256: str


def manifest_id(*facts: str | int | float) -> str:
    """A stable id for one processing of one file, derived from facts fixed for it.

    Pass facts that survive retries and restarts but differ between two drops, e.g. the
    journal row's `(inbox, rel, id, created)`. The same facts always give the same id.
    """
    if not facts:
        raise ValueError("manifest_id needs at least one fact")
    return str(uuid.uuid5(_ID_NAMESPACE, "\0".join(repr(f) for f in facts)))


def build_manifest(*, manifest_id: str, event: str, source: SourceFacts,
                   outputs: Sequence[OutputFacts] = (), credits_spent: int,
                   credits_remaining: int | None, finished_at: datetime,
                   reason: str | None = None, message: str | None = None,
                   timings_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The manifest as a dict (schema in the module docstring); raises ValueError on misuse."""
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, not {event!r}")
    if finished_at.tzinfo is None or finished_at.utcoffset() is None:
        raise ValueError("finished_at must carry its UTC offset (use datetime.now().astimezone())")
    if event == DONE and (not outputs or reason is not None):
        raise ValueError("a done manifest has at least one output and no reason")
    if event == FAILED and (outputs or not reason or message is None):
        raise ValueError("a failed manifest has a reason and a message, and no outputs")
    if credits_spent < 0:
        raise ValueError("credits_spent cannot be negative")
    for path in (source.path, *(o.path for o in outputs)):
        if not path.startswith("/"):
            raise ValueError(f"paths in a manifest are absolute, not {path!r}")
    return {
        "version": MANIFEST_VERSION,
        "id": manifest_id,
        "event": event,
        "source": {
            "path": source.path,
            "inbox": source.inbox,
            "moved_to": source.moved_to,
            "sha256": source.sha256,
            "width": source.width,
            "height": source.height,
        },
        "outputs": [
            {"path": o.path, "format": o.format, "width": o.width, "height": o.height,
             "sha256": o.sha256}
            for o in outputs
        ],
        "credits_spent": credits_spent,
        "credits_remaining": credits_remaining,
        "finished_at": finished_at.isoformat(timespec="milliseconds"),
        "reason": reason,
        "message": message,
        "watchfolder_version": __version__,
        "timings_ms": {name: round(ms) for name, ms in (timings_ms or {}).items()},
    }


def manifest_json(manifest: Mapping[str, Any]) -> bytes:
    """The manifest's bytes: UTF-8 JSON, keys in the builder's order, ending with a newline."""
    text = json.dumps(manifest, ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    # A file name that is not valid UTF-8 reaches us with surrogate escapes (PEP 383); as
    # \udcXX escapes they stay valid JSON, and a Python reader gets the original bytes back with
    # os.fsencode.
    return text.encode("utf-8", errors="backslashreplace")
