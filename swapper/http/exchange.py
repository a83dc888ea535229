"""One model request, from its parsed head and body to its release, whichever server received it.

The front door (``web.front``) and aiohttp's handlers (``serve`` for inference, the ``/upstream``
passthrough) each receive requests their own way and write answers their own way (straight on
the transport, or through an aiohttp response); everything between is this one flow:

    the model (``modelid`` reads its name, ``target`` maps it with the config or the selection)
    → shape the body for the model (at construction) → grant (``try_grant`` with no wait, or
    ``acquire``) → send (``send_now`` on an idle pooled connection with no await, or ``send``)
    → if the child refused the connection, restart it and send once more (``send``, the only
    place that retries) → the receiver relays the answer → ``finish`` gives back the lease, the
    upstream and the track.

``Exchange.open`` runs that flow for the front door as far as it goes with no wait, in one call:
the front door hands it the head and body, and hears back only to write the answer (its
``progress`` callback) or to end a cut request (``cut``).

Owns: what one request holds: its lease, its ``RequestTrack`` (metrics and ``/api/events``), and
the upstream connection or response. ``finish`` is idempotent and always runs once the request
ends, however it ends.

The run loop's ``Holder`` of the lease: ``cancel`` cuts the request when its model is stopped
under it (unload, reload): the task serving it is cancelled, or, for a request served with no
task, the receiver's ``cut`` callback ends it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import structlog
from yarl import URL

from swapper.config.schema import ModelConfig
from swapper.core.errors import (
    GatewayTimeout,
    ModelLoadFailed,
    ModelUnloaded,
    ShuttingDown,
    SwapperError,
    UpstreamError,
    UpstreamRefused,
)
from swapper.core.messages import Lease
from swapper.http import modelid, relay, shaping
from swapper.http.loading import wants_loading_state
from swapper.http.target import local_model, query_fields
from swapper.observe.events import EventBus, RequestTrack
from swapper.runtime.runloop import RunLoop
from swapper.wire.codec import RequestHead
from swapper.wire.h1pool import Connection, H1Pool, Response

__all__ = ["Exchange", "outcome_of", "upstream_path"]

log = structlog.get_logger("swapper.http.exchange")


def upstream_path(path: str) -> str:
    """The path a model route's request goes upstream on (the versionless ``/v/...`` forms and
    ``/audioapi/...`` lose their prefix)."""
    if path.startswith("/v/"):
        return path[2:]
    if path.startswith("/audioapi/"):
        return path[len("/audioapi") :]
    return path


class Exchange:
    """One model request in service (see the module docstring for the flow)."""

    __slots__ = (
        "body",
        "cfg",
        "cut",
        "finished",
        "headers",
        "lease",
        "method",
        "model",
        "out",
        "pool",
        "req_id",
        "runloop",
        "sent",
        "shape",
        "started",
        "target",
        "task",
        "track",
        "upstream",
        "url",
        "wanted",
        "content_type",
        "cut_error",
        "deadline",
        "gone",
        "head_timer",
    )

    def __init__(
        self,
        runloop: RunLoop,
        pool: H1Pool,
        *,
        model: str,
        cfg: ModelConfig,
        wanted: modelid.RequestModel | None,
        method: str,
        target: str,
        content_type: str | None,
        headers: bytes,
        body: bytes,
    ) -> None:
        """``target``: the path and query to send upstream, appended to the lease's base URL.
        ``wanted``: the model as the body named it, for shaping (None: the body goes verbatim,
        as ``/upstream`` sends it). ``headers``: the header lines to send (``relay.upstream_headers``).
        Raises ``BadRequest`` for a body that cannot be shaped for the model (before any grant:
        a request that cannot be sent loads nothing)."""
        self.runloop = runloop
        self.pool = pool
        self.model = model
        self.cfg = cfg
        self.wanted = wanted
        self.method = method
        self.target = target
        self.content_type = content_type
        self.headers = headers
        self.body = body
        self.req_id = runloop.new_request_id()
        self.lease: Lease | None = None
        self.track: RequestTrack  # set by the receiver (begin_track) before anything can finish it
        self.task: asyncio.Task[None] | None = None  # the task serving it, once it has one
        self.cut: Callable[[Exchange], None] | None = None  # ends it when it has no task
        self.sent: Connection | None = None  # sent with send_now, no response head yet
        self.upstream: Response | None = None
        self.url = _NO_URL
        # The body as it goes upstream.
        self.out = (
            body
            if wanted is None
            else shaping.rewrite_body(
                content_type,
                body,
                model_name=cfg.use_model_name,
                filters=cfg.filters,
                requested=wanted.model or model,
                is_json=wanted.is_json,
            )
        )
        self.started = 0.0  # perf_counter when it last went upstream
        self.finished = False
        # Why swapper cut it (set by ``cancel``): what its client is told, if it can still be.
        self.cut_error: SwapperError | None = None
        self.gone = False  # its client left
        # timeouts.request and timeouts.responseHeader, armed only when configured.
        self.deadline: asyncio.TimerHandle | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        if (limit := cfg.timeouts.request) > 0:
            err = GatewayTimeout(f"model {model!r}: no complete answer within {limit:g}s (timeouts.request)")
            self.deadline = asyncio.get_running_loop().call_later(limit, self.cancel, err)

    @classmethod
    def open(
        cls,
        runloop: RunLoop,
        pool: H1Pool,
        bus: EventBus,
        head: RequestHead,
        body: bytes,
        progress: Callable[[Exchange], None],
        cut: Callable[[Exchange], None],
    ) -> Exchange | None:
        """The front door's request, from its parsed head and body, as far as it goes with no wait.

        Resolved to its local model, shaped, granted and sent when the model can serve at once
        and a pooled connection is idle (then ``sent``; ``progress(ex)`` is called as the answer
        arrives); else it waits for its grant (``lease`` None) or a connection, in the receiver's
        task. ``finished`` already: sending failed (logged; the receiver closes the connection).
        None, with nothing held, when aiohttp's path must serve it: a name the selection resolves
        (pins, selectors, peers), an unknown name, a body that cannot be read or shaped, or a
        stream that must wait while ``sendLoadingState`` is on (aiohttp's path streams it).
        ``cut(ex)`` ends a request that has no task when its model is stopped under it.
        """
        config = runloop.config  # a reload replaces it; read it once per request
        try:
            query = query_fields(head.query) if head.query else {}
            wanted = modelid.extract(head.method, head.content_type, body, query)
            model = local_model(runloop, config, wanted)
            ex = cls(
                runloop,
                pool,
                model=model,
                cfg=config.models[model],
                wanted=wanted,
                method=head.method,
                target=upstream_path(head.target),
                content_type=head.content_type,
                headers=head.forwarded(),
                body=body,
            )
        except SwapperError:
            return None
        ex.cut = cut
        if not ex.try_grant():
            if wanted.stream and wants_loading_state(config, ex.cfg, head.path):
                ex.drop()
                return None
            ex.begin_track(bus, head.path, head.path)
            return ex
        try:
            ex.send_now(lambda: progress(ex))
        except Exception:
            log.exception("sending failed", path=head.path)
            ex.begin_track(bus, head.path, head.path)
            ex.finish()
            return ex
        # Tracked once the request is on its way upstream: the answer waits for none of this.
        ex.begin_track(bus, head.path, head.path).granted()
        return ex

    def drop(self) -> None:
        """Forgets a request that was never granted nor tracked (handed to another path)."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def begin_track(self, bus: EventBus, route: str, path: str) -> RequestTrack:
        self.track = bus.track(self.req_id, self.model, route, self.method, path)
        return self.track

    # ---- the lease ----

    def try_grant(self) -> bool:
        """Takes the lease if the model can serve at once (no message round trip), else False."""
        lease = self.runloop.try_acquire(self.req_id, self.model, self)
        if lease is None:
            return False
        self.granted(lease)
        return True

    async def acquire(self, on_wait: Callable[[], None] | None = None) -> Lease:
        """Waits for the lease (a load or a queue); ``granted`` it afterwards. A stop of the model
        cancels ``task`` (default: the calling task) through ``cancel``."""
        if self.task is None and self.cut is None:
            self.task = asyncio.current_task()
        return await self.runloop.acquire(self.req_id, self.model, on_wait=on_wait, holder=self)

    def granted(self, lease: Lease) -> None:
        """``lease`` is in hand: where the request goes follows from it (a reacquire's new one too)."""
        self.lease = lease
        self.req_id = lease.req_id
        self.url = _url(lease.base_url + self.target)

    # ---- sending ----

    def send_now(self, notify: Callable[[], None]) -> bool:
        """Sends on an idle pooled connection with no await (``H1Pool.send_now``); False, with
        nothing sent, if there is none."""
        self.started = time.perf_counter()
        self.sent = self.pool.send_now(self.method, self.url, self.headers, self.out, notify)
        if self.sent is None:
            return False
        self._arm_head_timer()
        return True

    async def send(self) -> Response:
        """Sends the request and returns the upstream's response head (also in ``upstream``).

        A child that refuses the connection died (its exit is not in yet) or stopped listening:
        nothing reached it, so it is restarted and the request sent once more.
        """
        self.started = time.perf_counter()
        connect = self.cfg.timeouts.connect
        self._arm_head_timer()
        try:
            upstream = await relay.send(self.pool, self.method, self.url, self.headers, self.out, connect)
        except UpstreamRefused:
            assert self.lease is not None
            self._disarm_head_timer()  # a restart is a load, not the child's answer time
            self.granted(await self.runloop.reacquire(self.lease, self))
            self.started = time.perf_counter()
            self._arm_head_timer()
            upstream = await relay.send(self.pool, self.method, self.url, self.headers, self.out, connect)
        self.answered(upstream, time.perf_counter())
        return upstream

    def answered(self, upstream: Response, arrived: float) -> None:
        """The upstream's response head came in at ``arrived`` (``time.perf_counter``)."""
        self._disarm_head_timer()
        self.upstream = upstream
        track = self.track
        track.content_type = upstream.reader.content_type
        if track.capture is not None:
            track.capture.response(upstream.status, upstream.raw_headers)
        track.forwarded(upstream.status, arrived - self.started)
        if upstream.streamed:
            upstream.do_not_pool()  # llama-server closes the connection after a streamed body

    def _arm_head_timer(self) -> None:
        limit = self.cfg.timeouts.response_header
        if limit > 0 and self.head_timer is None:
            err = GatewayTimeout(
                f"model {self.model!r} sent no response head within {limit:g}s (timeouts.responseHeader)"
            )
            self.head_timer = asyncio.get_running_loop().call_later(limit, self.cancel, err)

    def _disarm_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    # ---- the end ----

    def cancel(self, error: object = None) -> None:
        """The run loop cuts the request (its model is being stopped; ``error``, a
        ``SwapperError``, says why, default an unload): the receiver answers ``cut_error`` if
        nothing was sent yet, else ends the stream with it."""
        if self.cut_error is None and not self.gone:
            self.cut_error = (
                error
                if isinstance(error, SwapperError)
                else ModelUnloaded(
                    f"model {self.model!r} was stopped during the request (unload, reload or shutdown)"
                )
            )
        self._end()

    def client_left(self) -> None:
        """The client hung up: the request ends, unanswered."""
        if self.cut_error is None:
            self.gone = True
        self._end()

    def _end(self) -> None:
        if self.task is not None:
            self.task.cancel()
        elif not self.finished and self.cut is not None:
            self.cut(self)

    def finish(self) -> None:
        """Gives back the upstream connection, the lease and the track; idempotent."""
        if self.finished:
            return
        self.finished = True
        self._disarm_head_timer()
        if self.deadline is not None:
            self.deadline.cancel()
        if self.sent is not None:
            self.sent.abandon()  # the upstream learns that nobody waits for this answer
            self.sent = None
        if self.upstream is not None:
            self.upstream.close()  # back to the pool after a complete body; else closed
            self.upstream = None
        self.runloop.release(self.req_id)
        track = self.track
        if track.outcome is None:
            track.outcome = self._outcome()
        if track.capture is not None:
            track.capture.request(track.path, self.headers, self.body)
        track.done()

    def _outcome(self) -> str:
        if self.cut_error is not None:
            return outcome_of(self.cut_error)
        if self.gone or self.track.status is None:
            return "client_gone"
        return "ok"


def outcome_of(err: SwapperError) -> str:
    """The outcome (``events.OUTCOMES``) of a request answered or cut with ``err``."""
    if isinstance(err, (UpstreamError, ModelLoadFailed)):
        return "upstream_error"
    if isinstance(err, (ModelUnloaded, ShuttingDown)):
        return "cut"
    if err.status == 504:
        return "timeout"
    return "ok"  # a refusal (429, 503 queue full, 4xx): an answer, honestly given


_NO_URL = URL()


@functools.lru_cache(maxsize=1024)
def _url(url: str) -> URL:
    # A few distinct URLs (models × routes) recur for every request: parse each once.
    return URL(url, encoded=True)
