"""Sending to a child and relaying its answer through aiohttp: the upstream half of the hot path.

Owns: nothing long-lived. ``make_session()`` builds the one shared ``ClientSession`` (its owner is
``server``'s cleanup context, which closes it); its connector also carries the ``h1pool.H1Pool``
that requests are sent through (aiohttp's client costs as much CPU per request as all the rest of
the proxy; see h1pool), and closing the session closes that pool too.

``send()`` sends one request and returns the response head, sending it again only when it
provably never reached the upstream (see ``send``). ``relay()`` writes an upstream's
answer through an aiohttp response, for requests aiohttp received; the front door writes its own
straight on the transport (``front``). Both write the same head: the upstream's status, its
headers minus hop-by-hop ones (``codec.forwardable``), ``X-Accel-Buffering: no`` for SSE, and a
body that keeps its Content-Length or is re-chunked (then without a Content-Length, whatever the
upstream sent beside its Transfer-Encoding).

Must not touch: models, leases, children, the run loop, metrics policy or logging policy.
Errors before the client saw anything are raised as ``UpstreamError`` for the caller to render.

Concurrency: ``relay()`` runs in the request's handler task and is cancel-safe. With
``handler_cancellation=True`` a client that leaves cancels the task; the ``CancelledError``
propagates and the caller closes the upstream response, so llama-server sees the disconnect and
stops generating. Backpressure holds end to end: the loop is ``readany()`` → ``await
resp.write()`` with no queue in between; aiohttp's server write waits for the client to drain,
and h1pool stops reading the upstream socket while unread bytes pile up.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from swapper.core.errors import GatewayTimeout, SwapperError, UpstreamError, UpstreamRefused, sse_error_event
from swapper.http import cors
from swapper.observe.activity import TAIL_CHUNKS, tail_of
from swapper.observe.capture import Capture
from swapper.wire.codec import (
    HOP_BY_HOP,
    RECHUNKED_DROP,
    REQUEST_DROP,
    connection_of,
    forwardable,
    kept_fields,
)
from swapper.wire.h1pool import ConnectFailed, Disconnected, H1Pool, Response

__all__ = [
    "UPSTREAM_READ_ERRORS",
    "Relayed",
    "failed_before_response",
    "make_session",
    "pool_of",
    "relay",
    "send",
    "upstream_headers",
]

# aiohttp would otherwise invent these when the client sent none. Accept-Encoding matters most:
# an invented "gzip" would make the upstream compress for a client that never asked for it.
_NO_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
_IDENTITY_DROP = REQUEST_DROP | {b"accept-encoding"}
# What reading the upstream body can raise when the upstream breaks mid-body (h1pool's errors
# are ConnectionErrors).
UPSTREAM_READ_ERRORS = (OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Relayed:
    """What one ``relay()`` did: the response it wrote, the body bytes written to the client (not
    headers, not a caller's preamble), and whether the body completed (False when the upstream
    broke mid-body, which closed the client's connection so that it can tell, or the client left)."""

    response: web.StreamResponse
    bytes_out: int
    complete: bool
    tail: bytes = b""  # the body's last bytes (``activity.TAIL`` at most), for its token counts
    broken: bool = False  # the upstream broke mid-body (else an incomplete relay: the client left)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector (health probes and other non-forwarding requests use it) that also
    owns the pool requests are sent through, so that closing the session closes both."""

    def __init__(self, pool: H1Pool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.h1pool = pool

    async def close(self, *, abort_ssl: bool = False) -> None:
        self.h1pool.close()
        await super().close(abort_ssl=abort_ssl)


class _RelayedStream(cors.Relayed, web.StreamResponse):
    """A streamed answer relayed as the model sends it (its CORS headers too)."""


class _CoalescingResponse(cors.Relayed, web.StreamResponse):
    # Hold the headers until the first body write, so a small answer leaves in one segment (the
    # same trick web.Response uses). Only for non-SSE bodies, whose first chunk is already read.
    _send_headers_immediately = False


def make_session() -> aiohttp.ClientSession:
    """Build the shared upstream session; call it from the running loop, close it on shutdown.

    No total or read timeout: a generation may legitimately run for many minutes between bytes
    (prompt processing), and the client's disconnect is what ends a request early.
    """
    # Idle upstream connections are dropped after 4 s, before llama-server's own keep-alive
    # timeout (cpp-httplib's 5 s) closes them: a request written on a connection the upstream is
    # closing at that moment could not be sent again (``send``).
    pool = H1Pool(connect_timeout=10.0, keepalive=4.0)
    connector = _Connector(pool, limit=0, keepalive_timeout=30.0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        auto_decompress=False,  # Content-Encoding is forwarded, so the bytes must be too
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
    )


def pool_of(session: aiohttp.ClientSession) -> H1Pool:
    """The forwarding pool of a session made by ``make_session()``."""
    connector = session.connector
    if not isinstance(connector, _Connector):
        if connector is None:  # closed: swapper is shutting down
            raise UpstreamError("the upstream session is closed")
        raise TypeError("the session must come from relay.make_session()")
    return connector.h1pool


def upstream_headers(incoming: Sequence[tuple[bytes, bytes]], *, identity: bool) -> bytes:
    """The header lines of the client's headers to send upstream: minus hop-by-hop ones (also those
    named in its ``Connection`` values), Host, Content-Length and Expect (``codec.REQUEST_DROP``).
    ``identity`` asks for an unencoded body (for a caller whose own headers carry no encoding)."""
    connection = connection_of(incoming)
    if identity:
        return forwardable(incoming, connection, _IDENTITY_DROP) + b"Accept-Encoding: identity\r\n"
    return forwardable(incoming, connection, REQUEST_DROP)


async def send(
    pool: H1Pool, method: str, url: URL, headers: bytes, body: bytes, connect_timeout: float | None = None
) -> Response:
    """Sends one request through ``pool`` and returns the response head; raises ``UpstreamError``
    (nothing reached the client yet) if the upstream could not be reached or broke first.

    Sent again (once, on a fresh connection) only when it provably never reached the upstream:
    the pooled connection was found closed before a byte was written. A request that was written
    may have been read, and the child may have died of it: replaying it could crash the next one
    too, so it is answered 502 instead (Go's Transport and nginx's rule for POST). A refused
    connect (``UpstreamRefused``) is the caller's to retry: nothing was sent.
    """
    try:
        try:
            return await pool.request(method, url, headers, body, connect_timeout=connect_timeout)
        except Disconnected as exc:
            if not exc.replayable:
                raise
            return await pool.request(method, url, headers, body, fresh=True, connect_timeout=connect_timeout)
    except OSError as exc:  # h1pool's errors, TimeoutError included
        raise failed_before_response(exc, url) from exc


def failed_before_response(exc: Exception, url: URL) -> SwapperError:
    """What to answer when ``url``'s upstream could not be reached (``UpstreamRefused``: nothing
    was sent) or broke before its response head."""
    if isinstance(exc, ConnectFailed) and exc.errno == errno.ETIMEDOUT:
        return GatewayTimeout(
            f"upstream {url.origin()} did not accept the connection in time (timeouts.connect)"
        )
    if isinstance(exc, ConnectFailed):
        return UpstreamRefused(f"upstream {url.origin()} refused the connection: {exc.strerror}")
    if isinstance(exc, TimeoutError):
        return UpstreamError(f"upstream {url.origin()} timed out before responding")
    if isinstance(exc, Disconnected) and not exc.response_started:
        return UpstreamError(
            f"upstream {url.origin()} closed the connection during the request, before answering "
            "(its process died or dropped it); not sent again, since it may have read it"
        )
    return UpstreamError(f"upstream {url.origin()} failed before responding: {exc!r}")


async def relay(
    request: web.Request,
    upstream: Response,
    response: web.StreamResponse | None = None,
    capture: Capture | None = None,
) -> Relayed:
    """Writes ``upstream``'s answer to ``request``'s client through aiohttp.

    Without ``response``, the upstream's status and headers go first (see the module docstring),
    then the body as it arrives. With ``response`` (already prepared by the caller, e.g. a
    loading-state SSE preamble, and asked for an unencoded body) only the body is appended to it.

    Raises ``UpstreamError`` if a non-SSE upstream breaks before its first body byte: nothing has
    been written, and the caller renders the error. A later break ends an SSE stream with a
    final error event, and any other body by ending the client's connection with no clean end
    (a truncated body must not look complete); it returns ``complete=False, broken=True``;
    the handler may then be cancelled at its next ``await``, exactly as if the client had left.
    ``capture``, when given, is handed every piece of the body.
    """
    if response is not None:
        return await _pump(request, response, upstream, b"", capture)
    first = b""
    sse = upstream.sse
    reason = upstream.reason.decode("latin-1")
    if sse:
        resp: web.StreamResponse = _RelayedStream(status=upstream.status, reason=reason)
    else:
        # Read ahead one chunk: a non-streamed answer then leaves in one write (headers held by
        # _CoalescingResponse), and an upstream that dies before its body is still a clean 502.
        try:
            first = await upstream.readany()
        except UPSTREAM_READ_ERRORS as exc:
            raise UpstreamError(f"upstream broke before sending a body: {exc!r}") from exc
        resp = _CoalescingResponse(status=upstream.status, reason=reason)
    reader = upstream.reader
    headers = resp.headers
    drop = RECHUNKED_DROP if reader.te else HOP_BY_HOP
    for name, value in kept_fields(reader.headers, reader.connection, drop):
        headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
    if sse:
        headers["X-Accel-Buffering"] = "no"  # nginx and friends in front of us must not buffer SSE
    try:
        await resp.prepare(request)
    except ConnectionResetError:  # the client left while the upstream was answering
        return Relayed(resp, 0, False)
    return await _pump(request, resp, upstream, first, capture)


async def _pump(
    request: web.Request, resp: web.StreamResponse, content: Response, chunk: bytes, capture: Capture | None
) -> Relayed:
    """Copy the upstream body to the prepared ``resp``; its last reads make the tail."""
    sent = 0
    last: deque[bytes] = deque((), TAIL_CHUNKS)
    complete = broken = False
    try:
        while True:
            if not chunk:
                try:
                    chunk = await content.readany()
                except UPSTREAM_READ_ERRORS as exc:
                    broken = True
                    if content.sse:  # a final error event and a proper end: clients raise it
                        event = sse_error_event(UpstreamError(f"upstream broke mid-answer: {exc!r}"))
                        if not (last and last[-1].endswith(b"\n\n")):
                            event = b"\n\n" + event  # it broke mid-event: end that one first
                        await resp.write(event)
                        await resp.write_eof()
                    else:
                        _abort(request, resp)
                    break
                if not chunk:
                    await resp.write_eof()
                    complete = True
                    break
            last.append(chunk)
            if capture is not None:
                capture.add(chunk)
            if content.at_eof():
                # The last chunk: headers (if still held), data and terminator leave together.
                await resp.write_eof(chunk)
                sent += len(chunk)
                complete = True
                break
            await resp.write(chunk)
            sent += len(chunk)
            chunk = b""
    except ConnectionResetError:
        # The client left (ClientConnectionResetError is a ConnectionResetError); the caller
        # closes the upstream so generation stops.
        pass
    return Relayed(resp, sent, complete, tail_of(last), broken)


def _abort(request: web.Request, resp: web.StreamResponse) -> None:
    # The upstream broke mid-body. Ending the response normally (a final empty chunk) would make
    # a truncated body look complete, so drop the client connection instead, as nginx and Go's
    # ReverseProxy do. aiohttp's own write_eof afterwards meets a closed transport, which it
    # treats as a client disconnect.
    resp.force_close()
    transport = request.transport
    if transport is not None:
        transport.close()
