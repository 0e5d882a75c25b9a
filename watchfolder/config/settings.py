"""YAML configuration → frozen dataclasses, with every default and every check in one place.

The dataclasses below are the table: each key's default, type, bounds and redaction are stated
once, in its field (the field kinds and the one `Reader` are table.py; the `hooks:` and
`webhook:` sections are handoff.py), and the reader, `check-config`'s output and the README's
reference follow from it (tests hold the README against `reference()` and
`handoff_reference()`). `load_config` validates the whole file and raises one `ConfigError`
listing every problem with its path (`inboxes[1].outbox: parent folder does not exist`), so a
user fixes them all in one go. Nothing here touches the network or starts a thread.

A new section: a frozen dataclass of table fields, a `Config` field made with
`field(default_factory=...)`, an entry in `SECTIONS`, `name=c.section(top.get("name"), "name",
TheConfig)` in `parse_config`, and its rows in the README's reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import string
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

import platformdirs
import yaml

from watchfolder.config.handoff import HookSettings, WebhookSettings, read_hooks, read_webhook
from watchfolder.config.secret import Secret, StoreUrl, store_url_problem
from watchfolder.config.table import (
    ENV_REF,
    Reader,
    choice,
    flag,
    folder,
    integer,
    not_a_key,
    number,
    shown_default,
    spec_of,
    special,
    table_keys,
)
from watchfolder.config.web import WebConfig, read_web
from watchfolder.errors import ConfigError

DEFAULT_URL = "https://clipdrop-api.co/remove-background/v1"
# output_format → what the API is asked for (the Accept header); TIFF is made locally from a PNG
OUTPUT_FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpg",
                  "tiff": "image/png"}
TRANSPARENCY_MODES = ("return_input_if_non_opaque", "discard_alpha_layer")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
CREDENTIAL_NAME = "clipdrop-api-key"


# -- the table: every key, its default, type, bounds and redaction, stated once ------------------


@dataclass(frozen=True)
class ApiConfig:
    url: str = special(DEFAULT_URL)
    key: Secret = special(factory=lambda: Secret(""), shown="none", secret=True)
    key_file: Path | None = special(shown="none", secret=True)
    requests_per_minute: int = integer(60, 1)
    concurrency: int = integer(8, 1)
    timeout_seconds: float = number(120.0, 0.1)
    connect_timeout_seconds: float = number(10.0, 0.1)
    low_credits_warning: int = integer(20, 0)
    max_credits_per_day: int | None = integer(None, 1, shown="none")
    key_source: str = not_a_key("none")  # where the key came from (never the key)


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = integer(5, 1)
    backoff_seconds: float = number(2.0, 0)
    max_backoff_seconds: float = number(300.0, 0)
    pause_seconds: float = number(300.0, 0.05)
    retry_after_cap_seconds: float = number(600.0, 0)


@dataclass(frozen=True)
class LogConfig:
    # None: console on a terminal, JSON otherwise
    format: str | None = choice(None, LOG_FORMATS, shown="console on a terminal, else `json`")
    level: str = choice("info", LOG_LEVELS)


@dataclass(frozen=True)
class MetricsConfig:
    # "127.0.0.1:9464" to serve Prometheus metrics
    listen: str | None = special(shown="off")


IMAGE_FORMATS = ("png", "webp", "jpeg", "tiff")
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg", "tiff": "tif"}
POSITIONS = ("center", "top", "bottom", "left", "right", "top-left", "top-right",
             "bottom-left", "bottom-right")
TOKENS = ("dir", "stem", "ext", "inbox", "date", "hash")
COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}
Colour = tuple[int, int, int]


RESULT_KEY_VERSION = "v1:"  # bump when the meaning of a field in the result key changes
_PLACEMENT = ("name", "outbox")  # where an output goes, not what it is


def _default(spec: Field[Any]) -> Any:
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return spec.default


@dataclass(frozen=True)
class OutputConfig:
    """One output of an inbox's recipe: made from the one answer for the file."""

    name: str = special("{dir}/{stem}.{ext}")
    format: str = choice("png", IMAGE_FORMATS)
    background: Colour | None = special(shown="transparent; white for `jpeg`")
    crop: str = choice("none", ("none", "subject"))
    margin: str = special("0", shown="`0`")
    size: tuple[int, int] | None = special(shown="none")
    position: str = choice("center", POSITIONS)
    max_size: int | None = integer(None, 1, shown="none")
    mask: bool = flag(False)
    dpi: int | None = integer(None, 1, shown="none")
    quality: int | None = integer(None, 1, maximum=100, shown="none")
    compression: int | None = integer(None, 1, maximum=9, shown="the inbox's `compression`")
    effort: int | None = integer(None, 0, maximum=6, shown="`4`")
    outbox: Path | None = folder(required=False, shown="the inbox's `outbox`")

    @property
    def ext(self) -> str:
        return EXTENSIONS[self.format]

    def result_settings(self) -> dict[str, Any]:
        """The fields that change this output's pixels or encoding (not where it goes),
        those at their default left out: part of the result key (`settings_key`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _PLACEMENT and getattr(self, f.name) != _default(f)}

    def margin_pixels(self) -> int:
        return 0 if self.margin.endswith("%") else int(self.margin)

    def margin_percent(self) -> float:
        return float(self.margin[:-1]) if self.margin.endswith("%") else 0.0

    def path(self, rel: str, ext: str, *, inbox: str, sha256: str, date: str) -> str:
        """The output's path below its outbox, from the name template."""
        parent = PurePosixPath(rel).parent
        folder = "" if str(parent) == "." else str(parent)
        template = self.name if folder else self.name.replace("{dir}/", "")
        return template.format(dir=folder, stem=PurePosixPath(rel).stem, ext=ext, inbox=inbox,
                               hash=sha256[:8], date=date).lstrip("/")


@dataclass(frozen=True)
class CoordinationConfig:
    # redis:// or rediss:// to share the rate limit, the pause and the claims between hosts
    url: StoreUrl | None = special(shown="none (claims on the share only)")
    lease_seconds: float = number(60.0, 5)

    @property
    def enabled(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class InboxConfig:
    path: Path = folder(required=True, must_exist=True)
    outbox: Path = folder(required=True)
    errors: Path = folder(required=True)
    archive: Path | None = folder(required=False)
    recursive: bool = flag(True)
    output_format: str = choice("png", tuple(OUTPUT_FORMATS))
    compression: int | None = integer(None, 1, maximum=9, shown="PNG `3`, TIFF `2`")
    transparency_handling: str = choice(TRANSPARENCY_MODES[0], TRANSPARENCY_MODES)
    settle_seconds: float = number(2.0, 0)
    polling: bool = flag(False)
    polling_interval_seconds: float = number(2.0, 0.05)
    studio: bool = flag(True)
    outputs: tuple[OutputConfig, ...] = special((), shown="one output in `output_format`")
    manifest: bool = flag(False)
    done_marker: bool = flag(False)
    review: bool = flag(False)

    @property
    def settings_key(self) -> str:
        """The settings that change the result, part of a result's identity: versioned JSON
        of named fields, each recipe output's without its defaults, so a field added later
        (with a default) keeps every result reusable."""
        settings: dict[str, Any] = {"format": self.output_format,
                                    "transparency": self.transparency_handling}
        if not self.studio:
            settings["api_only"] = True
        if self.outputs:
            settings["outputs"] = [output.result_settings() for output in self.outputs]
        return RESULT_KEY_VERSION + json.dumps(settings, sort_keys=True, separators=(",", ":"))

    @property
    def legacy_settings_key(self) -> str:
        """The key 0.2 journaled (a `repr` hash of the recipe), still looked up for reuse."""
        recipe = "" if not self.outputs else "|" + hashlib.sha256(
            repr(self.outputs).encode()).hexdigest()[:12]
        return (f"{self.output_format}|{self.transparency_handling}"
                + ("" if self.studio else "|api-only") + recipe)


@dataclass(frozen=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    web: WebConfig = field(default_factory=WebConfig)
    state_dir: Path = special(factory=lambda: default_state_dir(),
                              shown="`$STATE_DIRECTORY`, else `~/.local/state/watchfolder`")
    rescan_seconds: float = number(60.0, 0.05)
    shutdown_timeout_seconds: float = number(20.0, 0)
    journal_retention_days: float = number(30.0, 1)
    hooks: HookSettings | None = special(shown="none")
    webhook: WebhookSettings | None = special(shown="none")
    inboxes: tuple[InboxConfig, ...] = special(())
    source: Path | None = not_a_key(None)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets replaced by where they came from."""
        return _plain_fields(self)


SECTIONS: dict[str, type] = {"api": ApiConfig, "retry": RetryConfig, "log": LogConfig,
                             "metrics": MetricsConfig, "coordination": CoordinationConfig,
                             "web": WebConfig, "inboxes[]": InboxConfig,
                             "inboxes[].outputs[]": OutputConfig}


def keys_of(cls: type) -> set[str]:
    """The YAML keys a section accepts."""
    keys = table_keys(cls)
    if cls is Config:
        keys |= {name.rstrip("[]") for name in SECTIONS if "." not in name}
    return keys


def reference() -> dict[str, str]:
    """`dotted.key` → its default as the README's configuration reference states it."""
    table: dict[str, str] = {}
    for f in fields(Config):
        if spec_of(f) is not None and f.name != "inboxes":
            table[f.name] = shown_default(f)
    for prefix, cls in SECTIONS.items():
        for f in fields(cls):
            if spec_of(f) is not None:
                table[f"{prefix}.{f.name}"] = shown_default(f)
    return table


def _plain(obj: Any) -> Any:
    if isinstance(obj, StoreUrl):
        return obj.redacted()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return [_plain(item) for item in obj]
    if not hasattr(obj, "__dataclass_fields__"):
        return obj
    redacted = getattr(obj, "redacted", None)  # a section that shows itself (the webhook)
    return redacted() if redacted is not None else _plain_fields(obj)


def _plain_fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        spec = spec_of(f)
        if spec is None and f.name not in SECTIONS:
            continue
        value = getattr(obj, f.name)
        if spec is not None and spec.secret:
            if f.name == "key":
                out[f.name] = (f"<set, from {obj.key_source}>" if value else "<not set>")
            continue
        if f.name == "format" and value is None:
            value = "auto"
        out[f.name] = _plain(value)
    return out


def default_state_dir() -> Path:
    """systemd's StateDirectory= when set, else the per-user state folder."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path(platformdirs.user_state_dir("watchfolder"))


# -- reading ------------------------------------------------------------------------------------

def _hint(key: str, path: str, allowed: set[str]) -> str:
    """' (did you mean ...?)': a close key here, or the section where this key belongs."""
    import difflib

    here = re.sub(r"\[\d+\]", "[]", path)
    homes = [prefix for prefix, cls in SECTIONS.items() if key in keys_of(cls) and prefix != here]
    if key in keys_of(Config) and path:
        homes.insert(0, "the top level")
    if homes:
        return f" (it belongs under {' or '.join(homes)})"
    found = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.5)
    return f" (did you mean '{found[0]}'?)" if found else ""


def load_config(path: Path | str, *, require_key: bool = True, read_key: bool = True) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem.

    `read_key=False` reads all of it but the API key, for `status` and `requeue`: they never
    use the key, and the staff who run them usually cannot read it (a systemd credential) or
    do not have `${CLIPDROP_API_KEY}` set.
    """
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
    if not read_key and isinstance(raw, dict):
        # The tools never serve the web view either, nor need its token.
        raw = {k: v for k, v in raw.items() if k != "web"}
        if isinstance(raw.get("api"), dict):
            raw = {**raw, "api": {k: v for k, v in raw["api"].items()
                                  if k not in ("key", "key_file")}}
        require_key = False
    return parse_config(raw, base_dir=path.resolve().parent, source=path,
                        require_key=require_key)


def parse_config(raw: Any, *, base_dir: Path, source: Path | None = None,
                 require_key: bool = True) -> Config:
    """Validate already-parsed YAML data (relative paths resolve against base_dir)."""
    c = Reader(base_dir, hint=_hint)
    top = c.mapping(raw, "", keys_of(Config))
    if raw is None:
        c.fail("config", "the file is empty; it needs at least an `inboxes:` list")

    api_raw = c.mapping(top.get("api"), "api", keys_of(ApiConfig))
    key, key_source = _read_key(c, api_raw, require_key)
    url = c.text(api_raw, "url", "api") or DEFAULT_URL
    if not re.match(r"^https?://[^/\s]+", url):
        c.fail("api.url", f"must be an http(s) URL, got {url!r}")
    api = c.section(api_raw, "api", ApiConfig, checked=True, url=url, key=key,
                    key_source=key_source, key_file=None)

    metrics_raw = c.mapping(top.get("metrics"), "metrics", keys_of(MetricsConfig))
    listen = c.text(metrics_raw, "listen", "metrics")
    if listen is not None and not re.match(r"^[\w.\-\[\]:]*:\d+$", listen):
        c.fail("metrics.listen", f"must be host:port, e.g. 127.0.0.1:9464; got {listen!r}")

    state_raw = c.text(top, "state_dir", "")
    state_dir = default_state_dir() if not state_raw else Path(state_raw).expanduser()
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir

    config = c.section(
        top, "", Config, checked=True,
        hooks=read_hooks(c, top.get("hooks")),
        webhook=read_webhook(c, top.get("webhook")),
        inboxes=_read_inboxes(c, top.get("inboxes")),
        api=api,
        retry=c.section(top.get("retry"), "retry", RetryConfig),
        log=c.section(top.get("log"), "log", LogConfig),
        metrics=MetricsConfig(listen=listen),
        coordination=_read_coordination(c, top.get("coordination")),
        web=read_web(c, top.get("web")),
        state_dir=state_dir,
        source=source)
    if c.problems:
        raise ConfigError([p.lstrip(".") for p in c.problems])
    return config


def _read_coordination(c: Reader, raw: Any) -> CoordinationConfig:
    data = c.mapping(raw, "coordination", keys_of(CoordinationConfig))
    text = c.text(data, "url", "coordination")
    url = None
    if text:
        problem = store_url_problem(text)
        if problem is None:
            url = StoreUrl(text)
        else:
            c.fail("coordination.url", problem)
    return c.section(data, "coordination", CoordinationConfig, checked=True, url=url)


def _read_key(c: Reader, api_raw: dict[str, Any], require_key: bool) -> tuple[Secret, str]:
    inline = api_raw.get("key")
    key_file = c.text(api_raw, "key_file", "api")
    if inline is not None and key_file:
        c.fail("api.key", "set either api.key or api.key_file, not both")
    if inline is not None:
        if not isinstance(inline, str):
            c.fail("api.key", "must be a string")
            return Secret(""), "none"
        from_env = bool(ENV_REF.search(inline))
        return (c.inline_secret(inline, "api.key"),
                "environment" if from_env else "config file (inline)")
    if key_file:
        path = c.path(key_file)
        return c.secret_file(path, "api.key_file", noun="key file "), f"key_file {path}"
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        path = Path(creds) / CREDENTIAL_NAME
        return c.secret_file(path, "api.key_file", noun="key file "), "systemd credential"
    if require_key:
        c.fail("api.key", "no API key: set api.key (e.g. ${CLIPDROP_API_KEY}), api.key_file, "
                          f"or a systemd credential named {CREDENTIAL_NAME}")
    return Secret(""), "none"


def _read_inboxes(c: Reader, raw: Any) -> tuple[InboxConfig, ...]:
    if raw is None:
        c.fail("inboxes", "is required: a list of folders to watch")
        return ()
    if not isinstance(raw, list) or not raw:
        c.fail("inboxes", "must be a non-empty list")
        return ()
    inboxes: list[InboxConfig] = []
    seen: dict[Path, int] = {}
    for index, item in enumerate(raw):
        p = f"inboxes[{index}]"
        if not isinstance(item, dict):
            c.mapping(item, p, keys_of(InboxConfig))
            continue
        before = len(c.problems)
        c.mapping(item, p, keys_of(InboxConfig))
        values = {f.name: c.value(item, f.name, p, spec, f.default) for f in fields(InboxConfig)
                  if (spec := spec_of(f)) is not None and spec.kind != "special"}
        values["outputs"] = _read_outputs(c, item.get("outputs"), p)
        inbox_path, recursive = values["path"], values["recursive"]
        for name in ("outbox", "errors", "archive"):
            dest = values[name]
            if dest is None or inbox_path is None:
                continue
            if dest == inbox_path:
                c.fail(f"{p}.{name}", "must not be the inbox itself")
            elif recursive and inbox_path in dest.parents:
                c.fail(f"{p}.{name}", "must not be inside a recursive inbox "
                                      "(its files would be picked up again)")
        if inbox_path is not None:
            if inbox_path in seen:
                c.fail(f"{p}.path", f"same folder as inboxes[{seen[inbox_path]}]")
            seen.setdefault(inbox_path, index)
        if len(c.problems) == before:
            inboxes.append(InboxConfig(**values))
    return tuple(inboxes)


def _read_outputs(c: Reader, raw: Any, inbox: str) -> tuple[OutputConfig, ...]:
    """An inbox's `outputs:` list (none: one output in `output_format`)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        c.fail(f"{inbox}.outputs", "must be a non-empty list of outputs (or left out)")
        return ()
    outputs: list[OutputConfig] = []
    names: dict[tuple[str, str, Path | None], int] = {}
    for index, item in enumerate(raw):
        p = f"{inbox}.outputs[{index}]"
        data = c.mapping(item, p, keys_of(OutputConfig))
        if not isinstance(item, dict):
            continue
        values = {f.name: c.value(data, f.name, p, spec, f.default)
                  for f in fields(OutputConfig)
                  if (spec := spec_of(f)) is not None and spec.kind != "special"}
        name = c.text(data, "name", p) or "{dir}/{stem}.{ext}"
        for _, token, _, _ in string.Formatter().parse(name):
            if token is not None and token not in TOKENS:
                c.fail(f"{p}.name", f"unknown token {{{token}}}; the tokens are "
                                    + ", ".join(f"{{{t}}}" for t in TOKENS))
        if name.startswith("/") or ".." in PurePosixPath(name).parts:
            c.fail(f"{p}.name", "must stay below the outbox (no leading / and no ..)")
        values["name"] = name
        values["margin"] = _margin(c, data.get("margin"), f"{p}.margin")
        values["size"] = _size(c, data.get("size"), f"{p}.size")
        background = data.get("background")
        values["background"] = _colour(c, background, f"{p}.background")
        if values["format"] == "jpeg" and background is not None \
                and values["background"] is None and not values["mask"]:
            c.fail(f"{p}.background", "JPEG has no transparency: give a colour (the default "
                                      "is white) or choose png, webp or tiff")
        if values["format"] == "jpeg" and values["background"] is None:
            values["background"] = COLOURS["white"]
        if values["size"] is not None and values["max_size"] is not None:
            c.fail(f"{p}.max_size", "set either size (an exact canvas) or max_size, not both")
        key = (name, EXTENSIONS[values["format"]], values["outbox"])
        if (key in names and "{ext}" in name) or (name, "", values["outbox"]) in names:
            c.fail(f"{p}.name", f"always the same name as {inbox}.outputs[{names[key]}]: "
                                f"give each output its own name (e.g. {{stem}}_web.{{ext}})")
        names.setdefault(key, index)
        if "{ext}" not in name:
            names.setdefault((name, "", values["outbox"]), index)
        outputs.append(OutputConfig(**values))
    return tuple(outputs)


def _margin(c: Reader, raw: Any, where: str) -> str:
    if raw is None:
        return "0"
    text = str(raw).strip()
    if re.fullmatch(r"\d+", text) or re.fullmatch(r"\d+(\.\d+)?%", text):
        return text
    c.fail(where, f"must be pixels (20) or a percentage (5%), got {raw!r}")
    return "0"


def _size(c: Reader, raw: Any, where: str) -> tuple[int, int] | None:
    if raw is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(raw))
    if match is None or 0 in (int(match[1]), int(match[2])):
        c.fail(where, f"must be WIDTHxHEIGHT in pixels, e.g. 2000x2000; got {raw!r}")
        return None
    return int(match[1]), int(match[2])


def _colour(c: Reader, raw: Any, where: str) -> Colour | None:
    if raw is None or raw == "transparent":
        return None
    text = str(raw).strip().lower()
    if text in COLOURS:
        return COLOURS[text]
    match = re.fullmatch(r"#([0-9a-f]{6})", text)
    if match is None:
        c.fail(where, f"must be transparent, white, black or #rrggbb; got {raw!r}")
        return None
    value = int(match[1], 16)
    return (value >> 16, (value >> 8) & 255, value & 255)


def inline_key_readable_by_others(path: Path) -> bool:
    """True when the file holds a literal key and group/other may read it."""
    try:
        mode = path.stat().st_mode
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    key = (data.get("api") or {}).get("key") if isinstance(data, dict) else None
    if not isinstance(key, str) or not key or ENV_REF.fullmatch(key.strip()):
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))
