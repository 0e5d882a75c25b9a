"""The daemon's side of the web view (web/): when it is served, and what a reload changes.

Starlette and uvicorn are imported only when the view is served. `run --once` serves it only
when `web.listen` is set in the file (a script's run should not take the default port).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from watchfolder.config.settings import Config

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon
    from watchfolder.web.server import WebServer


def bind(daemon: Daemon, config: Config) -> WebServer | None:
    """The web view's server, bound (not yet serving), or None (off, `run --once` without
    `web.listen` in the file, or the default address taken: see web/server.py)."""
    if config.web.listen is None or (daemon.once and not config.web.listen_given):
        return None
    from watchfolder.web.server import bind as bind_server

    return bind_server(daemon, config.web)


def rebind(daemon: Daemon, old: Config, new: Config) -> WebServer | None:
    """For a reload: a server on the new address (bound before the old one is stopped), or
    the running one when the address did not change. Raises StartupError when taken."""
    if new.web.listen == old.web.listen:
        return daemon.web
    server = bind(daemon, new)
    if daemon.web is not None:
        daemon.web.stop()
    return server


def adopt(current: WebServer | None, chosen: WebServer | None,
          config: Config) -> WebServer | None:
    """Commit a reload's choice: the running server takes the new token and hosts (sessions
    of an old token end), a new one starts serving."""
    if chosen is not None and chosen is current:
        chosen.configure(config.web)
    elif chosen is not None:
        chosen.start()
    return chosen
