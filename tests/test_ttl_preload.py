"""TTL unloads and startup preload, end to end with real fake upstreams.

Nothing here sleeps to wait for a state: every wait polls the run loop's snapshot under a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.core.states import State
from tests.ops_helpers import ops_config, runloop, wait_until

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


async def chat(client: TestClient[Any, Any], model: str, **kw: Any) -> None:
    resp = await client.post(
        "/v1/chat/completions", json={"model": model, "max_tokens": 2, "messages": [], **kw}
    )
    assert resp.status == 200, await resp.text()
    await resp.read()


def state(client: TestClient[Any, Any], model: str) -> State:
    return runloop(client).state(model)


async def running(client: TestClient[Any, Any]) -> dict[str, dict[str, Any]]:
    body = await (await client.get("/running")).json()
    return {r["model"]: r for r in body["running"]}


# ---- TTL ----


async def test_ttl_unloads_an_idle_model(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, m="ttl: 1")))
    await chat(client, "m")
    done = time.monotonic()
    pid = runloop(client).snapshot()["m"].pid
    assert pid is not None
    assert (await running(client))["m"]["ttl"] == 1
    stopped = await wait_until(lambda: state(client, "m") is State.STOPPED, within=6, what="TTL unload")
    # Idle for at least the TTL, and gone by the tick after it (1 s ticks), plus a stop.
    assert 1.0 <= stopped - done < 4.0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert await running(client) == {}
    # The next request simply loads it again.
    await chat(client, "m")
    assert state(client, "m") is State.READY


async def test_ttl_never_unloads_during_a_stream(aiohttp_client: ClientFactory) -> None:
    # 10 tokens at 3 tokens/s: a stream of about 3.5 s against a TTL of 1 s.
    client = await aiohttp_client(make_app(ops_config({"m": "--tps 3"}, m="ttl: 1")))
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m", "stream": True, "max_tokens": 10, "messages": []}
    )
    assert resp.status == 200
    began = time.monotonic()
    states: set[State] = set()
    while line := await resp.content.readline():
        states.add(state(client, "m"))
        if line.startswith(b"data: [DONE]"):
            break
    await resp.read()
    ended = time.monotonic()
    assert ended - began > 2.5  # long enough for at least two TTL ticks to have looked at it
    assert states == {State.READY}
    assert state(client, "m") is State.READY
    stopped = await wait_until(lambda: state(client, "m") is State.STOPPED, within=6, what="TTL unload")
    assert stopped - ended >= 1.0  # the TTL counts from the end of the stream


@pytest.mark.parametrize("unload_timeout", [0.5, 2.0])
async def test_ttl_stop_uses_unload_timeout(aiohttp_client: ClientFactory, unload_timeout: float) -> None:
    # The child ignores SIGTERM, so the stop lasts exactly the grace period, then SIGKILL.
    cfg = ops_config({"m": "--ignore-sigterm"}, m=f"ttl: 1\nunloadTimeout: {unload_timeout}")
    client = await aiohttp_client(make_app(cfg))
    await chat(client, "m")
    pid = runloop(client).snapshot()["m"].pid
    stopping = await wait_until(lambda: state(client, "m") is not State.READY, within=6, what="TTL stop")
    assert state(client, "m") is State.STOPPING
    stopped = await wait_until(lambda: state(client, "m") is State.STOPPED, within=6, what="SIGKILL")
    assert unload_timeout - 0.1 <= stopped - stopping < unload_timeout + 1.0
    assert pid is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_global_ttl_and_ttl_zero(aiohttp_client: ClientFactory) -> None:
    extra = "globalTTL: 1\ngroups:\n  both:\n    swap: false\n    members: [inherit, never]"
    client = await aiohttp_client(make_app(ops_config({"inherit": "", "never": ""}, extra, never="ttl: 0")))
    # "never" is used first, so it has been idle longest when "inherit" expires.
    await chat(client, "never")
    await chat(client, "inherit")
    assert {m: r["ttl"] for m, r in (await running(client)).items()} == {"inherit": 1, "never": 0}
    await wait_until(lambda: state(client, "inherit") is State.STOPPED, within=6, what="globalTTL unload")
    assert state(client, "never") is State.READY


# ---- preload ----


async def test_preload_loads_without_any_request(aiohttp_client: ClientFactory) -> None:
    extra = "hooks:\n  on_startup:\n    preload: [fast]"
    client = await aiohttp_client(make_app(ops_config({"m": "", "other": ""}, extra, m="aliases: [fast]")))
    await wait_until(lambda: state(client, "m") is State.READY, within=10, what="preload")
    assert (await running(client))["m"]["state"] == "ready"
    assert state(client, "other") is State.STOPPED
    # It is an ordinary loaded model: the first request is served without a swap.
    pid = runloop(client).snapshot()["m"].pid
    await chat(client, "m")
    assert runloop(client).snapshot()["m"].pid == pid
    await runloop(client).wait_idle()
    assert runloop(client).snapshot()["m"].status.in_flight == 0


async def test_preload_skips_failures_and_goes_in_order(aiohttp_client: ClientFactory) -> None:
    # One exclusive group (the default): a loads, b fails, c swaps a out and stays.
    extra = "hooks:\n  on_startup:\n    preload: [a, b, c]"
    cfg = ops_config({"a": "", "b": "--exit-during-load", "c": ""}, extra)
    client = await aiohttp_client(make_app(cfg))
    await wait_until(lambda: state(client, "c") is State.READY, within=10, what="preload of c")
    await runloop(client).wait_idle()
    assert state(client, "a") is State.STOPPED
    assert state(client, "b") is State.STOPPED
    assert (await client.get("/health")).status == 200


async def test_shutdown_during_preload_leaves_nothing(aiohttp_client: ClientFactory) -> None:
    extra = "hooks:\n  on_startup:\n    preload: [slow]"
    client = await aiohttp_client(make_app(ops_config({"slow": "--load-delay 30"}, extra)))
    await wait_until(lambda: runloop(client).snapshot()["slow"].pid is not None, what="preload start")
    began = time.monotonic()
    await asyncio.wait_for(client.close(), timeout=10)
    assert time.monotonic() - began < 5  # the load was abandoned, not waited for
