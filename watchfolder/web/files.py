"""The files the page's pictures and downloads name, each opened through `paths.open_inside`:

- by a journal record's id: its original where it is now (archive, errors or still in the
  inbox), or its n-th output; a result waiting for review, the API's answer in the spool
  (found by the id, never by a path from the request);
- by an inbox's slot and a path below its errors folder: a failed file (never its reason
  file), which may be from an earlier run or another host, so it has no record here.

Each returns the open file and the SHA-256 the journal knows for it (the thumbnail's cache key),
or raises `Refused`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from watchfolder.files.layout import REASON_SUFFIX
from watchfolder.journal.db import REVIEW
from watchfolder.web import views
from watchfolder.web.paths import Opened, Refused, open_inside, roots, safe_rel

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon


class Files:
    def __init__(self, daemon: Daemon, reader: views.Reader) -> None:
        self.daemon = daemon
        self.reader = reader

    def record_file(self, record_id: int, which: int | None) -> tuple[Opened, str | None]:
        """The record's original (`which` None) or its `which`-th output."""
        record = self.reader.record(record_id)
        if record is None:
            raise Refused(str(record_id))
        if which is None:
            path, sha = views.source_path(record), record.sha256
        else:
            paths, shas = views.output_paths(record), views.output_shas(record)
            if not 0 <= which < len(paths):
                raise Refused(str(which))
            path, sha = paths[which], shas[which]
        return open_inside(path, roots(self.daemon.config)), sha

    def failed(self, index: int, rel: str) -> Opened:
        """A failed file below the errors folder of inbox slot `index`."""
        inboxes = self.daemon.config.inboxes
        if not 0 <= index < len(inboxes):
            raise Refused(str(index))
        errors = inboxes[index].errors
        pure = safe_rel(rel)
        if pure.name.endswith(REASON_SUFFIX):
            raise Refused(rel)
        return open_inside(errors.joinpath(*pure.parts), [Path(os.path.realpath(errors))])

    def answer(self, record_id: int) -> tuple[Opened, str | None]:
        """The API's answer for a result waiting for review, while it waits."""
        record = self.reader.record(record_id)
        if record is None or record.state != REVIEW or not record.spool:
            raise Refused(str(record_id))
        spool = Path(os.path.realpath(self.daemon.config.state_dir / "spool"))
        return open_inside(record.spool, [spool]), None
