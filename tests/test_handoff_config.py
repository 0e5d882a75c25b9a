"""`hooks:` and `webhook:` validation: defaults, and every problem reported with its path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from watchfolder.config.handoff import HookSettings, WebhookSettings, parse_hooks, parse_webhook
from watchfolder.config.settings import Secret

SECRET = "whsec-0123456789abcdef"


def test_absent_sections_mean_no_hand_off() -> None:
    assert parse_hooks(None) == (None, [])
    assert parse_webhook(None) == (None, [])


def test_hooks_defaults() -> None:
    settings, problems = parse_hooks({"on_done": [sys.executable, "--version"]})
    assert problems == []
    assert settings == HookSettings(on_done=(sys.executable, "--version"), on_failed=None,
                                    timeout_seconds=60.0, max_parallel=4, retries=3)


def test_a_command_on_path_and_environment_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBLISH_TARGET", "shop-eu")
    settings, problems = parse_hooks({"on_failed": ["python3", "--target=${PUBLISH_TARGET}"],
                                      "timeout_seconds": 2.5, "max_parallel": 1, "retries": 0})
    assert problems == []
    assert settings is not None
    assert settings.on_failed == ("python3", "--target=shop-eu")
    assert (settings.timeout_seconds, settings.max_parallel, settings.retries) == (2.5, 1, 0)


def test_a_shell_string_is_refused_with_the_argv_to_write() -> None:
    _, problems = parse_hooks({"on_done": "/usr/local/bin/publish --fast"})
    assert problems == ['hooks.on_done: must be a list of strings (an argv), not a shell '
                        'string; write ["/usr/local/bin/publish", "--fast"]']


def test_every_hook_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    not_executable = tmp_path / "publish.sh"
    not_executable.write_text("#!/bin/sh\n")
    _, problems = parse_hooks({
        "on_done": [str(not_executable)],
        "on_failed": [],
        "timeout_seconds": 0,
        "max_parallel": 1.5,
        "retries": -1,
        "on_sucess": ["x"],
    })
    assert problems == [
        "hooks.on_sucess: unknown key (known: max_parallel, on_done, on_failed, retries, "
        "timeout_seconds)",
        f"hooks.on_done[0]: {not_executable} is not an executable file",
        "hooks.on_failed: must be a non-empty list of strings (an argv)",
        "hooks.timeout_seconds: must be at least 0.1, got 0",
        "hooks.max_parallel: must be a whole number, got 1.5",
        "hooks.retries: must be at least 0, got -1",
    ]


@pytest.mark.parametrize("argv, problem", [
    (["bin/publish"], "hooks.on_done[0]: must be an absolute path or a command on PATH, "
                      "not 'bin/publish'"),
    (["no-such-command-xq"], "hooks.on_done[0]: command 'no-such-command-xq' not found on "
                             "PATH (give its absolute path)"),
    ([sys.executable, 3], "hooks.on_done[1]: must be a string, got 3"),
    ([sys.executable, "${HANDOFF_UNSET_VAR}"], "hooks.on_done[1]: environment variable "
     "HANDOFF_UNSET_VAR is not set (export it, or remove the ${HANDOFF_UNSET_VAR} reference)"),
])
def test_bad_argv(argv: list[object], problem: str) -> None:
    assert parse_hooks({"on_done": argv})[1] == [problem]


def test_webhook_defaults_and_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    settings, problems = parse_webhook({"url": "http://192.168.1.20:8080/hook",
                                        "secret": "${WEBHOOK_SECRET}"})
    assert problems == []
    assert settings == WebhookSettings(url="http://192.168.1.20:8080/hook",
                                       secret=Secret(SECRET), timeout_seconds=10.0,
                                       connect_timeout_seconds=5.0, max_age_hours=24.0)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.redacted())
    assert settings.redacted()["secret"] == "<set>"


def test_webhook_secret_from_a_file_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "webhook.secret").write_text(SECRET + "\n")
    settings, problems = parse_webhook({"url": "https://example.com/wf",
                                        "secret_file": "webhook.secret"}, base_dir=tmp_path)
    assert problems == []
    assert settings is not None and settings.secret.reveal() == SECRET


def test_every_webhook_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    settings, problems = parse_webhook({"url": "ftp://user:pw@example.com/in?token=t",
                                        "secret": "${HANDOFF_UNSET_VAR}",
                                        "timeout_seconds": "fast", "max_age_hours": 0.5,
                                        "retries": 3})
    assert settings is None
    assert problems == [
        "webhook.retries: unknown key (known: connect_timeout_seconds, max_age_hours, secret, "
        "secret_file, timeout_seconds, url)",
        "webhook.url: must be an http(s) URL, got 'ftp://example.com/in'",
        "webhook.secret: environment variable HANDOFF_UNSET_VAR is not set (export it, or "
        "remove the ${HANDOFF_UNSET_VAR} reference)",
        "webhook.timeout_seconds: must be a number, got 'fast'",
        "webhook.max_age_hours: must be at least 1, got 0.5",
    ]
    _, problems = parse_webhook({"secret": SECRET, "secret_file": str(tmp_path / "s")})
    assert problems == ["webhook.url: is required: where to POST each manifest",
                        "webhook.secret: set either secret or secret_file, not both"]
    _, problems = parse_webhook({"url": "https://example.com/"})
    assert problems == ["webhook.secret: is required: the key that signs each delivery "
                        "(e.g. secret: ${WEBHOOK_SECRET}, or secret_file)"]
    _, problems = parse_webhook(["https://example.com/"])
    assert problems == ["webhook: must be a mapping, got list"]
