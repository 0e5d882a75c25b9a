"""Every name the daemon writes, spelled once.

    state_dir/journal.sqlite3            the journal (journal/db.py opens it)
    state_dir/spool/<id>.proxy.jpg       a studio file's proxy, until its answer is in
    state_dir/spool/<id>.<ext>           the answer: made empty before its request, streamed
                                         in, complete once journaled `fetched`, kept until
                                         every output is placed
    state_dir/spool/.<id>.part           an answer streaming in that has no name yet (one
                                         kept in memory while the spool was full)
    <folder>/.watchfolder-<hex>.tmp      a file being written beside its final name
    <outbox>/<name template>             each output (`{dir}/{stem}.{ext}` with no recipe)
    <outbox>/<dir>/<stem>.json / .done   a file's manifest and done marker
    <errors>/<name>.error.json           why a failed file failed
    <inbox>/.watchfolder-claims/         claims on the share (coordination/claims.py)

Hidden names (a leading dot) are never taken for work by the intake, so every temp name
starts with one.
"""

from __future__ import annotations

import glob
import uuid
from datetime import datetime
from pathlib import Path, PurePosixPath

from watchfolder.config.settings import EXTENSIONS, InboxConfig, OutputConfig

TEMP_PREFIX = ".watchfolder-"
TEMP_SUFFIX = ".tmp"
REASON_SUFFIX = ".error.json"  # beside a failed file in errors: why it failed
MANIFEST_SUFFIX = ".json"
DONE_SUFFIX = ".done"
JOURNAL_NAME = "journal.sqlite3"
SPOOL = "spool"
CLAIMS_FOLDER = ".watchfolder-claims"

DEFAULT_OUTPUT = OutputConfig()  # no recipe: one output named {dir}/{stem}.{ext}
# What the API answers in (png, webp, jpeg): an output made from an original that changed
# after it was sent is the answer as it is, whatever the settings asked for.
ANSWER_EXTENSIONS = tuple(EXTENSIONS[fmt] for fmt in ("png", "webp", "jpeg"))


def temp_beside(dest: Path) -> Path:
    """A fresh hidden temp name in `dest`'s folder."""
    return dest.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def is_temp(name: str) -> bool:
    """`name` is one of `temp_beside`'s names (left behind by a crash, if nobody writes it)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def reason_file(failed: Path) -> Path:
    """The reason file beside a failed file in errors."""
    return failed.with_name(failed.name + REASON_SUFFIX)


def proxy_name(record_id: int) -> str:
    return f"{record_id}.proxy.jpg"


def part_name(record_id: int) -> str:
    return f".{record_id}.part"


def answer_name(record_id: int, ext: str) -> str:
    return f"{record_id}.{ext}"


def output_specs(inbox: InboxConfig) -> tuple[OutputConfig, ...]:
    """The inbox's outputs by recipe position (the one default output without a recipe)."""
    return inbox.outputs or (DEFAULT_OUTPUT,)


def output_root(inbox: InboxConfig, spec: OutputConfig) -> Path:
    """The outbox an output goes to."""
    return spec.outbox or inbox.outbox


def output_name(inbox: InboxConfig, spec: OutputConfig, rel: str, ext: str, *,
                sha256: str) -> str:
    """An output's path below its outbox, from its name template, made today."""
    return spec.path(rel, ext, inbox=inbox.path.name, sha256=sha256,
                     date=datetime.now().astimezone().strftime("%Y-%m-%d"))


def output_pattern(inbox: InboxConfig, spec: OutputConfig, rel: str, ext: str, *,
                   sha256: str) -> str:
    """A glob pattern (below the output's outbox) matching the output's name made on any
    day: after a crash or a reset the day it was made is not known."""
    return spec.path(glob.escape(rel), ext, inbox=glob.escape(inbox.path.name),
                     sha256=sha256, date="*")


def output_folders(inbox: InboxConfig, rel: str, sha256: str) -> list[Path]:
    """The folders that exist where `rel`'s outputs and sidecars are written (`sha256` "*"
    when the content's hash is not known)."""
    found = {inbox.outbox.joinpath(*PurePosixPath(rel).parent.parts)}
    for spec in output_specs(inbox):
        root = output_root(inbox, spec)
        pattern = PurePosixPath(output_pattern(inbox, spec, rel, spec.ext, sha256=sha256))
        parent = str(pattern.parent)
        found.update([root] if parent == "." else root.glob(parent))
    return sorted(folder for folder in found if folder.is_dir())
