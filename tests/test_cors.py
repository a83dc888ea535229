"""CORS as llama-server does it: OPTIONS on any path → 200, the Origin echoed, credentials and
the requested headers allowed; ``corsOrigins`` narrows or widens the origin."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.config.load import parse_config
from swapper.config.schema import ConfigError
from swapper.http import cors
from tests.ops_helpers import ops_config, runloop

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/running",
        "/upstream/m/v1/x",
        "/upstream/m",
        "/nope/x",
    ],
)
async def test_preflight_on_any_path(aiohttp_client: ClientFactory, path: str) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    resp = await client.options(
        path,
        headers={
            "Origin": "http://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization, x-stainless-os",
        },
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    assert resp.headers["Access-Control-Allow-Headers"] == "content-type, authorization, x-stainless-os"
    assert resp.headers["Access-Control-Max-Age"] == "86400"
    assert await resp.read() == b""
    # A preflight never loads a model, even on a passthrough path.
    assert runloop(client).snapshot()["m"].pid is None


async def test_preflight_without_requested_headers_gets_the_default(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    resp = await client.options("/v1/chat/completions")
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Headers"] == "*"
    assert "Access-Control-Allow-Origin" not in resp.headers  # no Origin, nothing to echo


@pytest.mark.parametrize(
    ("requested", "allowed"),
    [
        (None, cors.ANY_HEADER),
        ("", cors.ANY_HEADER),
        ("Content-Type", "Content-Type"),
        (" a ,b,, c ", "a, b, c"),
        ("good, bad header, x<y>, ok-1", "good, ok-1"),
        ("bad header", cors.ANY_HEADER),
    ],
)
def test_allowed_headers_are_sanitized(requested: str | None, allowed: str) -> None:
    assert cors.allowed_headers(requested) == allowed


ORIGIN = {"Origin": "http://ui.example"}


async def test_swappers_own_answers_carry_the_origin(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": "", "n": ""}, m="concurrencyLimit: 1")))
    for method, path in (
        ("GET", "/running"),
        ("GET", "/v1/models"),
        ("GET", "/nope"),
        ("POST", "/v1/models"),
    ):
        resp = await client.request(method, path, headers=ORIGIN)
        assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example", path
        assert resp.headers["Vary"] == "Origin"
    # The front door's error answers too: an unknown model (handed to aiohttp), a refusal.
    resp = await client.post("/v1/chat/completions", json={"model": "x", "messages": []}, headers=ORIGIN)
    assert resp.status == 404 and resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    slow = {"X-Fake-Delay": "0.5", "Content-Type": "application/json"}
    body = b'{"model": "m", "messages": []}'
    first = asyncio.ensure_future(client.post("/v1/chat/completions", data=body, headers=slow))
    await wait_for_in_flight(client, "m")
    resp = await client.post("/v1/chat/completions", data=body, headers={**ORIGIN, **slow})
    assert resp.status == 429 and resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    assert (await first).status == 200
    # Without an Origin, nothing is added.
    resp = await client.get("/running")
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_relayed_answers_keep_the_models_own_headers(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    for path in ("/tokenize", "/upstream/m/x"):  # the front door's relay, and aiohttp's
        resp = await client.post(path, json={"model": "m"}, headers=ORIGIN)
        assert resp.status == 200 and (await resp.json())["model_name"] == "m"
        assert "Access-Control-Allow-Origin" not in resp.headers, path  # the fake sends none


async def wait_for_in_flight(client: TestClient[Any, Any], model: str) -> None:
    deadline = time.monotonic() + 10
    while runloop(client).snapshot()[model].status.in_flight == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("setting", "origin", "allowed", "credentials"),
    [
        ('"*"', "http://ui.example", "*", "false"),
        ('["http://ui.example", "http://b.example/"]', "http://ui.example", "http://ui.example", "true"),
        ('["http://b.example"]', "http://ui.example", None, "true"),
    ],
)
async def test_cors_origins_sets_the_allowed_origin(
    aiohttp_client: ClientFactory, setting: str, origin: str, allowed: str | None, credentials: str
) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, f"corsOrigins: {setting}")))
    for resp in (
        await client.options("/v1/chat/completions", headers={"Origin": origin}),
        await client.get("/v1/models", headers={"Origin": origin}),
        await client.get("/health", headers={"Origin": origin}),
    ):
        assert resp.status == 200
        assert resp.headers.get("Access-Control-Allow-Origin") == allowed
    assert resp.headers.get("Access-Control-Allow-Credentials") is None  # only on a preflight
    preflight = await client.options("/v1/models", headers={"Origin": origin})
    assert preflight.headers["Access-Control-Allow-Credentials"] == credentials


@pytest.mark.parametrize("bad", ["[]", "[1]", '["*", "http://a"]', "{a: 1}", '""'])
def test_bad_cors_origins_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="corsOrigins: "):
        parse_config(f"corsOrigins: {bad}\nmodels:\n  m:\n    cmd: x ${{PORT}}\n")
