"""Done marks: a file finished in keep mode (no archive) is not sent again by another daemon.

A file finished in keep mode stays in the inbox; every other daemon would see it as new. Before
releasing its claim, the daemon that finished it writes
`<inbox>/.watchfolder-claims/done/<ab>/<sha1 of rel>.json` with the file's size, mtime and
sha256; another daemon that claims the same unchanged file finds the mark and does not send it.
The marks live on the share, not in the store, because the share is as durable as the files
themselves (a store restarted without persistence would forget them).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from watchfolder.coordination.claims import (
    DONE_FOLDER,
    Holder,
    claims_folder,
    rel_hash,
    unavailable,
)
from watchfolder.logs import readable


@dataclass(frozen=True)
class DoneMark:
    """A file another daemon finished in keep mode, as it was when finished."""

    size: int
    mtime_ns: int
    sha256: str
    host: str
    pid: int
    result: str | None


class DoneMarks:
    """`.watchfolder-claims/done/<ab>/<sha1 of rel>.json`, one per file finished in place."""

    def __init__(self, holder: Holder) -> None:
        self.holder = holder

    @staticmethod
    def path(inbox: Path, rel: str) -> Path:
        h = rel_hash(rel)
        return claims_folder(inbox) / DONE_FOLDER / h[:2] / f"{h}.json"

    def mark(self, inbox: Path, rel: str, size: int, mtime_ns: int, sha256: str,
             result: str | None) -> None:
        """Record that this content of `rel` is done. Raises CoordinationUnavailable."""
        path = self.path(inbox, rel)
        body = {"file": readable(rel), "size": size, "mtime_ns": mtime_ns, "sha256": sha256,
                **self.holder.as_dict(), "result": result, "at": time.time()}
        temp = path.with_name(f".{path.stem}.{self.holder.daemon}.tmp")
        try:
            path.parent.mkdir(mode=0o777, parents=True, exist_ok=True)
            temp.write_text(json.dumps(body) + "\n", encoding="utf-8")
            temp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise unavailable(inbox, exc) from None

    def find(self, inbox: Path, rel: str, size: int, mtime_ns: int,
             sha256: str) -> DoneMark | None:
        """The mark of this exact content (size, mtime and hash all equal), or None."""
        try:
            data = json.loads(self.path(inbox, rel).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # torn by hand: not a mark
        except OSError as exc:
            raise unavailable(inbox, exc) from None
        if not isinstance(data, dict) or (data.get("size"), data.get("mtime_ns"),
                                          data.get("sha256")) != (size, mtime_ns, sha256):
            return None
        return DoneMark(size, mtime_ns, sha256, str(data.get("host", "?")),
                        int(data.get("pid") or 0), data.get("result"))


