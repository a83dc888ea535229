"""Peers: a front swapper forwards requests for another server's models, key injected, streaming
included; a peer that is down is a 502 at once; peers have their own concurrency limit and never
touch the local planner.

Real processes: two in-process swappers (the back one requires an API key and runs the fake
upstream as a child); the front one names it as a peer, beside a peer where nothing listens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.config.load import parse_config
from swapper.web.appkeys import RUNLOOP
from tests import rawhttp
from tests.test_swapping import ClientFactory, chat, fake_config, free_port

BACK_KEY = "sk-back"


async def poll(predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Polls a condition of another server (nothing reports it) until a deadline."""
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def back_swapper(aiohttp_client: ClientFactory) -> TestClient[Any, Any]:
    config = fake_config({"m": ""}, extra=f"apiKeys: [{BACK_KEY}]")
    return await aiohttp_client(make_app(config))


def front_config(
    back: TestClient[Any, Any], *, local: str = "", peer_extra: str = "", key: bool = True
) -> str:
    down = free_port()  # nothing listens there
    return (
        ("models:\n" + local if local else "")
        + "peers:\n"
        + f"  back:\n    proxy: http://127.0.0.1:{back.port}\n    models: [m, other]\n"
        + (f"    apiKey: {BACK_KEY}\n" if key else "")
        + peer_extra
        + f"  down:\n    proxy: http://127.0.0.1:{down}\n    models: [gone]\n    timeouts: {{connect: 2}}\n"
    )


async def front_swapper(aiohttp_client: ClientFactory, text: str) -> TestClient[Any, Any]:
    return await aiohttp_client(make_app(parse_config(text)))


async def test_a_peer_model_is_forwarded_with_the_peers_key(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    front = await front_swapper(aiohttp_client, front_config(back))
    for name in ("back/m", "m"):  # fully qualified, and bare (no local model claims it)
        body = await chat(front, name)
        assert body["model"] == "m"  # the back swapper's child answered
    # What reached the child: the peer's own model id, the key in both headers.
    resp = await front.post(
        "/v1/rerank", json={"model": "back/m", "query": "q"}, headers={"Authorization": "Bearer x"}
    )
    assert resp.status == 200, await resp.text()
    echo = await resp.json()
    assert json.loads(base64.b64decode(echo["body_b64"]))["model"] == "m"
    headers = {k.lower(): v for k, v in echo["headers"].items()}
    assert headers["authorization"] == f"Bearer {BACK_KEY}" and headers["x-api-key"] == BACK_KEY


async def test_hop_by_hop_headers_stop_at_swapper_on_the_way_to_a_peer_and_back(
    aiohttp_client: ClientFactory,
) -> None:
    """The fixed hop-by-hop list and whatever a Connection value names (RFC 9110 §7.6.1) go no
    further than swapper, toward a peer and back from it; end-to-end headers pass."""
    heads: list[bytes] = []
    body = b'{"ok": true}'

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = await rawhttp.read_request(reader)
        assert got is not None
        heads.append(got[0])
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, X-Hop\r\n"
            b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authentication-Info: a\r\nX-End: kept\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        front = await front_swapper(
            aiohttp_client, f"peers:\n  raw:\n    proxy: http://127.0.0.1:{port}\n    models: [m]\n"
        )
        conn = await rawhttp.Conn.open(front)
        hops = "Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\nTE: trailers\r\n"
        hops += "Proxy-Authorization: Basic eA==\r\n"
        status, headers, got = await conn.ask(rawhttp.chat("raw/m", extra_headers=hops + "X-End: kept\r\n"))
        conn.close()
    finally:
        server.close()
        await server.wait_closed()
    assert (status, got) == (200, body)
    sent = {line.split(b":")[0].lower() for line in heads[0].split(b"\r\n")[1:] if line}
    assert b"x-end" in sent and not sent & {b"x-drop", b"te", b"proxy-authorization"}, sent
    assert headers["x-end"] == "kept"
    assert not headers.keys() & {"x-hop", "keep-alive", "proxy-authentication-info"}, headers


async def test_a_peer_streams(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    front = await front_swapper(aiohttp_client, front_config(back))
    resp = await front.post(
        "/v1/chat/completions", json={"model": "back/m", "stream": True, "max_tokens": 3, "messages": []}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    events = [line for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    tokens = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(tokens) == "m#0 m#1 m#2 "


async def test_without_its_key_the_peers_401_comes_back(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    front = await front_swapper(aiohttp_client, front_config(back, key=False))
    resp = await front.post("/v1/chat/completions", json={"model": "back/m"})
    assert resp.status == 401


async def test_a_peer_that_is_down_is_a_502_within_its_connect_timeout(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    front = await front_swapper(aiohttp_client, front_config(back))
    async with asyncio.timeout(2 + 5):  # timeouts.connect: 2; a refusal is at once
        resp = await front.post("/v1/chat/completions", json={"model": "down/gone"})
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "bad_gateway" and "peer proxy error: peer 'down'" in error["message"]
    assert (await chat(front, "back/m"))["model"] == "m"  # the other peer is unaffected


async def test_a_peer_that_sends_no_head_in_time_is_a_502(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    text = front_config(back, peer_extra="    timeouts: {responseHeader: 1}\n")
    front = await front_swapper(aiohttp_client, text)
    resp = await front.post("/v1/chat/completions", json={"model": "back/m"}, headers={"X-Fake-Delay": "5"})
    assert resp.status == 502
    assert "timeouts.responseHeader" in (await resp.json())["error"]["message"]


async def test_peer_models_are_listed_with_their_peer(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    front = await front_swapper(aiohttp_client, front_config(back))
    data = (await (await front.get("/v1/models")).json())["data"]
    records = {r["id"]: r for r in data}
    assert sorted(records) == ["back/m", "back/other", "down/gone"]
    record = records["back/m"]
    assert record["name"] == "back: m" and record["status"] == {"value": "unloaded"}
    assert record["meta"]["llamaswap"] == {"type": "peer", "peerID": "back", "modelID": "m"}


async def test_peers_have_their_own_limit_and_leave_local_models_alone(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    local = fake_config({"local": ""})
    model = local.models["local"]
    local_yaml = f"  local:\n    cmd: {' '.join(model.cmd)}\n    proxy: {model.proxy}\n"
    front = await front_swapper(
        aiohttp_client, front_config(back, local=local_yaml, peer_extra="    concurrencyLimit: 1\n")
    )
    await chat(front, "local")
    pid = front.app[RUNLOOP].snapshot()["local"].pid
    slow = asyncio.ensure_future(
        front.post("/v1/chat/completions", json={"model": "back/m"}, headers={"X-Fake-Delay": "2"})
    )
    back_loop = back.app[RUNLOOP]

    async def in_flight_at_the_back() -> bool:
        snap = back_loop.snapshot().get("m")
        return snap is not None and snap.status.in_flight > 0

    await poll(in_flight_at_the_back, 20, "the slow request to reach the back swapper")
    busy = await front.post("/v1/chat/completions", json={"model": "back/m"})
    assert busy.status == 429 and (await busy.json())["error"]["code"] == "concurrency_limit"
    assert (await chat(front, "local"))["model"] == "local"  # no swap, no wait behind the peer
    assert (await slow).status == 200
    snapshot = front.app[RUNLOOP].snapshot()
    assert set(snapshot) == {"local"} and snapshot["local"].pid == pid


async def test_a_peers_only_config_serves(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    front = await front_swapper(aiohttp_client, front_config(back))
    assert front.app[RUNLOOP].config.models == {}
    assert (await chat(front, "back/m"))["model"] == "m"
    missing = await front.post("/v1/chat/completions", json={"model": "nothing"})
    assert missing.status == 404


async def test_a_query_model_is_renamed_for_the_peer(aiohttp_client: ClientFactory) -> None:
    back = await back_swapper(aiohttp_client)
    front = await front_swapper(aiohttp_client, front_config(back))
    # The back swapper knows "m", not "back/m": a 200 means the query was renamed on the way.
    resp = await front.get("/props", params={"model": "back/m", "x": "1"})
    assert resp.status == 200, await resp.text()


async def test_one_local_model_takes_unknown_names_but_not_a_peers(aiohttp_client: ClientFactory) -> None:
    """With one local model, a name llama-server would ignore reaches it; a peer's model still
    goes to the peer (the fallback is for names nobody claims)."""
    back = await back_swapper(aiohttp_client)
    local = fake_config({"local": ""})
    model = local.models["local"]
    local_yaml = f"  local:\n    cmd: {' '.join(model.cmd)}\n    proxy: {model.proxy}\n"
    front = await front_swapper(aiohttp_client, front_config(back, local=local_yaml))
    assert (await chat(front, "m"))["model"] == "m"  # the peer's child
    assert (await chat(front, "back/m"))["model"] == "m"
    assert (await chat(front, "gpt-3.5-turbo"))["model"] == "local"
    assert (await chat(front, "local"))["model"] == "local"
