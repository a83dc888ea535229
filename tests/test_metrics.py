"""Metrics: the event bus, the recorded series, and /metrics against real fake-upstream children."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from swapper.core.states import ModelSnapshot, ModelStatus, State
from swapper.memory.gpu import GpuUsage, SystemSampler
from swapper.observe.events import EVENTS, EventBus, Feed, Observer
from swapper.observe.metrics import Metrics, Sample, Usage, _Families, _footprints, _gauges
from tests.test_swapping import ClientFactory, chat, client_for, fake_config, runloop, wait_until

CHAT = "/v1/chat/completions"


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(await resp.text())


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /, **labels: str
) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


async def settled(client: TestClient[Any, Any]) -> None:
    """Every handler finished its request (tracked done, lease released) and the loop caught up."""
    await wait_until(lambda: not client.app[EVENTS].in_flight())
    await runloop(client).wait_idle()


async def test_a_swap_counts_a_start_a_load_and_the_requests(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}))
    before = await scrape(client)
    assert value(before, "swapper_model_starts_total", model="b", outcome="ready") == 0
    assert value(before, "swapper_model_load_seconds_count", model="b") == 0
    assert value(before, "swapper_model_state", model="a", state="stopped") == 1

    await chat(client, "a")
    await chat(client, "a")
    await chat(client, "b")  # evicts a
    await settled(client)
    after = await scrape(client)

    assert value(after, "swapper_model_starts_total", model="a", outcome="ready") == 1
    assert value(after, "swapper_model_starts_total", model="b", outcome="ready") == 1
    assert value(after, "swapper_model_starts_total", model="b", outcome="failed") == 0
    assert value(after, "swapper_model_load_seconds_count", model="b") == 1
    assert value(after, "swapper_requests_total", model="a", route=CHAT, status="2xx") == 2
    assert value(after, "swapper_requests_total", model="b", route=CHAT, status="2xx") == 1
    assert value(after, "swapper_queue_wait_seconds_count", model="a") == 2
    assert value(after, "swapper_ttfb_seconds_count", model="b") == 1
    assert value(after, "swapper_model_state", model="a", state="stopped") == 1
    assert value(after, "swapper_model_state", model="b", state="ready") == 1
    assert value(after, "swapper_model_in_flight", model="b") == 0
    rss = value(after, "swapper_model_rss_bytes", model="b")
    assert rss is not None and rss > 0
    assert value(after, "swapper_model_rss_bytes", model="a") is None  # not running: no series
    assert value(after, "process_resident_memory_bytes") is not None

    await chat(client, "a")  # swap back: a second start of a
    await settled(client)
    again = await scrape(client)
    assert value(again, "swapper_model_starts_total", model="a", outcome="ready") == 2
    assert value(again, "swapper_model_load_seconds_count", model="a") == 2


async def test_in_flight_gauge_follows_a_stream_back_to_zero(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 50"}))
    resp = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 10, "messages": []})
    assert (await resp.content.readline()).startswith(b"data:")
    during = await scrape(client)
    assert value(during, "swapper_model_in_flight", model="a") == 1
    assert value(during, "swapper_requests_total", model="a", route=CHAT, status="2xx") is None
    await resp.read()
    await settled(client)
    after = await scrape(client)
    assert value(after, "swapper_model_in_flight", model="a") == 0
    assert value(after, "swapper_model_queued", model="a") == 0
    assert value(after, "swapper_requests_total", model="a", route=CHAT, status="2xx") == 1


async def test_failed_start_and_crash_are_counted(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"bad": "--exit-during-load", "crashy": "--crash-after-bytes 300 --tps 200"})
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post(CHAT, json={"model": "bad"})
    assert resp.status == 502
    stream = await client.post(CHAT, json={"model": "crashy", "stream": True, "max_tokens": 50})
    assert b'data: {"error": ' in await stream.read()  # the child died mid-body: an error event ends it
    await wait_until(lambda: runloop(client).state("crashy") is State.STOPPED)
    await settled(client)
    samples = await scrape(client)
    assert value(samples, "swapper_model_starts_total", model="bad", outcome="failed") == 1
    assert value(samples, "swapper_model_load_seconds_count", model="bad") == 0
    assert value(samples, "swapper_requests_total", model="bad", route=CHAT, status="5xx") == 1
    assert value(samples, "swapper_model_unexpected_exits_total", model="crashy") == 1


def test_registries_are_per_app() -> None:
    # the global registry would refuse the second
    one, two = Metrics(["a"], SystemSampler()), Metrics(["a"], SystemSampler())
    one.child_ready("a", 0.5)
    assert (
        one.registry.get_sample_value("swapper_model_starts_total", {"model": "a", "outcome": "ready"}) == 1
    )
    assert (
        two.registry.get_sample_value("swapper_model_starts_total", {"model": "a", "outcome": "ready"}) == 0
    )


def test_scrape_gauges_include_gpus_and_vram_when_measured() -> None:
    snapshot = {
        "a": ModelSnapshot(ModelStatus(State.READY, 2, 1, 0.5), 123, 1.0),
        "b": ModelSnapshot(ModelStatus(State.STOPPED, 0, 0, None), None, None),
    }
    sample = Sample({"a": Usage(rss=1000, vram=2000)}, own_rss=10, gpus=(GpuUsage(0, "H100", 80, 30),))
    samples = parse(_render(_gauges(snapshot, sample)))
    assert value(samples, "swapper_model_in_flight", model="a") == 2
    assert value(samples, "swapper_model_queued", model="a") == 1
    assert value(samples, "swapper_model_oldest_wait_seconds", model="a") == 0.5
    assert value(samples, "swapper_model_vram_bytes", model="a") == 2000
    assert value(samples, "swapper_model_vram_bytes", model="b") is None
    assert value(samples, "swapper_gpu_memory_used_bytes", gpu="0", name="H100") == 30
    assert value(samples, "swapper_gpu_memory_total_bytes", gpu="0", name="H100") == 80


def test_memory_planner_footprints_become_a_gauge() -> None:
    memory = {
        "models": {"a": {"device": "gpu", "footprint": 5000}, "b": {"device": "ram", "footprint": None}}
    }
    samples = parse(_render(_footprints(memory)))
    assert value(samples, "swapper_model_footprint_bytes", model="a", device="gpu") == 5000
    assert value(samples, "swapper_model_footprint_bytes", model="b", device="ram") is None
    assert _footprints(None) == []


def _render(families: list[Any]) -> str:
    return generate_latest(_Families(families)).decode()


# ---- the bus ----


class Recorder(Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, State, State]] = []

    def model_state(self, model: str, old: State, new: State) -> None:
        self.seen.append((model, old, new))


class Broken(Observer):
    def model_state(self, model: str, old: State, new: State) -> None:
        raise RuntimeError("bug in an observer")


def test_bus_announces_changes_only_and_drops_a_failing_observer() -> None:
    bus, rec = EventBus(), Recorder()
    bus.subscribe(Broken())
    bus.subscribe(rec)
    bus.sync_states({"a": State.STOPPED, "b": State.STARTING})
    bus.sync_states({"a": State.STOPPED, "b": State.STARTING})
    bus.sync_states({"a": State.STOPPED, "b": State.READY})
    assert rec.seen == [("b", State.STOPPED, State.STARTING), ("b", State.STARTING, State.READY)]
    assert bus.states() == {"a": State.STOPPED, "b": State.READY}


async def test_feed_drops_the_oldest_for_a_slow_reader_and_ends_when_closed() -> None:
    feed: Feed[int] = Feed(3)
    for i in range(5):
        feed.push(i)
    assert await feed.wait_batch(None) == [2, 3, 4]
    assert feed.take_dropped() == 2
    feed.push(5)
    feed.closed()
    feed.push(6)  # after close: ignored
    assert await feed.wait_batch(None) == [5]
    assert await feed.wait_batch(None) is None


async def test_feed_takes_pushes_from_worker_threads() -> None:
    feed: Feed[str] = Feed(10)
    await asyncio.to_thread(feed.push, "from a thread")  # e.g. a log line logged in to_thread
    assert await feed.wait_batch(None) == ["from a thread"]


def test_request_series_render_as_prometheus_clients_own_would() -> None:
    # The request series are plain counts turned into families at scrape time; what they render
    # must match prometheus_client's Counter and Histogram fed the same facts (less _created).
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from swapper.observe.metrics import TTFB_BUCKETS, WAIT_BUCKETS

    metrics = Metrics(["a", "b"], SystemSampler())
    bus = EventBus()
    bus.subscribe(metrics)
    reference = CollectorRegistry()
    requests = Counter("swapper_requests", "x", ["model", "route", "status"], registry=reference)
    wait = Histogram("swapper_queue_wait_seconds", "x", ["model"], buckets=WAIT_BUCKETS, registry=reference)
    ttfb = Histogram("swapper_ttfb_seconds", "x", ["model"], buckets=TTFB_BUCKETS, registry=reference)
    for model in ("a", "b"):
        wait.labels(model)
        ttfb.labels(model)
    # Near bounds, between them, past the last, and a request the client left unanswered.
    facts = [
        ("a", 0.001, 0.005, 200),
        ("a", 0.0, 0.0075, 503),
        ("b", 700.0, 301.0, 200),
        ("a", 0.3, None, None),
    ]
    for i, (model, waited, upstream_ttfb, status) in enumerate(facts):
        track = bus.track(i, model, CHAT, "POST", CHAT)
        track.started -= waited  # as if it had waited that long
        track.granted()
        if status is not None:
            assert upstream_ttfb is not None
            track.forwarded(status, upstream_ttfb)
        track.done()
        assert track.waited is not None
        wait.labels(model).observe(track.waited)
        if track.ttfb is not None:
            ttfb.labels(model).observe(track.ttfb)
        label = "cancelled" if status is None else f"{status // 100}xx"
        requests.labels(model, CHAT, label).inc()
    for at_a_bound in (0.005, 600.0):  # exactly: a tracked wait is never exact
        metrics._model("b").wait.observe(at_a_bound)
        wait.labels("b").observe(at_a_bound)

    def series(text: str, prefix: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {
            k: round(v, 6)
            for k, v in parse(text).items()
            if k[0].startswith(prefix) and "created" not in k[0]
        }

    ours = generate_latest(_Families(metrics._request_families())).decode()
    theirs = generate_latest(reference).decode()
    for prefix in ("swapper_requests", "swapper_queue_wait_seconds", "swapper_ttfb_seconds"):
        assert series(ours, prefix) == series(theirs, prefix), prefix
        assert series(ours, prefix)
