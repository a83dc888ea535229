#!/usr/bin/env python3
"""A deliberately cheap upstream for proxy benchmarks: ``python scripts/fast_upstream.py --port P``.

Stdlib only, one asyncio ``Protocol`` per connection, no per-request allocation beyond parsing
the request head: the proxy under test, not this server, should be what a benchmark measures.

  GET  /health      200 {"status":"ok"}
  POST anything     a body containing ``"stream": true`` (or ``"stream":true``) gets an SSE answer
                    (``Transfer-Encoding: chunked``, one chunk per event, ``--chunks`` events then
                    ``data: [DONE]``), written one event per event-loop turn so that events leave
                    as separate writes, as a real server's tokens do; anything else gets a tiny
                    JSON chat completion with Content-Length.

HTTP/1.1 keep-alive (``Connection: close`` honoured), Content-Length request bodies only. Prints
"server is listening on http://HOST:PORT" once bound, the readiness line swapper looks for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

HEALTH = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"status":"ok"}'
CHAT_BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"fast",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
CHAT = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(CHAT_BODY)
    + CHAT_BODY
)
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'
EVENT_CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
DONE = b"data: [DONE]\n\n"
END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class Upstream(asyncio.Protocol):
    def __init__(self, chunks: int) -> None:
        self._chunks = chunks
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._streaming: asyncio.Task[None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._can_write.set()
        if self._streaming is not None:
            self._streaming.cancel()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._serve()

    def _serve(self) -> None:
        while self._streaming is None and self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if len(self._buf) < end + 4 + length:
                return
            body = bytes(self._buf[end + 4 : end + 4 + length])
            del self._buf[: end + 4 + length]
            close = b"\r\nconnection: close" in head
            if head.startswith(b"get /health"):
                self._transport.write(HEALTH)
            elif head.startswith(b"post "):
                if b'"stream": true' in body or b'"stream":true' in body:
                    self._streaming = asyncio.ensure_future(self._stream(close))
                    return
                self._transport.write(CHAT)
            else:
                self._transport.write(NOT_FOUND)
            if close:
                self._transport.close()

    async def _stream(self, close: bool) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(SSE_HEAD)
        for _ in range(self._chunks):
            await asyncio.sleep(0)  # one event per loop turn: separate writes, like real tokens
            if not self._can_write.is_set():
                await self._can_write.wait()
            if transport.is_closing():
                return
            transport.write(EVENT_CHUNK)
        transport.write(END)
        self._streaming = None
        if close:
            transport.close()
        else:
            self._serve()  # a request that arrived meanwhile (clients do not pipeline; be safe)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=200, help="SSE events per streamed answer (200)")
    args = ap.parse_args()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: Upstream(args.chunks), args.host, args.port, reuse_address=True, backlog=4096
    )
    print(f"server is listening on http://{args.host}:{args.port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
