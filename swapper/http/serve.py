"""A model request that aiohttp received, served through the one flow: ``target.resolve``, then
a peer (``peers.forward``) or the ``Exchange`` (shape, acquire, with the loading state streamed
meanwhile when the client asked for it, send), and ``relay.relay`` writes the answer through
aiohttp; ``finish`` in ``finally``. The front door's requests take the same steps
(``Exchange.open``), answered on its own transport.

Owns: nothing mutable; each call owns its request. ``web.routes`` and ``web.upstream`` receive
the request, read its body, and hand it here once.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from swapper.config.kindroutes import KindRoute
from swapper.config.schema import Config
from swapper.core.errors import Answer, BadRequest, SwapperError, error_answer
from swapper.core.messages import Lease
from swapper.http import modelid, peers, relay
from swapper.http.exchange import Exchange, outcome_of, upstream_path
from swapper.http.loading import LoadingStream, wait_with_preamble, wants_loading_state
from swapper.http.target import Target, resolve
from swapper.observe.events import EVENTS, RequestTrack, track_request
from swapper.runtime.runloop import RunLoop

__all__ = ["answer_response", "error_response", "forward", "model_request", "passthrough", "routed"]


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


async def model_request(
    request: web.Request, runloop: RunLoop, session: aiohttp.ClientSession, body: bytes
) -> web.StreamResponse:
    """A model request on an inference route (the front door serves most of them; see
    ``web.front``). A name that is no local id or alias, or that the active profile pins, is
    resolved by the selection: profile pin, selector, local model, peer model."""
    config = runloop.config  # a reload replaces it; read it once per request
    target: Target | None = None
    try:
        content_type = request.headers.get("Content-Type")
        target = resolve(runloop, config, request.method, content_type, body, request.query)
        choice = target.choice
        if choice is not None and choice.peer is not None:
            return await peers.forward(
                request,
                body,
                content_type,
                target.wanted,
                config.fleet.peers[choice.peer.peer],
                choice.peer,
                choice.name,
                runloop.new_request_id(),
                selector=choice.selector,
            )
        return await _serve_local(request, runloop, session, config, target, content_type)
    except SwapperError as err:
        return error_response(err)
    finally:
        if target is not None:
            target.release()


async def _serve_local(
    request: web.Request,
    runloop: RunLoop,
    session: aiohttp.ClientSession,
    config: Config,
    target: Target,
    content_type: str | None,
) -> web.StreamResponse:
    model, wanted = target.model, target.wanted
    cfg = config.models[model]
    ex = Exchange(
        runloop,
        relay.pool_of(session),
        model=model,
        cfg=cfg,
        wanted=wanted,
        method=request.method,
        target=upstream_path(request.raw_path),
        content_type=content_type,
        headers=relay.upstream_headers(request.raw_headers, identity=False),
        body=target.body,
    )
    track = ex.track = track_request(request, ex.req_id, model)
    track.selector = target.choice.selector if target.choice is not None else None
    preamble = None
    if wanted.stream and wants_loading_state(config, cfg, request.path):
        preamble = LoadingStream(request, model, config.loading_state_mode)
    return await forward(request, ex, track, preamble)


async def routed(
    request: web.Request, runloop: RunLoop, session: aiohttp.ClientSession, route: KindRoute, body: bytes
) -> web.StreamResponse:
    """A request on a ``routes:`` path: its model is the route's, whatever the body says; it goes
    upstream on the route's path and method (``swapper.config.kindroutes``), through the same lease,
    queue, limits and metrics as any model request."""
    content_type = request.headers.get("Content-Type")
    try:
        read = modelid.extract(request.method, content_type, body, request.query)
        # Shaped for the route's model (its filters, useModelName), never re-routed by the body.
        wanted: modelid.RequestModel | None = modelid.RequestModel(None, read.stream, is_json=read.is_json)
    except BadRequest:
        wanted = None  # not JSON or a form swapper can read: the service judges its own body
    raw_path, _, query = request.raw_path.partition("?")
    try:
        ex = Exchange(
            runloop,
            relay.pool_of(session),
            model=route.model,
            cfg=runloop.config.models[route.model],
            wanted=wanted,
            method=route.method or request.method,
            target=route.target(raw_path, query),
            content_type=content_type,
            headers=relay.upstream_headers(request.raw_headers, identity=False),
            body=body,
        )
    except SwapperError as err:
        return error_response(err)
    bus = request.app.get(EVENTS)
    if bus is None:
        track = ex.track = track_request(request, ex.req_id, route.model)
    else:  # labelled by the route's path, not aiohttp's catch-all
        track = ex.track = bus.track(ex.req_id, route.model, route.path, request.method, request.path)
    return await forward(request, ex, track)


async def passthrough(
    request: web.Request,
    runloop: RunLoop,
    session: aiohttp.ClientSession,
    model: str,
    target: str,
    body: bytes,
) -> web.StreamResponse:
    """``/upstream/<model>/<target>``: the body and headers go to ``model``'s server untouched."""
    try:
        ex = Exchange(
            runloop,
            relay.pool_of(session),
            model=model,
            cfg=runloop.config.models[model],
            wanted=None,  # forwarded untouched
            method=request.method,
            target=target,
            content_type=request.headers.get("Content-Type"),
            headers=relay.upstream_headers(request.raw_headers, identity=False),
            body=body,
        )
    except SwapperError as err:
        return error_response(err)
    ex.track = track_request(request, ex.req_id, model)  # metrics and /api/events
    return await forward(request, ex, ex.track)


async def forward(
    request: web.Request, ex: Exchange, track: RequestTrack, preamble: LoadingStream | None = None
) -> web.StreamResponse:
    """Lease, send and relay. With ``preamble``, the loading state streams while the model loads
    and the answer follows on the same response; without, the body goes as swapper shaped it, or
    as it came (``/upstream``, kind routes)."""
    relaying = False
    try:
        if preamble is not None:
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
        return await _failed(track, err, preamble)
    except asyncio.CancelledError:
        if (cut := _cut_before_answer(ex, relaying)) is None:
            raise
        return await _failed(track, cut, preamble)
    finally:
        ex.finish()


async def _failed(
    track: RequestTrack, err: SwapperError, preamble: LoadingStream | None
) -> web.StreamResponse:
    """The answer to a request that failed before its upstream answered: an error response, or the
    loading stream's error event when its headers are already out."""
    track.failed(err.status, outcome_of(err))
    if preamble is not None and preamble.response.prepared:
        await preamble.fail(err)
        return preamble.response
    return error_response(err)


def _cut_before_answer(ex: Exchange, relaying: bool) -> SwapperError | None:
    """Why the handler's task was cancelled, when a stop of its model did it before the upstream's
    answer began (the cancellation is withdrawn: the handler answers with it instead); None when
    the cancellation must go on (the client left, or a relay under way, which can only drop the
    connection)."""
    if (cut := ex.cut_error) is None or relaying or (task := asyncio.current_task()) is None:
        return None
    task.uncancel()
    return cut


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
