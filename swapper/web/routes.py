"""HTTP handlers: the per-request flow, and the admin endpoints.

Owns: nothing mutable. A model request reads its body once (bounded), finds its model id, asks
the run loop for a lease, forwards the bytes, and always releases in ``finally``. Admin routes read
the run loop's advisory snapshot or post messages to it; they never touch children or the
scheduler directly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import hdrs, web

from swapper.config.kindroutes import KindRoute
from swapper.config.schema import Config, Filters, ModelConfig
from swapper.core.errors import (
    Answer,
    BadRequest,
    BodyTooLarge,
    ModelNotFound,
    ModelRequired,
    NotFound,
    SwapperError,
    error_answer,
)
from swapper.core.messages import Lease
from swapper.core.states import State
from swapper.http import cors, modelid, peers, relay, shaping
from swapper.http.exchange import Exchange, outcome_of, upstream_path
from swapper.http.loading import LoadingStream, wait_with_preamble
from swapper.observe.events import EVENTS, RequestTrack, track_request
from swapper.observe.modelinfo import ModelInfo
from swapper.runtime.runloop import RunLoop
from swapper.web.catalog import model_list

NO_FILTERS = Filters()
CONFIG = web.AppKey("config", Config)
RUNLOOP = web.AppKey("runloop", RunLoop)
SESSION = web.AppKey("session", aiohttp.ClientSession)
MODEL_INFO = web.AppKey("model_info", ModelInfo)

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


def error_response(err: SwapperError) -> web.Response:
    return answer_response(error_answer(err))


def answer_response(answer: Answer) -> web.Response:
    """``answer`` as aiohttp's response (the front door writes the same bytes itself)."""
    return web.Response(
        status=answer.status,
        body=answer.body,
        content_type=answer.content_type,
        charset=answer.charset,
        headers=answer.headers,
    )


def choose_model(name: str | None, config: Config, runloop: RunLoop) -> str:
    """Maps the requested name (id or alias) to a model id, or picks one for a bare request.

    Clients written for a single llama-server often send no model at all: those go to
    ``defaultModel``, else to the only configured model, else to the only loaded one. They also
    send names llama-server ignores (``gpt-3.5-turbo``): an unknown name goes to the only
    configured model, or to ``defaultModel`` with ``routeUnknownModels``; otherwise it is a 404
    that lists the ids there are.
    """
    if name:
        model = config.resolve(name)
        if model is not None:
            return model
        if len(config.models) == 1:
            return next(iter(config.models))
        if config.route_unknown_models and config.default_model is not None:
            return config.default_model
        raise ModelNotFound(f"model '{name}' not found; models: {', '.join(listed_ids(config))}")
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


def listed_ids(config: Config) -> list[str]:
    """The ids ``/v1/models`` lists, sorted (what a 404 for an unknown name offers instead)."""
    return sorted(mid for mid, cfg in config.models.items() if not cfg.unlisted)


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_body_bytes
        raise BodyTooLarge(f"request body too large (limit {limit} bytes, maxBodyBytes)") from None


async def handle_model_request(request: web.Request) -> web.StreamResponse:
    """A model request that reached aiohttp (the front door serves most of them; see ``front``).

    A name that is no local id or alias, or that the active profile pins, is resolved first
    (``selection``): profile pin, selector, local model, peer model.
    """
    app = request.app
    runloop = app[RUNLOOP]
    config = runloop.config  # a reload replaces it; read it once per request
    if config.routes and (route := config.routes.match(request.path)) is not None:
        return await handle_kind_route(request, route)
    choice = None
    try:
        body = await read_body(request)
        content_type = request.headers.get("Content-Type")
        wanted = modelid.extract(request.method, content_type, body, request.query)
        name = wanted.model
        if name and runloop.selection.wants_choice(name, config):
            states = {m: snap.status.state for m, snap in runloop.snapshot().items()}
            choice = runloop.selection.choose(name, config, states)
            if choice.peer is not None:
                peer = config.fleet.peers[choice.peer.peer]
                return await peers.forward(
                    request,
                    body,
                    content_type,
                    wanted,
                    peer,
                    choice.peer,
                    choice.name,
                    runloop.new_request_id(),
                    selector=choice.selector,
                )
            if choice.name != name:  # the client's name for it is a pin or a selector
                body = shaping.rewrite_body(
                    content_type, body, model_name=choice.name, filters=NO_FILTERS, requested=name
                )
                wanted = modelid.extract(request.method, content_type, body, request.query)
        model = choice.local if choice is not None and choice.local else choose_model(name, config, runloop)
        selector = choice.selector if choice is not None else None
        return await _serve_local(request, runloop, config, model, wanted, body, content_type, selector)
    except SwapperError as err:
        return error_response(err)
    finally:
        if choice is not None:
            choice.release()


async def _serve_local(
    request: web.Request,
    runloop: RunLoop,
    config: Config,
    model: str,
    wanted: modelid.RequestModel,
    body: bytes,
    content_type: str | None,
    selector: str | None = None,
) -> web.StreamResponse:
    app = request.app
    cfg = config.models[model]
    ex = Exchange(
        runloop,
        relay.pool_of(app[SESSION]),
        model=model,
        cfg=cfg,
        wanted=wanted,
        method=request.method,
        target=upstream_path(request.raw_path),
        content_type=content_type,
        headers=relay.upstream_headers(request.raw_headers, identity=False),
        body=body,
    )
    track = ex.track = track_request(request, ex.req_id, model)
    track.selector = selector
    preamble: LoadingStream | None = None
    relaying = False
    try:
        if wanted.stream and wants_loading_state(config, cfg, request.path):
            preamble = LoadingStream(request, model, config.loading_state_mode)
            ex.granted(await acquire_with_preamble(ex, preamble))
            if preamble.response.prepared:
                # Its headers are out and carry no Content-Encoding: ask for an unencoded body.
                ex.headers = relay.upstream_headers(request.raw_headers, identity=True)
            else:
                preamble = None  # served at once: the upstream's own headers go out
        else:
            ex.granted(await ex.acquire())
        track.granted()
        upstream = await ex.send()
        relaying = True
        relayed = await relay.relay(request, upstream, preamble.response if preamble else None, track.capture)
        track.tail = relayed.tail
        if relayed.broken:
            track.outcome = "upstream_error"
        return relayed.response
    except SwapperError as err:
        track.failed(err.status, outcome_of(err))
        if preamble is not None and preamble.response.prepared:
            await preamble.fail(err)
            return preamble.response
        return error_response(err)
    except asyncio.CancelledError:
        if (cut := _cut_before_answer(ex, relaying)) is None:
            raise
        track.failed(cut.status, outcome_of(cut))
        if preamble is not None and preamble.response.prepared:
            await preamble.fail(cut)
            return preamble.response
        return error_response(cut)
    finally:
        ex.finish()


async def handle_kind_route(request: web.Request, route: KindRoute) -> web.StreamResponse:
    """A request on a ``routes:`` path: its model is the route's, whatever the body says; it goes
    upstream on the route's path and method (``swapper.config.kindroutes``), through the same lease,
    queue, limits and metrics as any model request."""
    app = request.app
    runloop = app[RUNLOOP]
    try:
        body = await read_body(request)
    except SwapperError as err:
        return error_response(err)
    content_type = request.headers.get("Content-Type")
    try:
        read = modelid.extract(request.method, content_type, body, request.query)
        # Shaped for the route's model (its filters, useModelName), never re-routed by the body.
        wanted: modelid.RequestModel | None = modelid.RequestModel(None, read.stream, is_json=read.is_json)
    except BadRequest:
        wanted = None  # not JSON or a form swapper can read: the service judges its own body
    raw_path, _, query = request.raw_path.partition("?")
    ex = Exchange(
        runloop,
        relay.pool_of(app[SESSION]),
        model=route.model,
        cfg=runloop.config.models[route.model],
        wanted=wanted,
        method=route.method or request.method,
        target=route.target(raw_path, query),
        content_type=content_type,
        headers=relay.upstream_headers(request.raw_headers, identity=False),
        body=body,
    )
    bus = app.get(EVENTS)
    if bus is None:
        track = ex.track = track_request(request, ex.req_id, route.model)
    else:  # labelled by the route's path, not aiohttp's catch-all
        track = ex.track = bus.track(ex.req_id, route.model, route.path, request.method, request.path)
    return await relay_plain(request, ex, track)


async def relay_plain(request: web.Request, ex: Exchange, track: RequestTrack) -> web.StreamResponse:
    """Lease, send and relay with no loading preamble: requests whose body swapper forwards as
    it is (``/upstream``, kind routes)."""
    relaying = False
    try:
        ex.granted(await ex.acquire())
        track.granted()
        upstream = await ex.send()
        relaying = True
        relayed = await relay.relay(request, upstream, capture=track.capture)
        track.tail = relayed.tail
        if relayed.broken:
            track.outcome = "upstream_error"
        return relayed.response
    except SwapperError as err:
        track.failed(err.status, outcome_of(err))
        return error_response(err)
    except asyncio.CancelledError:
        if (cut := _cut_before_answer(ex, relaying)) is None:
            raise
        track.failed(cut.status, outcome_of(cut))
        return error_response(cut)
    finally:
        ex.finish()


def _cut_before_answer(ex: Exchange, relaying: bool) -> SwapperError | None:
    """Why the handler's task was cancelled, when a stop of its model did it before the upstream's
    answer began (the cancellation is withdrawn: the handler answers with it instead); None when
    the cancellation must go on (the client left, or a relay under way, which can only drop the
    connection)."""
    if (cut := ex.cut_error) is None or relaying or (task := asyncio.current_task()) is None:
        return None
    task.uncancel()
    return cut


def wants_loading_state(config: Config, cfg: ModelConfig, path: str) -> bool:
    """Status text as reasoning deltas only fits chat completions; comments fit any SSE."""
    if not cfg.send_loading_state:
        return False
    return config.loading_state_mode == "comments" or path.endswith("/chat/completions")


async def acquire_with_preamble(ex: Exchange, preamble: LoadingStream) -> Lease:
    """Acquires; if the request has to wait, streams status to the client meanwhile.

    Admission errors (429, 404) arrive before any byte is written, since the loop answers them
    while handling the Acquire, before it would report a wait.
    """
    waiting = asyncio.get_running_loop().create_future()

    def on_wait() -> None:
        if not waiting.done():
            waiting.set_result(None)

    ex.task = asyncio.current_task()  # cut by a stop of the model, not the acquiring task below
    lease = asyncio.ensure_future(ex.acquire(on_wait=on_wait))
    try:
        await asyncio.wait({lease, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not lease.done():
            await wait_with_preamble(preamble, lease, lambda: ex.runloop.queue_position(ex.req_id))
        return await lease
    finally:
        lease.cancel()  # a no-op once done; otherwise the client left while we waited


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
