"""HTTP handlers: the inference routes' table, and the admin endpoints.

Owns: nothing mutable. A model request that reaches aiohttp has its body read here (bounded) and
is handed once to ``http.serve``, the same flow as the front door's: its model resolved, a
lease, the bytes forwarded, the answer relayed, the lease released in ``finally``. Admin routes
read the run loop's advisory snapshot or post messages to it; they never touch children or the
scheduler directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiohttp import hdrs, web

from swapper.config.kindroutes import KindRoute
from swapper.core.errors import Answer, BodyTooLarge, ModelNotFound, NotFound, SwapperError
from swapper.core.states import State
from swapper.http import cors, serve
from swapper.http.serve import answer_response as answer_response
from swapper.http.serve import error_response as error_response
from swapper.web.appkeys import CONFIG, MODEL_INFO, RUNLOOP, SESSION
from swapper.web.catalog import model_list

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
    # llama-server's own routes (its server.cpp route table)
    "/chat/completions",
    "/chat/completions/input_tokens",
    "/v1/chat/completions/input_tokens",
    "/responses",
    "/responses/input_tokens",
    "/v1/responses/input_tokens",
    "/audio/transcriptions",
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
    "/props",  # POST: change the server's props; ?model= names the model
    "/lora-adapters",
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
QUERY_ROUTES = ("/v1/audio/voices", "/sdapi/v1/loras", "/props", "/slots", "/lora-adapters")
# llama-server's routes with a parameter in the path; the model from ?model= (or the body).
PATTERN_ROUTES = ("/slots/{id_slot}",)  # POST ?action=save|restore|erase


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        raise BodyTooLarge(f"request body too large (limit {limit} bytes, maxBodyBytes)") from None


async def handle_model_request(request: web.Request) -> web.StreamResponse:
    """A model request that reached aiohttp (the front door serves most of them; see ``front``):
    its body read here, then served by ``http.serve``, the same flow as the front door's."""
    app = request.app
    runloop = app[RUNLOOP]
    if runloop.config.routes and (route := runloop.config.routes.match(request.path)) is not None:
        return await handle_kind_route(request, route)
    try:
        body = await read_body(request)
    except SwapperError as err:
        return error_response(err)
    return await serve.model_request(request, runloop, app[SESSION], body)


async def handle_kind_route(request: web.Request, route: KindRoute) -> web.StreamResponse:
    """A request on a ``routes:`` path (``serve.routed``)."""
    app = request.app
    try:
        body = await read_body(request)
    except SwapperError as err:
        return error_response(err)
    return await serve.routed(request, app[RUNLOOP], app[SESSION], route, body)


def _cors(app: web.Application, origin: str | None) -> tuple[tuple[str, str], ...]:
    """A page may read swapper's own answers cross-origin, as llama-server's."""
    allowed = cors.allow_origin(app[RUNLOOP].config.cors_origins, origin)
    if allowed is None:
        return ()
    if allowed == "*":
        return (("Access-Control-Allow-Origin", allowed),)
    return (("Access-Control-Allow-Origin", allowed), ("Vary", "Origin"))


def health_answer(app: web.Application, origin: str | None) -> Answer:
    return Answer(200, b"OK", "text/plain", "utf-8", headers=_cors(app, origin))


_HEALTHZ: Final = Answer(200, b'{"status": "ok"}', charset="utf-8")


def healthz_answer(app: web.Application, origin: str | None) -> Answer:
    """``GET /healthz``: swapper itself is up (the broker's liveness probe; says nothing of models)."""
    return _HEALTHZ


def models_answer(app: web.Application, origin: str | None) -> Answer:
    """``GET /v1/models`` (the front door serves it too)."""
    body = json.dumps(model_list(app[RUNLOOP], app.get(MODEL_INFO))).encode()
    return Answer(200, body, charset="utf-8", headers=_cors(app, origin))


# GETs whose whole answer is a function of the app's state (and the request's Origin), answered by
# the front door and by aiohttp from the same function.
ANSWERED_GETS: Final[Mapping[str, Callable[[web.Application, str | None], Answer]]] = {
    "/health": health_answer,
    "/v1/health": health_answer,
    "/healthz": healthz_answer,
    "/v1/models": models_answer,
    "/models": models_answer,
}


async def _handle_answered_get(request: web.Request) -> web.Response:
    answer = ANSWERED_GETS[request.path]
    return answer_response(answer(request.app, request.headers.get(hdrs.ORIGIN)))


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
                "cmd": cfg.cmd_raw or cfg.cmd_text,  # as the config wrote it (llama-swap's)
                "proxy": cfg.proxy,
                "ttl": int(cfg.ttl),
                "name": cfg.name,
                "description": cfg.description,
                "pid": snap.pid,
                "inFlight": st.in_flight,
                "queued": st.queued,
                "oldestWaitSeconds": None if st.oldest_wait is None else round(st.oldest_wait, 3),
                "service": runloop.service_status(mid),  # null: a child swapper spawned
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
        if method == hdrs.METH_GET:
            app.router.add_get(path, handler)  # and HEAD, as every GET route answers it
            known.setdefault(path, set()).add(hdrs.METH_HEAD)
        else:
            app.router.add_route(method, path, handler)
        known.setdefault(path, set()).add(method)

    for path in BODY_ROUTES:
        add("POST", path, handle_model_request)
    for path in QUERY_ROUTES:
        add("GET", path, handle_model_request)
    for path in PATTERN_ROUTES:
        add("POST", path, handle_model_request)
    for path in ANSWERED_GETS:
        add("GET", path, _handle_answered_get)
    add("GET", "/running", handle_running)
    add("GET", "/unload", handle_unload_all_get)
    add("POST", "/api/models/unload", handle_unload_all_post)
    add("POST", "/api/models/unload/{model:.+}", handle_unload_one)

    async def not_found(request: web.Request) -> web.StreamResponse:
        routes = request.app[RUNLOOP].config.routes  # read per request: a reload may change them
        if routes and (route := routes.match(request.path)) is not None:
            return await handle_kind_route(request, route)
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
