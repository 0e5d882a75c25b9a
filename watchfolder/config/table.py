"""The settings table's vocabulary and its one reader.

A setting is a dataclass field made by one of the helpers below (`number`, `integer`, `flag`,
`choice`, `folder`, `argv`, `special`); its `Spec` (kind, bounds, README wording, redaction)
rides in the field's metadata. `Reader` reads a YAML mapping against such a dataclass and
collects every problem with its dotted path (`inboxes[0].settle_seconds: must be at least 0,
got -1`), expanding `${VAR}` references and reading secret files on the way. Keys of kind
`special` are read by hand by the section that owns them, with the same reader.

Nothing here knows which sections exist (settings.py and handoff.py do), touches the network
or starts a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from watchfolder.config.secret import Secret

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Spec:
    """How one configuration key is read, checked and shown."""

    # number | integer | flag | choice | folder | argv | special (read by hand)
    kind: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    required: bool = False  # folders only
    must_exist: bool = False  # folders only
    shown: str | None = None  # how the README states the default, when not the value itself
    secret: bool = False  # check-config shows where it came from, never the value
    maximum: float | None = None


def _setting(default: Any = None, *, factory: Any = None, hidden: bool = False,
             **spec: Any) -> Any:
    """A field carrying its Spec; `hidden` keeps it out of the dataclass's repr."""
    metadata = {"spec": Spec(**spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not hidden)
    return field(default=default, metadata=metadata, repr=not hidden)


def number(default: float, minimum: float, **kw: Any) -> Any:
    return _setting(default, kind="number", minimum=minimum, **kw)


def integer(default: int | None, minimum: int, **kw: Any) -> Any:
    return _setting(default, kind="integer", minimum=minimum, **kw)


def flag(default: bool) -> Any:
    return _setting(default, kind="flag")


def choice(default: str | None, choices: tuple[str, ...], **kw: Any) -> Any:
    return _setting(default, kind="choice", choices=choices, **kw)


def folder(*, required: bool, must_exist: bool = False, **kw: Any) -> Any:
    return _setting(None, kind="folder", required=required, must_exist=must_exist, **kw)


def argv(**kw: Any) -> Any:
    """A command as a list of strings (never a shell string); its program must exist."""
    return _setting(None, kind="argv", **kw)


def special(default: Any = None, **kw: Any) -> Any:
    return _setting(default, kind="special", **kw)


def not_a_key(default: Any) -> Any:
    """A field computed from other keys (never read from the YAML, never shown)."""
    return field(default=default)


def spec_of(f: Field[Any]) -> Spec | None:
    spec = f.metadata.get("spec")
    return spec if isinstance(spec, Spec) else None


def table_keys(cls: type) -> set[str]:
    """The keys a section's dataclass declares."""
    return {f.name for f in fields(cls) if spec_of(f) is not None}


def shown_default(f: Field[Any]) -> str:
    """A key's default as the README states it (`60`, `true`, none, required, or its words)."""
    spec = spec_of(f)
    assert spec is not None
    if spec.shown is not None:
        return spec.shown
    if spec.kind == "folder":
        return "required" if spec.required else "none"
    if spec.kind == "argv":
        return "none"
    value = f.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


# (key, path, allowed) → the text after "unknown key", e.g. " (did you mean 'outbox'?)"
Hint = Callable[[str, str, set[str]], str]


def known_keys(key: str, path: str, allowed: set[str]) -> str:
    """A hint listing every key the section knows."""
    return f" (known: {', '.join(sorted(allowed))})"


class Reader:
    """Reads YAML mappings against the table, collecting problems, each with its dotted path.

    `hint` words the end of an "unknown key" problem; a section may pass its own to `mapping`.
    Relative paths resolve against `base_dir` (the config file's folder).
    """

    def __init__(self, base_dir: Path, hint: Hint = known_keys) -> None:
        self.base_dir = base_dir
        self.hint = hint
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: set[str], *,
                hint: Hint | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key),
                          "unknown key" + (hint or self.hint)(str(key), path, allowed))
        return value

    def section(self, raw: Any, path: str, cls: type, *, checked: bool = False,
                **given: Any) -> Any:
        """Read every table key of `cls` from `raw`; `given` are the special keys, read by hand.

        `checked`: `raw` already went through `mapping` (its unknown keys are reported).
        """
        data = raw if checked else self.mapping(raw, path, table_keys(cls))
        values = dict(given)
        for f in fields(cls):
            spec = spec_of(f)
            if spec is None or spec.kind == "special" or f.name in values:
                continue
            values[f.name] = self.value(data, f.name, path, spec, f.default)
        return cls(**values)

    def value(self, data: dict[str, Any], key: str, path: str, spec: Spec, default: Any) -> Any:
        where = f"{path}.{key}" if path else key
        if spec.kind == "folder":
            return self.folder(data, key, path, required=spec.required,
                               must_exist=spec.must_exist)
        value = data.get(key, default)
        if value is None and default is None and spec.kind != "flag":
            return None  # an optional key left out
        if spec.kind in ("number", "integer"):
            kind = int if spec.kind == "integer" else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                noun = "a whole number" if spec.kind == "integer" else "a number"
                self.fail(where, f"must be {noun}, got {value!r}")
                return default
            if spec.minimum is not None and value < spec.minimum:
                self.fail(where, f"must be at least {spec.minimum:g}, got {value}")
                return default
            if spec.maximum is not None and value > spec.maximum:
                self.fail(where, f"must be at most {spec.maximum:g}, got {value}")
                return default
            return value if spec.kind == "integer" else float(value)
        if spec.kind == "flag":
            if not isinstance(value, bool):
                self.fail(where, f"must be true or false, got {value!r}")
                return default
            return value
        if spec.kind == "choice":
            if value is not None and value not in spec.choices:
                self.fail(where, f"must be one of {', '.join(spec.choices)}; got {value!r}")
                return default
            return value
        if spec.kind == "argv":
            return self.argv(value, where)
        raise AssertionError(f"no reader for {spec.kind}")

    def text(self, data: dict[str, Any], key: str, path: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(f"{path}.{key}" if path else key, f"must be a string, got {value!r}")
            return None
        return self.expand(value, f"{path}.{key}" if path else key)

    def expand(self, value: str, path: str) -> str:
        """`value` with each `${VAR}` replaced by the environment's value (a problem if unset)."""
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                self.fail(path, f"environment variable {name} is not set "
                                f"(export it, or remove the ${{{name}}} reference)")
                return ""
            return os.environ[name]

        return ENV_REF.sub(sub, value)

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

    def argv(self, value: Any, where: str) -> tuple[str, ...] | None:
        if isinstance(value, str):
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; write {json.dumps(shlex.split(value))}"
            self.fail(where, f"must be a list of strings (an argv), not a shell string{hint}")
            return None
        if not isinstance(value, list) or not value:
            self.fail(where, "must be a non-empty list of strings (an argv)")
            return None
        items: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or (index == 0 and not item):
                self.fail(f"{where}[{index}]", f"must be a string, got {item!r}")
                return None
            items.append(self.expand(item, f"{where}[{index}]"))
        program = items[0]
        if "/" not in program:
            if program and shutil.which(program) is None:
                self.fail(f"{where}[0]", f"command {program!r} not found on PATH "
                                         f"(give its absolute path)")
        elif not program.startswith("/"):
            self.fail(f"{where}[0]", f"must be an absolute path or a command on PATH, "
                                     f"not {program!r}")
        elif not (Path(program).is_file() and os.access(program, os.X_OK)):
            self.fail(f"{where}[0]", f"{program} is not an executable file")
        return tuple(items)

    def inline_secret(self, value: Any, where: str) -> Secret:
        """A secret written in the YAML (`${VAR}` expanded); never echoed in a problem."""
        if not isinstance(value, str):
            self.fail(where, "must be a string")
            return Secret("")
        expanded = self.expand(value, where).strip()
        if not expanded and not ENV_REF.search(value):
            self.fail(where, "is empty")
        return Secret(expanded)

    def path(self, raw: str) -> Path:
        """A path from the YAML: `~` expanded, relative to the config file's folder."""
        path = Path(raw).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def secret_file(self, path: Path, where: str, *, noun: str = "") -> Secret:
        """A secret read from a file (stripped); `noun` names the file in problems."""
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            self.fail(where, f"cannot read {noun}{path}: "
                             f"{getattr(exc, 'strerror', None) or type(exc).__name__}")
            return Secret("")
        if not value:
            self.fail(where, f"{noun}{path} is empty")
        return Secret(value)
