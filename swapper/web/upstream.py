"""``/upstream/<model>/<path>``: talk to one model's own server directly (its web UI, ``/slots``...).

Owns: nothing mutable. ``add_routes(app, config)`` registers the routes with a ``PathResolver``
built once from the config (names, the deepest name, the compiled ``upstream.ignorePaths``).

Must not touch: children or scheduler state. A passthrough request takes a lease from the run
loop exactly like an inference request (``serve.passthrough``: ``acquire`` → ``relay.send`` →
``release`` in ``finally``), so any method on any path loads or swaps the model, waits its turn
in the queue, and keeps a busy model from being evicted; it is tracked like one too (``/metrics`` and
``/api/events``, route ``/upstream/{rest}``), and a connection refused by a ready model's child
is retried once on a restarted child. Bodies are forwarded untouched: no ``useModelName``, no
filters (llama-swap's upstream chain has none either).

Semantics (llama-swap's ``/upstream`` route):

1. The model is the *longest* configured id or alias that prefixes the path, so ids containing
   ``/`` work (``/upstream/author/model/v1/models``). Names are compared percent-decoded, so
   ``author%2Fmodel`` names ``author/model`` too.
2. ``/upstream/<model>`` with nothing after it redirects to ``/upstream/<model>/`` (query kept):
   301 for GET and HEAD, 308 for other methods so that the body is re-sent.
3. The rest of the path goes upstream with the client's own percent-encoding (``%2F`` stays
   ``%2F``), plus the raw query string.
4. If the rest (decoded) matches an ``upstream.ignorePaths`` regex (``re.search``) and the model
   is not ready, the answer is 409 and nothing is loaded: a UI's static assets, favicon probes
   and the like must not start a model. The readiness read is advisory: if the model is unloaded
   between the check and the acquire, that one request starts it again, which is harmless.

``GET /upstream`` and ``GET /upstream/`` redirect (302) a browser to the web UI's model page, as
llama-swap does, and any other client to ``/v1/models``, the nearest thing in JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote

from aiohttp import hdrs, web

from swapper.config.schema import Config
from swapper.core.errors import Conflict, ModelNotFound, SwapperError
from swapper.core.states import State
from swapper.http import cors, serve
from swapper.web import ui
from swapper.web.appkeys import RUNLOOP, SESSION
from swapper.web.routes import error_response, read_body

__all__ = ["PathResolver", "add_routes"]

PREFIX = "/upstream"
INDEX_LOCATION = "/v1/models"
UI_MODELS = "/ui/#/models"


class PathResolver:
    """Splits the part of a raw path after ``/upstream/`` into (model id, raw name, raw rest)."""

    def __init__(self, names: Mapping[str, str], ignore_paths: tuple[str, ...] = ()) -> None:
        self._names = dict(names)  # id or alias -> model id
        # The most raw segments a name can span ("a/b/c" spans 3; "a%2Fb" only 1).
        self._depth = max((n.count("/") + 1 for n in self._names), default=0)
        self._ignore = tuple(re.compile(p) for p in ignore_paths)

    @classmethod
    def from_config(cls, config: Config) -> PathResolver:
        names = {**config.aliases, **{m: m for m in config.models}}  # an id wins over an alias
        return cls(names, config.upstream_ignore_paths)

    def split(self, raw: str) -> tuple[str, str, str] | None:
        """Longest name prefixing ``raw`` (no leading ``/``, no query), or None.

        Returns (model id, the name as the client spelled it, the rest: ``""`` or ``"/..."``).
        """
        segments = raw.split("/", self._depth)[: self._depth]
        for k in range(len(segments), 0, -1):
            spelled = "/".join(segments[:k])
            model = self._names.get(unquote(spelled))
            if model is not None:
                return model, spelled, raw[len(spelled) :]
        return None

    def ignored(self, rest: str) -> bool:
        """Reports whether the decoded ``rest`` matches an ``upstream.ignorePaths`` pattern."""
        decoded = unquote(rest)
        return any(p.search(decoded) for p in self._ignore)


def add_routes(app: web.Application, config: Config) -> None:
    resolver = PathResolver.from_config(config)

    async def handle_upstream(request: web.Request) -> web.StreamResponse:
        return await _handle(request, resolver)

    app.router.add_get(PREFIX, _index)
    app.router.add_route("*", PREFIX + "/{rest:.*}", handle_upstream)


async def _index(request: web.Request) -> web.StreamResponse:
    location = UI_MODELS if ui.wants_html(request) else INDEX_LOCATION
    return web.Response(status=302, headers={hdrs.LOCATION: location})


async def _handle(request: web.Request, resolver: PathResolver) -> web.StreamResponse:
    if request.method == hdrs.METH_OPTIONS:
        return await cors.preflight(request)  # this route takes every method, so CORS's doesn't
    raw_path, qmark, query = request.raw_path.partition("?")
    # Drop the first segment however the client spelled it: aiohttp matched it decoded.
    raw = raw_path[1:].partition("/")[2]
    if not raw:
        if request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
            return await _index(request)
        return error_response(ModelNotFound("no model in path: use /upstream/<model>/<path>"))
    found = resolver.split(raw)
    if found is None:
        return error_response(ModelNotFound(f"model not found in path '{unquote(raw)}'"))
    model, spelled, rest = found
    if not rest:
        status = 301 if request.method in (hdrs.METH_GET, hdrs.METH_HEAD) else 308
        location = f"{PREFIX}/{spelled}/{qmark}{query}"
        return web.Response(status=status, headers={hdrs.LOCATION: location})
    app = request.app
    runloop = app[RUNLOOP]
    if resolver.ignored(rest) and runloop.state(model) is not State.READY:
        return error_response(Conflict(f"model {model} is not loaded; path matches upstream.ignorePaths"))
    try:
        body = await read_body(request)
    except SwapperError as err:
        return error_response(err)
    return await serve.passthrough(request, runloop, app[SESSION], model, f"{rest}{qmark}{query}", body)
