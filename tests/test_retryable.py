"""``retryable`` in every error swapper produces, and ``GET /healthz`` (issue 21).

A broker's callers (shell scripts, home-automation hooks) read one field to know whether to try
again: true for "not now" (429, 503, a child that died or hung, a peer that is down), false for
"not this request" (400, 401, 404, 413, a command that cannot run at all). Real-process tests:
swapper in-process, fake upstream children (``tests/upstreams``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from swapper.config.load import parse_config
from swapper.core.errors import (
    BadRequest,
    BodyTooLarge,
    ConcurrencyLimit,
    ModelLoadFailed,
    ModelNotFound,
    QueueFull,
    SwapperError,
    Unauthorized,
    UpstreamError,
    error_body,
)
from tests.test_swapping import ClientFactory, client_for, fake_config, runloop, wait_until


async def error_of(resp: Any) -> dict[str, Any]:
    body = await resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code", "retryable"}, body
    err: dict[str, Any] = body["error"]
    return err


@pytest.mark.parametrize(
    ("err", "retryable"),
    [
        (BadRequest("x"), False),
        (Unauthorized("x"), False),
        (ModelNotFound("x"), False),
        (BodyTooLarge("x"), False),
        (ConcurrencyLimit("x"), True),
        (QueueFull("x"), True),
        (UpstreamError("x"), True),
        (ModelLoadFailed("exited"), True),
        (ModelLoadFailed("cannot run", retryable=False), False),
        (SwapperError("never fits", status=507, code="insufficient_memory"), False),
        (SwapperError("a bug"), False),
    ],
)
def test_envelope_says_whether_to_retry(err: SwapperError, retryable: bool) -> None:
    body = json.loads(error_body(err))
    assert body["error"]["retryable"] is retryable
    assert body["error"]["code"] == err.code


async def test_client_errors_are_not_retryable(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "", "b": ""}, extra="maxBodyBytes: 1024")
    client = await client_for(aiohttp_client, cfg)
    json_type = {"Content-Type": "application/json"}
    cases = [
        (await client.post("/v1/chat/completions", data=b"{bad", headers=json_type), 400),
        (await client.post("/v1/chat/completions", json={"model": "nope"}), 404),
        (await client.post("/v1/chat/completions", json={"messages": []}), 400),  # no model
        (await client.post("/v1/chat/completions", data=b"x" * 4096), 413),
        (await client.get("/nope"), 404),
    ]
    for resp, status in cases:
        assert resp.status == status
        assert (await error_of(resp))["retryable"] is False


async def test_missing_api_key_is_not_retryable_and_healthz_needs_none(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}, extra="apiKeys: [sekret]"))
    resp = await client.post("/v1/chat/completions", json={"model": "a"})
    assert resp.status == 401
    assert (await error_of(resp))["retryable"] is False
    for method in ("GET", "HEAD"):
        resp = await client.request(method, "/healthz")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        if method == "GET":
            assert await resp.json() == {"status": "ok"}


async def test_healthz_is_answered_on_the_front_door_too(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    for _ in range(2):  # the same keep-alive connection
        resp = await client.get("/healthz")
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    assert client.server.front_site.front.answered >= 2  # type: ignore[attr-defined]


async def test_concurrency_limit_429_is_retryable(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--load-delay 0.5"}, a="concurrencyLimit: 1")
    client = await client_for(aiohttp_client, cfg)
    first = asyncio.ensure_future(client.post("/v1/chat/completions", json={"model": "a", "max_tokens": 2}))
    await wait_until(lambda: runloop(client).snapshot()["a"].status.queued == 1)
    resp = await client.post("/v1/chat/completions", json={"model": "a"})
    assert resp.status == 429
    assert (await error_of(resp))["retryable"] is True
    assert (await first).status == 200


async def test_unloaded_while_waiting_503_is_retryable(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--load-delay 1"}))
    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json={"model": "a"}))
    await wait_until(lambda: runloop(client).snapshot()["a"].status.queued == 1)
    await client.post("/api/models/unload")
    resp = await waiting
    assert resp.status == 503
    assert (await error_of(resp))["retryable"] is True


async def test_child_that_died_or_hung_is_retryable(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"dies": "--exit-during-load", "hangs": "--never-healthy"})
    hangs = dataclasses.replace(cfg.models["hangs"], health_check_timeout=0.5)
    client = await client_for(aiohttp_client, dataclasses.replace(cfg, models={**cfg.models, "hangs": hangs}))
    for model in ("dies", "hangs"):
        resp = await client.post("/v1/chat/completions", json={"model": model})
        assert resp.status == 502
        err = await error_of(resp)
        assert err["code"] == "model_load_failed" and err["retryable"] is True


async def test_command_that_cannot_run_is_not_retryable(aiohttp_client: ClientFactory) -> None:
    cfg = parse_config(
        "models:\n  a:\n    cmd: /nonexistent/llama-server --port ${PORT}\n    proxy: http://127.0.0.1:${PORT}\n"
    )
    client: TestClient[Any, Any] = await client_for(aiohttp_client, cfg)
    resp = await client.post("/v1/chat/completions", json={"model": "a"})
    assert resp.status == 502
    err = await error_of(resp)
    assert "no such file" in err["message"] and err["retryable"] is False


async def test_streamed_loading_failure_carries_retryable(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--exit-during-load"}, a="sendLoadingState: true")
    client = await client_for(aiohttp_client, cfg)
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    resp = await client.post("/v1/chat/completions", json=body)
    text = await resp.text()
    assert '"retryable": true' in text, text
