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

from swapper.h1pool import HIGH_WATER, ConnectFailed, Disconnected, H1Pool, ProtocolError, Response
from swapper.proxy import response_head
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
            resp = await pool.request("POST", url / "x", [("X-Req", "1")], b"{}")
            assert (resp.status, resp.reason, resp.headers["X-A"]) == (200, "OK", "1")
            assert await read_all(resp) == b"hello 0123456789"
            resp.close()
    assert len(seen) == 2
    assert seen[0].startswith(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-Req: 1\r\nContent-Length: 2\r\n\r\n{}" in seen[0]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
async def test_sized_body_and_interim_answer(pool: H1Pool, split: bool) -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nabcde"
    async with upstream(lambda req: bytewise(raw) if split else [raw]) as (url, _):
        resp = await pool.request("GET", url, [], b"")
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
            resp = await pool.request("GET", url, [], b"")
            conn = resp._conn
            assert conn is not None and conn.transport is not None
            peers.append(conn.transport.get_extra_info("sockname"))
            assert await read_all(resp) == expected
            resp.close()
    assert len(seen) == 3
    assert peers[0] == peers[1] != peers[2]  # reused once; "close" then forced a new connection


async def test_body_until_close_and_head_and_empty_statuses(pool: H1Pool) -> None:
    async with upstream(lambda req: [b"HTTP/1.1 200 OK\r\n\r\nall of it"], close_after=True) as (url, _):
        resp = await pool.request("GET", url, [], b"")
        assert await read_all(resp) == b"all of it"
        resp.close()

    def reply(req: bytes) -> list[bytes]:
        if req.startswith(b"HEAD"):
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"]
        return [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"]

    async with upstream(reply) as (url, seen):
        for method in ("HEAD", "GET", "HEAD"):
            resp = await pool.request(method, url, [], b"")
            assert resp.headers["Content-Length"] == "10"
            assert await read_all(resp) == b""
            resp.close()
        assert len(seen) == 3
        assert b"Content-Length" not in seen[0]  # no invented "Content-Length: 0" on HEAD/GET


async def test_empty_post_gets_content_length_zero(pool: H1Pool) -> None:
    async with upstream(lambda req: [b"HTTP/1.1 204 No Content\r\n\r\n"]) as (url, seen):
        resp = await pool.request("POST", url, [], b"")
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
            await pool.request("GET", url, [], b"")


async def test_head_values_lose_their_blanks_and_the_reason_keeps_its_bytes(pool: H1Pool) -> None:
    raw = "HTTP/1.1 200 Très bien\r\nX-A:\t 1 \t\r\nX-B:2\r\nContent-Length: 2 \r\n\r\nok".encode()
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, [], b"")
        assert (resp.headers["X-A"], resp.headers["X-B"]) == ("1", "2")
        # As a latin-1 str, like aiohttp's reason: each byte is one character, encodable again.
        assert resp.reason.encode("latin-1") == "Très bien".encode()
        assert await read_all(resp) == b"ok"
        resp.close()


@pytest.mark.parametrize(
    "body", [b"zz\r\nxx\r\n0\r\n\r\n", b"2\r\nxxyy\r\n0\r\n\r\n"], ids=["bad-size", "missing-crlf"]
)
async def test_malformed_chunks_break_the_body(pool: H1Pool, body: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, [], b"")
        with pytest.raises(ProtocolError):
            await read_all(resp)
        resp.close()


async def test_body_cut_short_raises_after_the_bytes_that_came(pool: H1Pool) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    async with upstream(lambda req: [raw], close_after=True) as (url, _):
        resp = await pool.request("GET", url, [], b"")
        assert await resp.readany() == b"abc"
        with pytest.raises(Disconnected) as info:
            await resp.readany()
        assert info.value.response_started
        resp.close()


async def test_close_before_responding_is_a_safe_to_retry_disconnect(pool: H1Pool) -> None:
    async with upstream(lambda req: [], close_after=True) as (url, _):
        with pytest.raises(Disconnected) as info:
            await pool.request("GET", url, [], b"")
        assert not info.value.response_started


async def test_connect_failure(pool: H1Pool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed) as info:
        await pool.request("GET", URL(f"http://127.0.0.1:{port}/"), [], b"")
    assert info.value.strerror


async def test_reading_pauses_above_the_high_water_mark(
    pool: H1Pool, wait_until: Callable[..., Awaitable[None]]
) -> None:
    size = 4 * HIGH_WATER
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with upstream(lambda req: [raw]) as (url, _):
        resp = await pool.request("GET", url, [], b"")
        conn = resp._conn
        assert conn is not None
        # Nobody reads: the buffer fills, then reading from the socket stops.
        await wait_until(lambda: conn._paused, what="reading paused")
        assert conn._unread <= HIGH_WATER + 256 * 1024
        assert len(await read_all(resp)) == size
        resp.close()


async def test_large_request_body_is_sent_whole(pool: H1Pool) -> None:
    body = bytes(range(256)) * 4096 * 3  # 3 MiB: written in drained slices
    async with upstream(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]) as (url, seen):
        resp = await pool.request("PUT", url / "up", [("Content-Type", "application/octet-stream")], body)
        assert await read_all(resp) == b"ok"
        resp.close()
    assert seen[0].endswith(b"\r\n\r\n" + body)


async def test_unread_response_closes_its_connection(pool: H1Pool) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd"
    async with upstream(lambda req: [raw[:-2], raw[-2:]]) as (url, _):
        resp = await pool.request("GET", url, [], b"")
        conn = resp._conn
        assert conn is not None
        resp.close()  # the body was never read: the connection cannot be reused
        assert conn.transport is not None and conn.transport.is_closing()
        assert pool._take(conn.key) is None


# What the proxy forwards of a response head (proxy.response_head, from Response.block).
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
        resp = await pool.request("POST", url / "x", [], b"{}")
        assert response_head(resp, "X-Extra: 1\r\n", rechunked=rechunked) == expected
        resp.close()
