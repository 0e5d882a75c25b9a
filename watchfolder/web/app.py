"""The routes of the web view (Starlette), its security headers and its live stream.

Pages: `/` (the overview: inboxes, To review, Needs attention, Recent), `/file/{id}` (one
finished file), `/login`. Images and downloads: `/thumb/...`, `/download/...` by journal id,
`/failed/...` by inbox slot and path below its errors folder (files.py opens them, through
`paths.open_inside`). Actions (POST only, actions.py): `/pause`, `/resume`, `/pause-all`,
`/resume-all`, `/retry`, `/retry-all`, `/approve`, `/reject`. Live parts: `/events`,
server-sent events carrying the page's fragments as HTML, swapped in place by htmx's SSE
extension; one overview is made for every stream at once (`views.Live`).

Blocking work (the journal, folder scans, thumbnails) runs in worker threads, never on the
event loop; the pipeline's locks are never taken while a page renders.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

import anyio
import jinja2
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from watchfolder.config.web import WebConfig
from watchfolder.web import actions, views
from watchfolder.web.auth import COOKIE, Gate
from watchfolder.web.files import Files
from watchfolder.web.paths import Opened, Refused, open_inside, roots
from watchfolder.web.thumbs import Thumbnails

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon

log = structlog.get_logger("watchfolder")

HERE = Path(__file__).parent
CSP = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "object-src 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
STREAM_SECONDS = 0.5  # how often a live page looks for news (a file shows within 2 s)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class WebApp:
    def __init__(self, daemon: Daemon, settings: WebConfig, bound: str) -> None:
        self.daemon = daemon
        self.gate = Gate(settings, bound)
        self.reader = views.Reader(daemon)
        self.live = views.Live(self.reader)
        self.thumbs = Thumbnails(daemon.config.state_dir)
        self.files = Files(daemon, self.reader)
        self.stopping = threading.Event()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True, trim_blocks=True, lstrip_blocks=True)
        routes = [
            Route("/", self.index),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/events", self.events),
            Route("/file/{id:int}", self.file_page),
            Route("/thumb/{id:int}/source", self.thumb_source),
            Route("/thumb/{id:int}/out/{n:int}", self.thumb_output),
            Route("/thumb/{id:int}/answer", self.thumb_answer),
            Route("/download/{id:int}/source", self.download_source),
            Route("/download/{id:int}/out/{n:int}", self.download_output),
            Route("/failed/{index:int}/thumb/{rel:path}", self.failed_thumb),
            Route("/failed/{index:int}/download/{rel:path}", self.failed_download),
            *(Route(f"/{name}", self.action, methods=["GET", "POST"])
              for name in actions.NAMES),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        self.starlette = Starlette(routes=routes)

    def configure(self, settings: WebConfig) -> None:
        self.gate = Gate(settings, self.gate.bound)

    def close(self) -> None:
        self.reader.close()

    # -- every request: Host, login, security headers --------------------------------------

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if host not in self.gate.hosts:
            # DNS rebinding: a page from a name the attacker controls, resolving here.
            response: Response = PlainTextResponse("unknown Host (see web.allowed_hosts)\n",
                                                   status_code=421)
            await response(scope, receive, self._secured(send))
            return
        await self.starlette(scope, receive, self._secured(send))

    @staticmethod
    def _secured(send: Send) -> Send:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)
        return with_headers

    def _render(self, template: str, **context: Any) -> str:
        return self.templates.get_template(template).render(**context)

    def _page(self, template: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(self._render(template, **context),
                            headers={"cache-control": "no-store"})

    # -- pages ---------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None:
            return self._log_in(token)
        if not self.gate.may_see(request):
            return RedirectResponse("/login", status_code=303)
        query = request.query_params
        inbox = actions.number(query.get("inbox"))
        name = (query.get("q") or "").strip()[:200]
        before = actions.number(query.get("before"))
        overview = await anyio.to_thread.run_sync(self.live.get)
        filtered = inbox is not None or bool(name) or before is not None
        recent = overview.recent if not filtered else await anyio.to_thread.run_sync(
            lambda: self.reader.recent(before=before, inbox=inbox, name=name))
        return self._page(
            "index.html", o=overview, recent=recent, can_act=self.gate.logged_in(request),
            token_set=self.gate.token_set, live_recent=not filtered, inbox=inbox, q=name,
            older=_older_link(recent, inbox, name), confirm=query.get("confirm"),
            note=query.get("note"), inboxes=self.reader.active())

    def _log_in(self, token: str) -> Response:
        if not self.gate.token_ok(token):
            return self._page("login.html", wrong=True)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, self.gate.session(), httponly=True, samesite="strict",
                            path="/")
        return response

    async def login(self, request: Request) -> Response:
        if request.method == "POST":
            if not self.gate.same_site(request):
                return PlainTextResponse("refused: another site\n", status_code=403)
            form = await _form(request)
            return self._log_in(form.get("token", ""))
        return self._page("login.html", wrong=False, token_set=self.gate.token_set)

    async def file_page(self, request: Request) -> Response:
        if not self.gate.may_see(request):
            return RedirectResponse("/login", status_code=303)
        record_id = request.path_params["id"]

        def read() -> tuple[Any, ...] | None:
            record = self.reader.record(record_id)
            if record is None:
                return None
            return (record, self.reader.timeline(record_id), views.output_paths(record),
                    self._manifest(record))

        found = await anyio.to_thread.run_sync(read)
        if found is None:
            return PlainTextResponse("no such file\n", status_code=404)
        record, timeline, outputs, manifest = found
        return self._page("file.html", r=record, name=Path(record.inbox).name,
                          timeline=timeline, outputs=[Path(p).name for p in outputs],
                          manifest=manifest)

    def _manifest(self, record: Any) -> str | None:
        """The manifest beside the first output (`manifest: true`), as its text."""
        if not record.result:
            return None
        try:
            opened = open_inside(Path(record.result).with_suffix(".json"),
                                 roots(self.daemon.config))
        except Refused:
            return None
        with opened:
            if opened.size > 1 << 20:
                return None
            return b"".join(opened.chunks()).decode("utf-8", "replace")

    # -- live ----------------------------------------------------------------------------------

    def fragments(self, can_act: bool) -> dict[str, str]:
        overview = self.live.get()
        context: dict[str, Any] = {"o": overview, "can_act": can_act,
                                   "recent": overview.recent}
        return {name: self._render(f"_{name}.html", **context)
                for name in ("totals", "inboxes", "attention", "recent", "review")}

    async def events(self, request: Request) -> Response:
        if not self.gate.may_see(request):
            return PlainTextResponse("log in first\n", status_code=403)
        can_act = self.gate.logged_in(request)

        async def stream() -> AsyncIterator[str]:
            sent: dict[str, str] = {}
            yield "retry: 2000\n\n"
            while not self.stopping.is_set():
                fragments = await anyio.to_thread.run_sync(self.fragments, can_act)
                for name, html in fragments.items():
                    if sent.get(name) != html:
                        sent[name] = html
                        data = "\n".join(f"data: {line}" for line in html.splitlines())
                        yield f"event: {name}\n{data or 'data: '}\n\n"
                await anyio.sleep(STREAM_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})

    # -- images and downloads ------------------------------------------------------------------

    async def _thumb(self, request: Request, opener: Callable[[], tuple[Opened, str | None]]
                     ) -> Response:
        if not self.gate.may_see(request):
            return PlainTextResponse("log in first\n", status_code=403)

        def make() -> tuple[bytes, str] | None:
            try:
                opened, sha = opener()
            except Refused:
                return None
            with opened:
                return self.thumbs.get(opened, sha)

        made = await anyio.to_thread.run_sync(make)
        if made is None:
            return PlainTextResponse("not found\n", status_code=404)
        return Response(made[0], media_type=made[1],
                        headers={"cache-control": "private, max-age=3600"})

    async def thumb_source(self, request: Request) -> Response:
        return await self._thumb(request, lambda: self.files.record_file(
            request.path_params["id"], None))

    async def thumb_output(self, request: Request) -> Response:
        return await self._thumb(request, lambda: self.files.record_file(
            request.path_params["id"], request.path_params["n"]))

    async def thumb_answer(self, request: Request) -> Response:
        return await self._thumb(request, lambda: self.files.answer(request.path_params["id"]))

    async def failed_thumb(self, request: Request) -> Response:
        return await self._thumb(request, lambda: (self.files.failed(
            request.path_params["index"], request.path_params["rel"]), None))

    async def _download(self, request: Request, opener: Callable[[], Opened]) -> Response:
        if not self.gate.may_see(request):
            return PlainTextResponse("log in first\n", status_code=403)
        try:
            opened = await anyio.to_thread.run_sync(opener)
        except Refused:
            return PlainTextResponse("not found\n", status_code=404)
        name = opened.real.name.encode("ascii", "replace").decode().replace('"', "_")
        return StreamingResponse(opened.chunks(), media_type="application/octet-stream",
                                 headers={"content-length": str(opened.size),
                                          "content-disposition":
                                              f'attachment; filename="{name}"'})

    async def download_source(self, request: Request) -> Response:
        return await self._download(request, lambda: self.files.record_file(
            request.path_params["id"], None)[0])

    async def download_output(self, request: Request) -> Response:
        return await self._download(request, lambda: self.files.record_file(
            request.path_params["id"], request.path_params["n"])[0])

    async def failed_download(self, request: Request) -> Response:
        return await self._download(request, lambda: self.files.failed(
            request.path_params["index"], request.path_params["rel"]))

    # -- actions -------------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        if request.method != "POST":
            return PlainTextResponse("actions are POST only\n", status_code=405,
                                     headers={"allow": "POST"})
        if not self.gate.token_set:
            return PlainTextResponse("read-only: set web.token to act from the page\n",
                                     status_code=403)
        if not self.gate.logged_in(request):
            return PlainTextResponse("log in first\n", status_code=403)
        if not self.gate.same_site(request):
            return PlainTextResponse("refused: sent from another site\n", status_code=403)
        form = await _form(request)
        name = request.url.path.strip("/")
        target = await anyio.to_thread.run_sync(lambda: actions.act(self.daemon, name, form))
        self.live.invalidate()  # the next look shows the action's effect at once
        return RedirectResponse(target, status_code=303)

async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the page's forms), first value of each field."""
    body = await request.body()
    if len(body) > 65536:
        return {}
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


def _older_link(recent: list[views.Done], inbox: int | None, name: str) -> str | None:
    if len(recent) < views.PAGE:
        return None
    query: dict[str, str | int] = {"before": recent[-1].id}
    if inbox is not None:
        query["inbox"] = inbox
    if name:
        query["q"] = name
    return "/?" + urlencode(query)
