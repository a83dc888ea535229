"""h1pool against hand-written upstreams: framing, odd-but-legal responses, reuse, backpressure.

The end-to-end proxy behaviours (headers, truncation, retries, disconnects) are in test_proxy.py;
these cover what only shows at the wire: every framing split at every byte, interim answers,
trailers, malformed heads, and the pause/resume of reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
from yarl import URL

from swapper.wire.codec import HOP_BY_HOP, RECHUNKED_DROP, forwardable, response_head
from swapper.wire.h1pool import HIGH_WATER, ConnectFailed, Disconnected, H1Pool, ProtocolError, Response
from tests.rawhttp import read_request

STEP = 5.0

Reply = Callable[[bytes], list[bytes]]  # request head+body -> segments to write, in order


@asynccontextmanager
async def upstream(reply: Reply, *, close_after: bool = False) -> AsyncIterator[tuple[URL, list[bytes]]]:
    """Serves ``reply(request)`` segment by segment (with a loop turn between), keep-alive."""
    seen: list[bytes] = []
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.add(writer)
        try:
            while True:
                got = await read_request(reader)
                if got is None:
                    return
                request = got[0] + got[1]
                seen.append(request)
                for segment in reply(request):
                    writer.write(segment)
                    await writer.drain()
                    await asyncio.sleep(0)
                if close_after:
                    return
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield URL(f"http://{host}:{port}"), seen
    finally:
        server.close()
        for writer in writers:
            writer.close()  # ends each serve() at its next read
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.fixture
async def pool() -> AsyncIterator[H1Pool]:
    p = H1Pool()
    yield p
    p.close()


async def read_all(resp: Response) -> bytes:
    out = b""
    async with asyncio.timeout(STEP):
        while chunk := await resp.readany():
            out += chunk
    assert resp.at_eof()
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
async def test_chunked_with_extensions_and_trailers(pool: H1Pool, split: bool) -> None:
    async with upstream(lambda req: bytewise(CHUNKED) if split else [CHUNKED]) as (url, seen):
        for _ in range(2):
            resp = await pool.request("POST", url / "x", b"X-Req: 1\r\n", b"{}")
            assert (resp.status, resp.reason, resp.headers["X-A"]) == (200, b"OK", "1")
            assert await read_all(resp) == b"hello 0123456789"
            resp.close()
    assert len(seen) == 2
    assert seen[0].startswith(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-Req: 1\r\nContent-Length: 2\r\n\r\n{}" in seen[0]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
async def test_sized_body_and_interim_answer(pool: H1Pool, split: bool) -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nabcde"
    async with upstream(lambda req: bytewise(raw) if split else [raw]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        assert resp.status == 201
        assert await read_all(resp) == b"abcde"
        resp.close()


async def test_keep_alive_reuse_and_connection_close(pool: H1Pool) -> None:
    replies = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nb",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nc",
        ]
    )
    peers: list[object] = []
    async with upstream(lambda req: [next(replies)]) as (url, seen):
        for expected in (b"a", b"b", b"c"):
            resp = await pool.request("GET", url, b"", b"")
            conn = resp._conn
            assert conn is not None and conn.transport is not None
            peers.append(conn.transport.get_extra_info("sockname"))
            assert await read_all(resp) == expected
            resp.close()
    assert len(seen) == 3
    assert peers[0] == peers[1] != peers[2]  # reused once; "close" then forced a new connection


async def test_body_until_close_and_head_and_empty_statuses(pool: H1Pool) -> None:
    async with upstream(lambda req: [b"HTTP/1.1 200 OK\r\n\r\nall of it"], close_after=True) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        assert await read_all(resp) == b"all of it"
        resp.close()

    def reply(req: bytes) -> list[bytes]:
        if req.startswith(b"HEAD"):
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"]
        return [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"]

    async with upstream(reply) as (url, seen):
        for method in ("HEAD", "GET", "HEAD"):
            resp = await pool.request(method, url, b"", b"")
            assert resp.headers["Content-Length"] == "10"
            assert await read_all(resp) == b""
            resp.close()
        assert len(seen) == 3
        assert b"Content-Length" not in seen[0]  # no invented "Content-Length: 0" on HEAD/GET


async def test_empty_post_gets_content_length_zero(pool: H1Pool) -> None:
    async with upstream(lambda req: [b"HTTP/1.1 204 No Content\r\n\r\n"]) as (url, seen):
        resp = await pool.request("POST", url, b"", b"")
        assert resp.status == 204 and await read_all(resp) == b""
        resp.close()
    assert seen[0].endswith(b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 0\r\n\r\n",  # a blank before the colon
        b"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 0\r\n\r\n",  # a bare CR inside a line
        b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 0\r\n\r\n",  # a bare LF inside a line
    ],
)
async def test_malformed_heads_are_protocol_errors(pool: H1Pool, raw: bytes) -> None:
    async with upstream(lambda req: [raw]) as (url, _):
        with pytest.raises(ProtocolError):
            await pool.request("GET", url, b"", b"")


async def test_head_values_lose_their_blanks_and_the_reason_keeps_its_bytes(pool: H1Pool) -> None:
    raw = "HTTP/1.1 200 Très bien\r\nX-A:\t 1 \t\r\nX-B:2\r\nContent-Length: 2 \r\n\r\nok".encode()
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        assert (resp.headers["X-A"], resp.headers["X-B"]) == ("1", "2")
        assert resp.reason == "Très bien".encode()  # the bytes as sent
        assert await read_all(resp) == b"ok"
        resp.close()


@pytest.mark.parametrize(
    "body", [b"zz\r\nxx\r\n0\r\n\r\n", b"2\r\nxxyy\r\n0\r\n\r\n"], ids=["bad-size", "missing-crlf"]
)
async def test_malformed_chunks_break_the_body(pool: H1Pool, body: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        with pytest.raises(ProtocolError):
            await read_all(resp)
        resp.close()


async def test_body_cut_short_raises_after_the_bytes_that_came(pool: H1Pool) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    async with upstream(lambda req: [raw], close_after=True) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        assert await resp.readany() == b"abc"
        with pytest.raises(Disconnected) as info:
            await resp.readany()
        assert info.value.response_started
        resp.close()


async def test_close_before_responding_after_the_request_was_written_is_not_replayable(pool: H1Pool) -> None:
    async with upstream(lambda req: [], close_after=True) as (url, _):
        with pytest.raises(Disconnected) as info:
            await pool.request("GET", url, b"", b"")
        assert not info.value.response_started
        assert not info.value.replayable  # the upstream read it: it may have acted on it


async def test_connect_failure(pool: H1Pool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed) as info:
        await pool.request("GET", URL(f"http://127.0.0.1:{port}/"), b"", b"")
    assert info.value.strerror


async def test_reading_pauses_above_the_high_water_mark(
    pool: H1Pool, wait_until: Callable[..., Awaitable[None]]
) -> None:
    size = 4 * HIGH_WATER
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        conn = resp._conn
        assert conn is not None
        # Nobody reads: the buffer fills, then reading from the socket stops.
        await wait_until(lambda: conn._paused, what="reading paused")
        assert sum(map(len, conn._chunks)) <= HIGH_WATER + 256 * 1024
        assert len(await read_all(resp)) == size
        resp.close()


async def test_large_request_body_is_sent_whole(pool: H1Pool) -> None:
    body = bytes(range(256)) * 4096 * 3  # 3 MiB: written in drained slices
    async with upstream(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]) as (url, seen):
        resp = await pool.request("PUT", url / "up", b"Content-Type: application/octet-stream\r\n", body)
        assert await read_all(resp) == b"ok"
        resp.close()
    assert seen[0].endswith(b"\r\n\r\n" + body)


async def test_unread_response_closes_its_connection(pool: H1Pool) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd"
    async with upstream(lambda req: [raw[:-2], raw[-2:]]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        conn = resp._conn
        assert conn is not None
        resp.close()  # the body was never read: the connection cannot be reused
        assert conn.transport is not None and conn.transport.is_closing()
        assert pool._take(conn.key) is None


# What a proxy forwards of a response head (codec.forwardable of Response.raw_headers).
LLAMA_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
    b"Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n"
    b"Keep-Alive: timeout=5, max=100\r\n\r\n{}"
)
ODD_CASE_HEAD = (
    b"HTTP/1.0 201 Made It\r\nKEEP-ALIVE: x\r\nconnection: keep-alive\r\nTea: green\r\n"
    b"Keep-Alive-Extra: y\r\nTE: trailers\r\nProxy-Connection: close\r\nContent-Length: 2\r\n\r\n{}"
)
NAMED_HEAD = (
    b"HTTP/1.1 200 OK\r\nConnection: X-Private\r\nX-Private: secret\r\nX-Public: p\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


@pytest.mark.parametrize(
    ("raw", "rechunked", "expected"),
    [
        (
            LLAMA_HEAD,
            False,
            b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
            b"Content-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\nX-Extra: 1\r\n\r\n",
        ),
        (
            LLAMA_HEAD,
            True,
            b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
            b"Content-Type: application/json; charset=utf-8\r\nX-Extra: 1\r\n\r\n",
        ),
        # Hop-by-hop names in any case go; names that only start like one stay.
        (
            ODD_CASE_HEAD,
            False,
            b"HTTP/1.1 201 Made It\r\nTea: green\r\nKeep-Alive-Extra: y\r\nContent-Length: 2\r\n"
            b"X-Extra: 1\r\n\r\n",
        ),
        # A header that Connection names is hop-by-hop too.
        (NAMED_HEAD, False, b"HTTP/1.1 200 OK\r\nX-Public: p\r\nContent-Length: 2\r\nX-Extra: 1\r\n\r\n"),
    ],
    ids=["llama-server", "rechunked", "odd-case", "connection-named"],
)
async def test_the_forwarded_head_drops_hop_by_hop_headers(
    pool: H1Pool, raw: bytes, rechunked: bool, expected: bytes
) -> None:
    async with upstream(lambda req: [raw], close_after=True) as (url, _):
        resp = await pool.request("POST", url / "x", b"", b"{}")
        drop = RECHUNKED_DROP if rechunked else HOP_BY_HOP
        lines = forwardable(resp.raw_headers, resp.reader.connection, drop) + b"X-Extra: 1\r\n"
        assert response_head(resp.status, resp.reason, lines) == expected
        resp.close()


# ---- llhttp's strictness (each of these was accepted, or crashed the parser, before it) ----


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 200 OK\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n", id="bare LF in status"),
        pytest.param(b"HTTP/1.1 200 OK\rX-Injected: 1\r\nContent-Length: 0\r\n\r\n", id="bare CR in status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n", id="NUL in a value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n", id="control byte"),
        pytest.param("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n".encode(), id="non-ASCII digit length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello", id="hex length"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 129 + b"\r\n", id="129 header fields"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 8191 + b"\r\n\r\n", id="an 8191-byte value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (70 * 1024), id="a head over 64 KiB"),
    ],
)
async def test_heads_llhttp_refuses_are_protocol_errors(pool: H1Pool, raw: bytes) -> None:
    async with upstream(lambda req: [raw]) as (url, _):
        with pytest.raises(ProtocolError):
            await pool.request("GET", url, b"", b"")


@pytest.mark.parametrize("size", [b"0x5", b"1_0", b"-0", b" 5", b"+5"])
async def test_chunk_sizes_llhttp_refuses_break_the_body(pool: H1Pool, size: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        with pytest.raises(ProtocolError):
            await read_all(resp)
        resp.close()


async def test_content_length_beside_chunking_loses_and_the_connection_is_not_reused(pool: H1Pool) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        assert await read_all(resp) == b"hello"  # the chunking wins (RFC 9112 §6.3)
        assert not resp.sized and resp.reader.forward(rechunked=False) == b""
        conn = resp._conn
        assert conn is not None
        resp.close()
        assert pool._take(conn.key) is None  # a suspect connection is never reused


async def test_a_piped_body_that_ends_with_the_connection_gets_its_last_call(pool: H1Pool) -> None:
    raw = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ", b"second"]
    async with upstream(lambda req: raw, close_after=True) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        calls: list[tuple[bytes, bool]] = []
        resp.pipe(lambda data, last: calls.append((data, last)))
        async with asyncio.timeout(STEP):
            await resp.wait_done()
        assert b"".join(data for data, _ in calls) == b"first second"
        assert calls[-1][1] is True  # the sink learns the end, so its client's body can end
        resp.close()


async def test_bytes_after_a_response_break_its_connection(pool: H1Pool) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, b"", b"")
        assert await read_all(resp) == b"ok"
        conn = resp._conn
        assert conn is not None
        resp.close()
        assert pool._take(conn.key) is None


async def test_head_then_get_on_the_same_connection(pool: H1Pool) -> None:
    def reply(req: bytes) -> list[bytes]:
        if req.startswith(b"HEAD"):
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"]

    async with upstream(reply) as (url, _):
        peers = []
        for method, body in (("HEAD", b""), ("GET", b"hello")):
            resp = await pool.request(method, url, b"", b"")
            conn = resp._conn
            assert conn is not None and conn.transport is not None
            peers.append(conn.transport.get_extra_info("sockname"))
            assert await read_all(resp) == body
            resp.close()
        assert peers[0] == peers[1]
