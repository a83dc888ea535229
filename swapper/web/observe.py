"""Observability routes: ``/metrics``, ``/v1/status``, ``/logs``, ``/logs/stream[/{id}]``, ``/api/events``.

Owns: the app's ``EventBus`` and ``Metrics`` (made in ``add_admin_routes``, which the server calls
before ``routes.add_routes`` registers its catch-all), and one ``Feed`` per open stream. The
streams end when the client leaves or when the server shuts down (``on_shutdown`` closes the bus,
which closes every feed), so they never hold up aiohttp's graceful shutdown.

Must not touch: children, the scheduler, or the run loop's state: everything here reads the
advisory snapshot, the log rings, or what the bus reports. Nothing a stream sends carries request
headers, queries or bodies, so no key or prompt leaves through it.

Concurrency: handlers run in their own tasks. A stream subscribes its feed in the same step as it
copies the history (no await between), so it neither misses nor repeats a line; its feed is then
filled synchronously by the publishers and drained here, and it drops the oldest entries when this
reader falls behind, so a slow client never stalls a child or the run loop.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import hdrs, web

from swapper import __version__
from swapper.config import capabilities
from swapper.config.schema import Config, MemoryConfig
from swapper.core.errors import BadRequest
from swapper.core.states import State
from swapper.memory.gpu import SystemSampler
from swapper.memory.samples import GpuUsage
from swapper.observe.activity import ACTIVITY, ActivityLog
from swapper.observe.events import EVENTS, EventBus, Feed, RequestTrack
from swapper.observe.logs import SWAPPER, LogHub, tagged
from swapper.observe.metrics import CONTENT_TYPE, METRICS, Metrics
from swapper.web.appkeys import CONFIG, RUNLOOP, SESSION
from swapper.web.routes import error_response, handle_model_request

FEED_LIMIT = 1024  # entries a stream may fall behind before the oldest are dropped
SESSION_ID_HEADERS = ("X-Session-ID", "X-Litellm-Session-Id")  # llama-swap's ui.activity default
KEEPALIVE_SECONDS = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
UPSTREAM = "upstream"  # log stream id: every child's output, without swapper's own lines
SWAPPER_IDS = frozenset({SWAPPER, "proxy"})  # "proxy" is llama-swap's name for its own log

T = TypeVar("T")


def add_admin_routes(
    app: web.Application, logs: LogHub, sampler: SystemSampler, *, metrics_route: bool = True
) -> None:
    """Creates the app's bus and metrics (which read memory through ``sampler``, the process's one:
    its maker closes it), wires ``logs`` into the bus, and adds the routes."""
    bus = EventBus()
    metrics = Metrics(app[CONFIG].models, sampler)
    bus.subscribe(metrics)
    logs.listen(bus.log_lines)
    app[EVENTS] = bus
    app[METRICS] = metrics

    async def close_streams(app: web.Application) -> None:
        bus.close()

    async def release(app: web.Application) -> None:
        logs.unlisten(bus.log_lines)

    app.on_shutdown.append(close_streams)
    app.on_cleanup.append(release)
    if metrics_route:  # else only on metricsListen's own listener (metrics_app)
        app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/v1/status", handle_status)
    app.router.add_get("/logs", handle_logs)
    app.router.add_get("/logs/stream", handle_log_stream)
    app.router.add_get("/logs/stream/{id:.+}", handle_log_stream)
    app.router.add_get("/api/events", handle_events)


# ---- /metrics and /v1/status ----


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    """swapper's families and every ready child's own (``childmetrics``); with ``?model=``, that
    model's own ``/metrics`` as llama-server answers it (a model request: it loads the model)."""
    if "model" in request.query:
        return await handle_model_request(request)
    return await _metrics_of(request.app)


async def _metrics_of(app: web.Application) -> web.Response:
    runloop, metrics = app[RUNLOOP], app[METRICS]
    config, snapshot = runloop.config, runloop.snapshot()
    targets = {
        mid: cfg.proxy.rstrip("/") + "/metrics"
        for mid, snap in snapshot.items()
        if snap.status.state is State.READY and (cfg := config.models.get(mid)) is not None
    }
    from swapper.observe import childmetrics  # only here: its Prometheus text parser is not needed to start

    children = await childmetrics.scrape(app[SESSION], targets)
    for model in children.failed:
        metrics.child_scrape_failed(model)
    body = await metrics.render(snapshot, runloop.memory_status(), children.families)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})


def metrics_app(main: web.Application) -> web.Application:
    """``metricsListen``'s listener: ``GET /metrics`` of ``main``, and nothing else.

    No API key: it is meant for a loopback (or otherwise private) address that a local scraper
    reads, which is how the main listener can face a LAN without exposing it.
    """
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        return await _metrics_of(main)

    app.router.add_get("/metrics", handle)
    return app


async def handle_status(request: web.Request) -> web.Response:
    app = request.app
    metrics, runloop = app[METRICS], app[RUNLOOP]
    snapshot, memory = runloop.snapshot(), runloop.memory_status()
    sample = await metrics.sample(snapshot)
    now = time.time()
    models = []
    for mid, snap in sorted(snapshot.items()):
        status, act, usage = snap.status, metrics.activity(mid), sample.children.get(mid)
        models.append(
            {
                "id": mid,
                "state": status.state.value,
                "pid": snap.pid,
                "uptimeSeconds": None if snap.started_at is None else _round(now - snap.started_at),
                "rssBytes": usage.rss if usage else None,
                "vramBytes": usage.vram if usage else None,
                "inFlight": status.in_flight,
                "queued": status.queued,
                "oldestWaitSeconds": _round(status.oldest_wait),
                "requestsTotal": act.requests,
                "lastUsed": _iso(act.last_used),
                "starts": act.starts,
                "lastLoadSeconds": _round(act.last_load_seconds),
                "unexpectedExits": act.unexpected_exits,
                "lastError": (
                    {"message": act.last_error, "at": _iso(act.last_error_at)} if act.last_error else None
                ),
                "priority": cfg.priority if (cfg := runloop.config.models.get(mid)) else None,
                "coexistsWith": list(runloop.coexists_with(mid)),
                "service": _service_entry(runloop.service_status(mid)),  # null: a child swapper spawns
            }
        )
    body = {
        "swapper": {
            "version": __version__,
            "pid": os.getpid(),
            "uptimeSeconds": _round(now - metrics.started),
            "rssBytes": sample.own_rss,
        },
        "gpus": [_gpu_entry(g, runloop.config.routing.memory, memory) for g in sample.gpus],
        "models": models,
        "queues": [
            {"model": m["id"], "queued": m["queued"], "oldestWaitSeconds": m["oldestWaitSeconds"]}
            for m in models
            if m["queued"]
        ],
        "requests": [_request_entry(req) for req in app[EVENTS].in_flight()],
        "memory": memory,  # the memory planner's ledger; null under the group or matrix planner
    }
    return web.json_response(body)


def _gpu_entry(gpu: GpuUsage, settings: MemoryConfig, memory: dict[str, Any] | None) -> dict[str, Any]:
    """One GPU: its memory, what is kept free there (``reserve``, per GPU), and, with the memory
    planner, swapper's models on it (``memory.gpus``)."""
    planned = next((g for g in memory["gpus"] if g["index"] == gpu.index), None) if memory else None
    return {
        "index": gpu.index,
        "name": gpu.name,
        "totalBytes": gpu.total,
        "usedBytes": gpu.used,
        "freeBytes": max(0, gpu.total - gpu.used),
        "reservedBytes": settings.reserve_of(gpu.index),
        "models": sorted(planned["models"]) if planned else None,
    }


def _service_entry(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {**status, "lastProbe": _iso(status["lastProbe"])}


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def _request_entry(req: RequestTrack) -> dict[str, Any]:
    """What streams and /v1/status say about one request: ids and timings, never its content."""
    entry: dict[str, Any] = {
        "id": str(req.req_id),
        "timestamp": _iso(req.at),
        "model": req.model,
        "req_path": req.path,
        "method": req.method,
        "state": "waiting" if req.waited is None else "serving",
        "elapsed_ms": round((time.perf_counter() - req.started) * 1000),
    }
    if req.waited is not None:
        entry["wait_ms"] = round(req.waited * 1000)
    return entry


# ---- logs ----


@dataclass(frozen=True, slots=True)
class LogSource:
    """Which lines a log stream carries: one source's raw lines, or tagged lines of many."""

    source: str | None  # a LogHub source; None: several, tagged
    children_only: bool = False  # with source None: leave swapper's own lines out

    def history(self, logs: LogHub) -> list[str]:
        if self.source is not None:
            return logs.history(self.source)
        lines = logs.history()
        if self.children_only:
            mine = tagged(SWAPPER, "")
            lines = [line for line in lines if not line.startswith(mine)]
        return lines

    def select(self, source: str, line: str) -> str | None:
        if self.source is not None:
            return line if source == self.source else None
        if self.children_only and source == SWAPPER:
            return None
        return tagged(source, line)


def log_source(ident: str, config: Config) -> LogSource | None:
    """Maps a stream id ('', 'swapper'/'proxy', 'upstream', a model id or alias) to its lines."""
    if not ident:
        return LogSource(None)
    if ident in SWAPPER_IDS:
        return LogSource(SWAPPER)
    if ident == UPSTREAM:
        return LogSource(None, children_only=True)
    model = config.resolve(ident)
    return None if model is None else LogSource(model)


class LogFeed(Feed[str]):
    def __init__(self, wanted: LogSource) -> None:
        super().__init__(FEED_LIMIT)
        self._wanted = wanted

    def log_line(self, source: str, line: str) -> None:
        selected = self._wanted.select(source, line)
        if selected is not None:
            self.push(selected)


async def handle_logs(request: web.Request) -> web.Response:
    return web.Response(text=_text(request.app[RUNLOOP].logs.history()))


async def handle_log_stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    ident = request.match_info.get("id", "")
    wanted = log_source(ident, app[RUNLOOP].config)
    if wanted is None:
        return error_response(
            BadRequest(f"invalid log source '{ident}': use 'swapper' (or 'proxy'), 'upstream' or a model id")
        )
    feed = LogFeed(wanted)
    history = [] if "no-history" in request.query else wanted.history(app[RUNLOOP].logs)
    resp = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/plain; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",
        }
    )

    def render(lines: list[str], dropped: int) -> bytes:
        if dropped:
            lines.insert(0, f"--- {dropped} lines dropped: this reader fell behind ---")
        return _text(lines).encode()

    return await _stream(request, resp, app[EVENTS], feed, render(history, 0), render, None)


def _text(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


# ---- /api/events ----

Frame = tuple[str, Any]  # (envelope type, its data), encoded when written


class EventFeed(Feed[Frame]):
    """Model states, log lines and request start/finish, as llama-swap's /api/events frames."""

    def __init__(
        self, config: Callable[[], Config], bus: EventBus, activity: ActivityLog | None = None
    ) -> None:
        super().__init__(FEED_LIMIT)
        self._config = config  # read per frame: a reload replaces the run loop's config
        self._bus = bus
        self._activity = activity

    def model_status(self) -> Frame:
        states = self._bus.states()
        out = []
        for mid, cfg in sorted(self._config().models.items()):
            out.append(
                {
                    "id": mid,
                    "name": cfg.name,
                    "description": cfg.description,
                    "state": states.get(mid, State.STOPPED).value,
                    "unlisted": cfg.unlisted,
                    "peerID": "",
                    "aliases": list(cfg.aliases),
                    **capabilities.render(cfg.capabilities),
                }
            )
        # llama-swap lists peer models after the local ones, with no state.
        out += [{"id": pm.fqn, "peerID": pm.peer, "state": ""} for pm in self._config().fleet.peer_models()]
        return "modelStatus", out

    def in_flight(self) -> Frame:
        requests = [_request_entry(req) for req in self._bus.in_flight()]
        return "inflight", {"operation": "snapshot", "requests": requests}

    def model_state(self, model: str, old: State, new: State) -> None:
        self.push(self.model_status())

    def log_line(self, source: str, line: str) -> None:
        data: dict[str, Any] = {"source": "proxy" if source == SWAPPER else UPSTREAM, "data": line + "\n"}
        if source != SWAPPER:
            data["model"] = source
        self.push(("logData", data))

    def request_started(self, req: RequestTrack) -> None:
        self.push(("inflight", {"operation": "upsert", "request": _request_entry(req)}))

    def request_granted(self, req: RequestTrack) -> None:
        self.push(("inflight", {"operation": "upsert", "request": _request_entry(req)}))

    def request_finished(self, req: RequestTrack) -> None:
        entry = _request_entry(req)
        entry["state"] = "done"
        entry["status"] = req.status
        self.push(("inflight", {"operation": "remove", "id": entry["id"], "request": entry}))
        ident = self._activity.record_id(req) if self._activity is not None else None
        if ident is not None:
            self.push(("activity", {"id": ident}))  # the client fetches the row itself

    def profile_changed(self, active: str | None) -> None:
        self.push(("profileChanged", {"active": active}))
        self.push(self.model_status())


def sse_frame(kind: str, data: Any) -> bytes:
    # llama-swap's envelope, data included as a JSON *string*, so its clients parse ours.
    envelope = json.dumps({"type": kind, "data": json.dumps(data, separators=(",", ":"))})
    return f"event: message\ndata: {envelope}\n\n".encode()


async def handle_events(request: web.Request) -> web.StreamResponse:
    app = request.app
    bus, runloop = app[EVENTS], app[RUNLOOP]
    feed = EventFeed(lambda: runloop.config, bus, app.get(ACTIVITY))
    config, logs = runloop.config, runloop.logs
    active = runloop.selection.active if runloop.selection.active in config.fleet.profiles else None
    # llama-swap's burst on connect: log history (swapper's own, then the children's), states,
    # the UI's settings, the active profile, the requests in flight.
    first = b"".join(
        [
            sse_frame("logData", {"source": "proxy", "data": _text(LogSource(SWAPPER).history(logs))}),
            sse_frame(
                "logData",
                {"source": UPSTREAM, "data": _text(LogSource(None, children_only=True).history(logs))},
            ),
            sse_frame(*feed.model_status()),
            sse_frame("uiConfig", {"activity": {"session_id": list(SESSION_ID_HEADERS)}}),
            sse_frame("profileChanged", {"active": active}),
            sse_frame(*feed.in_flight()),
        ]
    )
    resp = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",
        }
    )

    def render(frames: list[Frame], dropped: int) -> bytes:
        out = b"".join(sse_frame(kind, data) for kind, data in frames)
        if dropped:
            # The states in between are lost; a fresh modelStatus puts the client right again.
            out = f": {dropped} events dropped\n\n".encode() + out + sse_frame(*feed.model_status())
        return out

    return await _stream(request, resp, bus, feed, first, render, KEEPALIVE_SECONDS)


# ---- the shared streaming loop ----


async def _stream(
    request: web.Request,
    resp: web.StreamResponse,
    bus: EventBus,
    feed: Feed[T],
    first: bytes,
    render: Callable[[list[T], int], bytes],
    keepalive: float | None,
) -> web.StreamResponse:
    """Subscribes ``feed`` (before the first await), then writes until the client or server ends."""
    bus.subscribe(feed)
    try:
        await resp.prepare(request)
        if first:
            await resp.write(first)
        while (batch := await feed.wait_batch(keepalive)) is not None:
            if batch:
                await resp.write(render(batch, feed.take_dropped()))
            else:
                await resp.write(b": keep-alive\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left; nothing to finish
    finally:
        bus.unsubscribe(feed)
    return resp
