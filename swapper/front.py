"""The front door: a lean HTTP/1.1 server for the requests that must be fast.

Why: aiohttp's server side costs ~175-195 µs of CPU per request on the 2-vCPU machines swapper is
measured on (request objects, routing, response objects, the writer), more than the ≤150 µs a
whole proxied request may cost (../shared/docs/performance-anchors.md). So inference requests are
served here, straight on the transport: a well-formed HTTP/1.1 ``POST`` with a ``Content-Length``
body to an inference route (``routes.BODY_ROUTES``). A model that can serve at once is granted
without a message round trip (``RunLoop.try_acquire``); otherwise the request waits here for its
load or its turn (``RunLoop.acquire``), and refusals (429, 503, 507, a failed load) are answered
here with the usual JSON error.

Everything else is handed, with the bytes read so far, to aiohttp's ``RequestHandler`` on the same
connection, which keeps that connection from then on: other routes, chunked or ``Expect``
uploads, HTTP/1.0, bodies over ``maxBodyBytes``, bad JSON, unknown models, a failed API key, and a
streamed request that must wait while ``sendLoadingState`` is on (aiohttp's path streams the
loading state). The parser is deliberately conservative: whatever it is not sure of, the
battle-tested one answers, so this module never has to judge a malformed request.

Owns: ``Front`` owns the set of connections still on the front door (``FrontSite.stop`` drains
them); a ``FrontConn`` owns its read buffer and the task serving its current request. Requests
are served one at a time per connection, in order (pipelined bytes wait in the buffer).

Per request this does what ``routes.handle_model_request`` does, with the same helpers (model id,
lease, ``RequestTrack`` for metrics and events, shaping, ``proxy.send``), and writes the upstream's
answer itself: status and headers minus hop-by-hop ones, then the body verbatim with its
``Content-Length``, or re-chunked (SSE also gets ``X-Accel-Buffering: no``). Backpressure holds end
to end: a client that stops reading pauses this writer (``pause_writing``), which stops reading
the upstream, whose socket then fills. A client that leaves cancels the request's task, which
closes the upstream connection on the way out, so llama-server stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Final, cast
from urllib.parse import parse_qsl

import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from swapper import auth, modelid, proxy
from swapper.errors import SwapperError, error_body
from swapper.events import EVENTS, EventBus
from swapper.h1pool import H1Pool, Response
from swapper.routes import (
    BODY_ROUTES,
    CONFIG,
    RUNLOOP,
    SESSION,
    choose_model,
    upstream_request,
    wants_loading_state,
)
from swapper.runloop import RunLoop

__all__ = ["Front", "FrontConn", "FrontSite"]

log = structlog.get_logger("swapper.front")

MAX_HEAD: Final = 16 * 1024  # a longer head goes to aiohttp, which has its own limits
MAX_PIPELINED: Final = 1024 * 1024  # bytes buffered behind a request in service; then stop reading
KEEPALIVE: Final = 75.0  # seconds an idle connection stays open (aiohttp's default)
_FAST_PATHS: Final = frozenset(BODY_ROUTES)
# Request headers that send a request to aiohttp: framings and upgrades this parser leaves alone.
_SLOW_HEADERS: Final = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
# RFC 9110 token characters: what a header name may be made of.
_TOKEN_BYTES: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789" + bytes(range(65, 91)) + bytes(range(97, 123)))
_END: Final = b"0\r\n\r\n"


class Front:
    """Protocol factory and registry for the front-door connections of one server."""

    def __init__(self, app: web.Application, slow: Callable[[], asyncio.Protocol]) -> None:
        self.app = app
        self.slow = slow  # aiohttp's server: makes the RequestHandler a connection is handed to
        self.conns: set[FrontConn] = set()
        self.served = 0  # model requests served here
        self.handed = 0  # connections handed to aiohttp
        self.closing = False
        self._drained = asyncio.Event()
        self._runloop: RunLoop | None = None
        self._pool: H1Pool | None = None
        self._bus: EventBus | None = None
        # The keys aiohttp's auth middleware was built with (at start-up, like it).
        self.keys = tuple(key.encode() for key in app[CONFIG].api_keys)

    def __call__(self) -> FrontConn:
        return FrontConn(self)

    def parts(self) -> tuple[RunLoop, H1Pool, EventBus]:
        """The run loop, forwarding pool and event bus (looked up once, after start-up set them)."""
        if self._runloop is None or self._pool is None or self._bus is None:
            self._runloop = self.app[RUNLOOP]
            self._pool = proxy.pool_of(self.app[SESSION])
            self._bus = self.app[EVENTS]
        return self._runloop, self._pool, self._bus

    def begin_shutdown(self) -> None:
        """Closes idle connections; busy ones close once their current response is complete."""
        self.closing = True
        for conn in list(self.conns):
            conn.close_if_idle()
        self._note_idle()

    async def wait_drained(self) -> None:
        """Returns once no connection is serving a fast request (after ``begin_shutdown``)."""
        await self._drained.wait()

    def forget(self, conn: FrontConn) -> None:
        self.conns.discard(conn)
        self._note_idle()

    def _note_idle(self) -> None:
        if self.closing and not any(conn.busy for conn in self.conns):
            self._drained.set()


class FrontConn(asyncio.Protocol):
    """One client connection while it is on the fast path."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance() check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._front.conns.add(self)
        if self._front.closing:
            self._transport.close()
            return
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._cancel_idle_timer()
        if self._task is not None:
            self._task.cancel()  # the client left: the task closes the upstream and releases
        else:
            self._front.forget(self)
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._task is not None:
            if len(self._buf) > MAX_PIPELINED and not self._read_paused and self._transport is not None:
                self._read_paused = True
                self._transport.pause_reading()
            return
        self._parse()

    def eof_received(self) -> bool | None:
        return None  # close: a client that half-closed is gone for our purposes

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def close_if_idle(self) -> None:
        if self._task is None and self._transport is not None:
            self._transport.close()

    # ---- parsing and dispatch ----

    def _parse(self) -> None:
        """Dispatches the request at the head of the buffer, if it is complete."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._hand_off()
            return
        head = _parse_head(bytes(buf[:end]))
        if head is None:
            self._hand_off()
            return
        method, target, headers, length, close = head
        path, _, query = target.partition("?")
        if method != "POST" or path not in _FAST_PATHS or self._front.closing:
            self._hand_off()
            return
        runloop = self._front.parts()[0]
        if length > runloop.config.max_body_bytes:
            self._hand_off()  # aiohttp answers 413
            return
        if len(buf) < end + 4 + length:
            return  # the body is still arriving
        body = bytes(buf[end + 4 : end + 4 + length])
        request = _Request(method, target, path, query, headers, body, close, bytes(buf[: end + 4 + length]))
        del buf[: end + 4 + length]
        self._cancel_idle_timer()
        self._task = asyncio.get_running_loop().create_task(self._serve(request))

    def _hand_off(self, first: bytes = b"") -> None:
        """Gives this connection, with ``first`` and every byte buffered, to aiohttp for good."""
        transport = self._transport
        data = first + bytes(self._buf)
        self._buf.clear()
        self._cancel_idle_timer()
        self._front.handed += 1
        self._front.forget(self)
        if transport is None or transport.is_closing():
            return
        handler = self._front.slow()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._write_paused:
            handler.pause_writing()
        if data:
            handler.data_received(data)
        if self._read_paused:
            transport.resume_reading()

    # ---- serving one request ----

    async def _serve(self, request: _Request) -> None:
        keep = False
        try:
            keep = await self._serve_model(request)
        except asyncio.CancelledError:
            pass  # the client left, or the model is being stopped under it (unload, reload)
        except Exception:
            log.exception("front door failed", path=request.path)
        finally:
            self._task = None
        if request.handed:
            return
        transport = self._transport
        if transport is None:
            self._front.forget(self)
        elif not keep or request.close or self._front.closing:
            transport.close()
            self._front.forget(self)
        else:
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self._arm_idle_timer()
            if self._buf:
                self._parse()

    async def _serve_model(self, request: _Request) -> bool:
        """Serves ``request`` or hands the connection off; True if the connection may be reused."""
        runloop, pool, bus = self._front.parts()
        config = runloop.config  # a reload replaces it; read it once per request
        content_type = request.header("content-type")
        try:
            wanted = modelid.extract(request.method, content_type, request.body, _query(request.query))
            model = choose_model(wanted.model, config, runloop)
            keys = self._front.keys
            if keys and not auth.key_matches(auth.presented_keys(CIMultiDict(request.headers)), keys):
                raise SwapperError("unauthorized")  # aiohttp's middleware answers and logs it
        except SwapperError:
            return self._slow(request)
        cfg = config.models[model]
        req_id = runloop.new_request_id()
        lease = runloop.try_acquire(req_id, model)
        if lease is None and wanted.stream and wants_loading_state(config, cfg, request.path):
            return self._slow(request)  # it has to wait, and aiohttp's path streams the loading state
        self._front.served += 1
        track = bus.track(req_id, model, request.path, request.method, request.path)
        upstream = None
        try:
            if lease is None:
                lease = await runloop.acquire(req_id, model)  # a load or a queue: wait here
            track.granted()
            url, body = upstream_request(lease, cfg, wanted, content_type, request.body, request.target)
            headers = proxy.upstream_headers(request.headers, request.header("connection"), identity=False)
            started = time.perf_counter()
            upstream = await proxy.send(pool, request.method, URL(url, encoded=True), headers, body)
            track.forwarded(upstream.status, time.perf_counter() - started)
            if proxy.is_streamed(upstream.headers):
                upstream.do_not_pool()  # llama-server closes it after a streamed body
            return await self._relay(upstream, request.close or self._front.closing)
        except SwapperError as err:  # refused (429, 503, 507...), failed to load, upstream unreachable
            track.failed(err.status)
            self._write_error(err)
            return not request.close
        finally:
            if upstream is not None:
                upstream.close()  # back to the pool after a complete body; else closed
            runloop.release(req_id)
            track.done()

    def _slow(self, request: _Request) -> bool:
        request.handed = True
        self._hand_off(request.raw)
        return False

    async def _relay(self, upstream: Response, close: bool) -> bool:
        """Writes the upstream's answer; True if it completed (the connection may be reused)."""
        headers = upstream.headers
        status = upstream.status
        sse = proxy.is_sse(headers)
        bodiless = status in (204, 304)
        chunked = not bodiless and ("content-length" not in headers or "transfer-encoding" in headers)
        extra = ""
        if chunked:
            extra += "Transfer-Encoding: chunked\r\n"
        if sse:
            extra += "X-Accel-Buffering: no\r\n"  # nginx and friends in front of us must not buffer
        if close:
            extra += "Connection: close\r\n"
        head = proxy.response_head(status, upstream.reason, headers, extra, rechunked=chunked)
        first = b""
        if not sse and not bodiless:
            # Read ahead: a small answer leaves in one write, and an upstream that dies before its
            # body is still a clean 502.
            try:
                first = await upstream.readany()
            except proxy.UPSTREAM_READ_ERRORS as exc:
                self._write_error(SwapperError(f"upstream broke before sending a body: {exc!r}", status=502))
                return False
        if bodiless:
            return self._write(head)
        start = head + _frame(first, chunked) if first else head
        if upstream.at_eof():
            return self._write(start + _END if chunked else start)
        if not self._write(start):
            return False
        while True:
            if self._write_paused:
                await self._wait_writable()
            try:
                chunk = await upstream.readany()
            except proxy.UPSTREAM_READ_ERRORS:
                # A truncated body must not look complete: drop the client connection (nginx and
                # Go's ReverseProxy do the same).
                if self._transport is not None:
                    self._transport.close()
                return False
            if not chunk:
                return self._write(_END) if chunked else self._alive()
            if upstream.at_eof():
                return self._write(_frame(chunk, chunked) + (_END if chunked else b""))
            if not self._write(_frame(chunk, chunked)):
                return False

    def _write(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    def _alive(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _write_error(self, err: SwapperError) -> None:
        body = error_body(err)
        lines = "".join(f"{name}: {value}\r\n" for name, value in err.headers.items())
        head = (
            f"HTTP/1.1 {err.status} {_reason(err.status)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{lines}\r\n"
        )
        self._write(head.encode() + body)

    async def _wait_writable(self) -> None:
        while self._write_paused and self._transport is not None:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def _wake_writer(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        self._idle_timer = asyncio.get_running_loop().call_later(KEEPALIVE, self.close_if_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class _Request:
    __slots__ = ("body", "close", "handed", "headers", "method", "path", "query", "raw", "target")

    def __init__(
        self,
        method: str,
        target: str,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        body: bytes,
        close: bool,
        raw: bytes,
    ) -> None:
        self.method = method
        self.target = target  # path and query as the client sent them
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.close = close  # the client asked to close after this response
        self.raw = raw  # the request's bytes, for a hand-off
        self.handed = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]], int, bool] | None:
    """(method, target, headers, content length, close) of a plain HTTP/1.1 request head; None for
    anything this parser leaves to aiohttp (no Content-Length, other framings, odd syntax)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    headers: list[tuple[str, str]] = []
    length = -1
    close = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not _TOKEN_BYTES.issuperset(name):
            return None  # also obs-fold, and whitespace before the colon (smuggling vectors)
        lower = name.lower()
        value = value.strip(b" \t")
        if lower in _SLOW_HEADERS:
            return None
        if lower == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif lower == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            close = b"close" in tokens
        headers.append((name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
    if length < 0:
        return None
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return parts[0].decode("ascii", "replace"), target, headers, length, close


def _query(query: str) -> dict[str, str]:
    """The query's fields, the first value of each (as aiohttp's ``request.query.get`` gives)."""
    fields: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        fields.setdefault(name, value)
    return fields


def _frame(data: bytes, chunked: bool) -> bytes:
    if not chunked:
        return data
    return b"%x\r\n%b\r\n" % (len(data), data)


def _reason(status: int) -> str:
    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase
    return "Error"


class FrontSite(web.BaseSite):
    """A TCP site whose connections start on the front door (``Front``), not on aiohttp.

    ``stop()`` stops listening, closes idle fast-path connections, and waits up to ``grace``
    seconds for fast requests in service to finish, before the runner drains aiohttp's own.
    """

    __slots__ = ("_front", "_grace", "_host", "_listener", "_port")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, grace: float) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._grace = grace
        self._front: Front | None = None
        self._listener: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def front(self) -> Front:
        assert self._front is not None, "start() first"
        return self._front

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._listener is not None and self._listener.sockets, "start() first"
        return int(self._listener.sockets[0].getsockname()[1])

    async def start(self) -> None:
        await super().start()
        runner = cast(web.AppRunner, self._runner)
        server = runner.server
        assert server is not None
        self._front = Front(runner.app, server)
        self._listener = await asyncio.get_running_loop().create_server(
            self._front, self._host, self._port, reuse_address=True, backlog=self._backlog
        )
        self._server = self._listener

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._front is not None:
            self._front.begin_shutdown()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._grace):
                    await self._front.wait_drained()
        await super().stop()
