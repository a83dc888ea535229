"""Forward one request to one upstream URL and stream the answer back: swapper's hot path.

Owns: nothing long-lived. ``make_session()`` builds the one shared ``ClientSession`` (its owner is
``server``'s cleanup context, which closes it); its connector also carries the ``h1pool.H1Pool``
that ``forward()`` sends through (aiohttp's client costs as much CPU per request as all the rest of
the proxy; see h1pool), and closing the session closes that pool too. ``forward()`` owns one
upstream response for the length of one call and always closes or releases it before returning or
raising.

Must not touch: models, leases, children, the run loop, metrics policy or logging policy. It
returns what happened (status, bytes, time to first byte, whether the body completed) and lets its
caller record it. Errors before the client saw anything are raised as ``UpstreamError`` for the
caller to render; nothing here renders an error body.

Concurrency: ``forward()`` runs in the request's handler task and is cancel-safe. With
``handler_cancellation=True`` a client that leaves cancels the task; the ``CancelledError``
propagates and the upstream connection is closed on the way out, so llama-server sees the
disconnect and stops generating. Backpressure holds end to end: the loop is ``readany()`` →
``await resp.write()`` with no queue in between; aiohttp's server write waits for the client to
drain, and h1pool stops reading the upstream socket while unread bytes pile up, so a slow client
pauses the upstream (DESIGN.md, "How to write a correct streaming proxy").

Per-chunk work is one read, one write and a length sum: no logging, no JSON parsing, and no
copies beyond de-chunking.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from swapper.errors import UpstreamError, UpstreamRefused
from swapper.h1pool import ConnectFailed, Disconnected, H1Pool, Response

__all__ = [
    "UPSTREAM_READ_ERRORS",
    "ForwardResult",
    "failed_before_response",
    "forward",
    "hop_by_hop",
    "is_sse",
    "is_streamed",
    "make_session",
    "pool_of",
    "response_head",
    "send",
    "upstream_headers",
]

# RFC 9110 §7.6.1 hop-by-hop headers (with the Proxy-* family). Dropping them by name from a
# copy beats filtering header by header in Python (about half the cost, measured).
_HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Connection",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Authentication-Info",
)
# The body is re-framed from the bytes we pass; Host comes from the upstream URL; Expect was
# answered by our own server, and the upstream gets the whole body at once.
_REQUEST_DROP = (*_HOP_BY_HOP, "Host", "Content-Length", "Expect")
_REQUEST_DROP_LOWER = frozenset(name.lower() for name in _REQUEST_DROP)
# Content-Length stays: the body passes through verbatim (no decompression), so it is still true,
# and a sized response lets the client keep its connection without chunked framing.
_RESPONSE_DROP = _HOP_BY_HOP
_RESPONSE_DROP_LOWER = frozenset(name.lower() for name in _RESPONSE_DROP)
# The same as whole header lines of a response's header block (h1pool's Response.block: each line
# after a CRLF, checked to be "name:value"), to cut them out in one scan.
_RESPONSE_DROP_LINES = re.compile("\r\n(?:" + "|".join(_RESPONSE_DROP) + "):[^\r\n]*", re.I)
_RECHUNKED_DROP_LINES = re.compile(
    "\r\n(?:" + "|".join((*_RESPONSE_DROP, "Content-Length")) + "):[^\r\n]*", re.I
)
# Connection values that name no extra hop-by-hop header, so need no parsing.
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "Keep-Alive", "Close"})
# aiohttp would otherwise invent these when the client sent none. Accept-Encoding matters most:
# an invented "gzip" would make the upstream compress for a client that never asked for it.
_NO_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
_SSE = "text/event-stream"
# What reading the upstream body can raise when the upstream breaks mid-body (h1pool's errors
# are ConnectionErrors).
UPSTREAM_READ_ERRORS = (OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class ForwardResult:
    """What one ``forward()`` did.

    ``status`` is the upstream's status (also when it was appended to a caller's response).
    ``bytes_out`` counts body bytes written to the client (not headers, not a caller's preamble).
    ``ttfb`` is seconds from sending the request to the upstream's response headers, retry
    included. ``complete`` is False when the upstream broke mid-body (the client connection was
    then closed without a clean end, so the client can tell) or the client left.
    """

    status: int
    bytes_out: int
    ttfb: float
    response: web.StreamResponse
    complete: bool


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector (health probes and other non-forwarding requests use it) that also
    owns the pool ``forward()`` sends through, so that closing the session closes both."""

    def __init__(self, pool: H1Pool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.h1pool = pool

    async def close(self, *, abort_ssl: bool = False) -> None:
        self.h1pool.close()
        await super().close(abort_ssl=abort_ssl)


class _CoalescingResponse(web.StreamResponse):
    # Hold the headers until the first body write, so a small answer leaves in one segment (the
    # same trick web.Response uses). Only for non-SSE bodies, whose first chunk is already read.
    _send_headers_immediately = False


def make_session() -> aiohttp.ClientSession:
    """Build the shared upstream session; call it from the running loop, close it on shutdown.

    No total or read timeout: a generation may legitimately run for many minutes between bytes
    (prompt processing), and the client's disconnect is what ends a request early.
    """
    pool = H1Pool(connect_timeout=10.0, keepalive=30.0)
    connector = _Connector(pool, limit=0, keepalive_timeout=30.0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        auto_decompress=False,  # Content-Encoding is forwarded, so the bytes must be too
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
    )


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: str | URL,
    body: bytes,
    *,
    response: web.StreamResponse | None = None,
    on_refused: Callable[[], Awaitable[tuple[str, bytes]]] | None = None,
) -> ForwardResult:
    """Send ``request.method url`` with the client's headers and ``body``, relay the answer.

    ``url`` is the upstream base + path + query, already percent-encoded (build it from
    ``request.raw_path``); it is used verbatim. ``body`` is sent with a fresh Content-Length.

    Without ``response``, the upstream's status and headers (minus hop-by-hop ones; plus
    ``X-Accel-Buffering: no`` for SSE) go to the client, then the body as it arrives. With
    ``response`` (already prepared by the caller, e.g. a loading-state SSE preamble) only the
    upstream body is appended to it; the upstream is then asked for an unencoded body, since
    the caller's headers carry no Content-Encoding.

    Raises ``UpstreamError`` if the upstream refuses, resets or times out before its response
    headers arrive, or (non-SSE) breaks before the first body byte: nothing from the upstream
    has been written, and the caller renders the error (with ``response``, by ending its own
    stream). Later failures end the client's stream and return with ``complete=False``; an
    upstream that broke mid-body makes this close the client connection, so the handler may then
    be cancelled at its next ``await`` exactly as if the client had left. ``CancelledError``
    propagates after the upstream connection is closed.
    """
    target = URL(url, encoded=True) if isinstance(url, str) else url
    incoming = request.headers
    headers = upstream_headers(incoming.items(), incoming.get(hdrs.CONNECTION), identity=response is not None)
    started = time.perf_counter()
    try:
        upstream = await send(pool_of(session), request.method, target, headers, body)
    except UpstreamRefused:
        if on_refused is None:
            raise
        url, body = await on_refused()
        target = URL(url, encoded=True)
        upstream = await send(pool_of(session), request.method, target, headers, body)
    ttfb = time.perf_counter() - started
    try:
        if is_streamed(upstream.headers):
            # llama-server closes the connection after a streamed body although it said
            # keep-alive (docs/real-upstreams.md); pooling it would fail the next request.
            upstream.do_not_pool()
        if response is None:
            resp, bytes_out, complete = await _relay(request, upstream)
        else:
            resp = response
            bytes_out, complete = await _pump(request, response, upstream, b"")
        return ForwardResult(upstream.status, bytes_out, ttfb, resp, complete)
    finally:
        # After a complete body the connection is already back in the pool (or closed, see
        # above); otherwise this closes it, which is how the upstream learns the client left.
        upstream.close()


def pool_of(session: aiohttp.ClientSession) -> H1Pool:
    """The forwarding pool of a session made by ``make_session()``."""
    connector = session.connector
    if not isinstance(connector, _Connector):
        if connector is None:  # closed: swapper is shutting down
            raise UpstreamError("the upstream session is closed")
        raise TypeError("forward() needs a session made by proxy.make_session()")
    return connector.h1pool


def upstream_headers(
    incoming: Iterable[tuple[str, str]], connection: str | None, *, identity: bool
) -> list[tuple[str, str]]:
    """The client's headers to send upstream: minus hop-by-hop ones (also those named in its
    ``Connection`` value), Host, Content-Length and Expect. ``identity`` asks for an unencoded body."""
    drop = _REQUEST_DROP_LOWER
    if connection and connection not in _PLAIN_CONNECTION:
        drop = drop | hop_by_hop(connection)
    if identity:
        drop = drop | {"accept-encoding"}
    out = [(name, value) for name, value in incoming if name.lower() not in drop]
    if identity:
        out.append((hdrs.ACCEPT_ENCODING, "identity"))
    return out


def hop_by_hop(connection: str) -> frozenset[str]:
    """The header names (lower case) a ``Connection`` value makes hop-by-hop (RFC 9110 §7.6.1)."""
    return frozenset(token for part in connection.split(",") if (token := part.strip().lower()))


def response_head(upstream: Response, extra: str, *, rechunked: bool) -> bytes:
    """A status line and the upstream's headers minus hop-by-hop ones, then ``extra`` (header
    lines, each ending in CRLF) and the blank line: what the client gets, before the body.
    ``rechunked`` drops Content-Length too (the body goes out chunked)."""
    connection = upstream.connection
    if not connection or connection in _PLAIN_CONNECTION:
        # The common case: the header lines as received, the hop-by-hop ones cut out in one scan.
        drop = _RECHUNKED_DROP_LINES if rechunked else _RESPONSE_DROP_LINES
        lines = drop.sub("", upstream.block)
        head = f"HTTP/1.1 {upstream.status} {upstream.reason}{lines}\r\n{extra}\r\n"
        return head.encode("utf-8", "surrogateescape")  # how h1pool decoded them
    # Connection names more hop-by-hop headers (RFC 9110 §7.6.1): filter header by header.
    names = _RESPONSE_DROP_LOWER | hop_by_hop(connection)
    if rechunked:
        names |= {"content-length"}
    parts = [f"HTTP/1.1 {upstream.status} {upstream.reason}\r\n"]
    parts += [f"{name}: {value}\r\n" for name, value in upstream.headers.items() if name.lower() not in names]
    parts.append(extra)
    parts.append("\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")


def _drop(headers: CIMultiDict[str], names: tuple[str, ...], connection: str | None) -> None:
    for name in names:
        headers.popall(name, None)
    if connection and connection not in _PLAIN_CONNECTION:
        # Headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
        for token in connection.split(","):
            if token := token.strip():
                headers.popall(token, None)


async def send(pool: H1Pool, method: str, url: URL, headers: list[tuple[str, str]], body: bytes) -> Response:
    """Sends one request through ``pool`` and returns the response head; raises ``UpstreamError``
    (nothing reached the client yet) if the upstream could not be reached or broke first."""
    try:
        try:
            return await pool.request(method, url, headers, body)
        except Disconnected as exc:
            if exc.response_started:
                raise
            # llama-server closes its connection after every streamed response although it said
            # keep-alive (docs/real-upstreams.md); a pooled connection can be dead before the FIN
            # was seen. No response byte arrived, so one retry on a fresh connection is safe. A
            # connection that was never made (ConnectFailed) is not retried: it would fail again.
            return await pool.request(method, url, headers, body, fresh=True)
    except OSError as exc:  # h1pool's errors, TimeoutError included
        raise failed_before_response(exc, url) from exc


def failed_before_response(exc: Exception, url: URL) -> UpstreamError:
    """What to answer when ``url``'s upstream could not be reached (``UpstreamRefused``: nothing
    was sent) or broke before its response head."""
    if isinstance(exc, ConnectFailed):
        return UpstreamRefused(f"upstream {url.origin()} refused the connection: {exc.strerror}")
    if isinstance(exc, TimeoutError):
        return UpstreamError(f"upstream {url.origin()} timed out before responding")
    return UpstreamError(f"upstream {url.origin()} failed before responding: {exc!r}")


async def _relay(request: web.Request, upstream: Response) -> tuple[web.StreamResponse, int, bool]:
    first = b""
    sse = is_sse(upstream.headers)
    if sse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    else:
        # Read ahead one chunk: a non-streamed answer then leaves in one write (headers held by
        # _CoalescingResponse), and an upstream that dies before its body is still a clean 502.
        try:
            first = await upstream.readany()
        except UPSTREAM_READ_ERRORS as exc:
            raise UpstreamError(f"upstream broke before sending a body: {exc!r}") from exc
        resp = _CoalescingResponse(status=upstream.status, reason=upstream.reason)
    headers = resp.headers
    headers.extend(upstream.headers)
    _drop(headers, _RESPONSE_DROP, upstream.headers.get(hdrs.CONNECTION))
    if sse:
        headers["X-Accel-Buffering"] = "no"  # nginx and friends in front of us must not buffer SSE
    try:
        await resp.prepare(request)
    except ConnectionResetError:  # the client left while the upstream was answering
        return resp, 0, False
    sent, complete = await _pump(request, resp, upstream, first)
    return resp, sent, complete


def is_sse(headers: Mapping[str, str]) -> bool:
    return headers.get(hdrs.CONTENT_TYPE, "").lower().startswith(_SSE)


def is_streamed(headers: Mapping[str, str]) -> bool:
    """Whether the upstream closes the connection after this answer although it said keep-alive.

    Sized and empty (204, 304, HEAD) answers keep their connection; chunked and SSE ones don't
    (llama-server, docs/real-upstreams.md).
    """
    return "chunked" in headers.get(hdrs.TRANSFER_ENCODING, "").lower() or is_sse(headers)


async def _pump(
    request: web.Request, resp: web.StreamResponse, content: Response, chunk: bytes
) -> tuple[int, bool]:
    """Copy the upstream body to the prepared ``resp``; return (bytes written, completed)."""
    sent = 0
    try:
        while True:
            if not chunk:
                try:
                    chunk = await content.readany()
                except UPSTREAM_READ_ERRORS:
                    _abort(request, resp)
                    return sent, False
                if not chunk:
                    await resp.write_eof()
                    return sent, True
            if content.at_eof():
                # The last chunk: headers (if still held), data and terminator leave together.
                await resp.write_eof(chunk)
                return sent + len(chunk), True
            await resp.write(chunk)
            sent += len(chunk)
            chunk = b""
    except ConnectionResetError:
        # The client left (ClientConnectionResetError is a ConnectionResetError); the caller's
        # finally closes the upstream so generation stops.
        return sent, False


def _abort(request: web.Request, resp: web.StreamResponse) -> None:
    # The upstream broke mid-body. Ending the response normally (a final empty chunk) would make
    # a truncated body look complete, so drop the client connection instead, as nginx and Go's
    # ReverseProxy do. aiohttp's own write_eof afterwards meets a closed transport, which it
    # treats as a client disconnect.
    resp.force_close()
    transport = request.transport
    if transport is not None:
        transport.close()
