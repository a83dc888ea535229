"""One /metrics for the fleet: swapper's families plus each ready child's own, labelled by model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from swapper.app.server import make_app
from swapper.observe.childmetrics import merge, scrape
from tests.ops_helpers import ops_config

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

LLAMA = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio{model="theirs"} 0.5
# HELP process_cpu_seconds_total CPU.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 3
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_families_of_several_children_merge_under_one_name() -> None:
    merged = merge({"b": LLAMA, "a": LLAMA.replace("12", "7"), "bad": "this is { not prometheus"})
    assert merged.failed == ["bad"]
    names = [f.name for f in merged.families]
    assert names == ["llamacpp:prompt_tokens", "llamacpp:kv_cache_usage_ratio"]  # process_* is swapper's
    tokens = merged.families[0]
    assert [(s.labels, s.value) for s in tokens.samples] == [({"model": "a"}, 7), ({"model": "b"}, 12)]
    # A child's own model label gives way to swapper's.
    assert [s.labels for s in merged.families[1].samples] == [{"model": "a"}, {"model": "b"}]


async def load(client: TestClient[Any, Any], model: str) -> None:
    resp = await client.post("/v1/chat/completions", json={"model": model, "messages": [], "max_tokens": 1})
    assert resp.status == 200, await resp.text()


async def test_metrics_merges_the_ready_children(aiohttp_client: ClientFactory) -> None:
    config = ops_config(
        {
            "a": "--metrics on",
            "b": "--metrics on",
            "deaf": "--metrics hang",
            "plain": "",
            "cold": "--metrics on",
        },
        "groups: {all: {swap: false, members: [a, b, deaf, plain, cold]}}",
    )
    client = await aiohttp_client(make_app(config))
    for model in ("a", "b", "deaf", "plain"):
        await load(client, model)
    await load(client, "a")
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    got = samples(text)
    assert got[("llamacpp:requests_answered_total", (("model", "a"),))] == 2
    assert got[("llamacpp:requests_answered_total", (("model", "b"),))] == 1
    assert got[("llamacpp:kv_cache_usage_ratio", (("model", "b"),))] == 0.25
    assert not any(labels == (("model", "cold"),) for name, labels in got if name.startswith("llamacpp:"))
    assert not any(labels == (("model", "deaf"),) for name, labels in got if name.startswith("llamacpp:"))
    # The child that did not answer counts an error and did not fail the scrape; one without
    # metrics (llama-server's 501) is no error.
    assert got[("swapper_child_scrape_errors_total", (("model", "deaf"),))] == 1
    assert got[("swapper_child_scrape_errors_total", (("model", "plain"),))] == 0
    assert got[("swapper_child_scrape_errors_total", (("model", "a"),))] == 0
    assert (
        "swapper_requests_total",
        (("model", "a"), ("route", "/v1/chat/completions"), ("status", "2xx")),
    ) in got
    assert text.count("# TYPE llamacpp:requests_answered_total counter") == 1


async def test_metrics_with_a_model_is_that_models_own(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"a": "--metrics on", "b": "--metrics on"})))
    resp = await client.get("/metrics?model=b")  # loads b, as any model request
    assert resp.status == 200
    got = samples(await resp.text())
    assert got[("llamacpp:requests_answered_total", ())] == 0
    assert not any(name.startswith("swapper_") for name, _ in got)


async def test_children_are_scraped_at_once() -> None:
    """Each child answers only once all of them were asked: one after the other, the first would
    wait forever (and fail at its timeout)."""
    asked = 0
    everyone = asyncio.Event()

    async def child(request: web.Request) -> web.Response:
        nonlocal asked
        asked += 1
        if asked == 3:
            everyone.set()
        await everyone.wait()
        return web.Response(text="# TYPE up gauge\nup 1\n")

    app = web.Application()
    app.router.add_get("/metrics", child)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        url = str(server.make_url("/metrics"))
        scraped = await scrape(session, {"a": url, "b": url, "c": url}, within=5.0)
    assert scraped.failed == []
    assert [s.labels["model"] for s in scraped.families[0].samples] == ["a", "b", "c"]
