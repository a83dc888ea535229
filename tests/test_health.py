"""health.wait_healthy against real fake-upstream processes."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import yarl

from swapper.config.schema import ModelConfig
from swapper.core.errors import ModelLoadFailed
from swapper.runtime.children import Child
from swapper.runtime.health import wait_healthy
from swapper.wire.h1pool import H1Pool
from tests.test_children import Lines

MakeModel = Callable[..., ModelConfig]
Spawn = Callable[[ModelConfig], Awaitable[Child]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Spawns children and stops every one of them after the test."""
    children: list[Child] = []

    async def start(model: ModelConfig) -> Child:
        child = Child(model, output=Lines())
        await child.spawn()
        children.append(child)
        return child

    yield start
    await asyncio.gather(*(c.stop(grace=2.0) for c in children))


def health_url(model: ModelConfig) -> str:
    return f"{model.proxy}{model.check_endpoint}"


async def test_healthy_once_loaded(http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel) -> None:
    model = fake_model("alpha", "--load-delay", "0.3")
    t0 = time.monotonic()
    child = await spawn(model)
    await wait_healthy(http, child, health_url(model), 10.0)
    assert 0.3 <= time.monotonic() - t0 < 3.0
    async with http.get(health_url(model)) as r:
        assert r.status == 200


async def test_readiness_line_triggers_an_immediate_probe(
    http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel
) -> None:
    # Polling alone would next probe after 30 s; only the "server is listening" line can make
    # this return in time. The early "HTTP server is listening" line comes while /health still
    # says 503, and must not make the wait spin or give up.
    model = fake_model("alpha", "--load-delay", "0.3", "--print-early-ready", "--print-ready")
    child = await spawn(model)
    async with asyncio.timeout(10.0):
        await wait_healthy(http, child, health_url(model), 60.0, first_interval=30.0, max_interval=30.0)
    assert child.ready_lines_seen == 2


async def test_no_check_endpoint_means_ready_at_once(http: aiohttp.ClientSession) -> None:
    model = ModelConfig(id="x", cmd=("true",), cmd_text="true", proxy="", check_endpoint=None)
    await wait_healthy(http, Child(model, output=Lines()), None, 0.001)


async def test_exit_while_loading_fails_fast(
    http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel
) -> None:
    model = fake_model("broken", "--exit-during-load")
    child = await spawn(model)
    t0 = time.monotonic()
    with pytest.raises(ModelLoadFailed) as err:
        await wait_healthy(http, child, health_url(model), 30.0)
    assert time.monotonic() - t0 < 5.0
    msg = str(err.value)
    assert "'broken' exited with code 1 while loading" in msg
    assert "failed to load model" in msg  # the child's own last words
    assert err.value.status == 502


async def test_never_healthy_times_out(
    http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel
) -> None:
    model = fake_model("slow", "--never-healthy")
    child = await spawn(model)
    t0 = time.monotonic()
    with pytest.raises(ModelLoadFailed, match=r"health check timed out after 1s \(GET .*/health: HTTP 503\)"):
        await wait_healthy(http, child, health_url(model), 1.0)
    # uvloop's clock, which timeouts run on, has millisecond steps: a deadline may come ~1 ms early.
    assert 0.99 <= time.monotonic() - t0 < 3.0
    assert not child.exited()  # wait_healthy never stops the child; the caller does


async def test_nothing_listening_keeps_polling_until_timeout(
    http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel, free_port: Callable[[], int]
) -> None:
    model = fake_model("alpha")
    child = await spawn(model)
    with pytest.raises(ModelLoadFailed, match=r"timed out after 0.5s \(GET .*: ClientConnectorError"):
        await wait_healthy(http, child, f"http://127.0.0.1:{free_port()}/health", 0.5)


async def test_cancelling_the_wait_leaves_the_child_alone(
    http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel
) -> None:
    model = fake_model("slow", "--never-healthy")
    child = await spawn(model)
    waiting = asyncio.ensure_future(wait_healthy(http, child, health_url(model), 30.0))
    done, _ = await asyncio.wait([waiting], timeout=0.2)
    assert not done
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not child.exited()


async def test_a_child_that_prints_while_it_loads_is_not_probed_until_it_says_it_is_ready(
    http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel
) -> None:
    # It prints a progress line every 2 ms for 0.4 s, each with the probes it has answered: a
    # printing child is loading, so it is probed on its readiness line, and only every
    # QUIET_PROBE_EVERY (0.25 s) while it keeps printing, not at the silent child's 10-50 ms.
    model = fake_model("chatty", "--load-delay", "0.4", "--chatty-load", "--print-ready")
    lines = Lines()
    child = Child(model, output=lines)
    await child.spawn()
    try:
        await wait_healthy(http, child, health_url(model), 10.0)
        said = [re.search(r"(\d+) health probes so far", line) for _, line in lines.seen]
        progress = [int(m[1]) for m in said if m]
        assert len(progress) > 20 and progress[-1] <= 2, progress[-1]
    finally:
        await child.stop(grace=2.0)


async def test_probes_through_the_forwarding_pool(
    http: aiohttp.ClientSession, spawn: Spawn, fake_model: MakeModel, free_port: Callable[[], int]
) -> None:
    pool = H1Pool()
    try:
        model = fake_model("alpha", "--load-delay", "0.2")
        child = await spawn(model)
        await wait_healthy(http, child, health_url(model), 10.0, pool=pool)
        with pytest.raises(ModelLoadFailed, match=r"timed out after 0.3s \(GET .*: ConnectFailed"):
            await wait_healthy(http, child, f"http://127.0.0.1:{free_port()}/health", 0.3, pool=pool)
        never = fake_model("slow", "--never-healthy")
        slow = await spawn(never)
        # Listening first, so the 0.3 s below meets its 503s, not a start slowed by a busy machine.
        await _until_listening(health_url(never))
        with pytest.raises(ModelLoadFailed, match=r"timed out after 0.3s \(GET .*: HTTP 503\)"):
            await wait_healthy(http, slow, health_url(never), 0.3, pool=pool)
    finally:
        pool.close()


async def _until_listening(url: str, within: float = 10.0) -> None:
    where = yarl.URL(url)
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(where.host, where.port)
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens at {where.host}:{where.port}"
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return
