"""swapper as a drop-in for one llama-server: what a client written for llama-server sends gets the
answer llama-server would give (model names it ignores, what it would queue, its routes).

Real processes: swapper in-process (through its front door), fake upstreams as children. The
comparison with a real llama-server is ``test_compare_llama.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.config.load import parse_config
from swapper.config.schema import ConfigError
from tests.ops_helpers import ops_config, runloop

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


Client = TestClient[Any, Any]
JSON_TYPE = {"Content-Type": "application/json"}


async def echo(client: Client, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POSTs ``payload`` to a route the fake upstream echoes; its status and JSON answer."""
    resp = await client.post(path, data=json.dumps(payload).encode(), headers=JSON_TYPE)
    body: dict[str, Any] = await resp.json()
    return resp.status, body


# ---- model names llama-server ignores ----


@pytest.mark.parametrize("name", ["gpt-3.5-turbo", "test", "text-embedding-3-small", ""])
async def test_a_one_model_config_serves_any_model_name(aiohttp_client: ClientFactory, name: str) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    resp = await client.post("/v1/chat/completions", json={"model": name, **CHAT})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["model"] == "m"  # the fake names itself: the request reached m


async def test_the_upstream_receives_the_body_unchanged(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    payload = {"model": "gpt-4o", "content": "hello"}
    status, echoed = await echo(client, "/tokenize", payload)
    assert status == 200 and echoed["model_name"] == "m"
    assert json.loads(base64.b64decode(echoed["body_b64"])) == payload


async def test_unknown_names_are_404s_listing_the_ids(aiohttp_client: ClientFactory) -> None:
    config = ops_config({"b": "", "a": "", "hidden": ""}, hidden="unlisted: true")
    client = await aiohttp_client(make_app(config))
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-3.5-turbo", **CHAT})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "model_not_found"
    assert error["message"] == "model 'gpt-3.5-turbo' not found; models: a, b"


async def test_route_unknown_models_sends_them_to_the_default(aiohttp_client: ClientFactory) -> None:
    config = ops_config({"a": "", "b": ""}, "defaultModel: b\nrouteUnknownModels: true")
    client = await aiohttp_client(make_app(config))
    status, echoed = await echo(client, "/tokenize", {"model": "gpt-4o", "content": "x"})
    assert status == 200 and echoed["model_name"] == "b"
    status, echoed = await echo(client, "/tokenize", {"model": "a", "content": "x"})
    assert status == 200 and echoed["model_name"] == "a"  # known names still choose
    resp = await client.get("/v1/models")
    assert [m["id"] for m in (await resp.json())["data"]] == ["a", "b"]  # the real ids


def test_route_unknown_models_needs_a_default_model() -> None:
    text = "routeUnknownModels: true\nmodels:\n  m:\n    cmd: x ${PORT}\n  n:\n    cmd: y ${PORT}\n"
    with pytest.raises(ConfigError, match="routeUnknownModels: needs defaultModel"):
        parse_config(text)


# ---- what llama-server would queue ----


async def held(client: Client, count: int) -> list[asyncio.Future[int]]:
    """``count`` chat requests, each held 2 s by the upstream; waits until all are admitted (in
    flight or queued at swapper) or some were answered (a refusal comes at once)."""

    async def one() -> int:
        resp = await client.post(
            "/v1/chat/completions", json={"model": "m", **CHAT}, headers={"X-Fake-Delay": "2"}
        )
        await resp.read()
        return resp.status

    calls = [asyncio.ensure_future(one()) for _ in range(count)]
    deadline = time.monotonic() + 20
    while True:
        status = runloop(client).snapshot()["m"].status
        answered = sum(call.done() for call in calls)
        if status.in_flight + status.queued + answered >= count:
            return calls
        assert time.monotonic() < deadline, (status, answered)
        await asyncio.sleep(0.01)


async def test_without_concurrency_limit_the_child_queues(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    calls = await held(client, 24)
    deadline = time.monotonic() + 20
    while runloop(client).snapshot()["m"].status.in_flight < 24:  # all at the child at once
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    statuses = await asyncio.gather(*calls)
    assert statuses == [200] * 24  # llama-swap's default refuses the 11th


async def test_an_explicit_concurrency_limit_refuses_the_rest(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, m="concurrencyLimit: 10")))
    calls = await held(client, 14)
    statuses = await asyncio.gather(*calls)
    assert sorted(statuses) == [200] * 10 + [429] * 4


# ---- llama-server's routes that take a model ----


@pytest.mark.parametrize(
    ("method", "target", "forwarded"),
    [
        ("POST", "/slots/0?action=save", "/slots/0?action=save"),
        ("POST", "/slots/1?action=erase&model=m", "/slots/1?action=erase&model=m"),
        ("GET", "/slots?model=m", "/slots?model=m"),
        ("GET", "/lora-adapters", "/lora-adapters"),
        ("POST", "/lora-adapters", "/lora-adapters"),
        ("POST", "/props", "/props"),
        ("POST", "/apply-template", "/apply-template"),
        ("POST", "/detokenize", "/detokenize"),
        ("POST", "/infill", "/infill"),
        ("POST", "/responses", "/responses"),
        ("POST", "/v1/chat/completions/input_tokens", "/v1/chat/completions/input_tokens"),
    ],
)
async def test_llama_server_routes_reach_the_model(
    aiohttp_client: ClientFactory, method: str, target: str, forwarded: str
) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    body = b'{"filename": "s.bin"}' if method == "POST" else None
    resp = await client.request(method, target, data=body, headers=JSON_TYPE if body else None)
    assert resp.status == 200, await resp.text()
    echoed = await resp.json()
    assert echoed["method"] == method and echoed["model_name"] == "m"
    assert echoed["raw_path"] == forwarded
    if body is not None:
        assert base64.b64decode(echoed["body_b64"]) == body


async def test_a_slot_action_takes_its_model_from_the_query(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"a": "", "b": ""}, "defaultModel: a")))
    resp = await client.post("/slots/0?action=save&model=b", json={"filename": "s.bin"})
    assert (await resp.json())["model_name"] == "b"
    resp = await client.post("/slots/0?action=save", json={"filename": "s.bin"})
    assert (await resp.json())["model_name"] == "a"  # defaultModel
    resp = await client.post("/slots/0?action=save&model=c", json={"filename": "s.bin"})
    assert resp.status == 404 and "models: a, b" in (await resp.json())["error"]["message"]


async def test_v1_health_answers_like_health(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, "apiKeys: [k]")))
    resp = await client.get("/v1/health")
    assert resp.status == 200 and await resp.text() == "OK"
