"""The scheduler's vocabulary: model states and their transition table, a model's slot, a
request, a swap, the ``Effects`` the scheduler asks of the run loop, and status records.

Owns: nothing shared; each ``Slot`` belongs to the scheduler that made it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from swapper.core.errors import (
    SwapperError,
)


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


# Every state change a model may make (llama-swap's isValidTransition). A start that fails, or a
# swap aborted before its start was issued, goes back to stopped; a ready child that dies on its
# own is stopped without a stop; anything running can be told to stop.
TRANSITIONS: Final[Mapping[State, frozenset[State]]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.STOPPING, State.STOPPED}),
    State.READY: frozenset({State.STOPPING, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED}),
}


class InvalidTransition(RuntimeError):
    """A state change outside ``TRANSITIONS``: a scheduler bug, never a client's doing."""


class Effects(Protocol):
    """What the scheduler asks the run loop to do. None of these may call back into it."""

    def start_child(self, model: str, start_id: int) -> None:
        """Spawn ``model`` and report ``Started(model, start_id, error)`` when healthy or failed."""

    def stop_child(self, model: str, grace: float, *, cut: bool = True) -> None:
        """Stop ``model`` (aborting a start in progress) and report ``Stopped(model)``. ``cut``:
        end the requests still in flight on it rather than let them finish or fail by themselves."""

    def grant(self, req_id: int, model: str) -> bool:
        """Hands the request its lease; reports whether the requester was still waiting."""
        ...

    def fail(self, req_id: int, error: SwapperError) -> None:
        """Answers the request with ``error``; a requester already gone is ignored."""


# eq=False: a request is itself, never equal to another (seq is unique). Queue membership tests,
# removals and queue_position() then compare identities in C instead of field tuples in Python.
@dataclass(slots=True, eq=False)
class Request:
    req_id: int
    model: str
    at: float
    seq: int
    priority: int


@dataclass(slots=True)
class Slot:
    """Scheduling state of one model (the run loop owns its process)."""

    state: State = State.STOPPED
    in_flight: set[int] = field(default_factory=set)
    admitted: int = 0  # queued + waiting on a load + in flight, for concurrency limits
    last_used: float = 0.0

    def move(self, new: State) -> None:
        """Changes the state, refusing any change ``TRANSITIONS`` does not list."""
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"model state {self.state} cannot become {new}")
        self.state = new


@dataclass(slots=True)
class Swap:
    """Bringing ``target`` up: first ``evict`` must stop, then the start is issued."""

    target: str
    evict: frozenset[str]
    start_id: int
    waiters: list[Request]
    started_at: float
    start_issued: bool = False


@dataclass(frozen=True, slots=True)
class ModelStatus:
    state: State
    in_flight: int
    queued: int  # waiting in the queue or on a load
    oldest_wait: float | None  # seconds the oldest of those has waited


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """A model's status with its child's pid and start time: what the run loop shows observers."""

    status: ModelStatus
    pid: int | None
    started_at: float | None  # wall-clock time the current child was spawned
