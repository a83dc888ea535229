"""HTTP handlers: the per-request flow, and the admin endpoints.

Owns: nothing mutable. A model request reads its body once (bounded), finds its model id, asks
the run loop for a lease, forwards the bytes, and always releases in ``finally``. Admin routes read
the run loop's advisory snapshot or post messages to it; they never touch children or the
scheduler directly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

from swapper import modelid, proxy, shaping
from swapper.config import Config, ModelConfig
from swapper.errors import (
    BodyTooLarge,
    ModelNotFound,
    ModelRequired,
    NotFound,
    SwapperError,
    error_body,
)
from swapper.events import track_request
from swapper.loading import LoadingStream, wait_with_preamble
from swapper.messages import Lease
from swapper.runloop import RunLoop
from swapper.scheduler import State

CONFIG = web.AppKey("config", Config)
RUNLOOP = web.AppKey("runloop", RunLoop)
SESSION = web.AppKey("session", aiohttp.ClientSession)

# Routes whose model comes from the body (JSON, multipart or urlencoded), or ?model= as fallback.
BODY_ROUTES = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/reranking",
    "/v1/audio/speech",
    "/v1/audio/voices",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/audioapi/v1/tasks/run",
    # llama-server's own routes
    "/chat/completions",
    "/completions",
    "/completion",
    "/infill",
    "/rerank",
    "/reranking",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/embedding",
    "/embeddings",
    # versionless aliases: forwarded without the /v prefix
    "/v/chat/completions",
    "/v/responses",
    "/v/completions",
    "/v/messages",
    "/v/messages/count_tokens",
    "/v/embeddings",
    "/v/rerank",
    "/v/reranking",
)
# Routes whose model comes from ?model=.
QUERY_ROUTES = ("/v1/audio/voices", "/sdapi/v1/loras", "/props", "/slots")


def error_response(err: SwapperError) -> web.Response:
    return web.Response(
        status=err.status,
        body=error_body(err),
        content_type="application/json",
        headers=err.headers,
    )


def upstream_path(path: str) -> str:
    if path.startswith("/v/"):
        return path[2:]
    if path.startswith("/audioapi/"):
        return path[len("/audioapi") :]
    return path


def choose_model(name: str | None, config: Config, runloop: RunLoop) -> str:
    """Maps the requested name (id or alias) to a model id, or picks one for a bare request.

    Clients written for a single llama-server often send no model at all: those go to
    ``defaultModel``, else to the only configured model, else to the only loaded one.
    """
    if name:
        model = config.resolve(name)
        if model is None:
            raise ModelNotFound(f"model '{name}' not found")
        return model
    if config.default_model is not None:
        return config.default_model
    if len(config.models) == 1:
        return next(iter(config.models))
    loaded = [
        m for m, snap in runloop.snapshot().items() if snap.status.state in (State.READY, State.STARTING)
    ]
    if len(loaded) == 1:
        return loaded[0]
    raise ModelRequired("no model in the request: send a 'model' field (or ?model=), or set defaultModel")


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        raise BodyTooLarge(f"request body too large (limit {limit} bytes, maxBodyBytes)") from None


async def handle_model_request(request: web.Request) -> web.StreamResponse:
    app = request.app
    runloop = app[RUNLOOP]
    config = runloop.config  # a reload replaces it; read it once per request
    try:
        body = await read_body(request)
        content_type = request.headers.get("Content-Type")
        wanted = modelid.extract(request.method, content_type, body, request.query)
        model = choose_model(wanted.model, config, runloop)
    except SwapperError as err:
        return error_response(err)
    cfg = config.models[model]
    req_id = runloop.new_request_id()
    track = track_request(request, req_id, model)  # metrics and /api/events; done() in finally
    preamble: LoadingStream | None = None
    lease: Lease | None = None
    raw_body = body
    try:
        if wanted.stream and wants_loading_state(config, cfg, request.path):
            preamble = LoadingStream(request, model, config.loading_state_mode)
            lease = await acquire_with_preamble(runloop, req_id, model, preamble)
            if not preamble.response.prepared:
                preamble = None  # served at once: the upstream's own headers go out
        else:
            lease = await runloop.acquire(req_id, model)
        track.granted()
        url, body = upstream_request(lease, cfg, wanted, content_type, raw_body, request.raw_path)
        response = preamble.response if preamble is not None else None

        async def retry() -> tuple[str, bytes]:
            # Its child died (the exit is not in yet) or stopped listening: restart it, try again.
            nonlocal lease
            assert lease is not None
            lease = await runloop.reacquire(lease)
            return upstream_request(lease, cfg, wanted, content_type, raw_body, request.raw_path)

        result = await proxy.forward(request, app[SESSION], url, body, response=response, on_refused=retry)
        track.forwarded(result.status, result.ttfb)
        return result.response
    except SwapperError as err:
        track.failed(err.status)
        if preamble is not None and preamble.response.prepared:
            await preamble.fail(err)
            return preamble.response
        return error_response(err)
    finally:
        runloop.release(req_id if lease is None else lease.req_id)
        track.done()


def upstream_request(
    lease: Lease,
    cfg: ModelConfig,
    wanted: modelid.RequestModel,
    content_type: str | None,
    body: bytes,
    raw_path: str,
) -> tuple[str, bytes]:
    """The URL and body to send upstream: the body shaped for the model (useModelName, filters),
    the URL from the client's raw path (its percent-encoding and query kept byte for byte)."""
    body = shaping.rewrite_body(
        content_type,
        body,
        model_name=cfg.use_model_name,
        filters=cfg.filters,
        requested=wanted.model or lease.model,
        is_json=wanted.is_json,
    )
    return lease.base_url + upstream_path(raw_path), body


def wants_loading_state(config: Config, cfg: ModelConfig, path: str) -> bool:
    """Status text as reasoning deltas only fits chat completions; comments fit any SSE."""
    if not cfg.send_loading_state:
        return False
    return config.loading_state_mode == "comments" or path.endswith("/chat/completions")


async def acquire_with_preamble(runloop: RunLoop, req_id: int, model: str, preamble: LoadingStream) -> Lease:
    """Acquires; if the request has to wait, streams status to the client meanwhile.

    Admission errors (429, 404) arrive before any byte is written, since the loop answers them
    while handling the Acquire, before it would report a wait.
    """
    waiting = asyncio.get_running_loop().create_future()

    def on_wait() -> None:
        if not waiting.done():
            waiting.set_result(None)

    lease = asyncio.ensure_future(runloop.acquire(req_id, model, on_wait=on_wait))
    try:
        await asyncio.wait({lease, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not lease.done():
            await wait_with_preamble(preamble, lease, lambda: runloop.queue_position(req_id))
        return await lease
    finally:
        lease.cancel()  # a no-op once done; otherwise the client left while we waited


async def handle_health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def handle_list_models(request: web.Request) -> web.Response:
    headers = {}
    if origin := request.headers.get("Origin"):
        headers["Access-Control-Allow-Origin"] = origin
    return web.json_response(model_list(request.app[RUNLOOP]), headers=headers)


def model_list(runloop: RunLoop) -> dict[str, Any]:
    """The body of ``GET /v1/models`` (also served by the front door, ``front``)."""
    config = runloop.config
    snapshot = runloop.snapshot()
    now = int(time.time())
    data: list[dict[str, Any]] = []
    for mid, cfg in config.models.items():
        if cfg.unlisted:
            continue
        loaded = snapshot[mid].status.state is not State.STOPPED
        record: dict[str, Any] = {
            "id": mid,
            "object": "model",
            "created": now,
            "owned_by": "swapper",
            "meta": {"swapper": {**cfg.metadata, "type": "model", "aliases": list(cfg.aliases)}},
            "status": {"value": "loaded" if loaded else "unloaded"},
        }
        if cfg.name.strip():
            record["name"] = cfg.name.strip()
        if cfg.description.strip():
            record["description"] = cfg.description.strip()
        data.append(record)
        if config.include_aliases_in_list:
            for alias in cfg.aliases:
                meta = {**record["meta"], "swapper": {"type": "alias", "modelID": mid}}
                data.append({**record, "id": alias, "meta": meta})
    data.sort(key=lambda r: str(r["id"]))
    return {"object": "list", "data": data}


async def handle_running(request: web.Request) -> web.Response:
    runloop = request.app[RUNLOOP]
    config = runloop.config
    running = []
    for mid, snap in sorted(runloop.snapshot().items()):
        st = snap.status
        if st.state is State.STOPPED and not st.queued:
            continue
        cfg = config.models.get(mid)
        if cfg is None:
            continue  # removed by a reload; stopping
        running.append(
            {
                "model": mid,
                "state": st.state.value,
                "cmd": cfg.cmd_text,
                "proxy": cfg.proxy,
                "ttl": int(cfg.ttl),
                "name": cfg.name,
                "description": cfg.description,
                "pid": snap.pid,
                "inFlight": st.in_flight,
                "queued": st.queued,
                "oldestWaitSeconds": None if st.oldest_wait is None else round(st.oldest_wait, 3),
            }
        )
    return web.json_response({"running": running})


async def handle_unload_all_get(request: web.Request) -> web.Response:
    await request.app[RUNLOOP].unload()
    return web.Response(text="OK")


async def handle_unload_all_post(request: web.Request) -> web.Response:
    await request.app[RUNLOOP].unload()
    return web.json_response({"msg": "ok"})


async def handle_unload_one(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    model = request.app[RUNLOOP].config.resolve(name)
    if model is None:
        return error_response(ModelNotFound(f"model '{name}' not found"))
    await request.app[RUNLOOP].unload([model])
    return web.Response(text="OK")


def add_routes(app: web.Application) -> None:
    known: dict[str, set[str]] = {}

    def add(method: str, path: str, handler: Any) -> None:
        app.router.add_route(method, path, handler)
        known.setdefault(path, set()).add(method)

    for path in BODY_ROUTES:
        add("POST", path, handle_model_request)
    for path in QUERY_ROUTES:
        add("GET", path, handle_model_request)
    add("GET", "/health", handle_health)
    add("GET", "/v1/models", handle_list_models)
    add("GET", "/models", handle_list_models)
    add("GET", "/running", handle_running)
    add("GET", "/unload", handle_unload_all_get)
    add("POST", "/api/models/unload", handle_unload_all_post)
    add("POST", "/api/models/unload/{model:.+}", handle_unload_one)

    async def not_found(request: web.Request) -> web.Response:
        methods = known.get(request.path)
        if methods:
            err = SwapperError(
                f"method {request.method} not allowed on {request.path}",
                status=405,
                code="method_not_allowed",
                headers={"Allow": ", ".join(sorted(methods))},
            )
            return error_response(err)
        return error_response(NotFound(f"no route for {request.method} {request.path}"))

    app.router.add_route("*", "/{tail:.*}", not_found)
