"""Claims: a daemon takes a file before it pays for it, so daemons sharing an inbox send it once.

A claim names its holder (host, pid, a random id per daemon process) and lasts a lease: the
coordinator's thread renews it every lease/3 while this daemon works on the file (parked for a
retry or a 429 included), and it is released when the file ends or is handed back at a stop.
A claim not renewed for a whole lease belongs to a daemon that died (or lost the share or the
store that long): the next daemon that wants the file takes it over. A takeover may pay for a
file again, at most once per request the dead holder had in flight. A daemon restarted on the
same state_dir takes the claims of its previous life back at once (`Holder.instance`).

Two mechanisms behind one interface, `claim(inbox, rel) -> Claim | None` (None: held by a live
claim of another daemon):

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
A takeover of an expired claim is serialised by a second exclusive create, of
`<sha1>.<nonce of the expired claim>.takeover`: of the daemons that judged the same claim expired,
one wins, checks again (same nonce, same inode, same mtime, still expired), unlinks it and then
creates its own claim exclusively like anyone else (a new daemon racing it is settled by that
create). What leases cannot prevent, no lease can: a holder that stalls for a whole lease
(a hung mount) and then carries on. It finds its claim lost at the next renewal.

`StoreClaims` (with `coordination.url`): one key per file in the store, whose value carries the
expiry in the store's clock (`TIME`), set and checked by Lua scripts (compare-and-set to claim or
take over, compare-and-renew, compare-and-delete), so the store alone decides and host clocks
never matter. The key's identity is the inbox's id (written once in its claims folder), not its
path, so hosts may mount the share at different places.

Done marks (`DoneMarks`), with or without a store: a file finished in keep mode (no archive)
stays in the inbox; every other daemon would see it as new. Before releasing its claim, the
daemon that finished it writes `<inbox>/.watchfolder-claims/done/<ab>/<sha1 of rel>.json` with
the file's size, mtime and sha256; another daemon that claims the same unchanged file finds the
mark and does not send it. The marks live on the share, not in the store, because the share is
as durable as the files themselves (a store restarted without persistence would forget them).

Both `.watchfolder-claims` and the files in it are ignored by the intake (a dot-folder).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from watchfolder.errors import CoordinationUnavailable
from watchfolder.logs import readable

if TYPE_CHECKING:
    from watchfolder.coordination.store import Store

log = structlog.get_logger("watchfolder")

CLAIMS_FOLDER = ".watchfolder-claims"
DONE_FOLDER = "done"
INBOX_ID = "inbox-id"
CLAIM_SUFFIX = ".claim"
TAKEOVER_SUFFIX = ".takeover"
CLOCK_PREFIX = "clock."
CLOCK_REUSE_SECONDS = 1.0  # one clock-file write serves the judgements of the next second
NEW_PREFIX = ".new."  # a claim being written, before it is linked to its name
EMPTY_CLAIM_NS = 5_000_000_000
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV)


@dataclass(frozen=True)
class Holder:
    """Who holds a claim: this daemon process, of this daemon installation (`instance`)."""

    host: str
    pid: int
    daemon: str  # random per process: a restarted daemon with the same pid is someone else
    # Random per state_dir, kept there: a claim of the same instance but another process was
    # left by this daemon's previous life (the state_dir's lock proves that process is gone),
    # so a restart takes its own files back at once instead of waiting a lease.
    instance: str = ""

    @classmethod
    def this_process(cls, instance: str = "") -> Holder:
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(8), instance)

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "daemon": self.daemon,
                "instance": self.instance}

    def left_by_my_previous_life(self, other: dict[str, Any]) -> bool:
        """True for the holder of a claim this daemon left before a restart: same instance and
        host, another daemon id, and its process is gone."""
        if not self.instance or other.get("instance") != self.instance:
            return False
        if other.get("daemon") == self.daemon or other.get("host") != self.host:
            return False
        return not _running(other.get("pid"))


def _running(pid: Any) -> bool:
    """Is there a process with this pid here? (When unsure, yes: the lease decides then.)"""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


INSTANCE_FILE = "coordination-instance"


def instance_id(state_dir: Path) -> str:
    """This daemon installation's id, kept in its state_dir (made on first use)."""
    path = state_dir / INSTANCE_FILE
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(encoding="ascii").strip()
        if text:
            return text
    state_dir.mkdir(parents=True, exist_ok=True)
    made = f"{socket.gethostname()}:{secrets.token_hex(8)}"
    temp = path.with_name(f".{INSTANCE_FILE}.{os.getpid()}")
    temp.write_text(made + "\n", encoding="ascii")
    temp.replace(path)
    return made


def rel_hash(rel: str) -> str:
    """The name a file's claim and done mark go by (any rel, any length, any bytes)."""
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape"), usedforsecurity=False).hexdigest()


def claims_folder(inbox: Path) -> Path:
    return inbox / CLAIMS_FOLDER


class Claim:
    """One file held by this daemon until `release`; renewed by the coordinator's thread."""

    def __init__(self, backend: ClaimBackend, inbox: Path, rel: str, token: str) -> None:
        self.backend = backend
        self.inbox = inbox
        self.rel = rel
        self.token = token  # what the backend compares to know the claim is still ours
        self.lost = False  # a renewal found it taken over: do not send; let it go
        self.released = False

    def renew(self) -> bool:
        """Extend the lease; False once it turned out lost. Raises CoordinationUnavailable."""
        if self.lost or self.released:
            return not self.lost
        if not self.backend.renew(self):
            self.lost = True
            log.warning("claim.lost", inbox=str(self.inbox), file=self.rel,
                        hint="another daemon took this file over (this one did not renew its "
                             "claim for a whole lease); it is left to that daemon")
        return not self.lost

    def release(self) -> None:
        """Let the file go (done, failed, gone or handed back). Never raises."""
        if self.released:
            return
        self.released = True
        if self.lost:
            return
        try:
            self.backend.release(self)
        except (CoordinationUnavailable, OSError) as exc:
            # The lease runs out by itself; until then nobody else takes the file.
            log.info("claim.release_failed", inbox=str(self.inbox), file=self.rel,
                     error=str(exc))

    def __repr__(self) -> str:
        return f"Claim({readable(self.rel)!r}, lost={self.lost}, released={self.released})"


class ClaimBackend(Protocol):
    def claim(self, inbox: Path, rel: str) -> Claim | None: ...

    def renew(self, claim: Claim) -> bool: ...

    def release(self, claim: Claim) -> None: ...

    def sweep(self, inbox: Path) -> None: ...

    def close(self) -> None: ...


# -- on the share ------------------------------------------------------------------------------


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
        # Claims being written are named after this daemon installation, so that a restart can
        # remove what a crash left half-done (anybody else's wait for the sweep).
        tag = hashlib.sha1((holder.instance or holder.daemon).encode(),
                           usedforsecurity=False).hexdigest()[:12]
        self.new_prefix = f"{NEW_PREFIX}{tag}."

    def ensure(self) -> None:
        if self._made:
            return
        try:
            self.path.mkdir(mode=0o777, exist_ok=True)  # the umask decides who else may write
        except OSError as exc:
            raise unavailable(self.inbox, exc) from None
        self._made = True
        if self.holder.instance:
            with contextlib.suppress(OSError), os.scandir(self.path) as entries:
                for entry in entries:
                    if entry.name.startswith(self.new_prefix):  # left by our previous life
                        Path(entry.path).unlink(missing_ok=True)

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
        self._lock = threading.Lock()

    def folder(self, inbox: Path) -> ShareFolder:
        with self._lock:
            found = self._folders.get(inbox)
            if found is None:
                found = self._folders[inbox] = ShareFolder(inbox, self.holder, self.monotonic)
            return found

    def claim(self, inbox: Path, rel: str) -> Claim | None:
        folder = self.folder(inbox)
        folder.ensure()
        path = folder.path / f"{rel_hash(rel)}{CLAIM_SUFFIX}"
        try:
            try:
                return self._claim(folder, path, rel)
            except FileNotFoundError:
                folder.forget_made()  # the claims folder was removed by hand: make it again
                folder.ensure()
                return self._claim(folder, path, rel)
        except OSError as exc:
            raise unavailable(inbox, exc) from None

    def _claim(self, folder: ShareFolder, path: Path, rel: str) -> Claim | None:
        for _ in range(5):
            nonce = secrets.token_hex(8)
            if self._create(folder, path, rel, nonce):
                return Claim(self, folder.inbox, rel, nonce)
            seen = _read_claim(path)
            if seen is None:
                continue  # released meanwhile: try again
            mine = self.holder.left_by_my_previous_life(seen.holder)
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
        if seen is not None and seen.nonce == claim.token:
            path.unlink(missing_ok=True)

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
            folder.forget_clock()
            with contextlib.suppress(OSError):
                folder.path.rmdir()

    # -- inside --------------------------------------------------------------------------------

    def _content(self, rel: str, nonce: str) -> bytes:
        return (json.dumps({**self.holder.as_dict(), "nonce": nonce, "file": readable(rel),
                            "lease_seconds": self.lease_ns / 1e9,
                            "renewed": time.time()}) + "\n").encode()

    def _create(self, folder: ShareFolder, path: Path, rel: str, nonce: str) -> bool:
        """Create the claim file whole, or return False if it exists.

        Written to a private file first, then hard-linked to the claim's name: link() fails
        with EEXIST when the name exists, atomically (the NFS server decides), and a claim is
        never seen half-written, not even after its creator died. An NFS reply lost and
        retried can say EEXIST for a link that was made: the private file's link count tells.
        Where the share refuses hard links, O_CREAT|O_EXCL and then the write.
        """
        content = self._content(rel, nonce)
        if self._links:
            temp = path.with_name(f"{folder.new_prefix}{nonce}")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False  # another daemon is taking it over right now
        os.close(fd)
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
                    previous=_holder_label(seen.holder),
                    hint="its holder stopped renewing the claim for a whole lease (it died)")
        return True


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


def _holder_label(holder: dict[str, Any]) -> str:
    if not holder:
        return "unknown (the claim file was empty)"
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')}"


def unavailable(inbox: Path, exc: OSError) -> CoordinationUnavailable:
    return CoordinationUnavailable(
        f"cannot use the claims folder {claims_folder(inbox)}: {exc.strerror or exc}")


# -- in the store ------------------------------------------------------------------------------

# Which run of the store this is (`run_id`) and since when (`uptime`, us, or nil). INFO may be
# refused to an ACL user without @dangerous: then run_id is 'unknown' and only a store that
# lost everything (a missing key) is noticed, not one restored from an older snapshot.
STORE_RUN = """
local run_id, uptime = 'unknown', nil
local info = redis.pcall('INFO', 'server')
if type(info) == 'string' then
  run_id = string.match(info, 'run_id:(%w+)') or 'unknown'
  local up = string.match(info, 'uptime_in_seconds:(%d+)')
  if up then uptime = tonumber(up) * 1000000 end
end
"""

# After the store lost its data (restarted empty, or a failover), every live holder renews its
# claims within lease/3, re-creating them; until one lease has passed since the store started,
# nobody may take a new claim, so a live holder's file cannot be claimed by someone else first.
# KEYS[2] the store's run_id when last seen, KEYS[3] the grace key. Sets `grace` true or false.
_GRACE = STORE_RUN + """
local seen = redis.call('GET', KEYS[2])
if seen ~= run_id then
  local ends = now + lease  -- empty for long (first use, a flush): nothing says since when
  if uptime and (seen or uptime < lease) then ends = now - uptime + lease end
  redis.call('SET', KEYS[2], run_id)
  if ends > now then
    redis.call('SET', KEYS[3], '1', 'PX', math.ceil((ends - now) / 1000))
  end
end
local grace = redis.call('EXISTS', KEYS[3]) == 1
"""

# KEYS: 1 the claim, 2 run_id seen, 3 grace; ARGV: lease in microseconds, our token, and a
# value to replace even if live (a claim left by our own previous life) or "". Value:
# "<expires_us>|<token>". Returns {1, previous value or ""} when ours now, {0, current value
# or ""} when held by a live claim (or during the grace after a store reset).
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
""" + _GRACE + """
local current = redis.call('GET', KEYS[1])
local forced = ARGV[3] ~= '' and current == ARGV[3]
if grace and not forced then
  return {0, current or ''}
end
if current and not forced then
  local expires = tonumber(string.match(current, '^(%d+)|'))
  if expires and expires > now then
    return {0, current}
  end
end
redis.call('SET', KEYS[1], string.format('%.0f|', now + lease) .. ARGV[2],
           'PX', math.floor(2 * lease / 1000) + 1000)
return {1, current or ''}
"""

# KEYS: as _CLAIM; ARGV: lease in microseconds, our token. 1 renewed (or re-created after a
# store reset), 0 not ours any more.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
""" + _GRACE + """
local current = redis.call('GET', KEYS[1])
if current then
  if string.match(current, '^%d+|(.*)$') ~= ARGV[2] then return 0 end
elseif not grace then
  return 0  -- expired two leases ago: whoever took it over may have finished it
end
redis.call('SET', KEYS[1], string.format('%.0f|', now + lease) .. ARGV[2],
           'PX', math.floor(2 * lease / 1000) + 1000)
return 1
"""

# KEYS[1] the claim; ARGV[1] our token. 1 deleted, 0 not ours.
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and string.match(current, '^%d+|(.*)$') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


GRACE_KEYS = ("watchfolder:{claims}:run_id", "watchfolder:{claims}:grace")


class StoreClaims:
    """Claims as keys in the coordination store, expiring by the store's clock."""

    def __init__(self, store: Store, holder: Holder, lease_seconds: float,
                 share: ShareClaims) -> None:
        self.store = store
        self.holder = holder
        self.lease_us = int(lease_seconds * 1e6)
        self.share = share  # for each inbox's id (its claims folder)
        self._ids: dict[Path, str] = {}
        self._claim = store.script(_CLAIM)
        self._renew = store.script(_RENEW)
        self._release = store.script(_RELEASE)

    def keys(self, inbox: Path, rel: str) -> list[str]:
        """The claim's key, and the two keys of the grace after a store reset."""
        return [self.key(inbox, rel), *GRACE_KEYS]

    def key(self, inbox: Path, rel: str) -> str:
        inbox_id = self._ids.get(inbox)
        if inbox_id is None:
            try:
                inbox_id = self._ids[inbox] = self.share.folder(inbox).inbox_id()
            except OSError as exc:
                raise unavailable(inbox, exc) from None
        return f"watchfolder:{{{inbox_id}}}:claim:{rel_hash(rel)}"

    def claim(self, inbox: Path, rel: str) -> Claim | None:
        token = json.dumps({**self.holder.as_dict(), "nonce": secrets.token_hex(8)})
        keys = self.keys(inbox, rel)
        ours, previous = self.store.run(self._claim, keys, [self.lease_us, token, ""])
        mine = False
        if not ours and previous and self.holder.left_by_my_previous_life(
                _store_holder(previous)):
            # Left by this daemon before its restart: replace exactly that claim, at once.
            ours, previous = self.store.run(self._claim, keys, [self.lease_us, token, previous])
            mine = bool(ours)
        if not ours:
            return None
        if mine:
            log.debug("claim.reclaimed", inbox=str(inbox), file=rel,
                      hint="left by this daemon before its restart")
        elif previous:
            holder = _store_holder(previous)
            log.warning("claim.taken_over", inbox=str(inbox), file=rel,
                        previous=_holder_label(holder),
                        hint="its holder stopped renewing the claim for a whole lease (it died)")
        return Claim(self, inbox, rel, token)

    def renew(self, claim: Claim) -> bool:
        return bool(self.store.run(self._renew, self.keys(claim.inbox, claim.rel),
                                   [self.lease_us, claim.token]))

    def release(self, claim: Claim) -> None:
        self.store.run(self._release, [self.key(claim.inbox, claim.rel)], [claim.token])

    def sweep(self, inbox: Path) -> None:
        """Nothing to sweep: the store expires dead claims itself."""

    def close(self) -> None:
        self.share.close()


def _store_holder(value: bytes | str) -> dict[str, Any]:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    with contextlib.suppress(ValueError):
        loaded = json.loads(text.partition("|")[2])
        if isinstance(loaded, dict):
            return loaded
    return {}


# -- done marks --------------------------------------------------------------------------------


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

