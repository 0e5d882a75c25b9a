"""Command line: argument parsing, exit codes, logging and signals. No business logic here.

Exit codes: 0 success; 1 some files went to errors (--once); 2 usage or configuration error;
3 an account problem (401/402/403) or the daily budget stopped a --once run with files still
waiting.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import structlog
import yaml

from watchfolder import __version__, logs
from watchfolder.config.settings import Config, inline_key_readable_by_others, load_config
from watchfolder.errors import ConfigError, JournalUnreadable, StartupError
from watchfolder.files.requeue import report, requeue
from watchfolder.journal.reset import reset_journal
from watchfolder.service import allocator, status
from watchfolder.service.daemon import EXIT_USAGE, Daemon
from watchfolder.service.notify import Notifier
from watchfolder.service.progress import ProgressLine
from watchfolder.service.runloop import STATUS_SECONDS, supervise

log = structlog.get_logger("watchfolder")

DESCRIPTION = """\
watchfolder watches inbox folders, sends each complete image to the Clipdrop
remove-background API, writes the cut-out to an outbox, archives the original,
and moves anything that fails to an errors folder with a JSON reason file."""

EPILOG = """\
examples:
  watchfolder demo                                 try it end to end, no key needed
  watchfolder check-config --config daemon.yaml    validate and show the configuration
  watchfolder run --config daemon.yaml             run until SIGTERM / Ctrl-C
  watchfolder run --config daemon.yaml --once      process what is there now, then exit
  watchfolder status --config daemon.yaml          waiting, in flight, done, failed, paused
  watchfolder requeue --config daemon.yaml         put failed files back in their inbox
  watchfolder sandbox --port 8765                  a local stand-in for the API
  watchfolder coordination adopt --config daemon.yaml
                                                   skip a new store's first-minute hold

exit codes: 0 ok, 1 some files failed (--once), 2 usage/config error,
            3 account problem (bad key, no credits) or the daily budget
              stopped a --once run"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watchfolder", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"watchfolder {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_daemon_commands(commands)
    _add_admin_commands(commands)
    _add_tools(commands)
    return parser


def _add_daemon_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`run` and `check-config`."""
    run = commands.add_parser(
        "run", help="watch the inboxes and process files",
        description="Watch the configured inboxes and process every complete file. Runs until "
                    "SIGTERM or SIGINT (a second signal forces the exit); SIGHUP re-reads the "
                    "configuration. Speaks systemd's sd_notify when $NOTIFY_SOCKET is set.")
    _config_argument(run)
    run.add_argument("--once", action="store_true",
                     help="process the files in the inboxes now, wait for them, then exit "
                          "(0 all done, 1 some failed, 3 account problem or budget)")
    run.add_argument("--log-format", choices=("json", "console"),
                     help="override log.format from the configuration")
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check-config", help="validate the configuration and print it (key hidden)",
        description="Validate the configuration file and print the effective configuration, "
                    "with every default filled in and the API key hidden. Exits 2 and lists "
                    "every problem when it is invalid.")
    _config_argument(check)
    check.set_defaults(handler=cmd_check_config)


def _add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """What an admin runs beside the daemon: status, requeue, reset-journal, coordination."""
    status_parser = commands.add_parser(
        "status", help="show what is waiting, in flight, done today, failed, paused",
        description="Show what the daemon is doing (or left when it stopped): files waiting, "
                    "in flight and new in the inboxes, done and failed today with the last "
                    "reasons, the pause and its reason, the credits last seen. Reads the journal "
                    "read-only; works whether the daemon runs or not, and needs no API key.")
    _config_argument(status_parser)
    status_parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    status_parser.set_defaults(handler=cmd_status)

    requeue_parser = commands.add_parser(
        "requeue", help="put files from errors back into their inbox",
        description="Move failed files from the errors folders back into their inbox at their "
                    "original relative path and remove their reason file, once the cause is "
                    "fixed. Never overwrites a file already in the inbox (it is skipped and "
                    "reported). Exits 1 if some file was skipped.")
    _config_argument(requeue_parser)
    requeue_parser.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                                help="files in errors, or their .error.json (default: everything "
                                     "in every errors folder)")
    requeue_parser.add_argument("--dry-run", action="store_true",
                                help="say what would be moved, move nothing")
    requeue_parser.set_defaults(handler=cmd_requeue)

    reset_parser = commands.add_parser(
        "reset-journal", help="move a damaged journal aside and rebuild it from the folders",
        description="When the journal is damaged (the daemon refuses to start and says so), "
                    "move it and the result spool aside (nothing is deleted) and start a new "
                    "journal from what the folders show: files kept in place that already have "
                    "their result are recorded as done, archived originals with a result as "
                    "reusable. Everything else in the inboxes is processed again. The daemon "
                    "must be stopped.")
    _config_argument(reset_parser)
    reset_parser.set_defaults(handler=cmd_reset_journal)

    coordination = commands.add_parser(
        "coordination", help="the coordination store shared by several daemons",
        description="Commands about the coordination store (coordination.url).")
    actions = coordination.add_subparsers(dest="action", metavar="ACTION", required=True)
    adopt = actions.add_parser(
        "adopt", help="skip the first-minute hold of a store new to this API key",
        description="A store that is new to the API key (first use, a FLUSHALL) or restarted "
                    "empty holds new claims and sends for up to a minute, because it cannot "
                    "know when sends it never saw were made. If you know that no daemon sent "
                    "with this key in the last minute nor holds a claim, record that here and "
                    "the daemons start at once. Uses the config's coordination.url and API key "
                    "(only a hash of the key is written).")
    _config_argument(adopt)
    adopt.set_defaults(handler=cmd_coordination_adopt)


def _add_tools(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Not the daemon: the sandbox API and the demo."""
    from watchfolder.dev import sandbox

    sandbox_parser = commands.add_parser(
        "sandbox", help="run a local stand-in for the Clipdrop API, for trying and testing",
        description=(sandbox.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sandbox.add_arguments(sandbox_parser)
    sandbox_parser.set_defaults(handler=sandbox.run)

    from watchfolder.dev import demo

    demo_parser = commands.add_parser(
        "demo", help="see it work end to end: sandbox, sample images, no key needed",
        description="Create a demo folder, start the built-in sandbox API and the daemon, drop "
                    "sample studio shots (and one broken file) into the inbox and show where "
                    "each one goes. Keeps watching until Ctrl-C; --once exits after the samples.")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo.run)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, type=Path, metavar="FILE",
                        help="the YAML configuration (see daemon.yaml.example)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        _print_problems(args.config, exc.problems, hint=args.command != "check-config")
        return None


def _load_for_tools(args: argparse.Namespace) -> Config | None:
    """The configuration without the API key, for status, requeue and reset-journal: they
    never use it, and whoever runs them usually cannot read it. Their logs go to stderr
    (stdout is the command's answer)."""
    logs.configure(None, "warning")
    try:
        return load_config(args.config, read_key=False)
    except ConfigError as exc:
        _print_problems(args.config, exc.problems)
        return None


def _print_problems(path: Path, problems: list[str], *, hint: bool = True) -> None:
    noun = "problem" if len(problems) == 1 else "problems"
    print(f"watchfolder: {path}: {len(problems)} configuration {noun}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    if hint:
        print(f"Fix them and try again (`watchfolder check-config --config {path}` checks "
              f"without starting).", file=sys.stderr)


def _key_warnings(config: Config) -> list[str]:
    if config.source is not None and inline_key_readable_by_others(config.source):
        return [f"{config.source} holds the API key inline and other users can read it: "
                f"chmod 600 it, or use api.key_file / ${{CLIPDROP_API_KEY}} / a systemd "
                f"credential"]
    return []


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    print(f"# {args.config}: valid. Effective configuration (defaults filled in):")
    print(yaml.safe_dump(config.redacted(), sort_keys=False, allow_unicode=True), end="")
    for warning in _key_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_USAGE
    allocator.pin_thresholds()  # big freed blocks then leave the process (allocator.py)
    # `--once` on a terminal shows a live progress line; logs are written above it.
    progress = ProgressLine(sys.stderr) if args.once and sys.stderr.isatty() else None
    logs.configure(args.log_format or config.log.format, config.log.level,
                   stream=progress.stream() if progress else None)
    for warning in _key_warnings(config):
        log.warning("config.key_readable", message=warning)
    daemon = Daemon(config, once=args.once)
    notifier = Notifier.from_environment()
    signals = _SignalState(daemon)
    signals.install()
    notifier.status("starting: checking folders, opening the journal, scanning the inboxes")
    try:
        try:
            daemon.start()
        except ConfigError as exc:
            notifier.status(f"not started: {exc.problems[0]}")
            _print_problems(args.config, exc.problems)
            return EXIT_USAGE
        except StartupError as exc:
            notifier.status(f"not started: {exc.message}")
            print(f"watchfolder: cannot start: {exc.message}", file=sys.stderr)
            if isinstance(exc, JournalUnreadable):
                print(f"  fix: watchfolder reset-journal --config {args.config}",
                      file=sys.stderr)
            return EXIT_USAGE
        try:
            supervise(daemon, notifier, None if args.once else lambda: _reload(args, daemon),
                      status_seconds=0.5 if progress else STATUS_SECONDS,
                      on_tick=progress.update if progress else None)
        finally:
            daemon.stop()  # also after a bug in a reload: requests in flight may still finish
            if progress:
                progress.update(daemon.snapshot())
    finally:
        if progress:
            progress.close()
    return daemon.exit_code()


def cmd_coordination_adopt(args: argparse.Namespace) -> int:
    from watchfolder.coordination.coordinator import adopt_empty_store
    from watchfolder.errors import CoordinationUnavailable

    config = _load(args)
    if config is None:
        return EXIT_USAGE
    url = config.coordination.url
    if url is None:
        print(f"watchfolder: {args.config} has no coordination.url: there is no store to adopt",
              file=sys.stderr)
        return EXIT_USAGE
    logs.configure(None, "warning")
    try:
        adopt_empty_store(url, config.api.key.reveal())
    except CoordinationUnavailable as exc:
        print(f"watchfolder: {exc}", file=sys.stderr)
        return 1
    print(f"adopted {url.redacted()}: daemons using this API key claim and send at once, "
          f"without the first-minute hold")
    return 0


def _reload(args: argparse.Namespace, daemon: Daemon) -> bool:
    """Re-read the configuration; an invalid one is refused and the running one stays."""
    log.info("reload.requested", config=str(args.config))
    try:
        config = load_config(args.config)
        daemon.reload(config)
    except (ConfigError, StartupError) as exc:
        problems = exc.problems
    else:
        problems = []
    if problems:
        log.error("reload.rejected", config=str(args.config), problems=problems,
                  hint="the previous configuration keeps running; fix the file and reload again")
        return False
    logs.configure(args.log_format or config.log.format, config.log.level)
    for warning in _key_warnings(config):
        log.warning("config.key_readable", message=warning)
    return True


def cmd_reset_journal(args: argparse.Namespace) -> int:
    config = _load_for_tools(args)
    if config is None:
        return EXIT_USAGE
    try:
        lines = reset_journal(config)
    except StartupError as exc:
        print(f"watchfolder: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    for line in lines:
        print(line)
    print(f"journal rebuilt; start the daemon again (watchfolder run --config {args.config})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _load_for_tools(args)
    if config is None:
        return EXIT_USAGE
    try:
        report = status.collect(config)
    except StartupError as exc:
        print(f"watchfolder: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    print(status.to_json(report) if args.json else status.render(report, args.config))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    config = _load_for_tools(args)
    if config is None:
        return EXIT_USAGE
    outcomes = requeue(config, args.paths, dry_run=args.dry_run)
    for line in report(outcomes, dry_run=args.dry_run, config=args.config):
        print(line)
    return 1 if any(not outcome.requeued for outcome in outcomes) else 0


class _SignalState:
    """The first SIGTERM/SIGINT asks for a graceful stop; a second forces the exit; SIGHUP
    asks for a reload.

    Python runs a handler in the main thread at its next bytecode, and two signals that
    arrive before then run it once: a main thread slow to get the CPU on a loaded machine
    turned "stop now" into a graceful stop waiting for a hung request. So the handlers do
    nothing; the interpreter writes each signal's number to a pipe as it arrives
    (`signal.set_wakeup_fd`, one byte per delivery), and a thread of our own reads the pipe
    and acts on every byte at once, whatever the main thread is doing.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.count = 0

    def install(self) -> None:
        read, write = os.pipe()
        os.set_blocking(write, False)  # a full pipe drops a byte rather than block a handler
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _noted)
        threading.Thread(target=self._listen, args=(read,), name="watchfolder-signals",
                         daemon=True).start()

    def _listen(self, fd: int) -> None:
        while True:
            for signum in os.read(fd, 64):
                self.handle(signum)

    def handle(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.daemon.request_reload()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.count += 1
            if self.count > 1:
                os._exit(128 + signum)  # the user insists: journal is consistent at every step
            self.daemon.request_stop()


def _noted(signum: int, frame: FrameType | None) -> None:
    """Nothing to do here: the wakeup pipe has carried the signal to `_SignalState`."""


if __name__ == "__main__":
    sys.exit(main())
