"""``apiKeys``: every route but ``/health``, ``/healthz``, CORS preflights and the UI's files needs a key.

Owns: nothing mutable. ``middleware(keys)`` returns an aiohttp middleware closed over the keys; the
server installs it only when ``apiKeys`` is non-empty, so a keyless setup pays nothing per request.

Must not touch: the request body, routing, or the headers forwarded upstream. Keys are *not*
stripped before forwarding (llama-swap forwards them too, and an upstream started with its own
``--api-key`` set to the same key then keeps working).

Accepted forms (llama-swap's): ``Authorization: Bearer <key>``, ``x-api-key: <key>``
and ``Authorization: Basic base64(<any user>:<key>)``. A request passes when any credential it
presents equals any key. Every comparison is ``hmac.compare_digest`` and all of them run, so the
response time says nothing about how much of a guess was right, nor which key it was close to.
A failure is a 401 JSON envelope with ``WWW-Authenticate: Basic realm="swapper"``; the key itself is
never logged.

Concurrency: none; the middleware is a pure function of the request headers.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable, Mapping

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from swapper.core.errors import Unauthorized
from swapper.web import ui
from swapper.web.routes import error_response

__all__ = ["OPEN_PATHS", "REALM", "allows", "key_matches", "middleware", "presented_keys"]

log = structlog.get_logger("swapper.web.auth")

REALM = "swapper"
# Liveness probes (load balancers, Docker HEALTHCHECK) carry no credentials.
OPEN_PATHS = frozenset({"/health", "/v1/health", "/healthz"})  # llama-server answers /v1/health too


def presented_keys(headers: Mapping[str, str]) -> list[bytes]:
    """Every credential in ``headers``, as bytes: Basic password, Bearer token, ``x-api-key``."""
    return _credentials(_bytes(headers.get(hdrs.AUTHORIZATION, "")), _bytes(headers.get("x-api-key", "")))


def allows(keys: Iterable[bytes], authorization: bytes | None, api_key: bytes | None) -> bool:
    """Whether the ``Authorization`` and ``x-api-key`` values present one of ``keys`` (the front
    door's check, on the raw values; the middleware's is the same)."""
    return key_matches(_credentials(authorization or b"", api_key or b""), keys)


def _credentials(authorization: bytes, api_key: bytes) -> list[bytes]:
    found: list[bytes] = []
    scheme, _, value = authorization.strip().partition(b" ")
    value = value.strip()
    if value and scheme.lower() == b"bearer":
        found.append(value)
    elif value and scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        _, colon, password = decoded.partition(b":")
        if colon and password:
            found.append(password)
    if api_key := api_key.strip():
        found.append(api_key)
    return found


def key_matches(presented: Iterable[bytes], keys: Iterable[bytes]) -> bool:
    """Whether any presented credential is one of ``keys``, compared in constant time."""
    ok = False
    for given in presented:
        for key in keys:
            # No short-circuit: a match must cost what a miss costs.
            ok |= hmac.compare_digest(given, key)
    return ok


def _bytes(header_value: str) -> bytes:
    # aiohttp decodes header bytes that are not UTF-8 with surrogateescape; undo that exactly.
    return header_value.encode("utf-8", "surrogateescape")


def middleware(keys: Iterable[str]) -> Middleware:
    """The auth middleware for ``keys`` (non-empty); install it only when keys are configured."""
    wanted = tuple(k.encode() for k in keys)
    if not wanted:
        raise ValueError("auth.middleware needs at least one key; install nothing instead")
    challenge = {"WWW-Authenticate": f'Basic realm="{REALM}"'}

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == hdrs.METH_OPTIONS or request.path in OPEN_PATHS or ui.is_public(request):
            return await handler(request)
        presented = presented_keys(request.headers)
        if key_matches(presented, wanted):
            return await handler(request)
        log.warning(
            "unauthorized request",
            method=request.method,
            path=request.path,
            remote=request.remote,
            reason="invalid API key" if presented else "no API key",
        )
        # A page's script says so with X-Requested-With: it asks for the key itself, and a
        # challenge would make the browser stop the request for a login prompt of its own.
        # Its Allow-Origin, without which a page sees a bare network error, follows corsOrigins
        # like every answer of swapper's own (cors._on_prepare).
        headers = {} if "X-Requested-With" in request.headers else dict(challenge)
        return error_response(Unauthorized("unauthorized: invalid or missing API key", headers=headers))

    return require_api_key
