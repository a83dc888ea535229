"""apiKeys: every route but /health and OPTIONS needs a key, as in llama-swap."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from swapper.app.server import make_app
from swapper.config.schema import Config
from swapper.web import auth, ui
from tests.ops_helpers import ops_config

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

KEY = "sk-test-1"
OTHER_KEY = "sk-test-2"


def keyed_config() -> Config:
    return ops_config({"m": "", "author/model": ""}, f"apiKeys: [{KEY}, {OTHER_KEY}]")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def concrete(path: str) -> str:
    """A request path for a route's canonical path: every {variable} becomes a plain segment."""
    return re.sub(r"\{[^}]*\}", "m", path)


def test_no_keys_installs_no_middleware() -> None:
    app = make_app(ops_config({"m": ""}))
    assert all(getattr(m, "__name__", "") != "require_api_key" for m in app.middlewares)


def test_keys_install_the_middleware() -> None:
    app = make_app(keyed_config())
    assert any(getattr(m, "__name__", "") == "require_api_key" for m in app.middlewares)


async def test_every_route_needs_a_key(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    checked, open_ = [], []
    for route in client.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "OPTIONS" or path in auth.OPEN_PATHS:
            continue
        if path == "/ui" or path.startswith(ui.PREFIX):
            continue  # the UI's files hold no data (test_ui.py: its API needs the key)
        method = "GET" if route.method == "*" else route.method
        resp = await client.request(method, concrete(path), allow_redirects=False)
        checked.append(f"{method} {path}")
        if resp.status != 401 or resp.headers.get("WWW-Authenticate") != 'Basic realm="swapper"':
            open_.append(f"{method} {path} -> {resp.status}")
    assert not open_, open_
    # The inference, admin and passthrough routes are among those checked.
    for must in ("POST /v1/chat/completions", "GET /v1/models", "GET /running", "GET /unload"):
        assert must in checked
    assert any(c.startswith("GET /upstream/") for c in checked)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/running"),
        ("GET", "/unload"),
        ("POST", "/api/models/unload"),
        ("GET", "/upstream/m/"),
        ("GET", "/upstream"),
        ("GET", "/no/such/route"),
    ],
)
async def test_no_key_is_401_with_challenge(aiohttp_client: ClientFactory, method: str, path: str) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    resp = await client.request(method, path, json={"model": "m"}, allow_redirects=False)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="swapper"'
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["type"] == "authentication_error"
    # Nothing was loaded on the way.
    running = await client.get("/running", headers={"x-api-key": KEY})
    assert (await running.json())["running"] == []


async def test_health_and_preflight_need_no_key(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    assert (await client.get("/health")).status == 200
    for path in ("/v1/chat/completions", "/running", "/upstream/m/x", "/anything"):
        resp = await client.options(
            path, headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
        )
        assert resp.status == 200, path
        assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer {KEY}"},
        {"Authorization": f"Bearer {OTHER_KEY}"},
        {"x-api-key": KEY},
        {"X-API-Key": OTHER_KEY},
        {"Authorization": basic("anyone", KEY)},
        {"Authorization": basic("", KEY)},
        # A wrong credential does not spoil a right one sent alongside it.
        {"Authorization": "Bearer wrong", "x-api-key": KEY},
    ],
    ids=[
        "bearer",
        "bearer-lowercase",
        "second-key",
        "x-api-key",
        "x-api-key-case",
        "basic",
        "basic-no-user",
        "mixed",
    ],
)
async def test_each_key_form_is_accepted(aiohttp_client: ClientFactory, headers: dict[str, str]) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    resp = await client.get("/running", headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json()) == {"running": []}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Token {KEY}"},
        {"Authorization": KEY},
        {"x-api-key": "wrong"},
        {"Authorization": basic(KEY, "wrong")},  # the key as user name is not the key
        {"Authorization": "Basic " + base64.b64encode(KEY.encode()).decode()},  # no colon
        {"Authorization": "Basic !!!not-base64!!!"},
        {"Authorization": "Bearer "},
    ],
    ids=[
        "none",
        "wrong",
        "prefix",
        "longer",
        "other-scheme",
        "no-scheme",
        "x-api-key-wrong",
        "basic-user",
        "basic-no-colon",
        "basic-garbage",
        "bearer-empty",
    ],
)
async def test_wrong_key_is_401(aiohttp_client: ClientFactory, headers: dict[str, str]) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    resp = await client.get("/running", headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="swapper"'
    assert resp.content_type == "application/json"
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_401_carries_the_origin_for_browsers(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    resp = await client.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"


@pytest.mark.parametrize(
    ("setting", "origin", "allowed"),
    [
        ('["http://ui.example"]', "http://evil.example", None),
        ('["http://ui.example"]', "http://ui.example", "http://ui.example"),
        ('"*"', "http://evil.example", "*"),
    ],
)
async def test_401_follows_cors_origins(
    aiohttp_client: ClientFactory, setting: str, origin: str, allowed: str | None
) -> None:
    """The 401's Allow-Origin is the same policy as every other answer: with ``corsOrigins`` set,
    a page from another origin must not be told it may read the refusal."""
    config = ops_config({"m": ""}, f"apiKeys: [{KEY}]\ncorsOrigins: {setting}")
    client = await aiohttp_client(make_app(config))
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        resp = await client.request(method, path, headers={"Origin": origin}, json={"model": "m"})
        assert resp.status == 401
        assert resp.headers.get("Access-Control-Allow-Origin") == allowed, (method, path)


async def test_keyed_model_request_reaches_upstream_with_its_key(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    resp = await client.post("/tokenize", json={"model": "m", "content": "hi"}, headers={"x-api-key": KEY})
    assert resp.status == 200, await resp.text()
    echo = await resp.json()
    assert echo["model_name"] == "m"
    # Keys are forwarded, as llama-swap does: an upstream may check the same key.
    assert echo["headers"].get("x-api-key") == KEY
    assert json.loads(base64.b64decode(echo["body_b64"])) == {"model": "m", "content": "hi"}


def test_presented_keys() -> None:
    h = CIMultiDict({"Authorization": basic("u", "p:w"), "X-Api-Key": " k "})
    assert auth.presented_keys(h) == [b"p:w", b"k"]
    assert auth.presented_keys(CIMultiDict()) == []
    assert auth.presented_keys(CIMultiDict({"Authorization": "Bearer  tok "})) == [b"tok"]


def test_middleware_refuses_no_keys() -> None:
    with pytest.raises(ValueError):
        auth.middleware([])


@pytest.mark.parametrize(
    "header", [b"x-api-key: \xff\xfe", b"Authorization: Bearer \xc3\xa9\xff", b"Authorization: Basic \xff"]
)
async def test_undecodable_credentials_are_401_not_500(aiohttp_client: ClientFactory, header: bytes) -> None:
    client = await aiohttp_client(make_app(keyed_config()))
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET /running HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 401 ")
