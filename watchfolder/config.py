"""YAML configuration → frozen dataclasses, with every default and every check in one place.

`load_config` validates the whole file and raises one `ConfigError` listing every problem
with its path (`inboxes[1].outbox: parent folder does not exist`), so a user fixes them all
in one go. Nothing here touches the network or starts a thread.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import yaml

from watchfolder.errors import ConfigError

DEFAULT_URL = "https://clipdrop-api.co/remove-background/v1"
OUTPUT_FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpg"}
TRANSPARENCY_MODES = ("return_input_if_non_opaque", "discard_alpha_layer")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
CREDENTIAL_NAME = "clipdrop-api-key"


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class ApiConfig:
    url: str = DEFAULT_URL
    key: Secret = field(default_factory=lambda: Secret(""))
    key_source: str = "none"  # where the key came from, for check-config (never the key)
    requests_per_minute: int = 60
    concurrency: int = 8
    timeout_seconds: float = 120.0
    connect_timeout_seconds: float = 10.0
    low_credits_warning: int = 20


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    backoff_seconds: float = 2.0
    max_backoff_seconds: float = 300.0
    pause_seconds: float = 300.0
    retry_after_cap_seconds: float = 600.0


@dataclass(frozen=True)
class LogConfig:
    format: str | None = None  # None: console on a terminal, JSON otherwise
    level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "127.0.0.1:9464" to serve Prometheus metrics


@dataclass(frozen=True)
class InboxConfig:
    path: Path
    outbox: Path
    errors: Path
    archive: Path | None = None
    recursive: bool = True
    output_format: str = "png"
    transparency_handling: str = "return_input_if_non_opaque"
    settle_seconds: float = 2.0
    polling: bool = False
    polling_interval_seconds: float = 2.0

    @property
    def settings_key(self) -> str:
        """The settings that change the result, part of a result's identity."""
        return f"{self.output_format}|{self.transparency_handling}"


@dataclass(frozen=True)
class Config:
    inboxes: tuple[InboxConfig, ...]
    api: ApiConfig = field(default_factory=ApiConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    rescan_seconds: float = 60.0
    shutdown_timeout_seconds: float = 20.0
    source: Path | None = None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, key replaced by a marker."""
        return {
            "api": {
                "url": self.api.url,
                "key": f"<set, from {self.api.key_source}>" if self.api.key else "<not set>",
                "requests_per_minute": self.api.requests_per_minute,
                "concurrency": self.api.concurrency,
                "timeout_seconds": self.api.timeout_seconds,
                "connect_timeout_seconds": self.api.connect_timeout_seconds,
                "low_credits_warning": self.api.low_credits_warning,
            },
            "retry": vars_of(self.retry),
            "state_dir": str(self.state_dir),
            "rescan_seconds": self.rescan_seconds,
            "shutdown_timeout_seconds": self.shutdown_timeout_seconds,
            "log": {"format": self.log.format or "auto", "level": self.log.level},
            "metrics": {"listen": self.metrics.listen},
            "inboxes": [
                {k: (str(v) if isinstance(v, Path) else v) for k, v in vars_of(i).items()}
                for i in self.inboxes
            ],
        }


def vars_of(obj: object) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}  # type: ignore[attr-defined]


def default_state_dir() -> Path:
    """systemd's StateDirectory= when set, else the per-user state folder."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path(platformdirs.user_state_dir("watchfolder"))


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Checker:
    """Collects problems while reading a YAML mapping, each with its dotted path."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                hint = _close_match(str(key), allowed)
                self.fail(f"{path}.{key}" if path else str(key),
                          "unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
        return value

    def number(self, data: dict[str, Any], key: str, path: str, default: float, *,
               minimum: float, integer: bool = False) -> Any:
        value = data.get(key, default)
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            self.fail(f"{path}.{key}", f"must be {'a whole number' if integer else 'a number'}, "
                                       f"got {value!r}")
            return default
        if value < minimum:
            self.fail(f"{path}.{key}", f"must be at least {minimum}, got {value}")
            return default
        return value

    def boolean(self, data: dict[str, Any], key: str, path: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{path}.{key}", f"must be true or false, got {value!r}")
            return default
        return value

    def choice(self, data: dict[str, Any], key: str, path: str, default: Any,
               choices: tuple[str, ...] | list[str]) -> Any:
        value = data.get(key, default)
        if value is not None and value not in choices:
            self.fail(f"{path}.{key}", f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def text(self, data: dict[str, Any], key: str, path: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(f"{path}.{key}", f"must be a string, got {value!r}")
            return None
        return self.expand(value, f"{path}.{key}")

    def expand(self, value: str, path: str) -> str:
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                self.fail(path, f"environment variable {name} is not set "
                                f"(export it, or remove the ${{{name}}} reference)")
                return ""
            return os.environ[name]

        return _ENV_REF.sub(sub, value)

    def folder(self, data: dict[str, Any], key: str, path: str, *, required: bool,
               must_exist: bool) -> Path | None:
        raw = self.text(data, key, path)
        if raw is None or raw == "":
            if required:
                self.fail(f"{path}.{key}", "is required")
            return None
        folder = Path(raw).expanduser()
        if not folder.is_absolute():
            folder = self.base_dir / folder
        folder = Path(os.path.normpath(folder))
        if folder.exists():
            if not folder.is_dir():
                self.fail(f"{path}.{key}", f"{folder} is not a folder")
        elif must_exist:
            self.fail(f"{path}.{key}", f"folder {folder} does not exist (create it first)")
        elif not folder.parent.is_dir():
            self.fail(f"{path}.{key}", f"parent folder {folder.parent} does not exist")
        return folder


def _close_match(word: str, options: set[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.5)
    return found[0] if found else None


_TOP_KEYS = {"api", "retry", "state_dir", "log", "inboxes", "metrics", "rescan_seconds",
             "shutdown_timeout_seconds"}
_API_KEYS = {"url", "key", "key_file", "requests_per_minute", "concurrency", "timeout_seconds",
             "connect_timeout_seconds", "low_credits_warning"}
_RETRY_KEYS = {"max_attempts", "backoff_seconds", "max_backoff_seconds", "pause_seconds",
               "retry_after_cap_seconds"}
_INBOX_KEYS = {"path", "outbox", "errors", "archive", "recursive", "output_format",
               "transparency_handling", "settle_seconds", "polling", "polling_interval_seconds"}


def load_config(path: Path | str, *, require_key: bool = True) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found (pass --config with the path to your "
                           f"daemon.yaml; see daemon.yaml.example)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_config(raw, base_dir=path.resolve().parent, source=path,
                        require_key=require_key)


def parse_config(raw: Any, *, base_dir: Path, source: Path | None = None,
                 require_key: bool = True) -> Config:
    """Validate already-parsed YAML data (relative paths resolve against base_dir)."""
    c = _Checker(base_dir)
    top = c.mapping(raw, "", _TOP_KEYS)
    if raw is None:
        c.fail("config", "the file is empty; it needs at least an `inboxes:` list")

    api_raw = c.mapping(top.get("api"), "api", _API_KEYS)
    key, key_source = _read_key(c, api_raw, require_key)
    url = c.text(api_raw, "url", "api") or DEFAULT_URL
    if not re.match(r"^https?://[^/\s]+", url):
        c.fail("api.url", f"must be an http(s) URL, got {url!r}")
    api = ApiConfig(
        url=url,
        key=key,
        key_source=key_source,
        requests_per_minute=c.number(api_raw, "requests_per_minute", "api", 60, minimum=1,
                                     integer=True),
        concurrency=c.number(api_raw, "concurrency", "api", 8, minimum=1, integer=True),
        timeout_seconds=float(c.number(api_raw, "timeout_seconds", "api", 120, minimum=0.1)),
        connect_timeout_seconds=float(c.number(api_raw, "connect_timeout_seconds", "api", 10,
                                               minimum=0.1)),
        low_credits_warning=c.number(api_raw, "low_credits_warning", "api", 20, minimum=0,
                                     integer=True),
    )

    retry_raw = c.mapping(top.get("retry"), "retry", _RETRY_KEYS)
    retry = RetryConfig(
        max_attempts=c.number(retry_raw, "max_attempts", "retry", 5, minimum=1, integer=True),
        backoff_seconds=float(c.number(retry_raw, "backoff_seconds", "retry", 2, minimum=0)),
        max_backoff_seconds=float(c.number(retry_raw, "max_backoff_seconds", "retry", 300,
                                           minimum=0)),
        pause_seconds=float(c.number(retry_raw, "pause_seconds", "retry", 300, minimum=0.05)),
        retry_after_cap_seconds=float(c.number(retry_raw, "retry_after_cap_seconds", "retry",
                                               600, minimum=0)),
    )

    log_raw = c.mapping(top.get("log"), "log", {"format", "level"})
    log = LogConfig(format=c.choice(log_raw, "format", "log", None, LOG_FORMATS),
                    level=c.choice(log_raw, "level", "log", "info", LOG_LEVELS))

    metrics_raw = c.mapping(top.get("metrics"), "metrics", {"listen"})
    listen = c.text(metrics_raw, "listen", "metrics")
    if listen is not None and not re.match(r"^[\w.\-\[\]:]*:\d+$", listen):
        c.fail("metrics.listen", f"must be host:port, e.g. 127.0.0.1:9464; got {listen!r}")

    state_raw = c.text(top, "state_dir", "")
    state_dir = default_state_dir() if not state_raw else Path(state_raw).expanduser()
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir

    inboxes = _read_inboxes(c, top.get("inboxes"))

    config = Config(
        inboxes=tuple(inboxes),
        api=api,
        retry=retry,
        log=log,
        metrics=MetricsConfig(listen=listen),
        state_dir=state_dir,
        rescan_seconds=float(c.number(top, "rescan_seconds", "", 60, minimum=0.05)),
        shutdown_timeout_seconds=float(c.number(top, "shutdown_timeout_seconds", "", 20,
                                                minimum=0)),
        source=source,
    )
    if c.problems:
        raise ConfigError([p.lstrip(".") for p in c.problems])
    return config


def _read_key(c: _Checker, api_raw: dict[str, Any], require_key: bool) -> tuple[Secret, str]:
    inline = api_raw.get("key")
    key_file = c.text(api_raw, "key_file", "api")
    if inline is not None and key_file:
        c.fail("api.key", "set either api.key or api.key_file, not both")
    if inline is not None:
        if not isinstance(inline, str):
            c.fail("api.key", "must be a string")
            return Secret(""), "none"
        from_env = bool(_ENV_REF.search(inline))
        value = c.expand(inline, "api.key").strip()
        if not value and not from_env:
            c.fail("api.key", "is empty")
        return Secret(value), ("environment" if from_env else "config file (inline)")
    if key_file:
        path = Path(key_file).expanduser()
        if not path.is_absolute():
            path = c.base_dir / path
        return _key_from_file(c, path, "api.key_file"), f"key_file {path}"
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        path = Path(creds) / CREDENTIAL_NAME
        return _key_from_file(c, path, "api.key_file"), "systemd credential"
    if require_key:
        c.fail("api.key", "no API key: set api.key (e.g. ${CLIPDROP_API_KEY}), api.key_file, "
                          f"or a systemd credential named {CREDENTIAL_NAME}")
    return Secret(""), "none"


def _key_from_file(c: _Checker, path: Path, where: str) -> Secret:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        c.fail(where, f"cannot read key file {path}: {exc.strerror}")
        return Secret("")
    if not value:
        c.fail(where, f"key file {path} is empty")
    return Secret(value)


def _read_inboxes(c: _Checker, raw: Any) -> list[InboxConfig]:
    if raw is None:
        c.fail("inboxes", "is required: a list of folders to watch")
        return []
    if not isinstance(raw, list) or not raw:
        c.fail("inboxes", "must be a non-empty list")
        return []
    inboxes: list[InboxConfig] = []
    for index, item in enumerate(raw):
        p = f"inboxes[{index}]"
        data = c.mapping(item, p, _INBOX_KEYS)
        if not isinstance(item, dict):
            continue
        inbox_path = c.folder(data, "path", p, required=True, must_exist=True)
        outbox = c.folder(data, "outbox", p, required=True, must_exist=False)
        errors = c.folder(data, "errors", p, required=True, must_exist=False)
        archive = c.folder(data, "archive", p, required=False, must_exist=False)
        fmt = c.choice(data, "output_format", p, "png", list(OUTPUT_FORMATS))
        mode = c.choice(data, "transparency_handling", p, TRANSPARENCY_MODES[0],
                        TRANSPARENCY_MODES)
        settle = c.number(data, "settle_seconds", p, 2.0, minimum=0)
        recursive = c.boolean(data, "recursive", p, True)
        polling = c.boolean(data, "polling", p, False)
        interval = c.number(data, "polling_interval_seconds", p, 2.0, minimum=0.05)
        if inbox_path is None or outbox is None or errors is None:
            continue
        for name, dest in (("outbox", outbox), ("errors", errors), ("archive", archive)):
            if dest is None:
                continue
            if dest == inbox_path:
                c.fail(f"{p}.{name}", "must not be the inbox itself")
            elif recursive and inbox_path in dest.parents:
                c.fail(f"{p}.{name}", "must not be inside a recursive inbox "
                                      "(its files would be picked up again)")
        inboxes.append(InboxConfig(
            path=inbox_path, outbox=outbox, errors=errors, archive=archive,
            recursive=recursive, output_format=fmt, transparency_handling=mode,
            settle_seconds=float(settle), polling=polling,
            polling_interval_seconds=float(interval)))
    seen: dict[Path, int] = {}
    for index, inbox in enumerate(inboxes):
        if inbox.path in seen:
            c.fail(f"inboxes[{index}].path", f"same folder as inboxes[{seen[inbox.path]}]")
        seen.setdefault(inbox.path, index)
    return inboxes


def inline_key_readable_by_others(path: Path) -> bool:
    """True when the file holds a literal key and group/other may read it."""
    try:
        mode = path.stat().st_mode
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    key = (data.get("api") or {}).get("key") if isinstance(data, dict) else None
    if not isinstance(key, str) or not key or _ENV_REF.fullmatch(key.strip()):
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))
