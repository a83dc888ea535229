"""The front door (swapper/web/front.py): what it serves itself, what it hands to aiohttp, and that a
client cannot tell the two apart. Real processes: swapper in-process behind ``FrontSite`` (see
conftest's ``aiohttp_client``), the fake upstream as a child, raw sockets as clients so that
connection reuse, pipelining and framing are under the test's control."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.core.states import State
from swapper.observe.events import EVENTS
from swapper.web.front import Front, FrontConn
from tests.frontserver import FrontTestServer
from tests.ops_helpers import ops_config, runloop, wait_until
from tests.rawhttp import Conn, chat, read_response

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def front_of(client: TestClient[Any, Any]) -> Front:
    server = client.server
    assert isinstance(server, FrontTestServer)
    return server.front_site.front


async def loaded(
    aiohttp_client: ClientFactory, extra: str = "", flags: str = "", per: str = "", second: bool = False
) -> TestClient[Any, Any]:
    """A client for one fake model ``m`` (``per``: its extra YAML lines), already loaded; with
    ``second``, a model ``other`` is configured too (never loaded), so that unknown names are 404s."""
    models = {"m": flags, "other": ""} if second else {"m": flags}
    client = await aiohttp_client(make_app(ops_config(models, extra, m=per)))
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert resp.status == 200, await resp.text()
    assert runloop(client).state("m") is State.READY
    return client


async def test_a_ready_model_is_served_by_the_front_door(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    served, handed = front.served, front.handed
    conn = await Conn.open(client)
    status, headers, body = await conn.ask(chat())
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    assert "m" in json.loads(body)["model"]
    assert "server" not in headers or "aiohttp" not in headers["server"]  # aiohttp never saw it
    assert (front.served, front.handed) == (served + 1, handed)
    conn.close()


async def test_streams_are_rechunked_and_the_connection_is_kept(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    served = front.served
    conn = await Conn.open(client)
    for _ in range(2):
        status, headers, body = await conn.ask(chat(stream=True, max_tokens=5))
        assert status == 200
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["x-accel-buffering"] == "no"
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert len(events) >= 6  # five tokens (and maybe a final chunk), then [DONE]
    assert front.served == served + 2
    conn.close()


async def test_pipelined_and_byte_by_byte_requests(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    served = front.served
    conn = await Conn.open(client)
    await conn.send(chat(max_tokens=1) + chat(stream=True, max_tokens=2))
    first = await read_response(conn.reader)
    second = await read_response(conn.reader)
    assert first[0] == second[0] == 200
    assert "chat.completion" in first[2].decode() and second[2].endswith(b"data: [DONE]\n\n")
    for byte in chat(max_tokens=1):
        await conn.send(bytes([byte]))
    assert (await read_response(conn.reader))[0] == 200
    assert front.served == served + 3
    conn.close()


async def test_a_handed_off_connection_goes_on_serving(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    handed = front.handed
    conn = await Conn.open(client)
    assert (await conn.ask(chat()))[0] == 200
    status, _, body = await conn.ask(b"GET /running HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body)["running"][0]["model"] == "m"
    assert front.handed == handed + 1
    status, _, body = await conn.ask(chat(stream=True, max_tokens=2))  # now aiohttp's
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    conn.close()


async def test_model_list_and_health_are_answered_and_the_connection_stays(
    aiohttp_client: ClientFactory,
) -> None:
    # A client (an SDK's pool, a chat UI's backend) that lists models on a connection before its
    # inference requests keeps that connection on the front door.
    client = await loaded(aiohttp_client, per="aliases: [m-alias]")
    front = front_of(client)
    handed, served, answered = front.handed, front.served, front.answered
    legacy = await Conn.open(client)  # HTTP/1.0 goes to aiohttp: its handler's answer
    await legacy.send(b"GET /v1/models HTTP/1.0\r\nHost: x\r\nOrigin: http://ui.example\r\n\r\n")
    expected = json.loads((await legacy.reader.read()).partition(b"\r\n\r\n")[2])
    legacy.close()
    conn = await Conn.open(client)
    status, headers, body = await conn.ask(
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nOrigin: http://ui.example\r\n\r\n"
    )
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    assert headers["access-control-allow-origin"] == "http://ui.example"
    listed = json.loads(body)
    for entry in (*listed["data"], *expected["data"]):
        entry.pop("created")  # a timestamp
    assert listed == expected  # what aiohttp's handler answers
    assert [m["id"] for m in listed["data"]] == ["m"] and listed["data"][0]["status"]["value"] == "loaded"
    status, headers, body = await conn.ask(b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and "access-control-allow-origin" not in headers  # no Origin, no echo
    assert [m["id"] for m in json.loads(body)["data"]] == ["m"]
    status, _, body = await conn.ask(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (200, b"OK")
    assert (await conn.ask(chat()))[0] == 200
    assert (front.handed, front.served, front.answered) == (handed + 1, served + 1, answered + 3)
    # Pipelined behind each other, then a Connection: close.
    await conn.send(
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        + chat(max_tokens=1)
        + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert (await read_response(conn.reader))[0] == 200
    assert (await read_response(conn.reader))[0] == 200
    status, headers, _ = await read_response(conn.reader)
    assert status == 200 and headers["connection"] == "close"
    assert await conn.reader.read() == b""  # closed after it
    conn.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            b"200",
            id="a GET with a body",
        ),
        pytest.param(b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n", b"200", id="HTTP/1.0"),
    ],
)
async def test_other_gets_of_the_model_list_go_to_aiohttp(
    aiohttp_client: ClientFactory, request_bytes: bytes, status: bytes
) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    front = front_of(client)
    answered = front.answered
    conn = await Conn.open(client)
    await conn.send(request_bytes)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    assert head.split(b" ")[1] == status  # aiohttp's answer
    assert (front.handed, front.answered) == (1, answered)
    conn.close()


CHUNKED_BODY = json.dumps({"model": "m", "messages": []}).encode()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(chat("nope"), 404, "model_not_found", id="unknown model"),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5\r\n\r\n{nope",
            400,
            "invalid_request_error",
            id="bad JSON",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(CHUNKED_BODY), CHUNKED_BODY),
            200,
            None,
            id="chunked upload",
        ),
        pytest.param(chat().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 200, None, id="HTTP/1.0"),
        pytest.param(chat(padding="x" * 5000), 413, "request_too_large", id="body over maxBodyBytes"),
    ],
)
async def test_what_the_front_door_refuses_aiohttp_answers(
    aiohttp_client: ClientFactory, request_bytes: bytes, status: int, code: str | None
) -> None:
    client = await loaded(aiohttp_client, "maxBodyBytes: 4096", second=True)
    front = front_of(client)
    handed = front.handed
    conn = await Conn.open(client)
    got, headers, body = await conn.ask(request_bytes)
    assert got == status, body
    if code is not None:
        error = json.loads(body)["error"]
        assert error["code"] == code or error["type"] == code
    assert front.handed == handed + 1
    conn.close()
    assert runloop(client).snapshot()["m"].status.in_flight == 0


async def test_a_cold_model_loads_while_the_front_door_waits(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": "--load-delay 0.3"})))
    front = front_of(client)
    conn = await Conn.open(client)
    status, _, body = await conn.ask(chat())
    assert status == 200 and "chat.completion" in body.decode()
    assert (front.served, front.handed) == (1, 0)
    assert (await conn.ask(chat()))[0] == 200  # the same connection, now without a wait
    assert (front.served, front.handed) == (2, 0)
    conn.close()


async def test_loading_state_streams_go_to_aiohttp(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": "--load-delay 0.3"}, "sendLoadingState: true")))
    front = front_of(client)
    conn = await Conn.open(client)
    status, _, body = await conn.ask(chat(stream=True, max_tokens=2))
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert b"reasoning_content" in body  # the loading state, streamed by http.loading.LoadingStream
    assert (front.served, front.handed) == (0, 1)
    conn.close()


async def test_a_stream_handed_to_aiohttp_leaves_no_deadline_behind(aiohttp_client: ClientFactory) -> None:
    """A request the front door hands to aiohttp after looking at it holds nothing there: no
    lease, and no ``timeouts.request`` timer that would fire later on a request it never served."""
    config = ops_config({"m": "--load-delay 0.6"}, "sendLoadingState: true", m="timeouts: {request: 0.3}")
    client = await aiohttp_client(make_app(config))
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    conn = await Conn.open(client)
    # aiohttp's own deadline (armed after the front door's would have been) ends the stream.
    status, _, body = await conn.ask(chat(stream=True, max_tokens=2))
    conn.close()
    assert status == 200 and b"timeouts.request" in body
    assert front_of(client).handed == 1
    assert errors == []


async def test_refusals_while_waiting_are_rendered_by_the_front_door(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client, flags="--tps 20", per="concurrencyLimit: 1", second=True)
    front = front_of(client)
    busy = await Conn.open(client)
    await busy.send(chat(stream=True, max_tokens=200))
    await busy.reader.readuntil(b"data: ")
    conn = await Conn.open(client)
    status, headers, body = await conn.ask(chat())
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "concurrency_limit"
    assert front.handed == 0
    assert (await conn.ask(chat(model="nope")))[0] == 404  # the connection is still usable
    busy.close()
    conn.close()


async def test_expect_100_continue_is_answered_before_the_body(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    served = front.served
    conn = await Conn.open(client)
    request = chat(extra_headers="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    await conn.send(head + b"\r\n\r\n")
    assert await conn.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    await conn.send(body)
    assert (await read_response(conn.reader))[0] == 200
    assert (front.served, front.handed) == (served + 1, 0)
    status, _, _ = await conn.ask(chat(extra_headers="Expect: something-else\r\n"))
    assert status == 417 and front.handed == 1  # aiohttp's answer
    conn.close()


async def test_connection_close_is_honoured(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    conn = await Conn.open(client)
    status, headers, _ = await conn.ask(chat(extra_headers="Connection: close\r\n"))
    assert status == 200 and headers["connection"] == "close"
    assert await conn.reader.read() == b""  # the server closed its side
    conn.close()


async def test_a_client_leaving_mid_stream_frees_its_slot(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client, flags="--tps 20")
    front = front_of(client)
    served = front.served
    conn = await Conn.open(client)
    await conn.send(chat(stream=True, max_tokens=200))  # ten seconds of tokens
    await conn.reader.readuntil(b"data: ")  # streaming has begun
    assert runloop(client).snapshot()["m"].status.in_flight == 1
    conn.close()
    await wait_until(lambda: runloop(client).snapshot()["m"].status.in_flight == 0, within=5, what="release")
    assert front.served == served + 1
    assert not front.conns or all(not c.busy for c in front.conns)


async def test_api_keys_are_checked_on_the_fast_path(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, "apiKeys: [sk-right]")))
    key = "Authorization: Bearer sk-right\r\n"
    conn = await Conn.open(client)
    assert (await conn.ask(chat(extra_headers=key)))[0] == 200  # loads m (slow path)
    front = front_of(client)
    served = front.served
    fresh = await Conn.open(client)
    assert (await fresh.ask(chat(extra_headers=key)))[0] == 200
    assert front.served == served + 1
    wrong = await Conn.open(client)
    status, headers, _ = await wrong.ask(chat(extra_headers="Authorization: Bearer sk-wrong\r\n"))
    assert status == 401 and "www-authenticate" in headers
    assert front.served == served + 1
    # The model list needs a key too; health does not.
    answered = front.answered
    listing = await Conn.open(client)
    assert (await listing.ask(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + key.encode() + b"\r\n"))[0] == 200
    assert (await listing.ask(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    assert front.answered == answered + 2
    status, headers, _ = await listing.ask(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 401 and "www-authenticate" in headers  # aiohttp's middleware answered
    assert front.answered == answered + 2
    for c in (conn, fresh, wrong, listing):
        c.close()


async def test_shutdown_lets_a_fast_stream_finish() -> None:
    server = FrontTestServer(make_app(ops_config({"m": "--tps 20"})))
    await server.start_server()
    closing: asyncio.Future[None] | None = None
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
            async with session.post(url, json={"model": "m", "messages": []}) as resp:
                assert resp.status == 200  # loads m
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(chat(stream=True, max_tokens=10))  # half a second of tokens
        await reader.readuntil(b"data: ")
        assert server.front_site.front.served == 2  # the load, then the stream
        assert server.runner is not None
        closing = asyncio.ensure_future(server.runner.cleanup())
        rest = await reader.read()  # until the server closes the connection
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), rest[-80:]
        writer.close()
    finally:
        if closing is None:
            await server.close()
        else:
            await closing


async def test_a_plain_aiohttp_app_is_not_fronted(aiohttp_client: ClientFactory) -> None:
    app = web.Application()
    client = await aiohttp_client(app)
    assert not isinstance(client.server, FrontTestServer)


async def test_the_upstream_gets_the_request_byte_for_byte(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    served = front.served
    body = json.dumps({"model": "m", "documents": ["x" * 1024] * 2048}).encode()  # 2 MiB
    head = (
        "POST /v1/rerank?a=%2F1&b= HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "X-Trace: caf\xe9\r\nConnection: keep-alive, X-Hop\r\nX-Hop: dropped\r\nKeep-Alive: 5\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    conn = await Conn.open(client)
    status, _, answer = await conn.ask(head + body)
    assert status == 200
    echo = json.loads(answer)  # the fake echoes routes it does not implement
    assert base64.b64decode(echo["body_b64"]) == body
    assert echo["raw_path"] == "/v1/rerank?a=%2F1&b="
    names = [name.lower() for name, _ in echo["header_list"]]
    assert "x-trace" in names and "content-type" in names
    assert not {"connection", "keep-alive", "x-hop"} & set(names)  # hop-by-hop, also by Connection
    assert names.count("host") == 1 and names.count("content-length") == 1
    assert front.served == served + 1
    conn.close()


# ---- the inline path: a ready model's sized answer with no task ----


def in_flight(client: TestClient[Any, Any]) -> int:
    return runloop(client).snapshot()["m"].status.in_flight


async def test_sized_answers_on_a_pooled_connection_are_relayed_inline(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    conn = await Conn.open(client)
    assert (await conn.ask(chat()))[0] == 200  # leaves an upstream connection in the pool
    inline = front.inline
    for _ in range(3):
        status, headers, body = await conn.ask(chat())
        assert status == 200
        assert int(headers["content-length"]) == len(body)
        assert json.loads(body)["choices"][0]["message"]["content"]
    assert front.inline == inline + 3
    # A stream goes out inline but is relayed by a task, and its upstream connection is not
    # pooled (llama-server closes it), so the next request connects anew, in a task too.
    status, _, body = await conn.ask(chat(stream=True))
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert (await conn.ask(chat()))[0] == 200
    assert front.inline == inline + 3
    assert (await conn.ask(chat()))[0] == 200
    assert front.inline == inline + 4
    assert in_flight(client) == 0
    conn.close()


async def test_a_client_leaving_before_an_inline_answer_frees_its_slot_and_the_upstream(
    aiohttp_client: ClientFactory,
) -> None:
    client = await loaded(aiohttp_client)
    front = front_of(client)
    warm = await Conn.open(client)
    assert (await warm.ask(chat()))[0] == 200
    conn = await Conn.open(client)
    await conn.send(chat(extra_headers="X-Fake-Delay: 60\r\n"))
    await wait_until(lambda: in_flight(client) == 1, what="the request in flight")
    assert any(c.busy for c in front.conns)
    child = psutil.Process(runloop(client).snapshot()["m"].pid)

    def upstream_saw_the_close() -> bool:
        return any(c.status == psutil.CONN_CLOSE_WAIT for c in child.net_connections("tcp"))

    conn.close()
    # Released when the client left, not when the upstream answers a minute later; and the
    # upstream's connection is closed, so a real server would stop generating.
    await wait_until(lambda: in_flight(client) == 0, within=10, what="release")
    await wait_until(upstream_saw_the_close, within=10, what="the upstream connection closed")
    assert (await warm.ask(chat()))[0] == 200
    warm.close()


async def test_an_unload_cuts_an_inline_request(aiohttp_client: ClientFactory) -> None:
    client = await loaded(aiohttp_client)
    warm = await Conn.open(client)
    assert (await warm.ask(chat()))[0] == 200
    inline = front_of(client).inline
    await warm.send(chat(extra_headers="X-Fake-Delay: 60\r\n"))
    await wait_until(lambda: in_flight(client) == 1, what="the request in flight")
    resp = await client.post("/api/models/unload")
    assert resp.status == 200
    assert runloop(client).state("m") is State.STOPPED
    answer = await warm.reader.read()  # answered why, then closed
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"code": "model_unloaded"' in answer
    assert front_of(client).inline == inline
    warm.close()


async def test_a_request_a_pooled_connection_drops_is_answered_502_not_replayed(
    aiohttp_client: ClientFactory,
) -> None:
    # The fake drops every request that arrives on a reused connection, unanswered. It was written
    # and read: the child may have acted on it (or died of it), so it is never sent again (Go's
    # Transport and nginx do the same for a POST). The next request goes on a fresh connection.
    client = await loaded(aiohttp_client, flags="--drop-reused")
    front = front_of(client)
    conn = await Conn.open(client)
    inline = front.inline
    status, _, body = await conn.ask(chat())  # inline, on the connection the load's request left
    assert status == 502, body
    assert b"not sent again" in body
    assert front.inline == inline + 1
    status, _, body = await conn.ask(chat())  # no idle connection left: a fresh one
    assert status == 200, body
    assert in_flight(client) == 0
    conn.close()


@pytest.mark.parametrize("stream", [False, True], ids=["no-pooled-connection", "streamed"])
async def test_a_request_cut_before_its_task_runs_is_released(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    # The client leaves (or an unload cuts the request) in the loop turn in which its rest moved
    # to a task: a task cancelled before its first step never runs its coroutine, finally and all.
    client = await loaded(aiohttp_client)
    conn = await Conn.open(client)
    if not stream:
        # A stream's upstream connection is not pooled: the next request has to connect, in a task.
        assert (await conn.ask(chat(stream=True)))[0] == 200
    moved = FrontConn._in_task

    def move_then_cut(self: FrontConn, ex: Any) -> None:
        moved(self, ex)
        ex.cancel()

    monkeypatch.setattr(FrontConn, "_in_task", move_then_cut)
    await conn.send(chat(stream=stream))
    async with asyncio.timeout(5):
        answer = await conn.reader.read()  # cut: answered why, then closed
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"code": "model_unloaded"' in answer
    await wait_until(lambda: in_flight(client) == 0, within=5, what="release")
    assert not client.app[EVENTS].in_flight()  # its track ended too
    await wait_until(lambda: not any(c.busy for c in front_of(client).conns), within=5, what="idle")
    conn.close()
    monkeypatch.undo()
    again = await Conn.open(client)
    assert (await again.ask(chat()))[0] == 200
    again.close()
