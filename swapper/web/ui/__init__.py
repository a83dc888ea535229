"""The web UI at ``/ui/``: static files shipped in this package, and ``GET /`` sending browsers there.

Owns: the UI's files, read once from ``static/`` when the routes are added (a few tens of KiB,
served from memory with an ETag). The pages are plain HTML, CSS and JavaScript modules: no build
step, nothing fetched from elsewhere at run time. They read and steer swapper through the same
routes any client uses (``/api/events``, ``/v1/status``, ``/logs/stream``, ``/api/metrics``, the
model routes for the playground); ``api.py`` adds the llama-swap UI API routes they need.

Auth: the files themselves hold no data, so ``/ui/`` is served without a key (``auth`` lets it
through); the pages ask for the key once, keep it in the browser's local storage and send it with
every API call. Streams are read with ``fetch`` (``EventSource`` cannot send a header).

``GET /`` redirects a browser (``Accept`` names ``text/html``) to ``/ui/``; any other client gets
a small HTML page listing the models (``non_browser_root``).
"""

from __future__ import annotations

import hashlib
import mimetypes
from html import escape
from importlib import resources
from typing import Final
from urllib.parse import quote

from aiohttp import hdrs, web

from swapper.core.errors import NotFound
from swapper.web.appkeys import RUNLOOP
from swapper.web.routes import error_response
from swapper.web.ui import api

__all__ = ["PREFIX", "add_routes", "is_public", "wants_html"]

PREFIX: Final = "/ui/"
_TYPES: Final = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


class _File:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, name: str, body: bytes) -> None:
        suffix = name[name.rfind(".") :] if "." in name else ""
        self.content_type = _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.body = body
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


def load_files() -> dict[str, _File]:
    """Every file under ``static/`` by its name there (flat: the UI has no sub-folders)."""
    static = resources.files(__name__).joinpath("static")
    return {item.name: _File(item.name, item.read_bytes()) for item in static.iterdir() if item.is_file()}


def wants_html(request: web.BaseRequest) -> bool:
    return "text/html" in request.headers.get(hdrs.ACCEPT, "")


def is_public(request: web.BaseRequest) -> bool:
    """Whether ``request`` may go without an API key: the UI's files, and a browser's ``GET /``
    (only ever answered with the redirect)."""
    path = request.path
    return path == "/ui" or path.startswith(PREFIX) or (path == "/" and wants_html(request))


def add_routes(app: web.Application) -> None:
    """The UI and its API; after ``admin.add_admin_routes`` (the bus) and before
    ``routes.add_routes`` (whose catch-all would shadow these)."""
    files = load_files()

    async def handle_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name", "") or "index.html"
        found = files.get(name)
        if found is None and "." not in name:
            found = files["index.html"]  # a page's own path (a bookmark): the app shows it
        if found is None:
            return error_response(NotFound(f"no UI file '{name}'"))
        headers = {hdrs.ETAG: found.etag, hdrs.CACHE_CONTROL: "no-cache"}
        if request.headers.get(hdrs.IF_NONE_MATCH) == found.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.body, content_type=found.content_type, headers=headers)

    app.router.add_get("/", handle_root)
    app.router.add_get("/ui", _to_ui)
    app.router.add_get(PREFIX + "{name:[^/]*}", handle_file)
    api.add_routes(app)


async def _to_ui(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={hdrs.LOCATION: PREFIX})


async def handle_root(request: web.Request) -> web.Response:
    if wants_html(request):
        return await _to_ui(request)
    return non_browser_root(request)


def non_browser_root(request: web.Request) -> web.Response:
    """``GET /`` for a client that is not a browser: a small HTML page naming the models and the
    routes, never a 404 (llama-server answers ``/`` with its web UI's HTML whatever is asked)."""
    config = request.app[RUNLOOP].config
    items = "".join(
        f'<li><a href="/upstream/{quote(mid)}/">{escape(mid)}</a> {escape(cfg.name)}</li>'
        for mid, cfg in sorted(config.models.items())
        if not cfg.unlisted
    )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>swapper</title></head><body>'
        f'<h1>swapper</h1><p><a href="{PREFIX}">Web UI</a></p><h2>Models</h2><ul>{items}</ul>'
        '<p><a href="/v1/models">/v1/models</a> · <a href="/health">/health</a> · '
        '<a href="/metrics">/metrics</a> · <a href="/v1/status">/v1/status</a></p></body></html>'
    )
    return web.Response(text=page, content_type="text/html")
