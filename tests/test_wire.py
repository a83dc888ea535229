"""The wire, tried as an attacker would: raw sockets against swapper's front door (and the
connections it hands to aiohttp), and a child that answers with whatever bytes a test picks (the
fake upstream's ``X-Fake-Raw`` header). Each case here was accepted, forwarded, crashed or hung
before the front door and h1pool parsed with llhttp and bounded every buffer.

Real processes: swapper in-process behind ``FrontSite``, the fake upstream as a child.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.core.states import State
from swapper.web import front as front_module
from swapper.web.front import Front
from tests.frontserver import FrontTestServer
from tests.ops_helpers import ops_config, runloop, wait_until
from tests.rawhttp import Conn, chat, read_response

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
STEP = 10.0  # seconds any awaited step may take before the test fails


def front_of(client: TestClient[Any, Any]) -> Front:
    server = client.server
    assert isinstance(server, FrontTestServer)
    return server.front_site.front


async def loaded(aiohttp_client: ClientFactory, extra: str = "") -> TestClient[Any, Any]:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, extra)))
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert resp.status == 200, await resp.text()
    assert runloop(client).state("m") is State.READY
    return client


def raw_answer(data: bytes) -> str:
    """The ``X-Fake-Raw`` header line that makes the fake upstream answer ``data`` and close."""
    return f"X-Fake-Raw: {base64.b64encode(data).decode()}\r\n"


async def read_all(conn: Conn) -> bytes:
    """Everything up to the end of the connection, which the server must close; then closes it."""
    try:
        async with asyncio.timeout(STEP):
            return await conn.reader.read()
    finally:
        conn.close()


def held_bytes(front: Front) -> int:
    """What the front door's connections hold: unread request bytes and unsent answer bytes."""
    held = 0
    for conn in front.conns:
        held += len(conn._buf)
        transport = conn._transport
        if transport is not None:
            held += transport.get_write_buffer_size()
    return held


def small_receive_buffer() -> socket.socket:
    # A client that never reads: keep the kernel's share small, so that swapper's shows.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def flood(port: int, request: bytes, stop: asyncio.Event) -> None:
    """Pipelines ``request`` over and over and never reads an answer, until ``stop`` (or 256 MiB)."""
    sock = small_receive_buffer()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    batch = request * max(1, 64 * 1024 // len(request))
    try:
        for _ in range(256 * 1024 * 1024 // len(batch)):
            if stop.is_set():
                return
            writer.write(batch)
            await writer.drain()  # blocks for good once swapper stops reading
    finally:
        writer.transport.abort()  # a close would wait for the unsent bytes, which never go


async def assert_flood_is_bounded(client: TestClient[Any, Any], request: bytes) -> None:
    front = front_of(client)
    stop = asyncio.Event()
    task = asyncio.ensure_future(flood(client.port, request, stop))
    try:
        # The client reads nothing: swapper must stop answering, then stop reading.
        await wait_until(lambda: any(c._read_paused for c in front.conns), within=STEP, what="reading paused")
        held = held_bytes(front)
        assert held < front_module.MAX_PIPELINED + 1024 * 1024, held
        # ...and stay stopped: what it holds does not grow while the client keeps trying.
        for _ in range(20):
            await asyncio.sleep(0)
        assert held_bytes(front) < front_module.MAX_PIPELINED + 1024 * 1024
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task


# ---- memory ----


async def test_pipelined_gets_that_are_never_read_hold_bounded_memory(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    await assert_flood_is_bounded(client, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")


async def test_pipelined_model_lists_that_are_never_read_hold_bounded_memory(
    aiohttp_client: ClientFactory,
) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    await assert_flood_is_bounded(client, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")


async def test_pipelined_inline_posts_that_are_never_read_hold_bounded_memory(
    aiohttp_client: ClientFactory,
) -> None:
    client = await loaded(aiohttp_client)
    await assert_flood_is_bounded(client, chat(max_tokens=1))


async def test_a_stop_drops_a_connection_whose_client_never_reads(aiohttp_client: ClientFactory) -> None:
    # Closing it would wait for answers that never leave: past the grace, the stop aborts it.
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    front, site = front_of(client), client.server.front_site
    stop = asyncio.Event()
    task = asyncio.ensure_future(flood(client.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", stop))
    try:
        await wait_until(lambda: any(c._read_paused for c in front.conns), within=STEP, what="reading paused")
        site._grace = 0.1
        await site.stop()
        await wait_until(lambda: not front.conns, within=STEP, what="the connection dropped")
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await task


async def test_an_error_answer_survives_the_bytes_its_client_still_sends(
    aiohttp_client: ClientFactory,
) -> None:
    # A close with unread bytes is a reset, which can destroy the 400 before the client reads
    # it: the front door half-closes and discards what still arrives.
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    conn = await Conn.open(client)
    await conn.send(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
    await wait_until(lambda: front_of(client).refused == 1, within=STEP, what="the 400")
    for _ in range(16):
        await conn.send(b"x" * 4096)  # the client has not read the answer yet, and goes on
    answer = await asyncio.wait_for(conn.reader.read(), STEP)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]


# ---- deadlines ----


async def test_a_head_sent_byte_by_byte_is_cut_at_its_deadline(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, "requestHeaderTimeout: 0.5")))
    conn = await Conn.open(client)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    answer = b""
    async with asyncio.timeout(STEP):
        for byte in head:  # a slowloris: a byte every 50 ms, the head never ends
            await conn.send(bytes([byte]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    answer = await conn.reader.read()
            if conn.reader.at_eof():
                break
    conn.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert b'"code": "request_timeout"' in answer
    assert front_of(client).refused == 1


async def test_idle_connections_close_after_the_keepalive_on_both_paths(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front_module, "KEEPALIVE", 0.5)
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    on_front, handed = await Conn.open(client), await Conn.open(client)
    assert (await on_front.ask(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    assert (await handed.ask(b"GET /running HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    assert front_of(client).handed == 1
    assert await read_all(on_front) == b""  # closed by the server, not by this test
    assert await read_all(handed) == b""


# ---- what a child sends ----


async def test_a_body_ended_by_the_connection_gets_its_chunked_end(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    conn = await Conn.open(client)
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, until the end"
    await conn.send(chat(extra_headers=raw_answer(until_close)) + chat(max_tokens=1))
    async with asyncio.timeout(STEP):
        status, headers, body = await read_response(conn.reader)
        assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"hello, until the end")
        status, _, body = await read_response(conn.reader)  # the next answer is its own
    assert status == 200 and json.loads(body)["object"] == "chat.completion"
    conn.close()


@pytest.mark.parametrize("breaker", [b"\n", b"\r"], ids=["LF", "CR"])
async def test_a_bare_line_break_in_the_status_line_is_a_502(
    aiohttp_client: ClientFactory, breaker: bytes
) -> None:
    client = await loaded(aiohttp_client)
    conn = await Conn.open(client)
    injected = b"HTTP/1.1 200 OK" + breaker + b"X-Injected: 1\r\nContent-Length: 2\r\n\r\nok"
    async with asyncio.timeout(STEP):
        status, headers, body = await conn.ask(chat(extra_headers=raw_answer(injected)))
    assert status == 502 and "x-injected" not in headers
    assert json.loads(body)["src"] == "swapper"
    conn.close()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param("HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\n".encode(), id="non-ASCII digit length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n", id="NUL in a value"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
            id="chunk size 0x5",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
            id="chunk size 1_0",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-0\r\n\r\n", id="chunk size -0"),
    ],
)
async def test_answers_llhttp_refuses_are_502(aiohttp_client: ClientFactory, answer: bytes) -> None:
    client = await loaded(aiohttp_client)
    conn = await Conn.open(client)
    async with asyncio.timeout(STEP):
        status, _, body = await conn.ask(chat(extra_headers=raw_answer(answer)))
    assert status == 502 and json.loads(body)["error"]["code"] == "bad_gateway"
    assert runloop(client).snapshot()["m"].status.in_flight == 0
    conn.close()


@pytest.mark.parametrize("path", ["front door", "handed to aiohttp"])
async def test_content_length_beside_chunking_is_dropped(aiohttp_client: ClientFactory, path: str) -> None:
    client = await loaded(aiohttp_client)
    conn = await Conn.open(client)
    if path == "handed to aiohttp":
        assert (await conn.ask(b"GET /running HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    both = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    async with asyncio.timeout(STEP):
        status, headers, body = await conn.ask(chat(extra_headers=raw_answer(both)))
    assert (status, body) == (200, b"hello")
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    conn.close()


# ---- what a client sends ----

GOOD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(GOOD + b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}", id="NUL in a value"),
        pytest.param(GOOD + b"X-A: a\x01b\r\nContent-Length: 2\r\n\r\n{}", id="control byte in a value"),
        pytest.param(GOOD + b"X-A: a\x7fb\r\nContent-Length: 2\r\n\r\n{}", id="DEL in a value"),
        pytest.param(GOOD.replace(b"completions", b"compl\x00etions") + b"\r\n", id="NUL in the target"),
        pytest.param(GOOD.replace(b"completions", b"compl\x01etions") + b"\r\n", id="control in the target"),
        pytest.param(GOOD + b"X-A: 1\r\n" * 130 + b"Content-Length: 2\r\n\r\n{}", id="130 header fields"),
        pytest.param(GOOD + b"X-A: " + b"a" * 8191 + b"\r\n\r\n", id="an 8191-byte value"),
        pytest.param(b"POST /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="an 8201-byte target"),
        pytest.param(GOOD + b"X-A: " + b"a" * 20000, id="a line that never ends"),
        pytest.param(GOOD.replace(b"Host: x\r\n", b"") + b"Content-Length: 2\r\n\r\n{}", id="no Host"),
        pytest.param(GOOD + b"Host: y\r\nContent-Length: 2\r\n\r\n{}", id="two Hosts"),
        pytest.param(GOOD + "Content-Length: ²\r\n\r\n{}".encode(), id="non-ASCII digit length"),
        pytest.param(GOOD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", id="two lengths"),
        pytest.param(
            GOOD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="length and chunking",
        ),
        pytest.param(GOOD + b"X-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\n{}", id="obs-fold"),
        pytest.param(GOOD + b"X-A : 1\r\nContent-Length: 2\r\n\r\n{}", id="blank before a colon"),
        pytest.param(GOOD + b"X-A: 1\nContent-Length: 2\r\n\r\n{}", id="bare LF"),
        pytest.param(b"get /health HTTP/1.1\r\nHost: x\r\n\r\n", id="lower-case method"),
    ],
)
async def test_requests_llhttp_refuses_get_a_400_envelope(
    aiohttp_client: ClientFactory, request_bytes: bytes
) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    conn = await Conn.open(client)
    await conn.send(request_bytes)
    answer = await read_all(conn)  # the answer, then the end of the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert json.loads(body)["src"] == "swapper"
    assert runloop(client).state("m") is State.STOPPED  # nothing reached a model
    assert (front_of(client).refused, front_of(client).handed) == (1, 0)


async def test_an_absolute_form_target_is_served_like_its_path(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    conn = await Conn.open(client)
    request = chat(max_tokens=1).replace(
        b"POST /v1/chat/completions", b"POST http://swapper.example:8080/v1/chat/completions", 1
    )
    status, _, body = await conn.ask(request)
    assert status == 200 and json.loads(body)["object"] == "chat.completion"
    assert front_of(client).handed == 0
    conn.close()


@pytest.mark.parametrize(
    "path", ["/health", "/v1/models", "/models", "/running", "/v1/status", "/logs", "/metrics"]
)
async def test_head_works_on_every_get_route(aiohttp_client: ClientFactory, path: str) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    conn = await Conn.open(client)
    await conn.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    _, got, body = await read_response(conn.reader)
    await conn.send(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, rest = (await read_all(conn)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert rest == b""  # no body
    headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert headers[b"content-type"] == got["content-type"].lower().encode()
