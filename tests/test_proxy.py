"""proxy.send() and proxy.relay() (aiohttp's side of the hot path) against real sockets: aiohttp
upstreams, and hand-written ones for the connection-level behaviours (stale keep-alive,
truncation) that aiohttp's server never shows.

No test sleeps to wait for state: each waits on an Event or on a reply, under a short timeout so
a proxy that buffers fails fast instead of hanging.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from swapper.core.errors import UpstreamError, UpstreamRefused, error_body
from swapper.http.relay import make_session, pool_of, relay, send, upstream_headers
from tests.rawhttp import read_request

MAX_BODY = 64 * 1024 * 1024
STEP = 5.0  # seconds any single awaited step may take before the test fails


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    s = make_session()
    yield s
    await s.close()


@dataclass
class Result:
    status: int
    bytes_out: int
    complete: bool
    ttfb: float


@dataclass
class Proxy:
    """A tiny proxy app: its handler reads the body, sends it and relays the answer, as routes do."""

    session: aiohttp.ClientSession
    base: str
    results: list[Result] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    handler_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    preamble: bytes | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen_headers.append(dict(request.headers))
        body = await request.read()
        prepared = None
        if self.preamble is not None:
            prepared = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await prepared.prepare(request)
            await prepared.write(self.preamble)
        url = URL(self.base + request.raw_path, encoded=True)
        headers = upstream_headers(request.raw_headers, identity=prepared is not None)
        upstream = None
        try:
            started = time.perf_counter()
            upstream = await send(pool_of(self.session), request.method, url, headers, body)
            ttfb = time.perf_counter() - started
            if upstream.streamed:
                upstream.do_not_pool()
            relayed = await relay(request, upstream, prepared)
        except UpstreamError as exc:
            return web.Response(status=exc.status, body=error_body(exc), content_type="application/json")
        except asyncio.CancelledError:
            self.handler_cancelled.set()
            raise
        finally:
            if upstream is not None:
                upstream.close()
        self.results.append(Result(upstream.status, relayed.bytes_out, relayed.complete, ttfb))
        self.done.set()
        return relayed.response

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def start_proxy(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession, base: str, **client_kwargs: Any
) -> tuple[Proxy, TestClient[web.Request, web.Application]]:
    proxy = Proxy(session, base.rstrip("/"))
    client = await aiohttp_client(proxy.app(), **client_kwargs)
    return proxy, client


async def start_upstream(aiohttp_server: AiohttpServer, handler: Callable[..., object]) -> TestServer:
    return await aiohttp_server(_single_route_app(handler))


def base_of(server: TestServer) -> str:
    return str(server.make_url("/")).rstrip("/")


# --- a hand-written HTTP/1.1 upstream ----------------------------------------------------------

Script = Callable[[int, int], tuple[bytes, bool]]  # (connection no., request no. on it) -> (reply, close)


class RawUpstream:
    """Serves scripted replies byte for byte and records which connection each request used."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection no., head, body)
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def base(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = self.connections
        self.connections += 1
        try:
            for index in range(1_000):
                got = await read_request(reader)
                if got is None:
                    return
                head, body = got
                self.requests.append((conn, head, body))
                reply, close = self.script(conn, index)
                writer.write(reply)
                await writer.drain()
                if close:
                    return
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()


def sized(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
    return head + b"".join(h + b"\r\n" for h in extra) + b"Content-Length: %d\r\n\r\n" % len(body) + body


def sse(*events: bytes, end: bool = True) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
    out += b"Transfer-Encoding: chunked\r\n\r\n"
    for event in events:
        out += b"%x\r\n%s\r\n" % (len(event), event)
    return out + (b"0\r\n\r\n" if end else b"")


# --- headers and bodies ----------------------------------------------------------------------


async def test_body_and_headers_pass_through(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
    reply = bytes(range(256)) * 400  # 100 KiB, every byte value

    async def upstream(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.raw_path, list(request.headers.items()), await request.read()))
        resp = web.Response(body=reply, status=201, reason="Made It", content_type="application/x-thing")
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers["X-Upstream"] = "yes"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
        return resp

    server = await start_upstream(aiohttp_server, upstream)
    proxy, client = await start_proxy(aiohttp_client, session, base_of(server))
    body = b'{"model": "m", "x": "' + b"y" * 70_000 + b'"}'
    resp = await client.post(
        URL("/v1/a%2Fb/chat?model=a%2Fb&q=1+2", encoded=True),
        data=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer secret",
            "X-Custom": "1",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must go",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eA==",
            "Proxy-Connection": "keep-alive",
        },
    )
    assert resp.status == 201 and resp.reason == "Made It"
    assert await resp.read() == reply
    assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert resp.headers["X-Upstream"] == "yes"
    assert resp.headers["Content-Type"] == "application/x-thing"
    assert resp.headers["Content-Length"] == str(len(reply))
    assert "Keep-Alive" not in resp.headers and "Proxy-Authenticate" not in resp.headers
    assert "X-Accel-Buffering" not in resp.headers

    [(method, raw_path, headers, upstream_body)] = seen
    assert (method, raw_path, upstream_body) == ("POST", "/v1/a%2Fb/chat?model=a%2Fb&q=1+2", body)
    dropped = {"host", "content-length", "connection", "x-hop", "keep-alive", "te"}
    dropped |= {"proxy-authorization", "proxy-connection"}
    expected = [(k, v) for k, v in proxy.seen_headers[0].items() if k.lower() not in dropped]
    got = [(k, v) for k, v in headers if k.lower() not in {"host", "content-length"}]
    assert got == expected
    got_map = dict(headers)
    assert got_map["Host"] == f"{server.host}:{server.port}"
    assert got_map["Content-Length"] == str(len(body))
    [result] = proxy.results
    assert (result.status, result.bytes_out, result.complete) == (201, len(reply), True)
    assert result.ttfb > 0


async def test_no_headers_are_invented(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    seen: list[dict[str, str]] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=204)

    server = await start_upstream(aiohttp_server, upstream)
    _, client = await start_proxy(
        aiohttp_client,
        session,
        base_of(server),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    )
    assert (await client.get("/props?model=m1")).status == 204
    assert (await client.post("/v1/x")).status == 204
    get, post = seen
    assert set(get) == {"Host"}  # no Content-Length on a GET, no Accept-Encoding, no User-Agent
    assert set(post) == {"Host", "Content-Length"} and post["Content-Length"] == "0"


async def test_gzip_is_passed_through_verbatim(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    plain = b'{"text": "' + b"compress me " * 5000 + b'"}'
    packed = gzip.compress(plain)

    async def upstream(request: web.Request) -> web.Response:
        assert request.headers["Accept-Encoding"] == "gzip"
        return web.Response(body=packed, headers={"Content-Encoding": "gzip", "Content-Type": JSON})

    server = await start_upstream(aiohttp_server, upstream)
    _, raw_client = await start_proxy(aiohttp_client, session, base_of(server), auto_decompress=False)
    resp = await raw_client.get("/x", headers={"Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Content-Length"] == str(len(packed))
    assert await resp.read() == packed
    _, client = await start_proxy(aiohttp_client, session, base_of(server))
    assert await (await client.get("/x", headers={"Accept-Encoding": "gzip"})).read() == plain


JSON = "application/json"


async def test_large_bodies_stream_both_ways(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    async def upstream(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        resp = web.StreamResponse()  # chunked: no Content-Length
        await resp.prepare(request)
        for i in range(0, len(data), 100_000):
            await resp.write(data[i : i + 100_000])
        await resp.write_eof()
        return resp

    server = await start_upstream(aiohttp_server, upstream)
    proxy, client = await start_proxy(aiohttp_client, session, base_of(server))
    body = bytes(range(256)) * 8192  # 2 MiB
    resp = await client.post("/echo", data=io.BytesIO(body))  # raw bytes > 1 MiB make aiohttp warn
    assert resp.status == 200 and "Content-Length" not in resp.headers
    assert await resp.read() == body
    assert proxy.results[0].bytes_out == len(body)


async def test_upstream_error_status_and_redirect_pass_through(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    async def upstream(request: web.Request) -> web.Response:
        if request.path == "/moved":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        return web.json_response({"error": "nope"}, status=404)

    server = await start_upstream(aiohttp_server, upstream)
    _, client = await start_proxy(aiohttp_client, session, base_of(server))
    resp = await client.get("/missing")
    assert resp.status == 404 and await resp.json() == {"error": "nope"}
    resp = await client.get("/moved", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/elsewhere"


# --- streaming -------------------------------------------------------------------------------


async def test_sse_chunks_arrive_incrementally(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    client_has_chunk_1 = asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        # Chunk 2 is only sent once the client has chunk 1: a buffering proxy deadlocks here.
        await client_has_chunk_1.wait()
        await resp.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    server = await start_upstream(aiohttp_server, upstream)
    proxy, client = await start_proxy(aiohttp_client, session, base_of(server))
    async with asyncio.timeout(STEP):
        resp = await client.post("/v1/chat/completions", json={"model": "m", "stream": True})
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert await resp.content.readuntil(b"\n\n") == b'data: {"n": 1}\n\n'
    client_has_chunk_1.set()
    async with asyncio.timeout(STEP):
        assert await resp.read() == b'data: {"n": 2}\n\ndata: [DONE]\n\n'
    [result] = proxy.results
    assert result.complete and result.bytes_out == 46


async def test_appends_to_a_prepared_response(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    seen: list[str] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Accept-Encoding", ""))
        resp = web.StreamResponse(
            status=202, headers={"Content-Type": "text/event-stream", "X-Upstream": "1"}
        )
        await resp.prepare(request)
        await resp.write(b"data: token\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    server = await start_upstream(aiohttp_server, upstream)
    proxy, client = await start_proxy(aiohttp_client, session, base_of(server))
    proxy.preamble = b"data: loading\n\n"
    resp = await client.post("/v1/chat/completions", json={"stream": True})
    assert resp.status == 200 and "X-Upstream" not in resp.headers
    assert await resp.read() == b"data: loading\n\ndata: token\n\ndata: [DONE]\n\n"
    assert seen == ["identity"]  # the caller's headers carry no Content-Encoding
    [result] = proxy.results
    assert (result.status, result.bytes_out, result.complete) == (202, 27, True)


# --- upstream failures -----------------------------------------------------------------------


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_connection_refused_is_upstream_error(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    _, client = await start_proxy(aiohttp_client, session, f"http://127.0.0.1:{unused_port()}")
    resp = await client.post("/v1/chat/completions", json={"model": "m"})
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "bad_gateway" and "refused the connection" in error["message"]


async def test_send_raises_upstream_refused(session: aiohttp.ClientSession) -> None:
    url = URL(f"http://127.0.0.1:{unused_port()}/x")
    with pytest.raises(UpstreamRefused, match="refused"):
        await send(pool_of(session), "GET", url, b"", b"")


async def test_upstream_that_closes_without_answering_is_upstream_error(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    async with RawUpstream(lambda conn, index: (b"", True)) as upstream:
        _, client = await start_proxy(aiohttp_client, session, upstream.base)
        resp = await client.post("/x", data=b"{}")
        assert resp.status == 502
        assert "not sent again" in (await resp.json())["error"]["message"]
        assert upstream.connections == 1  # it read the request: never replayed


async def test_upstream_dying_before_the_body_is_upstream_error(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    head_only = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    async with RawUpstream(lambda conn, index: (head_only, True)) as upstream:
        _, client = await start_proxy(aiohttp_client, session, upstream.base)
        resp = await client.post("/x", data=b"{}")
        assert resp.status == 502
        assert "before sending a body" in (await resp.json())["error"]["message"]


async def test_upstream_dying_mid_stream_ends_the_stream_with_an_error_event(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    async with RawUpstream(lambda conn, index: (sse(b"data: 1\n\n", end=False), True)) as upstream:
        proxy, client = await start_proxy(aiohttp_client, session, upstream.base)
        resp = await client.post("/x", data=b"{}")
        assert resp.status == 200
        assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
        # A final error event (clients raise it) and a proper end, never a silent [DONE].
        rest = await resp.read()
        assert rest.startswith(b'data: {"error": {') and rest.endswith(b"\n\n")
        assert json.loads(rest[len(b"data: ") :])["error"]["code"] == "bad_gateway"
        await asyncio.wait_for(proxy.done.wait(), STEP)
        [result] = proxy.results
        assert (result.status, result.bytes_out, result.complete) == (200, 9, False)


async def test_sized_body_cut_short_truncates_the_client(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    half = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b"x" * 50
    async with RawUpstream(lambda conn, index: (half, True)) as upstream:
        proxy, client = await start_proxy(aiohttp_client, session, upstream.base)
        resp = await client.post("/x", data=b"{}")
        assert resp.status == 200 and resp.headers["Content-Length"] == "100"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        await asyncio.wait_for(proxy.done.wait(), STEP)
        assert (proxy.results[0].bytes_out, proxy.results[0].complete) == (50, False)


async def test_empty_bodies(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    async def upstream(request: web.Request) -> web.Response:
        if request.path == "/none":
            return web.Response(status=204, headers={"X-Kind": "none"})
        if request.path == "/same":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=b"0123456789", content_type="text/plain")

    server = await start_upstream(aiohttp_server, upstream)
    proxy, client = await start_proxy(aiohttp_client, session, base_of(server))
    resp = await client.get("/none")
    assert (resp.status, resp.headers["X-Kind"], await resp.read()) == (204, "none", b"")
    resp = await client.get("/same")
    assert (resp.status, resp.headers["ETag"], await resp.read()) == (304, '"v1"', b"")
    resp = await client.head("/text")
    assert (resp.status, resp.headers["Content-Length"], await resp.read()) == (200, "10", b"")
    resp = await client.get("/text")
    assert await resp.read() == b"0123456789"
    assert [r.complete for r in proxy.results] == [True] * 4


# --- connection reuse ------------------------------------------------------------------------


async def test_upstream_closing_after_sse_does_not_break_the_next_request(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    # llama-server: "Connection: keep-alive", then it closes the socket after every stream.
    async with RawUpstream(lambda conn, index: (sse(b"data: a\n\n", b"data: [DONE]\n\n"), True)) as upstream:
        _, client = await start_proxy(aiohttp_client, session, upstream.base)
        for _ in range(3):
            resp = await client.post("/v1/chat/completions", json={"stream": True})
            assert await resp.read() == b"data: a\n\ndata: [DONE]\n\n"
        assert upstream.connections == 3
        assert len(upstream.requests) == 3


async def test_sse_connection_is_not_pooled_even_if_upstream_keeps_it(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    async with RawUpstream(lambda conn, index: (sse(b"data: a\n\n"), False)) as upstream:
        _, client = await start_proxy(aiohttp_client, session, upstream.base)
        for _ in range(2):
            assert await (await client.post("/x", data=b"{}")).read() == b"data: a\n\n"
        assert [conn for conn, _, _ in upstream.requests] == [0, 1]


async def test_sized_responses_reuse_the_connection(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    async with RawUpstream(lambda conn, index: (sized(b'{"ok":1}'), False)) as upstream:
        _, client = await start_proxy(aiohttp_client, session, upstream.base)
        for _ in range(3):
            assert await (await client.post("/x", data=b"{}")).read() == b'{"ok":1}'
        assert [conn for conn, _, _ in upstream.requests] == [0, 0, 0]


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024])
async def test_a_request_a_pooled_connection_drops_is_not_replayed(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession, size: int
) -> None:
    def script(conn: int, index: int) -> tuple[bytes, bool]:
        if conn == 0 and index == 1:
            return b"", True  # the pooled connection died under the second request, read
        return sized(b'{"n":%d}' % index), False

    async with RawUpstream(script) as upstream:
        _, client = await start_proxy(aiohttp_client, session, upstream.base)
        assert await (await client.post("/x", data=b"{}")).read() == b'{"n":0}'
        again = b"a" * size
        resp = await client.post("/x", data=io.BytesIO(again))
        assert resp.status == 502  # the upstream may have acted on it: not sent again
        assert "not sent again" in (await resp.json())["error"]["message"]
        resp = await client.post("/x", data=b"{}")
        assert resp.status == 200 and await resp.read() == b'{"n":0}'  # a fresh connection
        assert [(conn, body) for conn, _, body in upstream.requests] == [(0, b"{}"), (0, again), (1, b"{}")]


# --- client disconnects ----------------------------------------------------------------------


async def test_client_disconnect_cancels_the_upstream(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    upstream_gone = asyncio.Event()
    never = asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        try:
            await never.wait()  # a long generation
        except asyncio.CancelledError:  # the proxy closed our connection (handler_cancellation)
            upstream_gone.set()
            raise
        return resp

    server = await start_upstream(aiohttp_server, upstream)
    proxy, client = await start_proxy(aiohttp_client, session, base_of(server))
    resp = await client.post("/v1/chat/completions", json={"stream": True})
    async with asyncio.timeout(STEP):
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
    resp.close()  # the client goes away mid-stream
    async with asyncio.timeout(STEP):
        await proxy.handler_cancelled.wait()
        await upstream_gone.wait()


async def test_client_disconnect_without_handler_cancellation(session: aiohttp.ClientSession) -> None:
    """With handler_cancellation off, the next write fails instead; forward() returns."""
    upstream_gone = asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:  # keeps generating; backpressure paces it
                await resp.write(b"data: " + b"x" * 1000 + b"\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            upstream_gone.set()
            raise

    upstream_runner = web.AppRunner(_single_route_app(upstream), handler_cancellation=True)
    proxy = Proxy(session, "")
    proxy_runner = web.AppRunner(proxy.app(), handler_cancellation=False)
    await upstream_runner.setup()
    await proxy_runner.setup()
    try:
        upstream_site = web.TCPSite(upstream_runner, "127.0.0.1", 0)
        proxy_site = web.TCPSite(proxy_runner, "127.0.0.1", 0)
        await upstream_site.start()
        await proxy_site.start()
        proxy.base = _site_url(upstream_site)
        async with aiohttp.ClientSession() as client:
            resp = await client.post(_site_url(proxy_site) + "/stream", data=b"{}")
            async with asyncio.timeout(STEP):
                await resp.content.readuntil(b"\n\n")
            resp.close()
            async with asyncio.timeout(STEP):
                await proxy.done.wait()
                await upstream_gone.wait()
        [result] = proxy.results
        assert not result.complete and result.bytes_out > 0
        assert not proxy.handler_cancelled.is_set()
    finally:
        await proxy_runner.cleanup()
        await upstream_runner.cleanup()


def _single_route_app(handler: Callable[..., object]) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", handler)  # type: ignore[arg-type]
    return app


def _site_url(site: web.TCPSite) -> str:
    server = site._server
    # Not an isinstance() check: uvloop's servers do not subclass asyncio.Server.
    assert server is not None
    host, port = cast(asyncio.Server, server).sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"


async def test_content_length_beside_chunking_is_not_forwarded(
    aiohttp_client: AiohttpClient, session: aiohttp.ClientSession
) -> None:
    # RFC 9112 §6.3: the chunking wins. Copying the Content-Length over a de-chunked body (as
    # aiohttp's path did) gives the client two framings to choose from.
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    async with RawUpstream(lambda conn, index: (raw, True)) as upstream:
        _, client = await start_proxy(aiohttp_client, session, upstream.base)
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(STEP):
            answer = await reader.read()
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length" not in head.lower()
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nhello\r\n0\r\n\r\n"
