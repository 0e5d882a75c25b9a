"""The web view's server: uvicorn in a thread of its own beside the workers.

The socket is bound in `WebServer()` (so a taken address is a `StartupError` before the daemon
does any work, as `metrics.listen` is), served from `start()`, and `stop()` ends the streams,
asks uvicorn to exit and joins its thread within a few seconds (the daemon's shutdown sequence
calls it first). uvicorn's own logging and access log are off: a URL may carry `?token=`.

uvicorn's `Server.serve` wakes ten times a second to look at its exit flag; an idle daemon
must cost next to nothing, so the thread runs uvicorn's `startup` and `shutdown` around an
event that `stop()` sets instead: no page open, no wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import TYPE_CHECKING

import structlog

from watchfolder.config.web import WebConfig
from watchfolder.errors import StartupError
from watchfolder.service.metrics import split_listen

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon

log = structlog.get_logger("watchfolder")


class WebServer:
    def __init__(self, daemon: Daemon, settings: WebConfig) -> None:
        import uvicorn

        from watchfolder.web.app import WebApp

        assert settings.listen is not None
        host, port = split_listen(settings.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise StartupError(f"web.listen: cannot listen on {settings.listen}: "
                               f"{exc.strerror or exc} (choose another address, or "
                               f"`web.listen: off`)") from None
        self.socket = sock
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.address = f"{shown}:{bound_port}"
        self.app = WebApp(daemon, settings, self.address)
        config = uvicorn.Config(self.app.asgi, log_config=None, access_log=False,
                                lifespan="off", interface="asgi3", proxy_headers=False,
                                timeout_graceful_shutdown=2,
                                server_header=False, date_header=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        """The address to open; on every interface, the loopback one of this machine."""
        host, _, port = self.address.rpartition(":")
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                        name="watchfolder-web", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)
        log.info("web.listening", url=self.url, read_only=not self.app.gate.token_set)

    async def _serve(self) -> None:
        server = self._server
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            if not server.config.loaded:
                server.config.load()
            server.lifespan = server.config.lifespan_class(server.config)
            await server.startup(sockets=[self.socket])
            await server.on_tick(0)  # sets the default response headers once
        finally:
            self._ready.set()
        await self._stop.wait()
        await server.shutdown(sockets=[self.socket])

    def configure(self, settings: WebConfig) -> None:
        """A reload's new token or hosts (the address is the same)."""
        self.app.configure(settings)

    def stop(self) -> None:
        self.app.stopping.set()
        self._server.should_exit = True
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended already
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5.0)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5.0)
        with contextlib.suppress(OSError):
            self.socket.close()
        self.app.close()


def bind(daemon: Daemon, settings: WebConfig) -> WebServer | None:
    """The server for `settings`, bound. The default address taken (several daemons on one
    host) is logged once and the daemon runs without the view (None); an address set in the
    configuration raises StartupError, as `metrics.listen` does."""
    try:
        return WebServer(daemon, settings)
    except StartupError as exc:
        if settings.listen_given:
            raise
        log.warning("web.unavailable", listen=settings.listen, error=exc.message,
                    hint="another program or watchfolder daemon uses it; set web.listen to "
                         "another address, or `web.listen: off`")
        return None
