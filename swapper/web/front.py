"""The front door: a lean HTTP/1.1 server for the requests that must be fast.

Why: aiohttp's server side (request objects, routing, response objects, the writer) costs more
CPU per request than all the rest of a proxied request. So inference requests are served here,
straight on the transport: an HTTP/1.1 ``POST`` with a Content-Length body (or none) to an
inference route (``routes.BODY_ROUTES``). A model that can serve at once is granted without a
message round trip; otherwise the request waits here for its load or its turn, and refusals (429,
503, 507, a failed load) are answered here with the usual JSON error. The ``routes.ANSWERED_GETS``
(health, the model list) are answered here too, GET and HEAD, so that a client that lists models on
a connection before its inference requests keeps that connection on this path.

Every head is parsed by llhttp (``codec.RequestReader``), with aiohttp's limits and rules: what
llhttp refuses is answered 400 here and the connection closed. Everything else is handed, with
the bytes read so far, to aiohttp's ``RequestHandler`` on the same connection, which keeps that
connection from then on: other routes and methods, chunked uploads, HTTP/1.0, upgrades, bodies
over ``maxBodyBytes``, bad JSON, unknown models, a failed API key, and a streamed request that
must wait while ``sendLoadingState`` is on (aiohttp's path streams the loading state).

Owns: ``Front`` owns the set of connections still on the front door (``FrontSite.stop`` drains
them, one timer sweeps them); a ``FrontConn`` owns its read buffer, its ``RequestReader`` and the
``exchange.Exchange`` of its current request. Requests are served one at a time per connection,
in order (pipelined bytes wait in the buffer).

Bounds: reading stops while a request is in service and more than ``MAX_PIPELINED`` bytes wait
behind it, and while the client does not read what it is sent (``pause_writing``): nothing is
parsed or answered until it does. A head must be whole within ``requestHeaderTimeout`` seconds
of its first byte (408 and close); an idle connection closes
after ``KEEPALIVE`` seconds, here and on aiohttp's side (``runner_options``).

The answer to a model request is the upstream's status and headers minus hop-by-hop ones, then the
body verbatim with its Content-Length, or re-chunked (SSE also gets ``X-Accel-Buffering: no``).
Backpressure holds end to end: a client that stops reading pauses this writer (``pause_writing``),
which stops reading the upstream, whose socket then fills. A client that leaves ends the request,
which closes the upstream connection, so llama-server stops generating.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

import structlog
from aiohttp import web

from swapper.core.errors import BadRequest, SwapperError, error_answer
from swapper.http import relay
from swapper.http.exchange import Exchange, outcome_of
from swapper.http.heads import _answer_head
from swapper.observe.activity import TAIL
from swapper.observe.events import EVENTS, EventBus
from swapper.runtime.runloop import RunLoop
from swapper.web import auth
from swapper.web.answers import _NO_TAIL, _NOTHING_OUT, AnswerWriter
from swapper.web.appkeys import CONFIG, RUNLOOP, SESSION
from swapper.web.routes import ANSWERED_GETS, BODY_ROUTES
from swapper.wire.codec import (
    CHUNK_END,
    BadMessage,
    RequestHead,
    RequestReader,
    chunk,
)
from swapper.wire.h1pool import H1Pool, Response

__all__ = ["Front", "FrontConn", "runner_options"]

log = structlog.get_logger("swapper.web.front")

MAX_PIPELINED: Final = 1024 * 1024  # bytes buffered behind a request in service; then stop reading
KEEPALIVE: Final = 75.0  # seconds an idle connection stays open (aiohttp's default before 3.10)
_FAST_PATHS: Final = frozenset(BODY_ROUTES)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def runner_options() -> dict[str, Any]:
    """How swapper's aiohttp server is run (``web.AppRunner``'s keywords): a handed-off connection
    keeps the front door's idle bound, and a client that leaves cancels its handler."""
    return {"handler_cancellation": True, "access_log": None, "keepalive_timeout": KEEPALIVE}


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
        self.refused = 0  # heads llhttp or the limits refused (400), or too slow (408)
        self.closing = False
        # Cached: each asyncio.get_running_loop() is a getpid() syscall (fork detection).
        self.loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._parts: tuple[RunLoop, H1Pool, EventBus] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        config = app[CONFIG]
        # The keys aiohttp's auth middleware was built with (at start-up, like it).
        self.keys = tuple(key.encode() for key in config.api_keys)
        self.head_timeout = config.request_header_timeout
        self.cors_origins = config.cors_origins  # as the preflights answer (read at start-up)
        self.keepalive = KEEPALIVE
        self._sweep_every = min(self.keepalive, self.head_timeout) / 8

    def __call__(self) -> FrontConn:
        return FrontConn(self)

    def parts(self) -> tuple[RunLoop, H1Pool, EventBus]:
        """The run loop, forwarding pool and event bus (looked up once, after start-up set them)."""
        parts = self._parts
        if parts is None:
            app = self.app
            parts = self._parts = (app[RUNLOOP], relay.pool_of(app[SESSION]), app[EVENTS])
        return parts

    def sweep(self) -> None:
        """Closes connections idle for ``KEEPALIVE`` seconds and heads that overran their
        deadline, now and every few seconds after.

        One timer for all connections: a timer per connection, re-armed per request, would cost
        every request a heap push and a cancel.
        """
        if self.closing:
            return
        now = time.monotonic()
        idle_since, head_since = now - self.keepalive, now - self.head_timeout
        for conn in list(self.conns):
            conn.sweep(idle_since, head_since)
        self._sweeper = self.loop.call_later(self._sweep_every, self.sweep)

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

    def abort_idle(self) -> None:
        """Drops the connections with no request in service that are still open once the grace
        is over: closed, but holding answers their client never reads. A busy one gets its
        answer when the run loop cuts its request."""
        for conn in list(self.conns):
            conn.abort_if_idle()

    def forget(self, conn: FrontConn) -> None:
        self.conns.discard(conn)
        self._note_idle()

    def _note_idle(self) -> None:
        if self.closing and not any(conn.busy for conn in self.conns):
            self._drained.set()


class FrontConn(AnswerWriter, asyncio.Protocol):
    """One client connection while it is on the fast path; ``AnswerWriter`` is its writing side."""

    _front: Front  # the whole front door (the writing side reads only a part of it)

    def __init__(self, front: Front) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        # The current request's bytes from its first one on, and whatever was pipelined after:
        # all of it is what a hand-off gives aiohttp.
        self._buf = bytearray()
        self._reader: RequestReader | None = None
        self._head: RequestHead | None = None  # whole, its body still arriving
        self._keep = True  # the request in service lets the connection live on
        self._head_at = 0.0  # when the current head's first byte was seen (0: no head under way)
        self._exchange: Exchange | None = None  # the request in service
        self._upstream: Response | None = None  # the answer being piped to this client
        self._write_paused = False
        self._read_paused = False
        self.active_at = time.monotonic()  # last bytes in or response out; Front sweeps idle ones
        self._continued = False  # 100 Continue sent for the request being received
        # What of the current answer went out: nothing, a head (and maybe body), or the head of a
        # chunked SSE stream, which a cut or a broken upstream can still end with an error event.
        self._head_out = _NOTHING_OUT
        self._tail: deque[bytes] = _NO_TAIL  # the last reads of the answer being relayed
        self._origin: bytes | None = None  # the model request in service's Origin, for its errors
        self._lingering = False  # answered and half-closed: what arrives is discarded

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
            self._exchange.client_left()  # the upstream is closed and the lease released
        else:
            self._front.forget(self)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        self.active_at = time.monotonic()
        self._buf += data
        if self._exchange is None and not self._write_paused:
            self._parse()
        else:
            self._bound_buffer()

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
        elif self._exchange is None and self._buf and self._transport is not None:
            self._parse()  # what was held back while the client did not read

    def sweep(self, idle_since: float, head_since: float) -> None:
        """Closes the connection if it is idle since before ``idle_since``, or if its head began
        before ``head_since`` and is still not whole (with a 408)."""
        if self._exchange is not None or self._transport is None:
            return
        if self._head_at and self._head_at < head_since and self._head is None:
            self._front.refused += 1
            self._answer(error_answer(_TIMEOUT), close=True)
        elif self.active_at < idle_since:
            self._transport.close()

    def close_if_idle(self) -> None:
        """Closes the connection if no request is in service."""
        if self._exchange is None and self._transport is not None:
            self._transport.close()

    def abort_if_idle(self) -> None:
        if self._exchange is None and self._transport is not None:
            self._transport.abort()

    # ---- reading requests ----

    def _bound_buffer(self) -> None:
        """Stops reading while too much waits unparsed (behind a request in service, or while
        the client does not read its answers)."""
        if len(self._buf) > MAX_PIPELINED and not self._read_paused and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def _parse(self) -> None:
        """Serves the requests at the head of the buffer, as far as they are complete, until one
        is in service, the client stops reading, or the connection is handed off or closed."""
        while self._exchange is None and self._transport is not None:
            if self._write_paused:
                self._bound_buffer()  # resume_writing parses on
                return
            try:
                head = self._read_head()
            except BadMessage as exc:
                self._front.refused += 1
                self._answer(error_answer(BadRequest(f"bad request: {exc}")), close=True)
                return
            if head is None:
                return
            if not self._dispatch(head):
                return
        if self._read_paused and self._transport is not None and len(self._buf) <= MAX_PIPELINED:
            self._read_paused = False
            self._transport.resume_reading()

    def _read_head(self) -> RequestHead | None:
        """The current request's head once it is whole (llhttp reads it as it arrives), else None."""
        if self._head is not None:
            return self._head  # whole already: its body is what was awaited
        if not self._buf:
            self._head_at = 0.0
            return None
        if not self._head_at:
            self._head_at = time.monotonic()
        reader = self._reader
        if reader is None:
            reader = self._reader = RequestReader()
        head = self._head = reader.read_head(self._buf)
        if head is not None:
            self._head_at = 0.0
        return head

    def _dispatch(self, head: RequestHead) -> bool:
        """Acts on a whole head; True if the next request may be read at once."""
        front = self._front
        if head.for_aiohttp or front.closing:
            return self._hand_off()
        method, path = head.method, head.path
        if method in ("GET", "HEAD") and path in ANSWERED_GETS and head.length <= 0:
            return self._answer_get(head, method == "HEAD")
        if method != "POST" or path not in _FAST_PATHS:
            return self._hand_off()
        runloop = front.parts()[0]
        if runloop.config.routes and runloop.config.routes.match(path) is not None:
            return self._hand_off()  # a kind route over an inference path: aiohttp serves it
        length = max(head.length, 0)
        if length > runloop.config.max_body_bytes:
            return self._hand_off()  # aiohttp answers 413
        assert self._reader is not None
        start = self._reader.fed
        if len(self._buf) < start + length:
            if head.expect and not self._continued:
                self._continued = True  # the client waits for this before it sends the body
                self._write(_CONTINUE)
            return False  # the body is still arriving
        self._continued = False
        body = bytes(self._buf[start : start + length])
        self._reader.feed(body)  # llhttp ends the message with its body; the reader is ready again
        # The head as it came: a request checked in _start may still go to aiohttp (a failed key,
        # an unknown model...); kept apart from the body, which is then not copied again.
        head_bytes = bytes(self._buf[:start])
        self._consumed(start + length)
        self._start(head, body, head_bytes)
        return False  # served one at a time: the next when this one is done

    def _consumed(self, size: int) -> None:
        """The current request's ``size`` bytes are read: the next request starts after them."""
        del self._buf[:size]
        self._head = None
        if self._reader is not None:
            self._reader.next()

    def _answer_get(self, head: RequestHead, head_only: bool) -> bool:
        """Answers one of the ``ANSWERED_GETS`` as aiohttp's handler would, unless aiohttp must (a
        missing or wrong API key: its middleware answers 401 and logs it)."""
        front = self._front
        if front.keys and head.path not in auth.OPEN_PATHS and not self._key_ok(head):
            return self._hand_off()
        origin = head.origin
        answer = ANSWERED_GETS[head.path](
            front.app, None if origin is None else origin.decode("utf-8", "surrogateescape")
        )
        assert self._reader is not None
        self._consumed(self._reader.fed)
        front.answered += 1
        close = not head.keep_alive
        self._answer(answer, close=close, head_only=head_only)
        return not close

    def _key_ok(self, head: RequestHead) -> bool:
        return auth.allows(self._front.keys, head.authorization, head.api_key)

    def _hand_off(self, first: bytes = b"") -> bool:
        """Gives this connection, with ``first`` and every byte buffered, to aiohttp for good."""
        transport = self._transport
        data = first + bytes(self._buf)
        self._buf.clear()
        self._reader = self._head = None
        self._front.handed += 1
        self._front.forget(self)
        if transport is None or transport.is_closing():
            return False
        handler = self._front.slow()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._write_paused:
            handler.pause_writing()
        if data:
            handler.data_received(data)
        if self._read_paused:
            transport.resume_reading()
        return False

    # ---- serving one request ----

    def _start(self, head: RequestHead, body: bytes, head_bytes: bytes) -> None:
        """Serves a model request: inline while everything goes the common way, else in a task.

        Inline means no task, no future and no await: the grant, the upstream write on a pooled
        connection (both in ``Exchange.open``), and (in the upstream's ``data_received``) the
        answer, when it is a sized one that arrived whole. That is most requests to a ready model,
        and a task's creation and wake-ups cost about as much CPU as the rest of the proxy's
        Python. At the first step that must wait (a load or queue, a new upstream connection, a
        retry, a streamed or partial body), the rest of the request moves to a task (``_forward``).
        """
        front = self._front
        if front.keys and not self._key_ok(head):
            self._hand_off(head_bytes + body)  # aiohttp's middleware answers and logs it
            return
        self._origin = head.origin
        runloop, pool, bus = front.parts()
        ex = Exchange.open(runloop, pool, bus, head, body, self._progress, self._cut)
        if ex is None:
            self._hand_off(head_bytes + body)
            return
        front.served += 1
        self._exchange = ex
        self._keep = head.keep_alive
        if ex.sent is None:
            if ex.finished:
                self._done(ex, False)  # it could not be sent
            else:
                self._in_task(ex)  # it waits for its grant or for a connection

    def _progress(self, ex: Exchange) -> None:
        """The inline request's upstream connection moved on (``H1Pool.send_now``)."""
        try:
            self._step_inline(ex)
        except Exception:  # never into h1pool's callback, with the lease still held
            log.exception("front door failed")
            self._cut(ex)

    def _step_inline(self, ex: Exchange) -> None:
        sent = ex.sent
        assert sent is not None
        if not sent.answered:
            exc = sent.failure
            if exc is None:
                return  # the head is still arriving
            ex.sent = None
            sent.abandon()
            # Never sent again: it was written, so the child may have read it (relay.send).
            self._end_inline(ex, relay.failed_before_response(exc, ex.url))
            return
        arrived = time.perf_counter()
        ex.sent = None
        upstream = sent.response()
        body = None if upstream.sse else upstream.take_whole()
        if body is None:
            ex.answered(upstream, arrived)
            self._in_task(ex)  # streamed, or still arriving
            return
        ex.upstream = upstream
        track = ex.track
        track.tail = body[-TAIL:]  # for the activity log's token counts
        if track.capture is not None:
            track.capture.add(body)
        head, chunked = _answer_head(upstream, self._closing_after())
        if body:
            head += chunk(body) if chunked else body
        if chunked:  # never for a bodiless status (_answer_head)
            head += CHUNK_END
        self._end_inline(ex, None, head, arrived)

    def _end_inline(
        self, ex: Exchange, err: SwapperError | None, answer: bytes = b"", arrived: float = 0.0
    ) -> None:
        """Writes the inline request's answer (or ``err``), releases it, and goes on to the next.
        ``arrived``: when the upstream's answer came (for its TTFB), recorded after the write."""
        keep = self._keep
        if err is not None:
            ex.track.failed(err.status, outcome_of(err))
            self._answer(self._error(err), close=not keep)
        else:
            keep = self._write(answer) and keep
            assert ex.upstream is not None
            ex.answered(ex.upstream, arrived)
        self._front.inline += 1
        ex.finish()
        # Not from inside the upstream's callback: the next request may reuse its connection.
        self._done(ex, keep, soon=True)

    def _cut(self, ex: Exchange) -> None:
        """Ends the inline request ``ex``: its client left, or its model is being stopped under it
        (answered with why: an inline answer is written whole, so nothing went out yet)."""
        if (err := ex.cut_error) is not None and not ex.finished:
            ex.track.failed(err.status, outcome_of(err))
            self._answer(self._error(err), close=True)
        ex.finish()
        self._done(ex, False)

    def _in_task(self, ex: Exchange) -> None:
        """Goes on with ``ex`` in a task (``_forward``), from wherever it stands."""
        ex.task = task = self._front.loop.create_task(self._serve(ex))
        # A task cancelled before its first step never runs its coroutine, so neither _forward's
        # finally: the client can leave (or an unload cut it) in the same loop turn that made it.
        task.add_done_callback(lambda _: self._task_ended(ex))

    def _task_ended(self, ex: Exchange) -> None:
        if not ex.finished:
            self._cut(ex)  # it never ran

    async def _serve(self, ex: Exchange) -> None:
        keep = False
        try:
            keep = await self._forward(ex)
        except asyncio.CancelledError:
            pass  # the client left, or the model is being stopped under it (unload, reload)
        except Exception:
            log.exception("front door failed", path=ex.target)
        self._done(ex, keep)

    def _done(self, ex: Exchange, keep: bool, *, soon: bool = False) -> None:
        """After ``ex``'s answer: closes the connection, or serves what the client sent next."""
        if self._exchange is not ex:
            return  # already ended (a cut, then the task's own end)
        self._exchange = None
        transport = self._transport
        if transport is None:
            self._front.forget(self)
        elif not keep or self._front.closing:
            transport.close()
            self._front.forget(self)
        else:
            self.active_at = time.monotonic()
            if soon:
                self._front.loop.call_soon(self._parse)
            else:
                self._parse()

    async def _forward(self, ex: Exchange) -> bool:
        """The request from wherever ``_start`` left it: waits for its lease if it has none, sends
        it if it was not sent, and relays the answer. True if the connection may be reused."""
        try:
            if ex.lease is None:
                ex.granted(await ex.acquire())  # a load or a queue: wait here
                ex.track.granted()
            upstream = ex.upstream
            if upstream is None:
                upstream = await ex.send()
            return await self._relay(upstream, ex.track) and self._keep
        except SwapperError as err:  # refused (429, 503, 507...), failed to load, upstream unreachable
            ex.track.failed(err.status, outcome_of(err))
            self._answer(self._error(err), close=not self._keep)
            return self._keep
        except asyncio.CancelledError:
            if (cut := ex.cut_error) is None:
                raise  # the client left
            if (task := ex.task) is not None:
                task.uncancel()
            return self._end_with(ex.track, cut) and self._keep
        finally:
            self._head_out = _NOTHING_OUT
            ex.finish()


_TIMEOUT: Final = SwapperError("request head not received in time", status=408, code="request_timeout")
