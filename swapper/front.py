"""The front door: a lean HTTP/1.1 server for the requests that must be fast.

Why: aiohttp's server side costs ~175-195 µs of CPU per request on the 2-vCPU machines swapper is
measured on (request objects, routing, response objects, the writer), more than the ≤150 µs a
whole proxied request may cost (../shared/docs/performance-anchors.md). So inference requests are
served here, straight on the transport: a well-formed HTTP/1.1 ``POST`` with a ``Content-Length``
body to an inference route (``routes.BODY_ROUTES``). A model that can serve at once is granted
without a message round trip (``RunLoop.try_acquire``); otherwise the request waits here for its
load or its turn (``RunLoop.acquire``), and refusals (429, 503, 507, a failed load) are answered
here with the usual JSON error. ``GET /health``, ``/v1/models`` and ``/models`` are answered here
too (with ``routes.model_list``), so that a client that lists models on a connection before its
inference requests (an SDK's pool, a chat UI's backend) keeps that connection on this path.

Everything else is handed, with the bytes read so far, to aiohttp's ``RequestHandler`` on the same
connection, which keeps that connection from then on: other routes, chunked uploads, HTTP/1.0,
an ``Expect`` other than 100-continue, bodies over ``maxBodyBytes``, bad JSON, unknown models, a
failed API key, and a streamed request that must wait while ``sendLoadingState`` is on (aiohttp's
path streams the loading state). The parser is deliberately conservative: whatever it is not sure of, the
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
import functools
import json
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
from swapper.config import ModelConfig
from swapper.errors import SwapperError, UpstreamRefused, error_body
from swapper.events import EVENTS, EventBus, RequestTrack
from swapper.h1pool import HEADER_LINE, Connection, Disconnected, H1Pool, Response
from swapper.messages import Lease
from swapper.routes import (
    BODY_ROUTES,
    CONFIG,
    RUNLOOP,
    SESSION,
    choose_model,
    model_list,
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
# GETs answered here (routes.py's handlers answer the same on aiohttp's path).
_ANSWERED_GETS: Final = frozenset({"/health", "/v1/models", "/models"})
_HEALTH: Final = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK"
_HEALTH_CLOSE: Final = _HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
# Request headers _parse_head looks at (lower case); Transfer-Encoding and Upgrade send the
# request to aiohttp: framings and upgrades this parser leaves alone.
_FRAMING_HEADERS: Final = frozenset(
    {"content-length", "content-type", "expect", "connection", "transfer-encoding", "upgrade"}
)
# Header lines are matched with h1pool.HEADER_LINE, which leaves trailing blanks on a value (a
# lazy match that drops them costs 2.5x): _parse_head strips them in the rare head that has any.
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_BODILESS: Final = frozenset({204, 304})  # answers that never have a body
_END: Final = b"0\r\n\r\n"


class Front:
    """Protocol factory and registry for the front-door connections of one server."""

    def __init__(self, app: web.Application, slow: Callable[[], asyncio.Protocol]) -> None:
        self.app = app
        self.slow = slow  # aiohttp's server: makes the RequestHandler a connection is handed to
        self.conns: set[FrontConn] = set()
        self.served = 0  # model requests served here
        self.inline = 0  # of those, answered with no task (FrontConn._start)
        self.answered = 0  # GETs answered here (health, model list)
        self.handed = 0  # connections handed to aiohttp
        self.closing = False
        # Cached: each asyncio.get_running_loop() is a getpid() syscall (fork detection).
        self.loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._parts: tuple[RunLoop, H1Pool, EventBus] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        # The keys aiohttp's auth middleware was built with (at start-up, like it).
        self.keys = tuple(key.encode() for key in app[CONFIG].api_keys)

    def __call__(self) -> FrontConn:
        return FrontConn(self)

    def parts(self) -> tuple[RunLoop, H1Pool, EventBus]:
        """The run loop, forwarding pool and event bus (looked up once, after start-up set them)."""
        parts = self._parts
        if parts is None:
            app = self.app
            parts = self._parts = (app[RUNLOOP], proxy.pool_of(app[SESSION]), app[EVENTS])
        return parts

    def sweep_idle(self) -> None:
        """Closes connections idle for ``KEEPALIVE`` seconds, now and every few seconds after.

        One timer for all connections: a timer per connection, re-armed per request, would cost
        every request a heap push and a cancel.
        """
        if self.closing:
            return
        since = time.monotonic() - KEEPALIVE
        for conn in list(self.conns):
            conn.close_if_idle(since)
        self._sweeper = self.loop.call_later(KEEPALIVE / 8, self.sweep_idle)

    def begin_shutdown(self) -> None:
        """Closes idle connections; busy ones close once their current response is complete."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
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
        self._exchange: _Exchange | None = None  # the request in service
        self._upstream: Response | None = None  # the answer being piped to this client
        self._write_paused = False
        self._read_paused = False
        self.active_at = time.monotonic()  # last bytes in or response out; Front sweeps idle ones
        self._continued = False  # 100 Continue sent for the request being received

    @property
    def busy(self) -> bool:
        return self._exchange is not None

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance() check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._front.conns.add(self)
        if self._front.closing:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._exchange is not None:
            self._exchange.cancel()  # the client left: the upstream is closed and the lease released
        else:
            self._front.forget(self)

    def data_received(self, data: bytes) -> None:
        self.active_at = time.monotonic()
        self._buf += data
        if self._exchange is not None:
            if len(self._buf) > MAX_PIPELINED and not self._read_paused and self._transport is not None:
                self._read_paused = True
                self._transport.pause_reading()
            return
        self._parse()

    def eof_received(self) -> bool | None:
        return None  # close: a client that half-closed is gone for our purposes

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading(True)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.pause_reading(False)

    def close_if_idle(self, since: float | None = None) -> None:
        """Closes the connection if no request is in service (and none was since ``since``)."""
        idle = since is None or self.active_at < since
        if idle and self._exchange is None and self._transport is not None:
            self._transport.close()

    # ---- parsing and dispatch ----

    def _parse(self) -> None:
        """Dispatches the requests at the head of the buffer, as far as they are complete."""
        buf = self._buf
        while self._exchange is None and self._transport is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._hand_off()
                return
            head = _parse_head(bytes(buf[:end]), bodyless=buf.startswith(b"GET "))
            if head is None or self._front.closing:
                self._hand_off()
                return
            path, _, query = head.target.partition("?")
            if head.method == "GET":
                # Answered at once, so that a client that lists models (or checks health) on a
                # connection before its inference requests keeps that connection here.
                if head.length > 0 or path not in _ANSWERED_GETS or not self._answer_get(head, path):
                    self._hand_off()
                    return
                del buf[: end + 4]
                self._front.answered += 1
                if head.close:
                    self._transport.close()
                    return
                continue
            if head.method != "POST" or path not in _FAST_PATHS:
                self._hand_off()
                return
            runloop = self._front.parts()[0]
            length = head.length
            if length > runloop.config.max_body_bytes:
                self._hand_off()  # aiohttp answers 413
                return
            if len(buf) < end + 4 + length:
                if head.expect and not self._continued:
                    self._continued = True  # the client waits for this before it sends the body
                    self._transport.write(_CONTINUE)
                return  # the body is still arriving
            self._continued = False
            body = bytes(buf[end + 4 : end + 4 + length])
            request = _Request(head, path, query, body, bytes(buf[: end + 4]))
            del buf[: end + 4 + length]
            self._start(request)
            return  # served one at a time: the next when this one is done

    def _answer_get(self, head: _Head, path: str) -> bool:
        """Answers ``GET /health`` or the model list as aiohttp's handlers would; False (nothing
        written) when aiohttp must: a missing or wrong API key (its middleware answers 401)."""
        if path == "/health":
            self._write(_HEALTH_CLOSE if head.close else _HEALTH)
            return True
        keys = self._front.keys
        if keys and not auth.key_matches(auth.presented_keys(CIMultiDict(head.headers)), keys):
            return False
        body = json.dumps(model_list(self._front.parts()[0])).encode()
        origin = next((v for n, v in head.headers if n.lower() == "origin"), None)
        extra = f"Access-Control-Allow-Origin: {origin}\r\n" if origin else ""
        if head.close:
            extra += "Connection: close\r\n"
        self._write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%b\r\n%b" % (len(body), extra.encode("utf-8", "surrogateescape"), body)
        )
        return True

    def _hand_off(self, first: bytes = b"") -> None:
        """Gives this connection, with ``first`` and every byte buffered, to aiohttp for good."""
        transport = self._transport
        data = first + bytes(self._buf)
        self._buf.clear()
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

    def _start(self, request: _Request) -> None:
        """Serves ``request``: inline while everything goes the common way, else in a task.

        Inline means no task, no future and no await: the grant, the upstream write on a pooled
        connection, and (in the upstream's ``data_received``) the answer, when it is a sized one
        that arrived whole. That is most requests to a ready model, and a task's creation and
        wake-ups cost about as much CPU as the rest of the proxy's Python (scripts/bench_proxy.py).
        At the first step that must wait (a load or queue, a new upstream connection, a retry, a
        streamed or partial body), the rest of the request moves to a task (``_forward``).
        """
        runloop, pool, bus = self._front.parts()
        config = runloop.config  # a reload replaces it; read it once per request
        head = request.head
        try:
            query = _query(request.query) if request.query else {}
            wanted = modelid.extract(head.method, head.content_type, request.body, query)
            model = choose_model(wanted.model, config, runloop)
            keys = self._front.keys
            if keys and not auth.key_matches(auth.presented_keys(CIMultiDict(head.headers)), keys):
                raise SwapperError("unauthorized")  # aiohttp's middleware answers and logs it
        except SwapperError:
            self._slow(request)
            return
        cfg = config.models[model]
        ex = _Exchange(self, request, model, cfg, wanted, runloop.new_request_id())
        lease = runloop.try_acquire(ex.req_id, model, ex)
        if lease is None and wanted.stream and wants_loading_state(config, cfg, request.path):
            self._slow(request)  # it has to wait, and aiohttp's path streams the loading state
            return
        self._front.served += 1
        self._exchange = ex
        if lease is None:
            ex.track = bus.track(ex.req_id, model, request.path, head.method, request.path)
            self._in_task(ex)
            return
        failure = None
        try:
            ex.granted(lease)
            ex.started = time.perf_counter()
            ex.sent = pool.send_now(head.method, _url(ex.url), ex.headers, ex.body, ex.progress)
        except Exception as exc:
            failure = exc
        # Tracked once the request is on its way upstream: the answer waits for none of this.
        ex.track = bus.track(ex.req_id, model, request.path, head.method, request.path)
        ex.track.granted()
        if failure is None:
            if ex.sent is None:
                self._in_task(ex)  # no idle upstream connection
        elif isinstance(failure, SwapperError):  # the body could not be shaped for the model
            self._end_inline(ex, failure)
        else:
            log.error("front door failed", path=request.path, exc_info=failure)
            self.abort(ex)

    def _progress(self, ex: _Exchange) -> None:
        """The inline request's upstream connection moved on (``H1Pool.send_now``)."""
        sent = ex.sent
        assert sent is not None
        if sent.headers is None:
            exc = sent.failure
            if exc is None:
                return  # the head is still arriving
            ex.sent = None
            sent.abandon()
            if isinstance(exc, Disconnected) and not exc.response_started:
                # The pooled connection was dead before it answered (llama-server closes one after
                # every stream): nothing was answered, so retry on a fresh one, as proxy.send does.
                self._in_task(ex)
            else:
                self._end_inline(ex, proxy.failed_before_response(exc, _url(ex.url)))
            return
        arrived = time.perf_counter()
        upstream = ex.upstream = sent.response()
        ex.sent = None
        body = None if proxy.is_sse(upstream.headers) else upstream.take_whole()
        if body is None:
            ex.forwarded(arrived)
            self._in_task(ex)  # streamed, or still arriving
            return
        close = ex.request.head.close or self._front.closing
        head, chunked = _answer_head(upstream, close, sse=False)
        if body:
            head += _frame(body, chunked)
        if chunked:  # never for a bodiless status (_answer_head)
            head += _END
        self._end_inline(ex, None, head, arrived)

    def _end_inline(
        self, ex: _Exchange, err: SwapperError | None, answer: bytes = b"", arrived: float = 0.0
    ) -> None:
        """Writes the inline request's answer (or ``err``), releases it, and goes on to the next.
        ``arrived``: when the upstream's answer came (for its TTFB), recorded after the write."""
        keep = not ex.request.head.close
        if err is not None:
            ex.track.failed(err.status)
            self._write_error(err)
        else:
            keep = self._write(answer)
            ex.forwarded(arrived)
        self._front.inline += 1
        ex.finish()
        # Not from inside the upstream's callback: the next request may reuse its connection.
        self._done(ex, keep, soon=True)

    def abort(self, ex: _Exchange) -> None:
        """Ends the inline request ``ex`` unanswered: its client left, or its model is being stopped."""
        if ex.sent is not None:
            ex.sent.abandon()  # the upstream learns that nobody waits for this answer
            ex.sent = None
        ex.finish()
        self._done(ex, False)

    def _in_task(self, ex: _Exchange) -> None:
        """Goes on with ``ex`` in a task (``_forward``), from wherever it stands."""
        ex.task = self._front.loop.create_task(self._serve(ex))
        # A task cancelled before its first step never runs its coroutine, so neither _forward's
        # finally: the client can leave (or an unload cut it) in the same loop turn that made it.
        ex.task.add_done_callback(ex.task_done)

    async def _serve(self, ex: _Exchange) -> None:
        keep = False
        try:
            keep = await self._forward(ex)
        except asyncio.CancelledError:
            pass  # the client left, or the model is being stopped under it (unload, reload)
        except Exception:
            log.exception("front door failed", path=ex.request.path)
        self._done(ex, keep)

    def _done(self, ex: _Exchange, keep: bool, *, soon: bool = False) -> None:
        """After ``ex``'s answer: closes the connection, or serves what the client sent next."""
        if self._exchange is not ex:
            return  # already ended (an abort, then the task's own end)
        self._exchange = None
        transport = self._transport
        if transport is None:
            self._front.forget(self)
        elif not keep or ex.request.head.close or self._front.closing:
            transport.close()
            self._front.forget(self)
        else:
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            self.active_at = time.monotonic()
            if self._buf:
                if soon:
                    self._front.loop.call_soon(self._parse)
                else:
                    self._parse()

    async def _forward(self, ex: _Exchange) -> bool:
        """The request from wherever ``_start`` left it: waits for its lease if it has none, sends
        it if it was not sent, and relays the answer. True if the connection may be reused."""
        runloop, pool, _ = self._front.parts()
        head = ex.request.head
        try:
            if ex.lease is None:
                ex.granted(await runloop.acquire(ex.req_id, ex.model))  # a load or a queue: wait here
                ex.track.granted()
            upstream = ex.upstream
            if upstream is None:
                ex.started = time.perf_counter()
                try:
                    upstream = await proxy.send(pool, head.method, _url(ex.url), ex.headers, ex.body)
                except UpstreamRefused:
                    # Its child died (the exit is not in yet) or stopped listening: nothing was sent,
                    # so restart it and try once more.
                    assert ex.lease is not None
                    ex.granted(await runloop.reacquire(ex.lease))
                    upstream = await proxy.send(pool, head.method, _url(ex.url), ex.headers, ex.body)
                ex.upstream = upstream
                ex.forwarded(time.perf_counter())
            return await self._relay(upstream, head.close or self._front.closing)
        except SwapperError as err:  # refused (429, 503, 507...), failed to load, upstream unreachable
            ex.track.failed(err.status)
            self._write_error(err)
            return not head.close
        finally:
            ex.finish()

    def _slow(self, request: _Request) -> None:
        self._hand_off(request.head_bytes + request.body)

    async def _relay(self, upstream: Response, close: bool) -> bool:
        """Writes the upstream's answer; True if it completed (the connection may be reused)."""
        sse = proxy.is_sse(upstream.headers)
        head, chunked = _answer_head(upstream, close, sse=sse)
        bodiless = upstream.status in _BODILESS
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
        # The rest goes from the upstream's data_received straight to the client: no task switch
        # per chunk. Reading the upstream pauses while the client does not keep up.
        self._upstream = upstream
        upstream.pipe(self._relay_chunk if chunked else self._relay_bytes)
        if self._write_paused:
            upstream.pause_reading(True)
        try:
            await upstream.wait_done()
        except proxy.UPSTREAM_READ_ERRORS:
            # A truncated body must not look complete: drop the client connection (nginx and
            # Go's ReverseProxy do the same).
            if self._transport is not None:
                self._transport.close()
            return False
        finally:
            self._upstream = None
        return self._alive()

    def _relay_chunk(self, data: bytes, last: bool) -> None:
        transport = self._transport
        if transport is not None:
            if data:
                transport.write(b"%x\r\n%b\r\n%b" % (len(data), data, _END if last else b""))
            elif last:
                transport.write(_END)

    def _relay_bytes(self, data: bytes, last: bool) -> None:
        transport = self._transport
        if transport is not None and data:
            transport.write(data)

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


class _Exchange:
    """One model request in service on a front-door connection, from its grant to its answer.

    It is the run loop's holder of the request's lease (``cancel`` cuts it when the model is
    stopped under it) and owns what the request holds: the lease, its ``RequestTrack``, and the
    upstream connection or response; ``finish`` gives them all back, once.
    """

    __slots__ = (
        "body",
        "cfg",
        "conn",
        "finished",
        "headers",
        "lease",
        "model",
        "req_id",
        "request",
        "sent",
        "started",
        "task",
        "track",
        "upstream",
        "url",
        "wanted",
    )

    def __init__(
        self,
        conn: FrontConn,
        request: _Request,
        model: str,
        cfg: ModelConfig,
        wanted: modelid.RequestModel,
        req_id: int,
    ) -> None:
        self.conn = conn
        self.request = request
        self.model = model
        self.cfg = cfg
        self.wanted = wanted
        self.req_id = req_id
        self.lease: Lease | None = None
        self.track: RequestTrack  # set by FrontConn._start before anything can finish it
        self.task: asyncio.Task[None] | None = None  # once it waits for something
        self.sent: Connection | None = None  # sent inline, no response head yet
        self.upstream: Response | None = None
        self.url = ""
        self.body = b""
        self.headers: list[tuple[str, str]] = []
        self.started = 0.0  # when it went upstream
        self.finished = False

    def granted(self, lease: Lease) -> None:
        """``lease`` is in hand: what goes upstream follows from it (a reacquire's new one too)."""
        first = self.lease is None
        self.lease = lease
        self.req_id = lease.req_id
        request = self.request
        head = request.head
        self.url, self.body = upstream_request(
            lease, self.cfg, self.wanted, head.content_type, request.body, head.target
        )
        if first:
            self.headers = proxy.upstream_headers(head.headers, head.connection, identity=False)

    def forwarded(self, arrived: float) -> None:
        """The upstream's response head came in at ``arrived`` (``time.perf_counter``)."""
        upstream = self.upstream
        assert upstream is not None
        self.track.forwarded(upstream.status, arrived - self.started)
        if proxy.is_streamed(upstream.headers):
            upstream.do_not_pool()  # llama-server closes it after a streamed body

    def progress(self) -> None:
        """Called by the upstream connection of an inline request (``H1Pool.send_now``)."""
        try:
            self.conn._progress(self)
        except Exception:  # never into h1pool's callback, with the lease still held
            log.exception("front door failed", path=self.request.path)
            self.conn.abort(self)

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        elif not self.finished:
            self.conn.abort(self)

    def task_done(self, task: asyncio.Task[None]) -> None:
        """Its task ended: if it never ran (cancelled before its first step), end it here."""
        if not self.finished:
            self.conn.abort(self)

    def finish(self) -> None:
        """Gives back the upstream connection, the lease and the track; idempotent."""
        if self.finished:
            return
        self.finished = True
        if self.sent is not None:
            self.sent.abandon()
            self.sent = None
        if self.upstream is not None:
            self.upstream.close()  # back to the pool after a complete body; else closed
            self.upstream = None
        self.conn._front.parts()[0].release(self.req_id)
        self.track.done()


class _Head:
    """A request head the front door can serve (what ``_parse_head`` accepted)."""

    __slots__ = ("close", "connection", "content_type", "expect", "headers", "length", "method", "target")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        self.method = method
        self.target = target  # path and query as the client sent them
        self.headers = headers
        self.length = -1  # Content-Length
        self.close = False  # the client asked to close after this response
        self.content_type: str | None = None  # the first Content-Type
        self.connection: str | None = None  # every Connection value, comma-joined
        self.expect = False  # Expect: 100-continue (curl sends it for bodies over 1 KiB)


class _Request:
    __slots__ = ("body", "head", "head_bytes", "path", "query")

    def __init__(self, head: _Head, path: str, query: str, body: bytes, head_bytes: bytes) -> None:
        self.head = head
        self.path = path
        self.query = query
        self.body = body
        # The head as received, blank line included: with the body, what a hand-off replays (kept
        # apart so that a large upload is not copied a second time for a hand-off that is rare).
        self.head_bytes = head_bytes


def _parse_head(data: bytes, *, bodyless: bool = False) -> _Head | None:
    """A plain HTTP/1.1 request head with a Content-Length; None for anything this parser leaves
    to aiohttp (no Content-Length, other framings, upgrades, odd syntax). With ``bodyless`` (a
    GET), a head without a Content-Length is accepted too, with ``length`` -1: no body."""
    # One C-level decode and one regex scan: a loop of splits and decodes per line cost ~8 µs a
    # request. UTF-8 with surrogateescape is what each value was decoded with before (CR and LF
    # are ASCII, so decoding the whole head splits nowhere differently), and round-trips on the
    # way out.
    text = data.decode("utf-8", "surrogateescape")
    eol = text.find("\r\n")
    if eol < 0:
        eol = len(text)
    parts = text[:eol].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or not parts[1].startswith("/"):
        return None
    if not (parts[0].isascii() and parts[1].isascii()):
        return None
    fields = HEADER_LINE.findall(text, eol)
    lines = len(fields)
    if text.count("\r", eol) != lines or text.count("\n", eol) != lines:
        # A line that is not ``token: value`` (obs-fold, a blank before the colon), or a bare CR
        # or LF, which an upstream might read as a line break (header smuggling). Each matched
        # line holds one CR and one LF, so equal counts mean the matches are all there is.
        return None
    trailing = " \r\n" in text or "\t\r\n" in text or text.endswith((" ", "\t"))
    head = _Head(parts[0], parts[1], [])
    headers = head.headers
    for name, value in fields:
        if trailing:
            value = value.rstrip(" \t")
        lower = name.lower()
        if lower not in _FRAMING_HEADERS:
            headers.append((name, value))
        elif lower == "content-length":
            if head.length >= 0 or not value.isdigit() or not value.isascii():
                return None
            head.length = int(value)
            headers.append((name, value))
        elif lower == "content-type":
            if head.content_type is None:
                head.content_type = value
            headers.append((name, value))
        elif lower == "expect":
            if value.lower() != "100-continue" or head.expect:
                return None  # aiohttp answers 417
            head.expect = True  # answered here, not forwarded
        elif lower == "connection":
            head.connection = value if head.connection is None else f"{head.connection}, {value}"
            head.close = head.close or "close" in {t.strip().lower() for t in value.split(",")}
            headers.append((name, value))
        else:
            return None  # Transfer-Encoding, Upgrade: aiohttp's
    return head if head.length >= 0 or bodyless else None


def _query(query: str) -> dict[str, str]:
    """The query's fields, the first value of each (as aiohttp's ``request.query.get`` gives)."""
    fields: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        fields.setdefault(name, value)
    return fields


@functools.lru_cache(maxsize=1024)
def _url(url: str) -> URL:
    # A few distinct URLs (models × routes) recur for every request: parse each once.
    return URL(url, encoded=True)


def _answer_head(upstream: Response, close: bool, *, sse: bool) -> tuple[bytes, bool]:
    """The head of the client's answer to ``upstream``, and whether its body goes out chunked
    (the upstream's was, or had no length)."""
    chunked = upstream.status not in _BODILESS and (not upstream.sized or upstream.coded)
    extra = ""
    if chunked:
        extra += "Transfer-Encoding: chunked\r\n"
    if sse:
        extra += "X-Accel-Buffering: no\r\n"  # nginx and friends in front of us must not buffer
    if close:
        extra += "Connection: close\r\n"
    return proxy.response_head(upstream, extra, rechunked=chunked), chunked


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
        self._front.sweep_idle()
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
