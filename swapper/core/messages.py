"""The run loop's inbox vocabulary: every message that may change scheduling or child state.

Owns: nothing; frozen, slotted records only. Facts are named in the past tense (``Started``,
``Stopped``, ``ChildExited``), requests in the imperative (``Acquire``, ``Unload``). The run loop
``match``es on ``Message`` with an ``assert_never`` default, so mypy flags a message without a
handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from swapper.config.schema import Config
from swapper.core.errors import SwapperError
from swapper.core.phases import StartMarks, StopMarks
from swapper.planners import Planner

if TYPE_CHECKING:
    from swapper.memory.monitor import MemoryMonitor
    from swapper.memory.samples import MemorySample


@dataclass(frozen=True, slots=True)
class Lease:
    """What a granted request gets: where to send it. Valid until its ``Release``."""

    req_id: int
    model: str
    base_url: str
    pid: int | None = None  # the child that was serving when granted (see Unreachable)


class Holder(Protocol):
    """Whoever serves a granted request: cut by ``cancel()`` when its model is stopped under it
    (unload, reload). The requester's task, or its ``exchange.Exchange``."""

    def cancel(self, msg: Any = None) -> object: ...


@dataclass(frozen=True, slots=True)
class Acquire:
    """A request wants ``model``; the answer is ``reply`` (a Lease, or a SwapperError)."""

    req_id: int
    model: str
    reply: asyncio.Future[Lease]
    at: float
    # Called (from the loop, synchronously) if the request was admitted but must wait for a
    # load or in the queue: the handler may then start a loading-state stream.
    on_wait: Callable[[], None] | None = None
    # Who serves the request (its task, or its ``exchange.Exchange``): cancelled if its model is
    # stopped under it (unload, reload), which closes its upstream connection, so the child can
    # exit on its first SIGTERM.
    task: Holder | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """Sent exactly once per Acquire, in ``finally``, whatever happened to the request.

    Reconciled by ``req_id``: a request in flight frees its slot, a queued or waiting one leaves
    its queue, an unknown one is a no-op. This is what makes a cancellation that races a grant
    leak-proof (see DESIGN.md, invariant 1).
    """

    req_id: int
    at: float


@dataclass(frozen=True, slots=True)
class Started:
    """A start attempt for ``model`` finished: healthy (``error`` None) or failed."""

    model: str
    start_id: int
    error: SwapperError | None
    marks: StartMarks | None = None  # when it spawned, exec'd, printed ready, passed the probe


@dataclass(frozen=True, slots=True)
class Stopped:
    """The child of ``model`` is gone and reaped (and its memory released, where measured)."""

    model: str
    marks: StopMarks | None = None  # when it was signalled and reaped (None: nothing ran)


@dataclass(frozen=True, slots=True)
class ChildExited:
    """A child exited without being asked to; a stale ``pid`` is ignored by the loop."""

    model: str
    pid: int
    returncode: int


@dataclass(frozen=True, slots=True)
class Unreachable:
    """A request found ``model``'s child (``pid``) refusing connections although it is counted
    ready: it died and its exit is not in yet, or it stopped listening. A stale ``pid`` is ignored."""

    model: str
    pid: int | None


@dataclass(frozen=True, slots=True)
class HangProbed:
    """``model``'s child (``pid``), silent for ``silent`` seconds with requests in flight, was
    probed: ``failure`` is why it is hung, None if it answered (slow, not hung)."""

    model: str
    pid: int
    silent: float
    failure: str | None


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic: TTL unloads, and queue re-evaluation as waits age past their bounds."""

    at: float


@dataclass(frozen=True, slots=True)
class Unload:
    """Stop ``models`` (all when None); ``reply`` resolves once every one of them has stopped."""

    models: frozenset[str] | None
    reply: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class Reload:
    """Adopt ``config`` (already validated, its ``planner`` built); ``reply`` gets the models
    that changed or went away: only those are restarted."""

    config: Config
    planner: Planner
    reply: asyncio.Future[frozenset[str]]
    memory: MemoryMonitor | None = None  # the new config's (routing.router.use: memory)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Fail every waiter, stop every child; ``reply`` resolves when all are stopped."""

    reply: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class MemorySampled:
    """The memory sampler read every device and each child's process tree (memory planner only)."""

    sample: MemorySample


Message = (
    Acquire
    | Release
    | Started
    | Stopped
    | ChildExited
    | Unreachable
    | HangProbed
    | Tick
    | Unload
    | Reload
    | Shutdown
    | MemorySampled
)
