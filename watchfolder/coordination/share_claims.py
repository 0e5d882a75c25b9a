"""Claims as files on the share, for daemons without a coordination store (see claims.py).

`ShareClaims` (no coordination store): an exclusive create of
`<inbox>/.watchfolder-claims/<sha1 of rel>.claim`, holding the holder as JSON. It is written to
a private file first and hard-linked to that name (the classic NFS-safe lock file), so it is
never seen half-written; where the share refuses hard links, `O_CREAT|O_EXCL` then the write.
Why it holds:
- local disk: link() and `O_CREAT|O_EXCL` are atomic in the kernel: one creator wins, the
  others get EEXIST.
- NFSv3 and v4: both are decided by the server (LINK; CREATE in EXCLUSIVE mode, or NFSv4 OPEN
  with an exclusive create), so of two clients racing one gets the name and the other EEXIST;
  Linux has done this since 2.6.5 (NFSv2 cannot, and is not supported). A LINK whose reply was
  lost and retried answers EEXIST though it worked: the private file's link count tells. Opening
  a file revalidates its attributes (close-to-open consistency), so the mtime read through an
  open descriptor is the server's, not one cached by this client.
- SMB 2/3: CREATE with the FILE_CREATE disposition, and a hard link (FileLinkInformation with
  ReplaceIfExists false), are refused with STATUS_OBJECT_NAME_COLLISION when the name exists:
  again the server decides, atomically.
Expiry never compares two hosts' clocks. The claim file's mtime is stamped by the share's server
when its holder writes it (at creation, at each renewal); to judge it, a daemon writes its own
clock file in the same folder and reads that file's mtime back: "now" by the same server's
clock. Only differences of two times of one server are compared (and the local monotonic clock
measures at most one second between two clock-file writes). On SMB the write time must be the
server's too: Samba and Windows set it from their own clock; see docs/several-hosts.md.
A released claim's file is not unlinked but renamed to a private spare name of this daemon
(`<new prefix>spare.<n>`), and the next claim is written into a spare (truncated, then written
whole, then linked to its name, as a new one): the claim's name appears and disappears exactly
as before, but no inode is allocated or freed per file. On ext4 without a journal (this
daemon's test machine) each inode freed is skipped, one by one, by every allocation of the
next minutes (`recently_deleted`): allocating the claims' inodes cost a tenth of the daemon's
CPU on the fast path. At most `SPARES` per folder are kept; a restart, the sweep (they are
private names) and `close` remove them.
A takeover of an expired claim is serialised by a second exclusive create, of
`<sha1>.<nonce of the expired claim>.takeover`: of the daemons that judged the same claim expired,
one wins, checks again (same nonce, same inode, same mtime, still expired), unlinks it and then
creates its own claim exclusively like anyone else (a new daemon racing it is settled by that
create). What leases cannot prevent, no lease can: a holder that stalls for a whole lease
(a hung mount) and then carries on. It finds its claim lost at the next renewal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog

from watchfolder import failpoints
from watchfolder.coordination.claims import (
    Claim,
    Holder,
    claims_folder,
    holder_label,
    rel_hash,
    unavailable,
)
from watchfolder.errors import CoordinationUnavailable
from watchfolder.files.spares import Spares
from watchfolder.logs import Outages, readable

log = structlog.get_logger("watchfolder")

INBOX_ID = "inbox-id"
CLAIM_SUFFIX = ".claim"
TAKEOVER_SUFFIX = ".takeover"
CLOCK_PREFIX = "clock."
CLOCK_REUSE_SECONDS = 1.0  # one clock-file write serves the judgements of the next second
NEW_PREFIX = ".new."  # a claim being written, before it is linked to its name
SPARE = "spare."  # after a folder's `new_prefix`: a released claim's file, to be written again
SPARES = 32  # spare claim files kept per claims folder (about the claims held at once)
EMPTY_CLAIM_NS = 5_000_000_000
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV)


@dataclass(frozen=True)
class _Seen:
    """A claim file as read: its nonce (empty if not yet written), inode, mtime, holder."""

    nonce: str
    inode: int
    mtime_ns: int
    holder: dict[str, Any]


class ShareFolder:
    """`<inbox>/.watchfolder-claims`: created on first use; the share's clock lives here."""

    def __init__(self, inbox: Path, holder: Holder,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.inbox = inbox
        self.path = claims_folder(inbox)
        self.holder = holder
        self.monotonic = monotonic
        self._clock_file = self.path / f"{CLOCK_PREFIX}{holder.daemon}"
        self._clock: tuple[float, int] | None = None  # (monotonic, share mtime_ns) of a write
        self._ticks = 0
        self._lock = threading.Lock()
        self._made = False
        self._making = threading.Lock()
        self._swept_previous_life = False
        # Claims being written are named after this daemon installation, so that a restart can
        # remove what a crash left half-done (anybody else's wait for the sweep).
        tag = hashlib.sha1((holder.instance or holder.daemon).encode(),
                           usedforsecurity=False).hexdigest()[:12]
        self.new_prefix = f"{NEW_PREFIX}{tag}."
        # Released claims' files, renamed to private names (files/spares.py).
        self.spares = Spares(self.path, keep=SPARES, prefix=f"{self.new_prefix}{SPARE}",
                             empty_above=None)

    def ensure(self) -> None:
        """Make the folder if missing; the first time, remove what our previous life left.

        Only then may a claim be written here: the sweep removes files with our private
        prefix, and run beside a claim being written (another worker's) it removed that
        claim's file before its link, so that worker failed and swept again, and so on."""
        if self._made:
            return
        with self._making:
            if self._made:
                return
            try:
                self.path.mkdir(mode=0o777, exist_ok=True)  # the umask decides who may write
            except OSError as exc:
                raise unavailable(self.inbox, exc) from None
            if self.holder.instance and not self._swept_previous_life:
                self._swept_previous_life = True  # once: a folder made again holds none
                with contextlib.suppress(OSError), os.scandir(self.path) as entries:
                    for entry in entries:
                        if entry.name.startswith(self.new_prefix):
                            Path(entry.path).unlink(missing_ok=True)
            self._made = True

    def now_ns(self) -> int:
        """The share's time now: the mtime of our clock file, written at most a second ago."""
        with self._lock:
            mono = self.monotonic()
            if self._clock is None or mono - self._clock[0] > CLOCK_REUSE_SECONDS:
                self._ticks += 1
                fd = os.open(self._clock_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                try:
                    os.write(fd, f"{self._ticks}\n".encode())
                finally:
                    os.close(fd)
                # Read back after the close: NFS flushes the write and takes the server's stamp.
                self._clock = (mono, self._clock_file.stat().st_mtime_ns)
                return self._clock[1]
            return self._clock[1] + round((mono - self._clock[0]) * 1e9)

    def forget_made(self) -> None:
        self._made = False
        with self._lock:
            self._clock = None
        self.spares.forget()  # gone with the folder

    def forget_clock(self) -> None:
        with contextlib.suppress(OSError):
            self._clock_file.unlink()

    def inbox_id(self) -> str:
        """A random id for this inbox, the same from every host that mounts the share."""
        self.ensure()
        path = self.path / INBOX_ID
        for _ in range(50):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    text = path.read_text(encoding="ascii").strip()
                    if text:
                        return text
                time.sleep(0.02)  # its creator is between the create and the write
                continue
            except OSError as exc:
                raise unavailable(self.inbox, exc) from None
            made = secrets.token_hex(16)
            try:
                os.write(fd, f"{made}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return made
        raise CoordinationUnavailable(f"{path} stays empty; remove it and start again")


class ShareClaims:
    """Claims as files in each inbox's `.watchfolder-claims` folder (see the module docstring)."""

    def __init__(self, holder: Holder, lease_seconds: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.holder = holder
        self.lease_ns = int(lease_seconds * 1e9)
        self.monotonic = monotonic
        self._links = True  # until the share refuses a hard link
        self._folders: dict[Path, ShareFolder] = {}
        self._away = Outages()  # inboxes whose claims folder failed (said once)
        self._lock = threading.Lock()

    def folder(self, inbox: Path) -> ShareFolder:
        with self._lock:
            found = self._folders.get(inbox)
            if found is None:
                found = self._folders[inbox] = ShareFolder(inbox, self.holder, self.monotonic)
            return found

    def claim(self, inbox: Path, rel: str) -> Claim | None:
        """Raises CoordinationUnavailable when the claims folder cannot be used: said once
        (`claims.unavailable`) until a claim in that inbox works again (`claims.recovered`)."""
        folder = self.folder(inbox)
        path = folder.path / f"{rel_hash(rel)}{CLAIM_SUFFIX}"
        try:
            folder.ensure()
            try:
                found = self._claim(folder, path, rel)
            except FileNotFoundError:
                folder.forget_made()  # the claims folder was removed by hand: make it again
                folder.ensure()
                found = self._claim(folder, path, rel)
        except OSError as exc:
            self._outage(inbox, unavailable(inbox, exc))
        except CoordinationUnavailable as exc:
            self._outage(inbox, exc)
        if self._away.ended(inbox):
            log.warning("claims.recovered", inbox=str(inbox))
        return found

    def _outage(self, inbox: Path, exc: CoordinationUnavailable) -> NoReturn:
        if self._away.began(inbox):
            log.error("claims.unavailable", inbox=str(inbox), message=str(exc),
                      hint=f"make {claims_folder(inbox)} a folder this daemon can write (not "
                           f"a file, not on a full or read-only disk); the inbox's files wait "
                           f"until then")
        raise exc from None

    def _claim(self, folder: ShareFolder, path: Path, rel: str) -> Claim | None:
        for _ in range(5):
            nonce = secrets.token_hex(8)
            where = _folder_identity(folder.inbox)
            if self._create(folder, path, rel, nonce):
                claim = Claim(self, folder.inbox, rel, nonce)
                claim.where = where
                return claim
            seen = _read_claim(path)
            if seen is None:
                continue  # released meanwhile: try again
            mine = self.holder.left_by_my_previous_life(seen.holder) or \
                self.holder.left_by_me(seen.holder)
            if not mine and not self._expired(folder, seen):
                return None
            if not self._take_over(folder, path, seen, rel, mine=mine):
                return None
        return None  # a crowd keeps taking it: let the others have it

    def renew(self, claim: Claim) -> bool:
        path = self.folder(claim.inbox).path / f"{rel_hash(claim.rel)}{CLAIM_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            if claim.where is not None and _folder_identity(claim.inbox) != claim.where:
                # Not our claim is gone but the inbox it was made in (a share unmounted: what
                # is there now is another folder, or none): nobody else can take it from
                # there; it is renewed when the inbox is back.
                raise unavailable(claim.inbox, FileNotFoundError(
                    errno.ENOENT, "the inbox is not the folder it was")) from None
            return False
        except OSError as exc:
            raise unavailable(claim.inbox, exc) from None
        try:
            with os.fdopen(fd, "r+b") as handle:
                if _nonce_of(handle.read()) != claim.token:
                    return False
                handle.seek(0)
                handle.write(self._content(claim.rel, claim.token))
                handle.truncate()
        except OSError as exc:
            raise unavailable(claim.inbox, exc) from None
        return True

    def release(self, claim: Claim) -> None:
        path = self.folder(claim.inbox).path / f"{rel_hash(claim.rel)}{CLAIM_SUFFIX}"
        seen = _read_claim(path)
        if seen is not None and seen.nonce == claim.token:  # ours: a spare for the next one
            self.folder(claim.inbox).spares.let_go(path)

    def sweep(self, inbox: Path) -> None:
        """Remove what dead daemons left: claims and takeover locks expired for two leases
        (their files were removed while claimed, or their taker died), and their clock files."""
        folder = self.folder(inbox)
        if not folder.path.is_dir():
            return
        try:
            now = folder.now_ns()
            for entry in os.scandir(folder.path):
                name = entry.name
                try:
                    age = now - entry.stat(follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:
                    continue
                if age <= 2 * self.lease_ns:
                    continue
                if name.endswith(CLAIM_SUFFIX):
                    seen = _read_claim(Path(entry.path))
                    if seen is not None:
                        self._take_over(folder, Path(entry.path), seen, None)
                elif name.endswith(TAKEOVER_SUFFIX) or name.startswith(NEW_PREFIX) or (
                        name.startswith(CLOCK_PREFIX) and entry.path != str(folder._clock_file)):
                    Path(entry.path).unlink(missing_ok=True)
        except OSError as exc:
            log.debug("claims.sweep_failed", inbox=str(inbox), error=str(exc))

    def close(self) -> None:
        """Remove this daemon's clock files, and claims folders left empty (a single daemon
        leaves no trace; one still used by another daemon is not empty)."""
        with self._lock:
            folders = list(self._folders.values())
        for folder in folders:
            folder.spares.drop()
            folder.forget_clock()
            with contextlib.suppress(OSError):
                folder.path.rmdir()

    # -- inside --------------------------------------------------------------------------------

    def _content(self, rel: str, nonce: str) -> bytes:
        return (json.dumps({**self.holder.as_dict(), "nonce": nonce, "file": readable(rel),
                            "lease_seconds": self.lease_ns / 1e9,
                            "renewed": time.time()}) + "\n").encode()

    def _create(self, folder: ShareFolder, path: Path, rel: str, nonce: str) -> bool:
        """Create the claim file (or a takeover lock) whole, or return False if it exists.

        Written to a private file first, then hard-linked to the claim's name: link() fails
        with EEXIST when the name exists, atomically (the NFS server decides), and a claim is
        never seen half-written, not even after its creator died. An NFS reply lost and
        retried can say EEXIST for a link that was made: the private file's link count tells.
        Where the share refuses hard links, O_CREAT|O_EXCL and then the write.
        """
        content = self._content(rel, nonce)
        if self._links:
            temp, fd = _spare_or_new(folder, path.with_name(f"{folder.new_prefix}{nonce}"))
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
            try:
                os.link(temp, path)
            except FileExistsError:
                return temp.stat().st_nlink >= 2
            except OSError as exc:
                if exc.errno not in NO_LINKS:
                    raise
                self._links = False
                log.info("claims.no_hard_links", folder=str(path.parent),
                         hint="the share refuses hard links: claims are created with O_EXCL")
            else:
                return True
            finally:
                temp.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        return True

    def _expired(self, folder: ShareFolder, seen: _Seen) -> bool:
        # An empty claim is one whose creator died between O_EXCL and its write (shares
        # without hard links only): dead after a few seconds rather than a whole lease.
        lease = self.lease_ns if seen.nonce else min(self.lease_ns, EMPTY_CLAIM_NS)
        return folder.now_ns() - seen.mtime_ns > lease

    def _take_over(self, folder: ShareFolder, path: Path, seen: _Seen, rel: str | None, *,
                   mine: bool = False) -> bool:
        """Remove the expired claim `seen` (or `mine`: one left by this daemon's previous life)
        if nobody else is doing it; True if removed (or gone).

        The lock's name carries the expired claim's nonce, so only daemons judging that same
        claim compete for it; the winner looks again under the lock before unlinking.
        """
        lock = path.with_name(f"{path.name[:-len(CLAIM_SUFFIX)]}.{seen.nonce or 'empty'}"
                              f"{TAKEOVER_SUFFIX}")
        if not self._lock_takeover(folder, lock, rel):
            return False  # another daemon is taking it over right now
        failpoints.hit("takeover-locked")
        try:
            again = _read_claim(path)
            if again is None:
                return True
            if (again.nonce, again.inode, again.mtime_ns) != (seen.nonce, seen.inode,
                                                            seen.mtime_ns):
                return False  # renewed, or already taken over: live
            if not mine and not self._expired(folder, again):
                return False
            path.unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)
        if mine:
            log.debug("claim.reclaimed", inbox=str(folder.inbox), file=rel,
                      hint="left by this daemon before its restart")
            return True
        log.warning("claim.taken_over" if rel is not None else "claim.expired_removed",
                    inbox=str(folder.inbox), file=readable(rel) if rel else None,
                    previous=holder_label(seen.holder),
                    hint="its holder stopped renewing the claim for a whole lease (it died)")
        return True

    def _lock_takeover(self, folder: ShareFolder, lock: Path, rel: str | None) -> bool:
        """Create the takeover lock `lock` (naming its holder, like a claim); False if a live
        taker holds it.

        A lock left by a taker that died inside its takeover (a SIGKILL between the lock's
        create and its unlink) would block the file until the sweep, two leases later: when
        that taker was this daemon's previous life (the state_dir's lock proves it gone), or
        the lock is empty and older than an empty claim may be (a taker without hard links
        that died between create and write, or a daemon older than this rule), it is removed
        and the lock taken now. A takeover holds its lock for a read and an unlink, never
        seconds.
        """
        for _ in range(3):
            if self._create(folder, lock, rel or "", secrets.token_hex(8)):
                return True
            left = _read_claim(lock)
            if left is None:
                continue  # its taker finished meanwhile: try again
            if left.holder:
                if not self.holder.left_by_my_previous_life(left.holder):
                    return False
            elif folder.now_ns() - left.mtime_ns <= EMPTY_CLAIM_NS:
                return False
            with contextlib.suppress(OSError):
                # Only if it is still the lock judged: a new taker's lock stays.
                if lock.stat().st_ino == left.inode:
                    lock.unlink()
            log.info("claim.takeover_lock_removed", inbox=str(folder.inbox),
                     file=readable(rel) if rel else None, previous=holder_label(left.holder),
                     hint="its taker died in the middle of a takeover")
        return False


def _folder_identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _spare_or_new(folder: ShareFolder, new: Path) -> tuple[Path, int]:
    """A private file to write a claim into: a spare one emptied (no inode allocated), or
    `new`, created."""
    while (spare := folder.spares.pop()) is not None:
        try:
            return spare, os.open(spare, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue  # swept meanwhile (a spare is a private name like any claim written)
    return new, os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def _read_claim(path: Path) -> _Seen | None:
    """The claim at `path`, read through an open descriptor (fresh attributes); None if gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        data = handle.read(4096)
    holder: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        loaded = json.loads(data)
        if isinstance(loaded, dict):
            holder = loaded
    return _Seen(str(holder.get("nonce", "")), st.st_ino, st.st_mtime_ns, holder)


def _nonce_of(data: bytes) -> str:
    with contextlib.suppress(ValueError):
        loaded = json.loads(data)
        if isinstance(loaded, dict):
            return str(loaded.get("nonce", ""))
    return ""


