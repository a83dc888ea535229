"""One swap's timeline: when each step from the decision to the first byte relayed happened.

Owns: nothing shared. The marks are facts reported by whoever saw them: the scheduler's decision
time, a victim's stop (``StopMarks``, carried by ``Stopped``), the new child's start
(``StartMarks``, carried by ``Started``), the run loop's grant, and the event bus's first byte
relayed. The run loop assembles a ``SwapTimeline`` and hands it to the bus, which completes it
(``events.EventBus.swap_ready``). ``phases()`` turns the marks into durations, the same ones in
``swapper_swap_phase_seconds`` and in the debug log line of each swap.

All marks are ``time.monotonic()`` seconds (not ``loop.time()``: uvloop's has millisecond steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# Each phase ends at the mark of the same position in MARKS and begins at the latest earlier
# mark that was seen: a start with nothing to evict has no stop phases; a child that prints no
# readiness line (or whose line was read after the probe passed) has no ready_line phase.
MARKS: Final = (
    "decided",  # the scheduler started the swap
    "signalled",  # the stop signal (SIGTERM or cmdStop) went to the last victim
    "exited",  # the last victim was reaped
    "stopped",  # the run loop learned it (pipes drained, memory released: ``Stopped``)
    "spawning",  # the new child's spawn call began (after the port check)
    "exec",  # the spawn call returned: the child runs the new program
    "ready_line",  # the child printed its first readiness line
    "healthy",  # a health probe answered 200
    "granted",  # the run loop learned it and granted the waiting requests
    "first_byte",  # the first response head from the new child was relayed
)
PHASES: Final = (
    "stop_signal",
    "old_exit",
    "stopped",
    "pre_spawn",
    "exec",
    "ready_line",
    "healthy",
    "granted",
    "first_byte",
)
TOTAL: Final = "total"  # decided to the last mark seen


@dataclass(frozen=True, slots=True)
class StopMarks:
    """When one child's stop signal went out and when it was reaped (None: never, e.g. it had
    exited on its own before the stop)."""

    signalled: float | None
    exited: float | None


@dataclass(frozen=True, slots=True)
class StartMarks:
    """A start attempt's marks: spawn call, exec, first readiness line (None: none seen before
    the probe passed), health probe passed."""

    spawning: float
    exec: float
    ready_line: float | None
    healthy: float


@dataclass(slots=True)
class SwapTimeline:
    """The marks of one swap to ``model``, by name (see ``MARKS``)."""

    model: str
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float | None) -> None:
        if at is not None:
            self.marks[name] = at

    def add_stops(self, stops: list[StopMarks]) -> None:
        """The victims' stops: the swap waited for the last of them."""
        self.mark("signalled", max((s.signalled for s in stops if s.signalled is not None), default=None))
        self.mark("exited", max((s.exited for s in stops if s.exited is not None), default=None))

    def add_start(self, start: StartMarks) -> None:
        self.marks["spawning"] = start.spawning
        self.marks["exec"] = start.exec
        if start.ready_line is not None and start.ready_line <= start.healthy:
            self.marks["ready_line"] = start.ready_line
        self.marks["healthy"] = start.healthy

    def phases(self) -> dict[str, float]:
        """Seconds per phase (see ``MARKS``), in order, plus ``total``; marks out of order (a
        clock read in another task just before an earlier mark) count as zero-length phases."""
        out: dict[str, float] = {}
        prev: float | None = None
        first: float | None = None
        for name, phase in zip(MARKS, (None, *PHASES), strict=True):
            at = self.marks.get(name)
            if at is None:
                continue
            if prev is None:
                first = prev = at
                continue
            out[str(phase)] = max(0.0, at - prev)
            prev = max(prev, at)
        if first is not None and prev is not None and out:
            out[TOTAL] = prev - first
        return out

    def describe(self) -> dict[str, float]:
        """``phases()`` in milliseconds, rounded, for a log line."""
        return {name: round(seconds * 1000, 2) for name, seconds in self.phases().items()}


class SwapTimelines:
    """The run loop's timelines in the making: each start's, until its ``Started`` hands it to the
    bus, and each stopped child's marks, with when the loop learned of them, until a start that
    waited for that stop takes them. Owned by the run loop; an advisory record of the swap (it only
    feeds metrics and a log line)."""

    __slots__ = ("_starts", "_stops")

    def __init__(self) -> None:
        self._starts: dict[str, tuple[int, SwapTimeline]] = {}
        self._stops: dict[str, tuple[StopMarks, float]] = {}

    def stopped(self, model: str, marks: StopMarks, at: float) -> None:
        self._stops[model] = (marks, at)

    def begin(self, model: str, start_id: int, plan: tuple[float, frozenset[str]] | None) -> None:
        """The start of ``model`` being issued: the decision and the stops it waited for."""
        timeline = SwapTimeline(model)
        if plan is not None:
            decided, evict = plan
            timeline.mark("decided", decided)
            stops = [self._stops.pop(v) for v in evict if v in self._stops]
            timeline.add_stops([marks for marks, _ in stops])
            timeline.mark("stopped", max((at for _, at in stops), default=None))
        self._starts[model] = (start_id, timeline)

    def take(self, model: str, start_id: int) -> SwapTimeline | None:
        """The timeline of that start, once; None for a start that was cancelled (dropped)."""
        entry = self._starts.get(model)
        if entry is None or entry[0] != start_id:
            return None
        del self._starts[model]
        return entry[1]

    def drop(self, model: str) -> None:
        self._starts.pop(model, None)
