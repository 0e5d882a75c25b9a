"""The exceptions watchfolder raises, as one tree.

    WatchfolderError
    ├── ConfigError              the YAML is wrong; carries every problem with its path
    ├── StartupError             something else stops a start: another daemon on the state_dir,
    │   │                        the metrics address taken
    │   ├── JournalUnreadable    the journal cannot be opened or read (damaged, permissions)
    │   └── StateDirFull         the state_dir's disk has not the room to start on
    ├── InputRejected            a local check refused the file (costs no request): not an
    │                            image, too large, a link, not a regular file, unreadable
    ├── DestinationError         outbox / archive / errors not writable or gone: the file waits
    ├── SourceUnreadable         the inbox file cannot be read right now (EIO, ESTALE, EACCES):
    │                            retried with backoff, never taken for a change of the file
    ├── StateUnavailable         the journal (state_dir) cannot be written now: disk full, I/O
    │                            error; a pause, not a crash: the file waits
    ├── CoordinationUnavailable  the coordination store or the share's claims folder cannot be
    │                            reached: nothing is sent, the file waits
    └── ApiError                 the API (or the way to it) answered something else than a result
        ├── FileRejected         400, other 4xx: this file fails, go to errors
        │   └── FormatNotAcceptable  406: the API cannot produce the asked output_format
        ├── AccountError         401, 402, 403, 404: pause the whole queue, fail nothing
        │   ├── KeyMissing       401
        │   ├── CreditsExhausted 402
        │   ├── KeyRefused       403
        │   └── EndpointMissing  404/405: api.url points at something that is not the API
        └── Retryable            try again later; `delay` is the server's wish, if it said one
            ├── RateLimited      429: slows the shared limiter, never counts as an attempt
            ├── ServerError      5xx
            ├── TransportError   connection refused/reset, timeout
            └── BadResult        a 200 whose body does not decode or has the wrong size

`reason` is the short machine code written to error files and logs.
"""

from __future__ import annotations


class WatchfolderError(Exception):
    """Base of everything watchfolder raises on purpose."""

    reason = "error"


class ConfigError(WatchfolderError):
    """The configuration is invalid; `problems` lists each one as `path: what is wrong`."""

    reason = "config"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class StartupError(WatchfolderError):
    """The daemon cannot start for a reason that is not in the configuration file."""

    reason = "startup"

    def __init__(self, message: str) -> None:
        self.message = message
        self.problems = [message]  # printed like a ConfigError's
        super().__init__(message)


class JournalUnreadable(StartupError):
    """The journal in state_dir cannot be opened or read."""

    reason = "journal_unreadable"


class StateDirFull(StartupError):
    """The disk of state_dir is full (or nearly): the journal cannot be written."""

    reason = "state_full"


class InputRejected(WatchfolderError):
    """A local check refused the file before any request was spent."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(message)


class DestinationError(WatchfolderError):
    """A folder we must write to is missing or not writable; the file keeps waiting."""

    reason = "destination_unavailable"


class SourceUnreadable(WatchfolderError):
    """Reading or looking at a file in the inbox failed with an error of the source itself
    (EIO, ESTALE, EACCES): a transient, per-file problem; `errno` says which."""

    reason = "unreadable"

    def __init__(self, path: object, error: OSError) -> None:
        self.errno = error.errno
        self.message = f"cannot read the file: {error.strerror or error}"
        super().__init__(f"{path}: {self.message}")


class StateUnavailable(WatchfolderError):
    """A write of the journal (or the spool) in state_dir failed: disk full, I/O error. Nothing
    was changed; the caller waits and tries again."""

    reason = "state_unavailable"


class CoordinationUnavailable(WatchfolderError):
    """The coordination store (or the claims folder on the share) cannot be reached: the file
    waits, and no request is sent until it answers again."""

    reason = "coordination_unavailable"


class ApiError(WatchfolderError):
    """The API did not give us a usable result."""

    reason = "api_error"

    def __init__(self, message: str, status: int | None = None) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


class FileRejected(ApiError):
    """The API refused this file (or our request for it): permanent for this file."""

    reason = "api_rejected"


class FormatNotAcceptable(FileRejected):
    """406: the API will not produce the requested output format."""

    reason = "format_not_acceptable"


class AccountError(ApiError):
    """The account or endpoint refuses every request: pause, keep every file."""

    reason = "account"


class KeyMissing(AccountError):
    reason = "key_missing"


class CreditsExhausted(AccountError):
    reason = "no_credits"


class KeyRefused(AccountError):
    reason = "key_refused"


class EndpointMissing(AccountError):
    reason = "endpoint_missing"


class Retryable(ApiError):
    """A transient failure; `delay` is what the server asked for (seconds), if anything."""

    reason = "transient"

    def __init__(self, message: str, status: int | None = None, delay: float | None = None) -> None:
        super().__init__(message, status)
        self.delay = delay


class RateLimited(Retryable):
    reason = "rate_limited"


class ServerError(Retryable):
    reason = "server_error"


class TransportError(Retryable):
    reason = "transport_error"


class BadResult(Retryable):
    reason = "bad_result"
