"""llama-swap's UI API, and what swapper's own UI needs beside it.

Routes (llama-swap's shapes where it has the same route; docs/operations.md lists the
differences):

* ``GET /api/version``: ``{"version", "commit", "build_date"}``.
* ``GET /api/metrics``: every record of the activity log, oldest first (llama-swap's entry shape,
  plus ``method``, ``queue_wait_ms`` and ``ttfb_ms``).
* ``GET /api/metrics/activity``: the same records, filtered, sorted and paged as llama-swap does
  (``model``, ``min_id``, ``max_id``, ``limit``, ``page``, ``sort``, ``order``).
* ``GET /api/captures/{id}``: one captured exchange (``captureBuffer``).
* ``POST /api/models/load/{model}``: loads a model (id or alias) through the run loop like any
  request, and answers once it is ready (swapper's own; llama-swap's UI loads through
  ``/upstream/<model>/``, which any model's own ``/`` would have to answer).
* ``GET /api/routing``: the planner in use and its groups, matrix or memory settings.

Owns: the app's ``activity.ActivityLog`` (made and subscribed to the bus in ``add_routes``, when
``metricsMaxInMemory`` is not 0). Everything else is read from the config or the log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from swapper import __version__
from swapper.core.errors import BadRequest, ModelNotFound, NotFound, SwapperError
from swapper.observe.activity import ACTIVITY, ActivityLog, Record
from swapper.observe.events import EVENTS
from swapper.web.appkeys import CONFIG, RUNLOOP
from swapper.web.routes import error_response

__all__ = ["add_routes"]

MAX_PAGE: Final = 999  # llama-swap's limit on ``limit``
DEFAULT_PAGE: Final = 25
# llama-swap's sort keys, each as a key on a record.
_SORTS: Final[dict[str, Callable[[Record], Any]]] = {
    "id": lambda r: r.id,
    "time": lambda r: r.at,
    "model": lambda r: r.model,
    "req_path": lambda r: r.path,
    "resp_status_code": lambda r: r.status or 0,
    "resp_content_type": lambda r: r.content_type,
    "cached": lambda r: r.tokens.cached,
    "prompt": lambda r: r.tokens.input,
    "generated": lambda r: r.tokens.output,
    "drafted": lambda r: r.tokens.draft,
    "prompt_speed": lambda r: r.tokens.prompt_per_second,
    "gen_speed": lambda r: r.tokens.tokens_per_second,
    "duration": lambda r: r.duration,
}


def add_routes(app: web.Application) -> None:
    """Makes the activity log (on the app's bus, made by ``admin``) and adds the routes."""
    cfg = app[CONFIG]
    if cfg.activity_records > 0:
        log = ActivityLog.make(cfg.activity_records, cfg.capture_bytes)
        app[EVENTS].subscribe(log)
        app[ACTIVITY] = log
    app.router.add_get("/api/version", handle_version)
    app.router.add_get("/api/metrics", handle_metrics)
    app.router.add_get("/api/metrics/activity", handle_activity)
    app.router.add_get("/api/captures/{id}", handle_capture)
    app.router.add_post("/api/models/load/{model:.+}", handle_load)
    app.router.add_get("/api/routing", handle_routing)


async def handle_version(request: web.Request) -> web.Response:
    # A wheel knows no commit or build date; llama-swap's clients read the keys, so they stay.
    return web.json_response({"version": __version__, "commit": "unknown", "build_date": "unknown"})


def _entries(log: ActivityLog | None, records: list[Record]) -> list[dict[str, Any]]:
    if log is None:
        return []
    return [r.as_json(log.has_capture(r.id)) for r in records]


async def handle_metrics(request: web.Request) -> web.Response:
    log = request.app.get(ACTIVITY)
    return web.json_response(_entries(log, log.records() if log else []))


def _int_param(request: web.Request, name: str, default: int, low: int, high: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"invalid {name}: '{raw}' is not a whole number") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}-{high}" if high is not None else f">= {low}"
        raise BadRequest(f"invalid {name}: {value} (allowed: {bounds})")
    return value


async def handle_activity(request: web.Request) -> web.Response:
    log = request.app.get(ACTIVITY)
    try:
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        page = _int_param(request, "page", 1, 1)
        min_id = _int_param(request, "min_id", 0, 0)
        max_id = _int_param(request, "max_id", 0, 0)
        sort = request.query.get("sort", "id")
        order = request.query.get("order", "desc")
        if sort not in _SORTS:
            raise BadRequest(f"invalid sort '{sort}' (allowed: {', '.join(_SORTS)})")
        if order not in ("asc", "desc"):
            raise BadRequest(f"invalid order '{order}' (allowed: asc, desc)")
    except SwapperError as err:
        return error_response(err)
    models = set(request.query.getall("model", []))
    records = [
        r
        for r in (log.records() if log else [])
        if (not models or r.model in models) and r.id >= min_id and (not max_id or r.id <= max_id)
    ]
    records.sort(key=_SORTS[sort], reverse=order == "desc")
    total = len(records)
    chosen = records[(page - 1) * limit : page * limit]
    return web.json_response(
        {
            "data": _entries(log, chosen),
            "page": page,
            "limit": limit,
            "total": total,
            "total_pages": (total + limit - 1) // limit,
        }
    )


async def handle_capture(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    try:
        ident = int(raw)
    except ValueError:
        return error_response(BadRequest(f"invalid capture id '{raw}'"))
    log = request.app.get(ACTIVITY)
    if log is None or log.captures is None:
        return error_response(NotFound("captures are off: set captureBuffer (MB) to keep them"))
    capture = log.captures.get(ident)
    if capture is None:
        return error_response(NotFound(f"capture {ident} not found"))
    return web.json_response(capture.as_json(ident))


async def handle_load(request: web.Request) -> web.Response:
    runloop = request.app[RUNLOOP]
    name = request.match_info["model"]
    model = runloop.config.resolve(name)
    if model is None:
        return error_response(ModelNotFound(f"model '{name}' not found"))
    req_id = runloop.new_request_id()
    try:
        await runloop.acquire(req_id, model)
    except SwapperError as err:
        return error_response(err)
    finally:
        runloop.release(req_id)  # loaded, not in use: it stays up like after any request
    return web.json_response({"msg": "ok", "model": model})


async def handle_routing(request: web.Request) -> web.Response:
    config = request.app[RUNLOOP].config
    routing = config.routing
    body: dict[str, Any] = {"use": routing.use}
    if routing.use == "group":
        body["groups"] = [dataclasses.asdict(g) for g in routing.groups]
    elif routing.use == "matrix" and routing.matrix is not None:
        matrix = routing.matrix
        body["matrix"] = {
            "vars": dict(matrix.vars),
            "evict_costs": dict(matrix.evict_costs),
            "sets": [{"name": name, "dsl": dsl} for name, dsl in matrix.sets],
        }
    else:
        body["memory"] = dataclasses.asdict(routing.memory)
    return web.json_response(body)
