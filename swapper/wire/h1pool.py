"""A lean HTTP/1.1 client for the forwarding hot path: a keep-alive pool and a streaming reader.

Why not aiohttp's ``ClientSession`` here: one round trip through it costs about as much CPU as all
the rest of a proxied request (request and response objects, timer contexts, trace and cookie
hooks, redirect and auth handling, connector bookkeeping). This client does only what forwarding
needs; responses are parsed by llhttp (``codec.ResponseReader``), which also de-chunks them.
Health probes and everything else keep using aiohttp's client.

Owns: the idle keep-alive connections of each origin (``close()`` closes them) and, while a
response is being read, that response's connection: ``Response.close()`` returns it to the pool
when its body was read to the end and both sides allow reuse, and closes it otherwise (which is
how an upstream learns that its client left).

Scope: what local inference servers speak. Responses framed by Content-Length, by the chunked
transfer coding (extensions and trailers are dropped) or by the end of the connection; HEAD
requests and 1xx/204/304 answers have no body; interim 1xx answers are skipped. No upgrades, no
pipelining, no redirects, no decompression (body bytes pass verbatim), no proxies, no cookies.
A response llhttp refuses raises ``ProtocolError``, and its connection is closed, never reused.

Backpressure: reading from the socket pauses while more than ``HIGH_WATER`` body bytes wait
unread, and resumes once the reader has taken them, so a slow client slows the upstream down.
A body handed to a sink (``Response.pipe``) has no reader in between: the sink's owner pauses
reading itself (``Response.pause_reading``) when its own client stops taking bytes.
Request bodies over ``WRITE_SLICE`` go out in slices, each waiting for the socket to drain.

Concurrency: one task at a time uses a ``Response``; every method is cancel-safe (a cancelled
``request()`` closes its connection; a cancelled read leaves it to ``Response.close()``).
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from collections.abc import Callable
from typing import Final, cast

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from swapper.wire.codec import BadMessage, ResponseReader, request_head

__all__ = ["ConnectFailed", "Connection", "Disconnected", "H1Pool", "ProtocolError", "Response"]

HIGH_WATER: Final = 256 * 1024  # unread body bytes that pause reading from the upstream
WRITE_SLICE: Final = 256 * 1024  # request bodies larger than this are written in drained slices
# Methods that get no "Content-Length: 0" when their body is empty (aiohttp's rule, kept so that
# upstreams see the same requests as before).
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_SSE: Final = b"text/event-stream"

# Connection states.
_IDLE, _HEAD, _BODY, _DONE = range(4)


class ConnectFailed(ConnectionError):
    """No connection could be made (refused, unreachable, timed out); nothing was sent."""


class Disconnected(ConnectionError):
    """The upstream closed or reset the connection before the response was complete.

    ``response_started`` says whether any response byte had arrived. ``replayable`` says whether
    the request provably never reached the upstream: the connection was found closed before a
    byte of it was written. Only then may it be sent again (Go's Transport and nginx's
    ``proxy_next_upstream`` rule for non-idempotent requests): a request that was written may
    have been read, and the upstream may have died of it.
    """

    def __init__(self, message: str, *, response_started: bool, replayable: bool = False) -> None:
        super().__init__(message)
        self.response_started = response_started
        self.replayable = replayable


class ProtocolError(ConnectionError):
    """The upstream's response was not valid HTTP/1.1 (or used something this client refuses)."""


class Connection(asyncio.Protocol):
    """One connection and the reader of its current response; llhttp runs in ``data_received``."""

    def __init__(self, pool: H1Pool, key: tuple[str, str, int]) -> None:
        self._pool = pool
        # Cached: each asyncio.get_running_loop() is a getpid() syscall (fork detection).
        self._loop = asyncio.get_running_loop()
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._chunks: list[bytes] = []  # body bytes parsed and not yet read
        self.reader = ResponseReader(self._got_head, self._chunks, self._got_end)
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes, bool], None] | None = None  # see Response.pipe
        self._notify: Callable[[], None] | None = None  # see H1Pool.send_now
        self._drained: asyncio.Future[None] | None = None
        self._exc: Exception | None = None
        self._lost = False
        self._paused = False
        self._write_paused = False
        self._state = _IDLE
        self._got_bytes = False
        self._meter = pool._meter_of(key)  # reads from this origin, for hang detection

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance() check: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        state = self._state
        if state == _BODY and exc is None and self.reader.eof():
            pass  # a body delimited by the connection's end: _end() completed it
        elif state not in (_IDLE, _DONE) and self._exc is None:
            why = "closed the connection" if exc is None else f"reset the connection ({exc!r})"
            where = "mid-body" if state == _BODY else "before responding"
            self._exc = Disconnected(f"upstream {why} {where}", response_started=self._got_bytes)
        self._pool._forget(self)
        if self._sink is not None and self._state == _DONE:
            self._flush_to_sink()
        self._wake()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if self._state in (_IDLE, _DONE) or self._exc is not None:
            # Bytes nobody asked for (after a complete response, or while pooled): the connection
            # is out of step with the upstream and cannot be reused.
            self._fail(ProtocolError("upstream sent data outside a response"))
            return
        self._got_bytes = True
        self._meter[0] += 1
        try:
            reader.feed(data)
        except BadMessage as exc:
            self._fail(ProtocolError(f"upstream sent an invalid response: {exc}"))
            return
        if self._sink is not None:
            if self._chunks or self._state == _DONE:
                self._flush_to_sink()
            if self._state == _DONE:
                self._wake()  # a piped body only wakes its reader at the end
            return
        if not self._paused and sum(map(len, self._chunks)) > HIGH_WATER and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost() settles the state

    # ---- ResponseReader callbacks ----

    def _got_head(self) -> None:
        self._state = _BODY

    def _got_end(self) -> None:
        self._state = _DONE

    def _flush_to_sink(self) -> None:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        assert self._sink is not None
        sink, last = self._sink, self._state == _DONE
        if last:
            self._sink = None  # the last call: nothing more goes to it
        sink(data, last)

    # ---- used by H1Pool and Response ----

    def start(self, head_only: bool) -> None:
        self.reader.start(head_only=head_only)
        self._state = _HEAD
        self._got_bytes = False

    async def send(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        if transport is None or self._lost:
            raise Disconnected("upstream closed the connection", response_started=False, replayable=True)
        if len(body) <= WRITE_SLICE:
            transport.write(head + body if body else head)
            return
        transport.write(head)
        view = memoryview(body)
        for at in range(0, len(body), WRITE_SLICE):
            if self._state != _HEAD:
                return  # the upstream answered early (a 413, say): the rest is not wanted
            if self._lost:
                raise Disconnected("upstream closed the connection", response_started=self._got_bytes)
            transport.write(view[at : at + WRITE_SLICE])
            if self._write_paused:
                self._drained = self._loop.create_future()
                try:
                    await self._drained
                finally:
                    self._drained = None

    @property
    def answered(self) -> bool:
        """Whether the response head is in (see ``H1Pool.send_now``)."""
        return self._state in (_BODY, _DONE)

    async def wait_head(self) -> None:
        while self._state == _HEAD:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def readany(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                if self._paused and self.transport is not None and not self._lost:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._state == _DONE:
                return b""  # complete, even if the upstream misbehaved afterwards
            if self._exc is not None:
                raise self._exc
            await self._wait()

    def at_eof(self) -> bool:
        return self._state == _DONE and not self._chunks

    def reusable(self) -> bool:
        return (
            self._state == _DONE
            and self.reader.keep_alive
            and not self._lost
            and not self._chunks
            and self._exc is None
        )

    def pipe(self, sink: Callable[[bytes, bool], None]) -> None:
        self._sink = sink
        self.pause_reading(False)  # a high-water pause is the sink owner's to manage from now on
        if self._chunks or self._state == _DONE:
            self._flush_to_sink()

    async def wait_done(self) -> None:
        while self._state != _DONE:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    def pause_reading(self, paused: bool) -> None:
        transport = self.transport
        if paused != self._paused and transport is not None and not self._lost:
            self._paused = paused
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    @property
    def failure(self) -> Exception | None:
        """Why the response broke off, once it has (see ``H1Pool.send_now``)."""
        return self._exc

    def response(self) -> Response:
        """The response, once ``answered`` (see ``H1Pool.send_now``); notifications stop."""
        self._notify = None
        return Response(self._pool, self)

    def take_whole(self) -> bytes | None:
        """The whole body if it has all arrived (and none was read), else None with nothing taken."""
        if self._state != _DONE:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data

    def reset(self) -> None:
        self._notify = None
        self._state = _IDLE
        self._sink = None

    def abandon(self) -> None:
        """Closes a response sent with ``H1Pool.send_now`` that nobody will read; no more calls."""
        self._notify = None
        self.close()

    def close(self) -> None:
        self.reader.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    # ---- internals ----

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        notify = self._notify
        if notify is not None:
            notify()  # last, wherever it is called: the callee may reuse or close this connection
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._exc is None:
            self._exc = exc
        self.close()
        self._wake()


class Response:
    """One upstream response: status line and headers, then the body via ``readany()``.

    ``raw_headers`` are the fields as received (bytes, trailing blanks trimmed); ``headers`` is
    the same as a case-insensitive multidict of str, built when first asked for.
    """

    __slots__ = ("_conn", "_headers", "_pool", "reader", "reason", "status")

    def __init__(self, pool: H1Pool, conn: Connection) -> None:
        reader = conn.reader
        assert reader.status
        self._pool = pool
        self._conn: Connection | None = conn
        self.reader = reader  # the head's facts (framing, Content-Type...), valid until close()
        self.status = reader.status
        self.reason = reader.reason
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self.reader.headers

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict(
                    (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                    for name, value in self.reader.headers
                )
            )
        return self._headers

    @property
    def sse(self) -> bool:
        return self.reader.content_type.startswith(_SSE)

    @property
    def streamed(self) -> bool:
        """Whether the upstream closes the connection after this answer although it said keep-alive.

        Sized and empty (204, 304, HEAD) answers keep their connection; chunked and SSE ones don't
        (llama-server does this after every stream).
        """
        return self.reader.chunked or self.sse

    @property
    def sized(self) -> bool:
        """The body goes out as it came, framed by its Content-Length (no re-chunking needed)."""
        reader = self.reader
        return reader.sized and not reader.te

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some if none have); b"" at the end.

        Raises ``Disconnected`` or ``ProtocolError`` if the body breaks off.
        """
        conn = self._conn
        if conn is None:
            return b""
        return await conn.readany()

    def take_whole(self) -> bytes | None:
        """The whole body if it has already arrived (none of it read yet), else None and nothing
        is taken: lets a caller answer a small response without awaiting."""
        conn = self._conn
        return b"" if conn is None else conn.take_whole()

    def at_eof(self) -> bool:
        """True once the whole body has arrived and been read."""
        conn = self._conn
        return conn is None or conn.at_eof()

    def pipe(self, sink: Callable[[bytes, bool], None]) -> None:
        """Hands the rest of the body to ``sink(data, last)`` as it arrives, inside the upstream's
        ``data_received`` (no task switch per chunk, for the front door's relay); bytes already
        read ahead go at once. ``last`` is True with the body's final bytes, also for a body
        that ends with the connection. Then await ``wait_done()``; use ``pause_reading`` for
        backpressure. No ``readany()`` after this."""
        if self._conn is not None:
            self._conn.pipe(sink)

    async def wait_done(self) -> None:
        """Returns once a piped body is complete; raises ``Disconnected`` or ``ProtocolError`` if it
        broke off."""
        if self._conn is not None:
            await self._conn.wait_done()

    def pause_reading(self, paused: bool) -> None:
        """Stops (True) or resumes (False) reading the upstream socket: backpressure for ``pipe``."""
        if self._conn is not None:
            self._conn.pause_reading(paused)

    def do_not_pool(self) -> None:
        """Close the connection at ``close()`` even if it could be reused."""
        self.reader.keep_alive = False

    def close(self) -> None:
        """Return the connection to the pool if the body is complete and reuse is allowed;
        otherwise close it. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable():
            conn.reset()
            self._pool._put(conn)
        else:
            conn.close()


class H1Pool:
    """Keep-alive connections per origin (scheme, host, port), most recently used first."""

    def __init__(self, *, connect_timeout: float = 10.0, keepalive: float = 30.0) -> None:
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._meters: dict[tuple[str, str, int], list[int]] = {}  # origin -> [reads so far]
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        url: URL,
        headers: bytes,
        body: bytes,
        *,
        fresh: bool = False,
        connect_timeout: float | None = None,
    ) -> Response:
        """Sends one request and waits for the response head.

        ``url`` must be absolute and already encoded; its path and query go out verbatim.
        ``headers`` are header lines (``codec.forwardable``) without Host or Content-Length: both
        are written from ``url`` and ``body`` (Content-Length also for an empty body, unless the
        method is GET, HEAD, OPTIONS or TRACE). ``fresh`` skips the idle connections;
        ``connect_timeout`` replaces the pool's (0: none) for a new connection. Raises
        ``ConnectFailed`` (nothing was sent), ``Disconnected`` (``replayable`` when nothing was
        written) or ``ProtocolError``.
        """
        if self._closed:
            raise ConnectFailed("the upstream connection pool is closed")
        head = _request_head(method, url, headers, body)
        key = (url.scheme, url.raw_host or "", url.port or 0)
        conn = None if fresh else self._take(key)
        if conn is None:
            conn = await self._connect(
                url, key, self._connect_timeout if connect_timeout is None else connect_timeout
            )
        try:
            conn.start(head_only=method == "HEAD")
            await conn.send(head, body)
            await conn.wait_head()
        except BaseException:
            conn.close()
            raise
        return Response(self, conn)

    def send_now(
        self, method: str, url: URL, headers: bytes, body: bytes, notify: Callable[[], None]
    ) -> Connection | None:
        """Sends one request on an idle keep-alive connection without awaiting anything; None, with
        nothing sent, when there is no idle connection or the body needs more than one write.

        For a caller that answers from callbacks, with no task (the front door's inline path):
        ``notify()`` is called from the connection's callbacks each time the response moves on
        (bytes arrived, or it broke off). Once ``answered``, ``response()`` gives the
        ``Response`` (and stops the notifications); until then ``failure`` says whether the
        response broke off (never safe to replay: the request was written). ``abandon()`` gives
        it up. Same arguments as ``request``.
        """
        if self._closed or len(body) > WRITE_SLICE or method == "HEAD":
            return None
        conn = self._take((url.scheme, url.raw_host or "", url.port or 0))
        if conn is None:
            return None
        assert conn.transport is not None  # _take checked it
        conn.start(head_only=False)
        conn._notify = notify
        head = _request_head(method, url, headers, body)
        conn.transport.write(head + body if body else head)
        return conn

    def reads(self, base_url: str) -> int:
        """How many reads ``base_url``'s origin has answered so far (any change is progress)."""
        url = URL(base_url)
        meter = self._meters.get((url.scheme, url.raw_host or "", url.port or 0))
        return 0 if meter is None else meter[0]

    def _meter_of(self, key: tuple[str, str, int]) -> list[int]:
        meter = self._meters.get(key)
        if meter is None:
            meter = self._meters[key] = [0]
        return meter

    def close_idle(self, base_url: str) -> None:
        """Closes the idle connections to ``base_url``'s origin, whose server is about to stop:
        llama-server's exit waits until it notices an idle keep-alive connection (up to 10 ms)."""
        url = URL(base_url)
        for conn in self._idle.pop((url.scheme, url.raw_host or "", url.port or 0), []):
            conn.close()

    def close(self) -> None:
        """Closes every idle connection; connections in use close with their responses."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    # ---- internals ----

    def _take(self, key: tuple[str, str, int]) -> Connection | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            transport = conn.transport
            if transport is None or transport.is_closing() or now - conn.idle_since > self._keepalive:
                conn.close()
                continue
            return conn
        return None

    def _put(self, conn: Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    def _forget(self, conn: Connection) -> None:
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    async def _connect(self, url: URL, key: tuple[str, str, int], limit: float) -> Connection:
        loop = asyncio.get_running_loop()
        host, port = key[1], key[2]
        tls = None
        if url.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(limit or None):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, key), host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise ConnectFailed(errno.ETIMEDOUT, "connect timed out") from None
        except OSError as exc:
            raise ConnectFailed(exc.errno, exc.strerror) from exc
        return conn


def _request_head(method: str, url: URL, headers: bytes, body: bytes) -> bytes:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if not url.is_default_port():
        host = f"{host}:{url.port}"
    length = len(body) if body or method not in _NO_BODY_METHODS else None
    return request_head(method, url.raw_path_qs, host, headers, length)
