"""CORS preflight: ``OPTIONS`` on any path answers 204 with permissive headers, without a key.

Owns: nothing mutable. ``add_routes(app)`` registers one ``OPTIONS /{tail:.*}`` route. It is a
route rather than a middleware so that the other requests pay nothing for it; it must be
registered before ``routes.add_routes``, whose ``*`` catch-all would otherwise answer OPTIONS
with a 404. A more specific route (``/v1/chat/completions`` has only POST) does not shadow it:
aiohttp falls through to it when the method does not match. A route registered for *every*
method (``/upstream/...``) does, so such a handler calls ``preflight`` itself.

Semantics follow llama-swap's CORS middleware (reference §4.1): ``Allow-Origin: *``, a fixed
method list, ``Allow-Headers`` echoing the requested header names that are valid HTTP tokens (or a
default list), ``Max-Age: 86400``. Normal responses get no CORS headers here: llama-server adds its
own to inference responses, and ``/v1/models`` echoes ``Origin`` itself.
"""

from __future__ import annotations

import re

from aiohttp import hdrs, web

__all__ = ["ALLOW_METHODS", "DEFAULT_ALLOW_HEADERS", "add_routes", "allowed_headers", "preflight"]

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOW_HEADERS = "Content-Type, Authorization, Accept, X-Requested-With"
MAX_AGE = "86400"
# RFC 9110 token: what a header name may contain. Anything else is dropped, never echoed.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def allowed_headers(requested: str | None) -> str:
    """The ``Access-Control-Allow-Headers`` value for a preflight's ``Access-Control-Request-Headers``."""
    if not requested:
        return DEFAULT_ALLOW_HEADERS
    names = [n for part in requested.split(",") if _TOKEN.fullmatch(n := part.strip())]
    return ", ".join(names) or DEFAULT_ALLOW_HEADERS


async def preflight(request: web.Request) -> web.Response:
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*",
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: allowed_headers(
                request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
            ),
            hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE,
        },
    )


def add_routes(app: web.Application) -> None:
    app.router.add_route(hdrs.METH_OPTIONS, "/{tail:.*}", preflight)
