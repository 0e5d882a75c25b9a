"""The configuration table (config/settings.py, config/handoff.py) is the single statement of
every key and default: the README's reference, `check-config`'s output and the example config
must agree with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from watchfolder.config.handoff import handoff_reference
from watchfolder.config.settings import Config, keys_of, parse_config, reference

ROOT = Path(__file__).resolve().parent.parent


def readme_reference() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([^`]+)` \| (.+?) \| .* \|$", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_readme_states_every_key_with_the_tables_default() -> None:
    readme = readme_reference()
    table = reference()
    assert sorted(readme) == sorted(table), "keys missing from (or unknown to) the README"
    wrong = {key: (readme[key], table[key]) for key in table if readme[key] != table[key]}
    assert wrong == {}, "README default differs from the table: (README, table)"


def test_check_config_shows_every_key_of_the_table(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    config = parse_config({"inboxes": [{"path": "in", "outbox": "out", "errors": "err",
                                        "outputs": [{"format": "webp"}]}]},
                          base_dir=tmp_path, require_key=False)
    shown = config.redacted()
    for key in reference():
        section, _, name = key.partition(".")
        if not name:
            assert section in shown, key
        elif key.startswith("inboxes[].outputs[]."):
            assert key.rsplit(".", 1)[1] in shown["inboxes"][0]["outputs"][0], key
        elif section == "inboxes[]":
            assert name in shown["inboxes"][0] or name == "key_file", key
        elif name != "key_file":  # shown as the key's source, never as a path of its own
            assert name in shown[section], key
    assert set(shown) == keys_of(Config)


def test_the_example_config_uses_only_keys_of_the_table() -> None:
    raw = yaml.safe_load((ROOT / "daemon.yaml.example").read_text(encoding="utf-8"))
    table = reference()
    for key, value in raw.items():
        if isinstance(value, dict):
            for inner in value:
                assert f"{key}.{inner}" in table, f"{key}.{inner}"
        elif key == "inboxes":
            for inbox in value:
                for inner in inbox:
                    assert f"inboxes[].{inner}" in table, inner
        else:
            assert key in table, key


def test_readme_states_the_hand_off_keys_with_the_tables_defaults() -> None:
    """The `hooks` and `webhook` rows name every key of their section, each default as
    `key` (value), and no key or default the table does not have."""
    readme = readme_reference()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {match[1]: match[2] for match in re.finditer(r"^\| `(hooks|webhook)` \| .+? \| (.+) \|$",
                                                         text, re.MULTILINE)}
    assert sorted(rows) == ["hooks", "webhook"]
    table = handoff_reference()
    for section, row in rows.items():
        keys = {key.split(".", 1)[1]: shown for key, shown in table.items()
                if key.startswith(f"{section}.")}
        named = set(re.findall(r"`([a-z_]+)`", row))
        assert named == set(keys), f"{section}: keys the README names (README, table)"
        # a default is one word in brackets: `retries` (3), not `on_done` (argv lists, ...)
        stated = dict(re.findall(r"`([a-z_]+)` \(([^)\s]+)\)", row))
        defaults = {key: shown.strip("`") for key, shown in keys.items()
                    if shown.startswith("`")}
        assert stated == defaults, f"{section}: README defaults (README, table)"
        assert readme[section] == reference()[section]


def test_the_config_package_imports_nothing_but_itself_and_errors() -> None:
    """Reading a config must not load the hand-off's threads and SQLite, nor anything else."""
    code = ("import sys, watchfolder.config.settings; "
            "print(' '.join(m for m in sys.modules if m.startswith('watchfolder')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    loaded = set(done.stdout.split())
    outside = {m for m in loaded if m not in ("watchfolder", "watchfolder.errors")
               and not m.startswith("watchfolder.config")}
    assert outside == set()
