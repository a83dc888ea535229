"""CORS as llama-server does it: preflights answered for any path without a key, the ``Origin``
echoed, credentials allowed, the requested headers allowed.

Owns: nothing mutable. ``add_routes(app, origins)`` registers one ``OPTIONS /{tail:.*}`` route and
keeps the ``corsOrigins`` policy it was started with (like ``apiKeys``, a reload keeps it). It is
a route rather than a middleware so that the other requests pay nothing for it; it must be
registered before ``routes.add_routes``, whose ``*`` catch-all would otherwise answer OPTIONS
with a 404. A more specific route (``/v1/chat/completions`` has only POST) does not shadow it:
aiohttp falls through to it when the method does not match. A route registered for *every*
method (``/upstream/...``) does, so such a handler calls ``preflight`` itself.

A preflight gets ``200`` with an empty body, as from llama-server: ``Allow-Origin`` per the policy
(``allow_origin``), ``Allow-Credentials: true`` (``false`` with ``*``, which browsers never pair
with credentials), ``Allow-Headers`` echoing the requested header names that are valid HTTP
tokens (``*`` when none were asked for: with credentials a browser reads ``*`` as a name, so
echoing is what lets a page send ``Authorization``), ``Max-Age: 86400``. Other answers: those
relayed from a model carry the model's own headers (llama-server's echo the ``Origin``);
swapper's own (errors, ``/v1/models``, admin routes) carry ``Allow-Origin`` per the same policy:
``_on_prepare`` on aiohttp's side, ``routes.ANSWERED_GETS`` and the front door's error answers.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import hdrs, web

__all__ = ["ALLOW_METHODS", "ANY_HEADER", "add_routes", "allow_origin", "allowed_headers", "preflight"]

ALLOW_METHODS: Final = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ANY_HEADER: Final = "*"
MAX_AGE: Final = "86400"
# RFC 9110 token: what a header name may contain. Anything else is dropped, never echoed.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
ORIGINS = web.AppKey("cors_origins", tuple)


class Relayed:
    """Marks a response class relayed from a model (``relay``): its CORS headers are the model's."""


def allow_origin(origins: tuple[str, ...], origin: str | None) -> str | None:
    """The ``Access-Control-Allow-Origin`` value for a request from ``origin``, or None for none."""
    if origins == ("*",):
        return "*"
    if not origin:
        return None
    if not origins or origin in origins:
        return origin
    return None


def allowed_headers(requested: str | None) -> str:
    """The ``Access-Control-Allow-Headers`` value for a preflight's ``Access-Control-Request-Headers``."""
    if not requested:
        return ANY_HEADER
    names = [n for part in requested.split(",") if _TOKEN.fullmatch(n := part.strip())]
    return ", ".join(names) or ANY_HEADER


async def preflight(request: web.Request) -> web.Response:
    origins = request.app.get(ORIGINS, ())
    headers = {
        hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS: "false" if origins == ("*",) else "true",
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
        hdrs.ACCESS_CONTROL_ALLOW_HEADERS: allowed_headers(
            request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
        ),
        hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE,
    }
    if (allowed := allow_origin(origins, request.headers.get(hdrs.ORIGIN))) is not None:
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
        if allowed != "*":
            headers[hdrs.VARY] = "Origin"  # an echo: a cache must not serve it to another origin
    return web.Response(status=200, headers=headers)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """swapper's own answers (errors, admin routes) carry ``Allow-Origin`` as llama-server's do, so
    a page sees a 404 or a 429 rather than a network error. Relayed answers keep the model's."""
    if isinstance(response, Relayed) or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
        return
    allowed = allow_origin(request.app.get(ORIGINS, ()), request.headers.get(hdrs.ORIGIN))
    if allowed is not None:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
        if allowed != "*":
            response.headers.add(hdrs.VARY, "Origin")


def add_routes(app: web.Application, origins: tuple[str, ...] = ()) -> None:
    app[ORIGINS] = origins
    app.router.add_route(hdrs.METH_OPTIONS, "/{tail:.*}", preflight)
    app.on_response_prepare.append(_on_prepare)
