"""A lean HTTP/1.1 client for the forwarding hot path: a keep-alive pool and a streaming reader.

Why not aiohttp's ``ClientSession`` here: one round trip through it costs ~200 µs of CPU on the
2-vCPU machines swapper is measured on (request and response objects, timer contexts, trace and
cookie hooks, redirect and auth handling, connector bookkeeping), about as much as all the rest of
a proxied request. This client does only what forwarding needs and costs a fraction of that
(scripts/bench_proxy.py). Health probes and everything else keep using aiohttp's client.

Owns: the idle keep-alive connections of each origin (``close()`` closes them) and, while a
response is being read, that response's connection: ``Response.close()`` returns it to the pool
when its body was read to the end and both sides allow reuse, and closes it otherwise (which is
how an upstream learns that its client left).

Scope: what local inference servers speak. Responses framed by Content-Length, by the chunked
transfer coding (extensions and trailers are skipped) or by the end of the connection; HEAD
requests and 1xx/204/304 answers have no body; interim 1xx answers are skipped. No upgrades, no
pipelining, no redirects, no decompression (body bytes pass verbatim), no proxies, no cookies.
A response that breaks these rules raises ``ProtocolError``.

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
import re
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Final, cast

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = [
    "HEADER_LINE",
    "ConnectFailed",
    "Connection",
    "Disconnected",
    "H1Pool",
    "ProtocolError",
    "Response",
]

HIGH_WATER: Final = 256 * 1024  # unread body bytes that pause reading from the upstream
WRITE_SLICE: Final = 256 * 1024  # request bodies larger than this are written in drained slices
MAX_HEAD: Final = 64 * 1024  # a response head larger than this is a protocol error
MAX_CHUNK_LINE: Final = 4096
# Methods that get no "Content-Length: 0" when their body is empty (aiohttp's rule, kept so that
# upstreams see the same requests as before).
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_EMPTY_BODY_STATUS: Final = frozenset({204, 304})
# One header line: CRLF, a token (RFC 9110), a colon, the value without its leading blanks (the
# front door's request parser uses it too). Trailing blanks stay on the value. The value stops at
# a CR only ([^\r] scans 20% faster than [^\r\n]): a bare LF inside it is caught by the parser's
# count of LFs, as a bare CR is by its count of CRs.
HEADER_LINE: Final = re.compile(r"\r\n([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r]*)")

# Parser states of one connection.
_IDLE, _HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = range(6)
# Sub-states while in _CHUNKED: _chunk_left > 0 is data still due in the current chunk;
_CHUNK_SIZE_LINE: Final = 0  # ...a size line is next;
_CHUNK_CRLF: Final = -1  # ...the CRLF that ends a chunk's data is next;
_CHUNK_TRAILERS: Final = -2  # ...trailer fields (or the final CRLF) are next.


class ConnectFailed(ConnectionError):
    """No connection could be made (refused, unreachable, timed out); nothing was sent."""


class Disconnected(ConnectionError):
    """The upstream closed or reset the connection before the response was complete.

    ``response_started`` says whether any response byte had arrived: a pooled connection that the
    upstream closed while it sat idle fails with False, and then a retry is safe.
    """

    def __init__(self, message: str, *, response_started: bool) -> None:
        super().__init__(message)
        self.response_started = response_started


class ProtocolError(ConnectionError):
    """The upstream's response was not valid HTTP/1.1 (or used something this client refuses)."""


class Connection(asyncio.Protocol):
    """One connection and its response parser; the parser runs inside ``data_received``."""

    def __init__(self, pool: H1Pool, key: tuple[str, str, int]) -> None:
        self._pool = pool
        # Cached: each asyncio.get_running_loop() is a getpid() syscall (fork detection).
        self._loop = asyncio.get_running_loop()
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._buf = bytearray()
        self._chunks: list[bytes] = []  # body bytes parsed and not yet read
        self._unread = 0
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes, bool], None] | None = None  # see Response.pipe
        self._notify: Callable[[], None] | None = None  # see H1Pool.send_now
        self._drained: asyncio.Future[None] | None = None
        self._exc: Exception | None = None
        self._lost = False
        self._paused = False
        self._write_paused = False
        self._state = _IDLE
        self._head_only = False
        self._got_bytes = False
        self._left = 0  # _LENGTH: bytes still due; _CHUNKED: see the _CHUNK_* sub-states
        self.keep_alive = False
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] | None = None
        # Of the response head, besides ``headers`` (see Response):
        self.block = ""
        self.connection = ""
        self.coded = False
        self.sized = False

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance() check: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.keep_alive = False
        state = self._state
        if state == _UNTIL_CLOSE and exc is None:
            self._state = _DONE
        elif state not in (_IDLE, _DONE) and self._exc is None:
            why = "closed the connection" if exc is None else f"reset the connection ({exc!r})"
            where = "mid-body" if state != _HEAD else "before responding"
            self._exc = Disconnected(f"upstream {why} {where}", response_started=self._got_bytes)
        self._pool._forget(self)
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
        if self._state in (_IDLE, _DONE) or self._exc is not None:
            # Bytes nobody asked for (after a complete response, or while pooled): the connection
            # is out of step with the upstream and cannot be reused.
            self._fail(ProtocolError("upstream sent data outside a response"))
            return
        self._got_bytes = True
        if self._buf:
            pass  # a partial head, size line or CRLF is pending: parse from the buffer
        elif self._state == _CHUNKED:
            # The common streaming case: parse the segment itself, buffer only an incomplete tail.
            try:
                used = self._parse_chunks(data)
            except ProtocolError as exc:
                self._fail(exc)
                return
            if used < len(data):
                self._buf += data[used:]
            data = b""
        elif self._state in (_LENGTH, _UNTIL_CLOSE) and len(data) <= self._left_or_all():
            # The whole segment is body: no copy into the buffer.
            self._chunks.append(data)
            self._unread += len(data)
            if self._state == _LENGTH:
                self._left -= len(data)
                if self._left == 0:
                    self._state = _DONE
            data = b""
        if data:
            self._buf += data
            try:
                self._parse()
            except ProtocolError as exc:
                self._fail(exc)
                return
        if self._sink is not None:
            if self._chunks or self._state == _DONE:
                self._flush_to_sink()
            if self._state == _DONE:
                self._wake()  # a piped body only wakes its reader at the end
            return
        if self._unread > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _flush_to_sink(self) -> None:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._unread = 0
        assert self._sink is not None
        self._sink(data, self._state == _DONE)

    def _left_or_all(self) -> int:
        return self._left if self._state == _LENGTH else 1 << 62

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost() settles the state

    # ---- the parser ----

    def _parse(self) -> None:
        while True:
            state = self._state
            if state == _HEAD:
                if not self._parse_head():
                    return
            elif state == _LENGTH:
                self._take(min(self._left, len(self._buf)))
                if self._left == 0:
                    self._state = _DONE
                return
            elif state == _CHUNKED:
                del self._buf[: self._parse_chunks(self._buf)]
                return
            elif state == _UNTIL_CLOSE:
                self._take(len(self._buf))
                return
            else:  # _DONE with bytes left over: the upstream sent more than it framed
                if self._buf:
                    raise ProtocolError("upstream sent bytes after the end of its response")
                return

    def _take(self, n: int) -> None:
        if n <= 0:
            return
        buf = self._buf
        data = bytes(buf) if n == len(buf) else bytes(buf[:n])
        del buf[:n]
        self._chunks.append(data)
        self._unread += n
        if self._state == _LENGTH:
            self._left -= n

    def _parse_head(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise ProtocolError("upstream response head too large")
            return False
        # One decode and one regex scan, as the front door parses request heads: a loop of
        # partitions, strips and decodes per line cost ~8 µs a response.
        text = buf[:end].decode("utf-8", "surrogateescape")
        del buf[: end + 4]
        eol = text.find("\r\n")
        if eol < 0:
            eol = len(text)
        version, _, rest = text[:eol].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not (code.isascii() and code.isdigit()):
            raise ProtocolError(f"upstream sent a bad status line: {text[:eol][:100]!r}")
        status = int(code)
        pairs = HEADER_LINE.findall(text, eol)
        lines = len(pairs)  # one CR and one LF each: equal counts mean no other line, no bare CR/LF
        if text.count("\r", eol) != lines or text.count("\n", eol) != lines:
            raise ProtocolError(f"upstream sent a bad header line: {_first_bad_line(text[eol:])[:100]!r}")
        if " \r\n" in text or "\t\r\n" in text or text.endswith((" ", "\t")):
            pairs = [(name, value.rstrip(" \t")) for name, value in pairs]
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("upstream switched protocols; upgrades are not forwarded")
            return True  # an interim answer: the real one follows
        headers = CIMultiDict(pairs)
        self.connection = headers.get("Connection", "")
        connection = self.connection.lower()
        if version == "HTTP/1.0":
            self.keep_alive = "keep-alive" in connection
        else:
            self.keep_alive = "close" not in connection
        coding = headers.get("Transfer-Encoding")
        lengths = headers.getall("Content-Length", ())
        self.coded = coding is not None
        self.sized = bool(lengths)
        self.block = text[eol:]
        if self._head_only or status in _EMPTY_BODY_STATUS:
            self._state = _DONE
        elif coding is not None:
            if coding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._state, self._left = _CHUNKED, _CHUNK_SIZE_LINE
            else:
                self._state, self.keep_alive = _UNTIL_CLOSE, False
            if lengths:
                self.keep_alive = False  # both framings: chunked wins, the connection is suspect
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
                raise ProtocolError(f"upstream sent a bad Content-Length: {lengths!r}")
            self._left = int(lengths[0])
            self._state = _LENGTH if self._left else _DONE
        else:
            self._state, self.keep_alive = _UNTIL_CLOSE, False
        self.status = status
        if not reason.isascii():  # a str of the bytes as sent, one character each (as aiohttp has it)
            reason = reason.encode("utf-8", "surrogateescape").decode("latin-1")
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)  # last: only a valid head is seen by wait_head()
        return True

    def _parse_chunks(self, src: bytes | bytearray) -> int:
        """De-chunks what ``src`` holds; returns how many bytes it consumed.

        One joined bytes object per call, however many chunks arrived together: a busy stream
        delivers dozens of small SSE chunks per read, and per-chunk objects would cost more than
        the parsing.
        """
        end = len(src)
        pieces: list[bytes | bytearray] = []
        pos = 0
        left = self._left
        while True:
            if left > 0:  # data of the current chunk
                stop = pos + left
                if stop > end:
                    if pos < end:
                        pieces.append(src[pos:end])
                        left -= end - pos
                        pos = end
                    break
                pieces.append(src[pos:stop])
                pos = stop
                left = _CHUNK_CRLF
            if left == _CHUNK_CRLF:
                if end - pos < 2:
                    break
                if src[pos] != 13 or src[pos + 1] != 10:
                    raise ProtocolError("upstream sent a chunk without its CRLF")
                pos += 2
                left = _CHUNK_SIZE_LINE
            eol = src.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > (MAX_HEAD if left == _CHUNK_TRAILERS else MAX_CHUNK_LINE):
                    raise ProtocolError("upstream sent an overlong chunk size or trailer line")
                break
            if left == _CHUNK_TRAILERS:  # skipped line by line, up to the empty one
                empty = eol == pos
                pos = eol + 2
                if empty:
                    self._state = _DONE
                    break
                continue
            line = src[pos:eol]
            try:
                size = int(line, 16)  # the common case: no extensions
            except ValueError:
                size = _chunk_size(line)
            if size < 0:
                raise ProtocolError(f"upstream sent a bad chunk size: {bytes(line[:20])!r}")
            pos = eol + 2
            left = size or _CHUNK_TRAILERS
        self._left = left
        if pieces:
            data = b"".join(pieces)
            self._chunks.append(data)
            self._unread += len(data)
        if self._state == _DONE and pos < end:
            raise ProtocolError("upstream sent bytes after the end of its response")
        return pos

    # ---- used by H1Pool and Response ----

    def start(self, head_only: bool) -> None:
        self._state = _HEAD
        self._head_only = head_only
        self._got_bytes = False
        self.headers = None
        self.keep_alive = False

    async def send(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        if transport is None or self._lost:
            raise Disconnected("upstream closed the connection", response_started=False)
        if len(body) <= WRITE_SLICE:
            transport.write(head + body if body else head)
            return
        transport.write(head)
        view = memoryview(body)
        for at in range(0, len(body), WRITE_SLICE):
            if self.headers is not None:
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

    async def wait_head(self) -> None:
        while self.headers is None:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def readany(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._unread = 0
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
            and self.keep_alive
            and not self._lost
            and not self._chunks
            and not self._buf
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
        """The response, once ``headers`` are in (see ``H1Pool.send_now``); notifications stop."""
        self._notify = None
        return Response(self._pool, self)

    def take_whole(self) -> bytes | None:
        """The whole body if it has all arrived (and none was read), else None with nothing taken."""
        if self._state != _DONE:
            return None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._unread = 0
        return data

    def reset(self) -> None:
        self._notify = None
        self._state = _IDLE
        self.headers = None
        self._sink = None

    def abandon(self) -> None:
        """Closes a response sent with ``H1Pool.send_now`` that nobody will read; no more calls."""
        self._notify = None
        self.close()

    def close(self) -> None:
        self.keep_alive = False
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


def _first_bad_line(block: str) -> str:
    """The first line of a header block (each line after a CRLF) that ``HEADER_LINE`` rejects."""
    for line in block.split("\r\n")[1:]:
        if "\n" in line or not HEADER_LINE.fullmatch("\r\n" + line):
            return line
    return block


def _chunk_size(line: bytes | bytearray) -> int:
    """The size in a chunk size line with extensions (``1a;name=value``); -1 if unparsable."""
    text = bytes(line).split(b";", 1)[0].strip(b" \t")
    if not text or any(c not in b"0123456789abcdefABCDEF" for c in text):
        return -1
    return int(text, 16)


class Response:
    """One upstream response: status line and headers, then the body via ``readany()``."""

    __slots__ = ("_conn", "_pool", "block", "coded", "connection", "headers", "reason", "sized", "status")

    def __init__(self, pool: H1Pool, conn: Connection) -> None:
        assert conn.headers is not None
        self._pool = pool
        self._conn: Connection | None = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers: CIMultiDictProxy[str] = conn.headers
        # The header lines as received, each after a CRLF (valid: the parser checked every line),
        # so that a proxy can forward them without rebuilding them from ``headers``.
        self.block = conn.block
        self.connection = conn.connection  # the first Connection value, as sent ("" if none)
        self.coded = conn.coded  # it has a Transfer-Encoding
        self.sized = conn.sized  # it has a Content-Length

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
        read ahead go at once. ``last`` is True with the body's final bytes. Then await
        ``wait_done()``; use ``pause_reading`` for backpressure. No ``readany()`` after this."""
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
        if self._conn is not None:
            self._conn.keep_alive = False

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
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self, method: str, url: URL, headers: Iterable[tuple[str, str]], body: bytes, *, fresh: bool = False
    ) -> Response:
        """Sends one request and waits for the response head.

        ``url`` must be absolute and already encoded; its path and query go out verbatim.
        ``headers`` must not contain Host or Content-Length: both are written from ``url`` and
        ``body`` (Content-Length also for an empty body, unless the method is GET, HEAD, OPTIONS
        or TRACE). ``fresh`` skips the idle connections. Raises ``ConnectFailed``,
        ``Disconnected`` (with ``response_started`` False when a retry is safe) or
        ``ProtocolError``.
        """
        if self._closed:
            raise ConnectFailed("the upstream connection pool is closed")
        head = _request_head(method, url, headers, body)
        key = (url.scheme, url.raw_host or "", url.port or 0)
        conn = None if fresh else self._take(key)
        if conn is None:
            conn = await self._connect(url, key)
        try:
            conn.start(head_only=method == "HEAD")
            await conn.send(head, body)
            await conn.wait_head()
        except BaseException:
            conn.close()
            raise
        return Response(self, conn)

    def send_now(
        self,
        method: str,
        url: URL,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        notify: Callable[[], None],
    ) -> Connection | None:
        """Sends one request on an idle keep-alive connection without awaiting anything; None, with
        nothing sent, when there is no idle connection or the body needs more than one write.

        For a caller that answers from callbacks, with no task (the front door's inline path):
        ``notify()`` is called from the connection's callbacks each time the response moves on
        (bytes arrived, or it broke off). Once ``headers`` is set, ``response()`` gives the
        ``Response`` (and stops the notifications); while it is None, ``failure`` says whether
        the response broke off (a ``Disconnected`` whose ``response_started`` is False on a pooled
        connection is safe to retry). ``abandon()`` gives it up. Same arguments as ``request``.
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

    async def _connect(self, url: URL, key: tuple[str, str, int]) -> Connection:
        loop = asyncio.get_running_loop()
        host, port = key[1], key[2]
        tls = None
        if url.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, key), host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError:
            raise ConnectFailed(errno.ETIMEDOUT, "connect timed out") from None
        except OSError as exc:
            raise ConnectFailed(exc.errno, exc.strerror) from exc
        return conn


def _request_head(method: str, url: URL, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if not url.is_default_port():
        host = f"{host}:{url.port}"
    parts = [f"{method} {url.raw_path_qs} HTTP/1.1\r\nHost: {host}\r\n"]
    parts += [f"{name}: {value}\r\n" for name, value in headers]
    if body or method not in _NO_BODY_METHODS:
        parts.append(f"Content-Length: {len(body)}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")
