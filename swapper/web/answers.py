"""The front door's writing side: a model request's answer relayed from its child (chunks
straight from the upstream connection's reads, no task switch per chunk), its errors (JSON, or a
final SSE event once a stream is under way) and swapper's own answers.

Owns: nothing of its own. ``FrontConn`` inherits these; they write to its transport and read the
state it keeps for the request in service (declared below).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import replace
from typing import Final, Protocol

from swapper.core.errors import Answer, SwapperError, UpstreamError, error_answer, sse_error_event
from swapper.http import cors, relay
from swapper.http.exchange import Exchange, outcome_of
from swapper.http.heads import _BODILESS, _answer_head, _capturing, _reason
from swapper.observe.activity import TAIL_CHUNKS, tail_of
from swapper.observe.capture import Capture
from swapper.observe.events import RequestTrack
from swapper.wire.codec import CHUNK_END, chunk, response_head
from swapper.wire.h1pool import Response

__all__ = ["AnswerWriter"]

LINGER: Final = 2.0  # seconds a connection closed after an answer still discards what arrives
_NOTHING_OUT, _HEAD_OUT, _SSE_OUT = range(3)  # what of the current answer went out
_NO_TAIL: Final[deque[bytes]] = deque((), TAIL_CHUNKS)  # shared until the first relay: written, never read


class _Door(Protocol):
    """What the writing side reads of the front door (``front.Front``)."""

    closing: bool
    cors_origins: tuple[str, ...]


class AnswerWriter:
    """Writes answers on a front-door connection (see the module docstring)."""

    _front: _Door
    _transport: asyncio.Transport | None
    _exchange: Exchange | None
    _upstream: Response | None
    _keep: bool
    _write_paused: bool
    _head_out: int
    _tail: deque[bytes]
    _origin: bytes | None
    _buf: bytearray
    _read_paused: bool
    _lingering: bool

    def _end_with(self, track: RequestTrack, err: SwapperError) -> bool:
        """Ends the current answer with ``err``, however far it got: the JSON error if nothing
        went out, a final SSE error event and a proper end for a stream, else a cut connection
        (a truncated body must not look complete). True if the connection may serve on."""
        if self._head_out == _NOTHING_OUT:
            track.failed(err.status, outcome_of(err))
            self._answer(self._error(err), close=True)
            return False
        track.outcome = outcome_of(err)
        if self._head_out == _SSE_OUT:
            event = sse_error_event(err)
            if not (self._tail and self._tail[-1].endswith(b"\n\n")):
                event = b"\n\n" + event  # the upstream broke mid-event: end that one first
            return self._write(chunk(event) + CHUNK_END)
        if self._transport is not None:
            self._transport.close()
        return False

    async def _relay(self, upstream: Response, track: RequestTrack) -> bool:
        """Writes the upstream's answer; True if it completed (the connection may be reused).
        Leaves the answer's last bytes in ``track.tail`` (its last few reads: never per chunk
        work beyond keeping a reference)."""
        tail = self._tail = deque((), TAIL_CHUNKS)
        try:
            return await self._relay_body(upstream, track.capture)
        finally:
            track.tail = tail_of(tail)
            self._tail = _NO_TAIL

    async def _relay_body(self, upstream: Response, capture: Capture | None) -> bool:
        head, chunked = _answer_head(upstream, self._closing_after())
        bodiless = upstream.status in _BODILESS
        first = b""
        if not upstream.sse and not bodiless:
            # Read ahead: a small answer leaves in one write, and an upstream that dies before its
            # body is still a clean 502.
            try:
                first = await upstream.readany()
            except relay.UPSTREAM_READ_ERRORS as exc:
                err = UpstreamError(f"upstream broke before sending a body: {exc!r}")
                return self._end_with(self._track_of(), err)
        if bodiless:
            return self._write(head)
        self._tail.append(first)
        if capture is not None:
            capture.add(first)
        start = head + (chunk(first) if chunked else first) if first else head
        if upstream.at_eof():
            return self._write(start + CHUNK_END if chunked else start)
        if not self._write(start):
            return False
        self._head_out = _SSE_OUT if chunked and upstream.sse else _HEAD_OUT
        # The rest goes from the upstream's data_received straight to the client: no task switch
        # per chunk. Reading the upstream pauses while the client does not keep up.
        self._upstream = upstream
        sink = self._relay_chunk if chunked else self._relay_bytes
        upstream.pipe(sink if capture is None else _capturing(sink, capture))
        if self._write_paused:
            upstream.pause_reading(True)
        try:
            await upstream.wait_done()
        except relay.UPSTREAM_READ_ERRORS as exc:
            # A stream ends with an error event and a proper end; any other truncated body must
            # not look complete: the client connection is dropped (as nginx and Go's ReverseProxy do).
            return self._end_with(self._track_of(), UpstreamError(f"upstream broke mid-answer: {exc!r}"))
        finally:
            self._upstream = None
        return self._transport is not None and not self._transport.is_closing()

    def _track_of(self) -> RequestTrack:
        assert self._exchange is not None
        return self._exchange.track

    def _relay_chunk(self, data: bytes, last: bool) -> None:
        self._tail.append(data)
        transport = self._transport
        if transport is not None:
            if data:
                transport.write(b"%x\r\n%b\r\n%b" % (len(data), data, CHUNK_END if last else b""))
            elif last:
                transport.write(CHUNK_END)

    def _relay_bytes(self, data: bytes, last: bool) -> None:
        self._tail.append(data)
        transport = self._transport
        if transport is not None and data:
            transport.write(data)

    # ---- writing ----

    def _closing_after(self) -> bool:
        return not self._keep or self._front.closing

    def _write(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    def _error(self, err: SwapperError) -> Answer:
        """The model request's error answer; with the request's ``Origin``, as a page may read it
        (``cors``: swapper's own answers carry ``Allow-Origin``, as llama-server's do)."""
        answer = error_answer(err)
        origin = self._origin
        if origin is None:
            return answer
        allowed = cors.allow_origin(self._front.cors_origins, origin.decode("utf-8", "surrogateescape"))
        if allowed is None:
            return answer
        extra = (("Access-Control-Allow-Origin", allowed),) + (
            (("Vary", "Origin"),) if allowed != "*" else ()
        )
        return replace(answer, headers=answer.headers + extra)

    def _answer(self, answer: Answer, *, close: bool = False, head_only: bool = False) -> None:
        """Writes ``answer`` whole (``head_only``: without its body, for HEAD); ``close`` closes
        the connection after it."""
        content_type = answer.content_type
        if answer.charset:
            content_type += f"; charset={answer.charset}"
        fields = [("Content-Type", content_type), ("Content-Length", str(len(answer.body))), *answer.headers]
        if close:
            fields.append(("Connection", "close"))
        lines = "".join(f"{name}: {value}\r\n" for name, value in fields)
        data = response_head(answer.status, _reason(answer.status), lines.encode("utf-8", "surrogateescape"))
        if self._write(data if head_only else data + answer.body) and close:
            self._close_lingering()

    def _close_lingering(self) -> None:
        """Closes after an answer its client may still be sending into (a 400, a 408): the write
        side first, then what arrives is discarded until the client closes or ``LINGER`` passes.
        A close with unread bytes would be a reset, and a reset can destroy the answer before
        the client reads it."""
        transport = self._transport
        assert transport is not None
        if not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self._buf.clear()
        transport.write_eof()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER, transport.close)
