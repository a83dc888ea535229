"""Forwarding a request to a peer (``peers:``): another swapper, llama-swap or a hosted API.

Owns: ``PeerClient``, the app's client session for peers (TLS, no decompression: bytes pass
through as they came) and the number of requests in flight to each peer. Peers never swap and
never reach the run loop or a planner; each has its own ``concurrencyLimit`` (a request beyond it
gets 429 at once, as a model's does).

One request, one flow (``forward``): count it in, shape the body (the peer's ``filters``; the
``model`` field becomes the peer's own model id when the client named it ``peer/model``), send
with the peer's key as ``Authorization: Bearer`` and ``x-api-key``, relay the answer as it
streams, count it out. A peer that cannot be reached, or sends no response head within its
``timeouts.responseHeader``, is a 502 with the usual envelope; ``timeouts.connect`` bounds the
connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import aiohttp
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict

from swapper.config.schema import PeerConfig, PeerModel
from swapper.core.errors import ConcurrencyLimit, UpstreamError
from swapper.http import shaping
from swapper.http.exchange import upstream_path
from swapper.http.modelid import RequestModel
from swapper.observe.events import EVENTS, EventBus
from swapper.wire.codec import HOP_BY_HOP, REQUEST_DROP, connection_of, kept_fields

log = structlog.get_logger("swapper.http.peers")


class PeerClient:
    """The session peers are reached through, and each peer's in-flight count."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on first use, inside the running loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


PEERS = web.AppKey("peers", PeerClient)


async def peers_ctx(app: web.Application) -> AsyncIterator[None]:
    app[PEERS] = client = PeerClient()
    try:
        yield
    finally:
        await client.close()


def _kept(raw: tuple[tuple[bytes, bytes], ...], drop: frozenset[bytes]) -> list[tuple[str, str]]:
    """``raw`` minus ``drop`` and the names its Connection lists (``codec.kept_fields``), decoded
    as aiohttp decodes headers."""
    return [
        (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        for name, value in kept_fields(raw, connection_of(raw), drop)
    ]


def _headers(request: web.Request, peer: PeerConfig) -> CIMultiDict[str]:
    # Never Host, Content-Length or Expect either: the client session writes its own.
    out = CIMultiDict(_kept(request.raw_headers, REQUEST_DROP))
    if peer.api_key:  # the peer's key replaces the client's (which was for this swapper)
        out[hdrs.AUTHORIZATION] = f"Bearer {peer.api_key}"
        out["x-api-key"] = peer.api_key
    return out


async def forward(
    request: web.Request,
    body: bytes,
    content_type: str | None,
    wanted: RequestModel,
    peer: PeerConfig,
    target: PeerModel,
    requested: str,
    req_id: int,
    *,
    selector: str | None = None,
) -> web.StreamResponse:
    """Serves one request through ``peer``; raises SwapperError before any byte is written."""
    client = request.app[PEERS]
    count = client.in_flight.get(peer.id, 0)
    if count >= peer.concurrency_limit:
        raise ConcurrencyLimit(
            f"too many requests in flight to peer '{peer.id}' (concurrencyLimit {peer.concurrency_limit})",
            headers={"Retry-After": "1"},
        )
    client.in_flight[peer.id] = count + 1
    bus: EventBus | None = request.app.get(EVENTS)
    track = None
    if bus is not None:
        track = bus.track(req_id, target.fqn, _route(request), request.method, request.path)
        track.selector = selector
        track.granted()  # no wait: peers queue nothing here
    try:
        rename = target.model if requested != target.model else None
        out = shaping.rewrite_body(
            content_type,
            body,
            model_name=rename,
            filters=peer.filters,
            requested=requested,
            is_json=wanted.is_json,
        )
        url = peer.proxy + _target(request, rename)
        connect = peer.connect_timeout or None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(peer.response_header_timeout or None):
                upstream = await client.session().request(
                    request.method,
                    url,
                    data=out,
                    headers=_headers(request, peer),
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect),
                )
        except TimeoutError:
            raise UpstreamError(
                f"peer proxy error: peer '{peer.id}' sent no response within "
                f"{peer.response_header_timeout:g}s (timeouts.responseHeader)"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"peer proxy error: peer '{peer.id}' at {peer.proxy}: {exc}") from None
        if track is not None:
            track.content_type = upstream.headers.get(hdrs.CONTENT_TYPE, "").encode("latin-1", "replace")
            track.forwarded(upstream.status, time.perf_counter() - started)
        try:
            return await _relay(request, upstream)
        finally:
            upstream.release()
    except UpstreamError as err:
        if track is not None:
            track.failed(err.status)
        raise
    finally:
        client.in_flight[peer.id] -= 1
        if track is not None:
            track.done()


def _target(request: web.Request, rename: str | None) -> str:
    """The path and query to ask the peer for; a ``?model=`` naming ``peer/model`` is renamed too."""
    target = upstream_path(request.raw_path)
    if rename is None or "model" not in request.query:
        return target
    query = [(k, rename if k == "model" else v) for k, v in request.query.items()]
    return upstream_path(request.rel_url.raw_path) + "?" + urlencode(query)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in _kept(upstream.raw_headers, HOP_BY_HOP):  # its Content-Length stays
        resp.headers.add(name, value)
    if upstream.headers.get(hdrs.CONTENT_TYPE, "").startswith("text/event-stream"):
        resp.headers["X-Accel-Buffering"] = "no"  # a proxy in front must not buffer SSE
    try:
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        # The peer broke mid-body: cut the client too, so a truncated answer never looks whole.
        resp.force_close()
        if request.transport is not None:
            request.transport.close()
    except ConnectionResetError:
        pass  # the client left; releasing the upstream response closes its connection
    return resp
