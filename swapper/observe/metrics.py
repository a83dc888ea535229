"""Prometheus metrics: what happened (counters, histograms) and what is (gauges read at scrape).

Owns: one ``CollectorRegistry`` per app (apps and tests never share the global one), the label
children bound per model and per (model, route), and per-model activity for ``/v1/status``. It
reads memory through the process's one sampler (``memory.gpu.SystemSampler``, handed in: the
same NVML session and tree walk as the memory monitor's), which it neither owns nor closes.

Recording: ``Metrics`` is an ``events.Observer``. Run-loop facts (starts, load times, unexpected
exits) and request facts (status, queue wait, time to first byte) arrive as bus hooks on the event
loop's thread. Run-loop facts go into prometheus_client's own series. Request facts, several per
request, go into plain counts (``_Tally``, ``_RouteSeries``) that are turned into metric families
at scrape time, on the same thread: a prometheus_client series takes a lock per add and walks its
buckets in Python, which made metrics a tenth of a proxied request's CPU. A request costs a few
dict lookups and integer adds; nothing is recorded per chunk. Label values
are bounded: ``model`` is a configured id (the handler has resolved aliases and rejected unknown
names before tracking starts) and ``route`` is the matched route's template, never the raw path.

The present (states, in flight, queued, memory, GPUs) is not tracked as it changes: it is read at
scrape time from the run loop's advisory snapshot plus a sample of each child's process tree,
taken in a worker thread because /proc and NVML reads block. Nothing samples between scrapes. A
scrape waits for NVML's one open at most ``OPEN_WAIT`` seconds, once: a hung nvmlInit costs the
first scrape that wait and later ones nothing (their samples have no GPUs until it answers).

Must not touch: children or scheduler internals; it reads only the snapshot it is handed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from swapper.core.states import ModelSnapshot, State
from swapper.memory.gpu import GpuUsage, SystemSampler
from swapper.memory.samples import MemorySample
from swapper.observe.console import CONSOLE
from swapper.observe.events import Observer, RequestTrack

if TYPE_CHECKING:
    from swapper.core.phases import SwapTimeline

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Queue waits span a free model (~0) to a swap behind a long generation (minutes).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Time to first byte includes any swap, so its tail is a model load.
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Loads: a tiny model in ~0.1 s up to a 100 GB one read from a cold disk.
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# A swap's phases: from a fraction of a millisecond (the loop's own steps) to a large model's load.
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Seconds a scrape waits for NVML's open (once per process; nvmlInit can hang on a wedged driver).
OPEN_WAIT = 5.0


@dataclass(slots=True)
class Activity:
    """What /v1/status shows about one model beyond the snapshot; wall-clock times."""

    requests: int = 0
    last_used: float | None = None  # when its last request finished
    starts: int = 0  # start attempts that ended (ready or failed)
    last_load_seconds: float | None = None
    unexpected_exits: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """One child's process tree at sample time."""

    rss: int  # resident bytes summed over the tree (shared pages count once per process)
    vram: int | None  # bytes NVML attributes to the tree; None without NVML or when unmeasurable


@dataclass(frozen=True, slots=True)
class Sample:
    children: Mapping[str, Usage]  # model id -> usage, for children alive at sample time
    own_rss: int  # swapper's own resident bytes
    gpus: tuple[GpuUsage, ...]  # empty without NVML

    @classmethod
    def of(cls, memory: MemorySample, own_rss: int) -> Sample:
        """What the gauges and ``/v1/status`` show of a sample (the ledger reads the same one)."""
        children = {model: Usage(u.rss, u.gpu) for model, u in memory.children.items()}
        return cls(children, own_rss, memory.gpus)


class _Tally:
    """One histogram series in plain counts (event loop thread only): ``counts[i]`` observations
    fell in bucket ``i`` (the last one is +Inf), not cumulative; turned into a family at scrape."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value: le
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        buckets, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
        family.add_metric(labels, buckets, self.sum)


class _RouteSeries:
    """Requests answered for one (model, route), by status class (-1: no answer) and outcome."""

    __slots__ = ("by_class", "by_outcome")

    def __init__(self) -> None:
        self.by_class: dict[int, int] = {}
        self.by_outcome: dict[str, int] = {}

    def count(self, status: int | None, outcome: str | None) -> None:
        key = -1 if status is None else status // 100
        self.by_class[key] = self.by_class.get(key, 0) + 1
        how = outcome or "ok"
        self.by_outcome[how] = self.by_outcome.get(how, 0) + 1


class _ModelSeries:
    __slots__ = ("exits", "failed", "load", "ready", "scrape_errors", "ttfb", "wait")

    def __init__(self, m: Metrics, model: str) -> None:
        self.ready = m.starts.labels(model, "ready")
        self.failed = m.starts.labels(model, "failed")
        self.load = m.load_seconds.labels(model)
        self.exits = m.unexpected_exits.labels(model)
        self.scrape_errors = m.scrape_errors.labels(model)
        self.wait = _Tally(WAIT_BUCKETS)
        self.ttfb = _Tally(TTFB_BUCKETS)


class _Families(Collector):
    """Metric families built for one scrape, rendered once and dropped."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class Metrics(Observer):
    def __init__(self, models: Iterable[str], sampler: SystemSampler) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.starts = Counter(
            "swapper_model_starts",
            "Child start attempts that ended, by outcome (ready, failed)",
            ["model", "outcome"],
            registry=reg,
        )
        self.load_seconds = Histogram(
            "swapper_model_load_seconds",
            "Time from spawning a child to its first passing health check",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=reg,
        )
        self.hang_probes = Counter(
            "swapper_hang_probes",
            "Health probes of ready children silent for timeouts.hung with requests in flight, by "
            "result (alive: slow, left alone; hung: killed)",
            ["model", "result"],
            registry=reg,
        )
        self.unexpected_exits = Counter(
            "swapper_model_unexpected_exits",
            "Ready children that exited without being asked to (crashes, OOM kills)",
            ["model"],
            registry=reg,
        )
        self.swap_phases = Histogram(
            "swapper_swap_phase_seconds",
            "Each phase of a swap, from the decision to the first byte relayed: stop_signal, old_exit,"
            " stopped, pre_spawn, exec, ready_line, healthy, granted, first_byte, and their total",
            ["model", "phase"],
            buckets=PHASE_BUCKETS,
            registry=reg,
        )
        self.scrape_errors = Counter(
            "swapper_child_scrape_errors",
            "Scrapes of a ready child's own /metrics that failed (no answer in time, a bad status"
            " or unreadable text); the child's families are missing from that scrape",
            ["model"],
            registry=reg,
        )
        ProcessCollector(registry=reg)  # swapper's own process_* series
        self._models: dict[str, _ModelSeries] = {}
        self._routes: dict[tuple[str, str], _RouteSeries] = {}
        self._activity: dict[str, Activity] = {}
        self._sampler = sampler
        self._waited_open = False  # a scrape waited for NVML's open once already
        self.started = time.time()  # for swapper's uptime in /v1/status
        for model in models:
            self._model(model)  # series exist at 0 from the start, so rate() sees the first event

    # ---- reads for /v1/status ----

    def activity(self, model: str) -> Activity:
        return self._activity.get(model) or Activity()

    # ---- Observer hooks (event loop thread) ----

    def child_ready(self, model: str, load_seconds: float) -> None:
        series = self._model(model)
        series.ready.inc()
        series.load.observe(load_seconds)
        act = self._activity[model]
        act.starts += 1
        act.last_load_seconds = load_seconds

    def child_start_failed(self, model: str, error: str) -> None:
        self._model(model).failed.inc()
        act = self._activity[model]
        act.starts += 1
        act.last_error, act.last_error_at = f"start failed: {error}", time.time()

    def child_exited(self, model: str, pid: int, returncode: int) -> None:
        self._count_exit(model, f"pid {pid} exited unexpectedly (rc {returncode})")

    def child_unreachable(self, model: str, pid: int) -> None:
        # Counted as an unexpected exit: usually it is one whose exit was not seen yet (the stop
        # that follows makes that exit an expected one), else a child that stopped serving.
        self._count_exit(model, f"pid {pid} refused connections; restarted")

    def hang_probed(self, model: str, pid: int, failure: str | None) -> None:
        self.hang_probes.labels(model, "alive" if failure is None else "hung").inc()

    def child_hung(self, model: str, pid: int, why: str) -> None:
        self._count_exit(model, f"pid {pid} hung ({why}); killed")

    def swap_timed(self, timeline: SwapTimeline) -> None:
        for phase, seconds in timeline.phases().items():
            self.swap_phases.labels(timeline.model, phase).observe(seconds)

    def _count_exit(self, model: str, error: str) -> None:
        self._model(model).exits.inc()
        act = self._activity[model]
        act.unexpected_exits += 1
        act.last_error, act.last_error_at = error, time.time()

    def request_granted(self, req: RequestTrack) -> None:
        if req.waited is not None:
            self._model(req.model).wait.observe(req.waited)

    def request_finished(self, req: RequestTrack) -> None:
        key = (req.model, req.route)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _RouteSeries()
        route.count(req.status, req.outcome)
        if req.ttfb is not None:
            self._model(req.model).ttfb.observe(req.ttfb)
        act = self._activity.get(req.model)
        if act is None:
            self._model(req.model)
            act = self._activity[req.model]
        act.requests += 1
        act.last_used = time.time()

    def _model(self, model: str) -> _ModelSeries:
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = _ModelSeries(self, model)
            self._activity.setdefault(model, Activity())
        return series

    def child_scrape_failed(self, model: str) -> None:
        self._model(model).scrape_errors.inc()

    # ---- scrape ----

    async def sample(self, snapshot: Mapping[str, ModelSnapshot]) -> Sample:
        """Samples the running children's process trees and the GPUs, off the event loop."""
        pids = {model: snap.pid for model, snap in snapshot.items() if snap.pid is not None}
        if not self._waited_open and not self._sampler.opened:
            self._waited_open = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OPEN_WAIT):
                    await asyncio.to_thread(self._sampler.open)
        return await asyncio.to_thread(_sample, pids, self._sampler)

    async def render(
        self,
        snapshot: Mapping[str, ModelSnapshot],
        memory: Mapping[str, Any] | None = None,
        children: Sequence[Metric] = (),
    ) -> bytes:
        """The Prometheus text exposition: recorded series plus scrape-time gauges.

        ``memory`` is the memory planner's advisory status (``RunLoop.memory_status()``), when
        that planner runs: its footprints become a gauge. ``children``: the children's own
        families, labelled by model (``childmetrics.scrape``).
        """
        sample = await self.sample(snapshot)
        present = _Families(
            self._request_families() + _gauges(snapshot, sample) + _footprints(memory) + list(children)
        )
        return await asyncio.to_thread(_render, self.registry, present)

    def _request_families(self) -> list[Metric]:
        """The request series as they stand (built on the event loop's thread, which records them)."""
        requests = CounterMetricFamily(
            "swapper_requests",
            "Model requests answered, by model, route template and status class "
            "('cancelled': the client left before an answer)",
            labels=["model", "route", "status"],
        )
        outcomes = CounterMetricFamily(
            "swapper_request_outcomes",
            "Model requests by how they ended: ok (answered whole), client_gone, cut (the model "
            "was stopped under it), upstream_error (refused, died, broke mid-answer), timeout",
            labels=["model", "route", "outcome"],
        )
        for (model, route), series in sorted(self._routes.items()):
            for key, count in sorted(series.by_class.items()):
                requests.add_metric([model, route, "cancelled" if key < 0 else f"{key}xx"], count)
            for outcome, count in sorted(series.by_outcome.items()):
                outcomes.add_metric([model, route, outcome], count)
        wait = HistogramMetricFamily(
            "swapper_queue_wait_seconds",
            "Time from asking the run loop for a model to holding its lease (load or queue)",
            labels=["model"],
        )
        ttfb = HistogramMetricFamily(
            "swapper_ttfb_seconds",
            "Time from the request's arrival to the upstream's response headers, swap included",
            labels=["model"],
        )
        for model, m in sorted(self._models.items()):
            m.wait.add_to(wait, [model])
            m.ttfb.add_to(ttfb, [model])
        dropped = CounterMetricFamily(
            "swapper_log_lines_dropped",
            "Console (stderr) log lines dropped because nobody read them fast enough; /logs has them",
        )
        dropped.add_metric([], CONSOLE.dropped)
        return [requests, outcomes, wait, ttfb, dropped]


def _render(registry: CollectorRegistry, present: _Families) -> bytes:
    return generate_latest(registry) + generate_latest(present)


def _gauges(snapshot: Mapping[str, ModelSnapshot], sample: Sample) -> list[Metric]:
    def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    state = gauge(
        "swapper_model_state", "1 for the state each model is in, 0 for the others", "model", "state"
    )
    in_flight = gauge("swapper_model_in_flight", "Requests holding a lease on the model", "model")
    queued = gauge("swapper_model_queued", "Requests waiting for the model (queue or load)", "model")
    oldest = gauge("swapper_model_oldest_wait_seconds", "Age of the oldest waiting request", "model")
    rss = gauge("swapper_model_rss_bytes", "Resident memory of the child's process tree", "model")
    vram = gauge("swapper_model_vram_bytes", "GPU memory NVML attributes to the child's tree", "model")
    for model, snap in sorted(snapshot.items()):
        status = snap.status
        for candidate in State:
            state.add_metric([model, candidate.value], 1.0 if status.state is candidate else 0.0)
        in_flight.add_metric([model], status.in_flight)
        queued.add_metric([model], status.queued)
        oldest.add_metric([model], status.oldest_wait or 0.0)
        usage = sample.children.get(model)
        if usage is not None:
            rss.add_metric([model], usage.rss)
            if usage.vram is not None:
                vram.add_metric([model], usage.vram)
    families: list[Metric] = [state, in_flight, queued, oldest, rss, vram]
    if sample.gpus:
        used = gauge("swapper_gpu_memory_used_bytes", "GPU memory in use (all processes)", "gpu", "name")
        total = gauge("swapper_gpu_memory_total_bytes", "GPU memory in total", "gpu", "name")
        for gpu in sample.gpus:
            used.add_metric([str(gpu.index), gpu.name], gpu.used)
            total.add_metric([str(gpu.index), gpu.name], gpu.total)
        families += [used, total]
    return families


def _footprints(memory: Mapping[str, Any] | None) -> list[Metric]:
    if memory is None:
        return []
    footprint = GaugeMetricFamily(
        "swapper_model_footprint_bytes",
        "Memory the memory planner reserves for the model (measured, else estimated)",
        labels=["model", "device"],
    )
    for model, info in sorted(memory.get("models", {}).items()):
        if info.get("footprint") is not None:
            footprint.add_metric([model, str(info.get("device"))], info["footprint"])
    return [footprint]


def _sample(pids: Mapping[str, int], sampler: SystemSampler) -> Sample:
    """Blocking: run in a worker thread. Logs nothing (LogHub belongs to the loop's thread)."""
    try:
        memory = sampler.sample(pids, time.monotonic(), private=False)
    except Exception:  # NVMLError (a GPU fell off the bus, driver reloaded): no GPU data now
        memory = sampler.sample(pids, time.monotonic(), private=False, gpus=False)
    return Sample.of(memory, _own_rss())


def _own_rss() -> int:
    return int(psutil.Process().memory_info().rss)


METRICS = web.AppKey("metrics", Metrics)
