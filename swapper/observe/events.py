"""Facts the run loop and the request handlers report, fanned out to whoever listens.

Owns: the observers, the model states last announced, and the requests in flight (the snapshot
a new ``/api/events`` client starts from). The publishers are the run loop (model states, child
starts and exits), the model-request handler (one ``RequestTrack`` per request) and ``LogHub``
(every log line); the observers are ``metrics.Metrics`` and one ``Feed`` per open log or event
stream.

Concurrency contract: everything runs on the event loop's thread, and every method is sync and
cheap, because the run loop calls in from its handlers, which never await. An observer must be
cheap too: bump a counter or append to a bounded buffer; never await, block, log, or call back
into the run loop. An observer that raises is dropped (then logged, so that its own log line
cannot reach it), so a bug in metrics or in one stream can never take the run loop down.

Model states are announced once per run-loop message (``sync_states`` after each one), the same
granularity as the loop's snapshot: a model that changes state twice within one message (a start
that fails and is retried in the same drain) is announced once, from the state before to the
state after.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import structlog
from aiohttp import web

from swapper.core.phases import SwapTimeline
from swapper.core.states import State

if TYPE_CHECKING:
    from swapper.observe.capture import Capture

log = logging.getLogger("swapper.observe.events")
swap_log = structlog.get_logger("swapper.swaps")

T = TypeVar("T")


# How a request ended: answered whole (whatever its status), its client left first, swapper cut
# it (the model stopped under it: unload, reload, shutdown, a hang), the upstream failed it
# (refused, died, broke mid-answer, failed to load), or a deadline (``timeouts``) ran out.
OUTCOMES: Final = ("ok", "client_gone", "cut", "upstream_error", "timeout")


class RequestTrack:
    """One model request, from routing to its response, as the handler reports it.

    Holds ids, the matched route template and timings only: never headers, query or body, so
    nothing here can leak a key or a prompt to an event stream. Two exceptions that no stream
    sends: ``tail``, the answer's last bytes, where ``activity`` finds its token counts, and
    ``capture``, a whole exchange kept only when ``captureBuffer`` asks for it.
    """

    __slots__ = (
        "_bus",
        "at",
        "capture",
        "content_type",
        "method",
        "model",
        "outcome",
        "path",
        "req_id",
        "route",
        "selector",
        "started",
        "status",
        "tail",
        "ttfb",
        "waited",
    )

    def __init__(self, bus: EventBus, req_id: int, model: str, route: str, method: str, path: str) -> None:
        self._bus = bus
        self.req_id = req_id
        self.model = model
        self.route = route  # the route's path template: bounded, unlike the path
        self.method = method
        self.path = path
        self.at = time.time()
        self.started = time.perf_counter()
        self.waited: float | None = None  # acquire -> lease in hand
        self.ttfb: float | None = None  # arrival -> upstream response headers (wait included)
        self.status: int | None = None  # None: the client left before an answer
        # How it ended (``OUTCOMES``), set by whoever knows: a 2xx head then a cut stream is
        # not a success. None until then; ``Exchange.finish`` settles it.
        self.outcome: str | None = None
        self.content_type = b""  # the upstream answer's, once forwarded
        self.tail = b""  # the answer's last bytes (activity.TAIL at most), set by the relay
        self.capture: Capture | None = None  # set by activity.ActivityLog when captures are on
        self.selector: str | None = None  # the selector that chose its model, if one did

    def granted(self) -> None:
        """The run loop granted the lease: the request stops waiting and goes upstream."""
        self.waited = time.perf_counter() - self.started
        self._bus._request_granted(self)

    def forwarded(self, status: int, upstream_ttfb: float) -> None:
        """The upstream's response head came, ``upstream_ttfb`` seconds after it was sent."""
        self.status = status
        if self.waited is not None:
            self.ttfb = self.waited + upstream_ttfb
        if self._bus._first_bytes:  # a swap waits for its first byte relayed
            self._bus._request_forwarded(self)

    def failed(self, status: int, outcome: str | None = None) -> None:
        self.status = status
        if outcome is not None:
            self.outcome = outcome

    def done(self) -> None:
        """Call exactly once, in ``finally``."""
        self._bus._request_done(self)


class Observer:
    """What the bus reports; every hook is a no-op here, subclasses override what they use."""

    def model_state(self, model: str, old: State, new: State) -> None:
        pass

    def child_ready(self, model: str, load_seconds: float) -> None:
        """A start attempt passed its health check, ``load_seconds`` after the spawn began."""

    def child_start_failed(self, model: str, error: str) -> None:
        """A start attempt ended without a healthy child (exit, health timeout, spawn error)."""

    def child_exited(self, model: str, pid: int, returncode: int) -> None:
        """A ready child exited without being asked to."""

    def child_unreachable(self, model: str, pid: int) -> None:
        """A ready child refused connections (dead with its exit not yet seen, or no longer
        listening) and is being restarted: a failure like ``child_exited``, reported instead of it."""

    def hang_probed(self, model: str, pid: int, failure: str | None) -> None:
        """A silent ready child was probed (``hang``): ``failure`` None means alive."""

    def child_hung(self, model: str, pid: int, why: str) -> None:
        """A ready child was found hung (``hang``) and is being killed: a failure like
        ``child_exited``, reported instead of it."""

    def swap_timed(self, timeline: SwapTimeline) -> None:
        """A swap is complete: its first byte was relayed, or its model left ``ready`` first."""

    def request_started(self, req: RequestTrack) -> None:
        pass

    def request_granted(self, req: RequestTrack) -> None:
        pass

    def request_finished(self, req: RequestTrack) -> None:
        pass

    def log_line(self, source: str, line: str) -> None:
        pass

    def profile_changed(self, active: str | None) -> None:
        """``PUT /api/profiles/active`` switched the active profile (None: none)."""

    def closed(self) -> None:
        """The bus closed (server shutdown): streams end now."""


_HOOKS: Final = (
    "model_state",
    "child_ready",
    "child_start_failed",
    "child_exited",
    "child_unreachable",
    "hang_probed",
    "child_hung",
    "swap_timed",
    "request_started",
    "request_granted",
    "request_finished",
    "log_line",
    "profile_changed",
    "closed",
)


class EventBus:
    """The fan-out. ``subscribe`` observers; the publishers call the other methods."""

    def __init__(self) -> None:
        self._observers: tuple[Observer, ...] = ()
        # hook name -> the bound hooks of the observers that override it. Tuples, rebuilt on
        # (rare) changes, so that publishing iterates without copying, an observer may
        # unsubscribe while being notified, and a fact nobody listens to (most request facts,
        # with no event stream open) costs a dict lookup: this runs several times per request.
        self._hooks: dict[str, tuple[Callable[..., None], ...]] = dict.fromkeys(_HOOKS, ())
        self._states: dict[str, State] = {}
        self._in_flight: dict[int, RequestTrack] = {}
        self._first_bytes: dict[str, SwapTimeline] = {}  # model -> its swap, until a first byte
        self._closed = False

    def subscribe(self, observer: Observer) -> None:
        if self._closed:
            observer.closed()
            return
        self._set_observers((*self._observers, observer))

    def unsubscribe(self, observer: Observer) -> None:
        self._set_observers(tuple(o for o in self._observers if o is not observer))

    def _set_observers(self, observers: tuple[Observer, ...]) -> None:
        self._observers = observers
        self._hooks = {
            hook: tuple(
                getattr(o, hook) for o in observers if getattr(type(o), hook) is not getattr(Observer, hook)
            )
            for hook in _HOOKS
        }

    def close(self) -> None:
        self._closed = True
        self._notify("closed")

    def states(self) -> Mapping[str, State]:
        """Each model's state as of the last run-loop message (empty before the first)."""
        return dict(self._states)

    def in_flight(self) -> list[RequestTrack]:
        return list(self._in_flight.values())

    # ---- publishers ----

    def sync_states(self, states: Mapping[str, State]) -> None:
        """The run loop's view after one message; announces every model whose state changed.

        Observers read ``states()`` as it is after the whole message.
        """
        if states == self._states:
            return  # most messages change no state; one C-level compare says so
        previous, self._states = self._states, dict(states)
        for model, new in states.items():
            old = previous.get(model, State.STOPPED)
            if new is not old:
                if new is not State.READY and model in self._first_bytes:
                    self._swap_done(self._first_bytes.pop(model))  # no request came in time
                self._announce(model, old, new)

    def _announce(self, model: str, old: State, new: State) -> None:
        self._notify("model_state", model, old, new)

    def child_ready(self, model: str, load_seconds: float) -> None:
        self._notify("child_ready", model, load_seconds)

    def child_start_failed(self, model: str, error: str) -> None:
        self._notify("child_start_failed", model, error)

    def child_exited(self, model: str, pid: int, returncode: int) -> None:
        self._notify("child_exited", model, pid, returncode)

    def child_unreachable(self, model: str, pid: int) -> None:
        self._notify("child_unreachable", model, pid)

    def hang_probed(self, model: str, pid: int, failure: str | None) -> None:
        self._notify("hang_probed", model, pid, failure)

    def child_hung(self, model: str, pid: int, why: str) -> None:
        self._notify("child_hung", model, pid, why)

    def swap_ready(self, timeline: SwapTimeline) -> None:
        """The run loop granted the requests waiting on a swap; its first byte relayed (the
        first forwarded response of its model) completes it."""
        if (earlier := self._first_bytes.pop(timeline.model, None)) is not None:
            self._swap_done(earlier)
        self._first_bytes[timeline.model] = timeline

    def track(self, req_id: int, model: str, route: str, method: str, path: str) -> RequestTrack:
        """Starts tracking one request; its handler must call ``done()`` in ``finally``."""
        req = RequestTrack(self, req_id, model, route, method, path)
        self._in_flight[req_id] = req
        self._notify("request_started", req)
        return req

    def log_lines(self, source: str, lines: list[str]) -> None:
        """``LogHub``'s listener: each line is a ``log_line`` fact (free while nobody listens)."""
        if self._hooks["log_line"]:
            for line in lines:
                self._notify("log_line", source, line)

    def profile_changed(self, active: str | None) -> None:
        self._notify("profile_changed", active)

    def _request_granted(self, req: RequestTrack) -> None:
        self._notify("request_granted", req)

    def _request_forwarded(self, req: RequestTrack) -> None:
        timeline = self._first_bytes.pop(req.model, None)
        if timeline is None:
            return
        at = time.monotonic()
        if req.ttfb is not None:  # when the head came, which may be a whole body ago (web/routes.py)
            at -= time.perf_counter() - (req.started + req.ttfb)
        timeline.mark("first_byte", at)
        self._swap_done(timeline)

    def _swap_done(self, timeline: SwapTimeline) -> None:
        swap_log.debug("swap phases", model=timeline.model, phases_ms=timeline.describe())
        self._notify("swap_timed", timeline)

    def _request_done(self, req: RequestTrack) -> None:
        if self._in_flight.pop(req.req_id, None) is not None:
            self._notify("request_finished", req)

    def _notify(self, hook: str, *args: object) -> None:
        for call in self._hooks[hook]:
            try:
                call(*args)
            except Exception:
                observer = call.__self__  # type: ignore[attr-defined]  # a bound method
                self.unsubscribe(observer)
                log.exception("event observer %r failed and was dropped", observer)


class Feed(Observer, Generic[T]):
    """One stream's bounded backlog, filled by bus hooks and drained by the stream's handler.

    When the reader falls ``limit`` items behind, the oldest are dropped and counted, so a slow
    client costs a bounded amount of memory and never slows a publisher (a child's stdout, the
    run loop). Make it in the task that drains it.
    """

    def __init__(self, limit: int) -> None:
        self._items: deque[T] = deque(maxlen=limit)
        self._wake = asyncio.Event()
        self._closed = False
        self._dropped = 0
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()

    def push(self, item: T) -> None:
        if threading.get_ident() != self._thread:
            # A log line from a worker thread (anything that logs inside asyncio.to_thread):
            # asyncio.Event is not thread-safe, so hop onto the loop first.
            self._loop.call_soon_threadsafe(self.push, item)
            return
        if self._closed:
            return
        if len(self._items) == self._items.maxlen:
            self._dropped += 1
        self._items.append(item)
        self._wake.set()

    def closed(self) -> None:
        self._closed = True
        self._wake.set()

    def take_dropped(self) -> int:
        dropped, self._dropped = self._dropped, 0
        return dropped

    async def wait_batch(self, idle: float | None) -> list[T] | None:
        """Everything pushed since the last call, waiting for at least one item.

        Returns ``[]`` after ``idle`` seconds (None: no limit) with nothing new (time for a
        keep-alive), and None once the feed is closed and drained.
        """
        if not self._items and not self._closed:
            try:
                async with asyncio.timeout(idle):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._wake.clear()
        if not self._items:
            return None if self._closed else []
        items = list(self._items)
        self._items.clear()
        return items


EVENTS = web.AppKey("events", EventBus)
_DETACHED = EventBus()  # for apps built without the admin routes: tracks, tells no one


def track_request(request: web.Request, req_id: int, model: str) -> RequestTrack:
    """Starts tracking a model request on its app's bus (see ``RequestTrack``)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    bus = request.app.get(EVENTS, _DETACHED)
    return bus.track(req_id, model, route, request.method, request.path)
