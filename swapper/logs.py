"""Logging set-up and the per-model ring buffers behind ``/logs``.

Owns: structlog configuration, and ``LogHub``: one bounded ring of recent lines per source
(``swapper`` and each model id), a combined ring, and the listeners told of every new line.
Everything here runs on the event loop's thread; children's output arrives through ``child_lines``
(a sync callback, with the lines of one read). Listeners are sync and must only append to
something bounded (the event bus, whose per-stream ``events.Feed`` drops the oldest lines for a
slow reader), so a slow log reader can never stall a child's stdout.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import sys
from collections import deque
from collections.abc import Callable, Iterator

import structlog

SWAPPER = "swapper"
RING_BYTES = 100 * 1024
_PLUS_NEWLINE = (1).__add__  # a line's bytes in a ring: its own and a newline's

Listener = Callable[[str, list[str]], None]  # (source, lines added together)


class _Ring:
    """The last ``RING_BYTES`` of lines (at least the newest line), kept a batch at a time.

    A batch is the lines of one read of a child's pipe (a ready llama-server's ~9 lines a request
    arrive dozens at a time): adding, counting and dropping them is C-level work on whole lists,
    not Python a line, which cost more than the requests that made the lines.
    """

    __slots__ = ("_batches", "_bytes", "_sizes")

    def __init__(self) -> None:
        self._batches: deque[list[str]] = deque()
        self._sizes: deque[int] = deque()  # bytes of each batch, a newline a line included
        self._bytes = 0

    def extend(self, lines: list[str]) -> None:
        size = sum(map(len, lines)) + len(lines)
        self._batches.append(lines)
        self._sizes.append(size)
        self._bytes += size
        while self._bytes > RING_BYTES:
            excess = self._bytes - RING_BYTES
            if len(self._batches) > 1 and self._sizes[0] <= excess:
                self._batches.popleft()
                self._bytes -= self._sizes.popleft()
                continue
            # Only some lines of the oldest batch go: the fewest that cover the excess, never the
            # newest line. Each line's running total of bytes, by C-level map and accumulate.
            oldest = self._batches[0]
            ends = list(itertools.accumulate(map(_PLUS_NEWLINE, map(len, oldest))))
            cut = min(bisect.bisect_left(ends, excess) + 1, len(oldest) - (len(self._batches) == 1))
            if cut <= 0:
                return  # one line alone over the budget: kept
            self._bytes -= ends[cut - 1]
            if cut == len(oldest):
                self._batches.popleft()
                self._sizes.popleft()
            else:
                self._batches[0] = oldest[cut:]  # a new list: the caller's stays as it was
                self._sizes[0] -= ends[cut - 1]

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._batches)


class LogHub:
    """Recent output of swapper and of every child, and live feeds of it."""

    def __init__(self, *, echo_upstream: bool = False) -> None:
        self._rings: dict[str, _Ring] = {}
        self._all = _Ring()
        self._listeners: tuple[Listener, ...] = ()
        self._echo_upstream = echo_upstream

    def add(self, source: str, lines: list[str]) -> None:
        """Adds ``lines`` of ``source`` (one batch: a ready child's output comes a read at a time)."""
        ring = self._rings.get(source)
        if ring is None:
            ring = self._rings[source] = _Ring()
        ring.extend(lines)
        self._all.extend(list(map(f"[{source}] ".__add__, lines)))  # tagged(), in C
        for listener in self._listeners:
            listener(source, lines)

    def child_lines(self, model: str, stream: str, lines: list[str]) -> None:
        self.add(model, lines)
        if self._echo_upstream:
            print("\n".join(tagged(model, line) for line in lines), file=sys.stderr)

    def history(self, source: str | None = None) -> list[str]:
        if source is None:
            return list(self._all)
        return list(self._rings.get(source, ()))

    def last_lines(self, source: str, n: int) -> list[str]:
        return list(self._rings.get(source, ()))[-n:]

    def listen(self, listener: Listener) -> None:
        """Calls ``listener(source, lines)`` for the lines added from now on, as they come."""
        self._listeners = (*self._listeners, listener)

    def unlisten(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)


def tagged(source: str, line: str) -> str:
    """A line of the combined log: its source in brackets, then the line."""
    return f"[{source}] {line}"


class _HubHandler(logging.Handler):
    def __init__(self, hub: LogHub) -> None:
        super().__init__()
        self._hub = hub

    def emit(self, record: logging.LogRecord) -> None:
        self._hub.add(SWAPPER, [self.format(record)])


def setup_logging(level: str, fmt: str, hub: LogHub | None, *, console: bool = True) -> None:
    """Routes structlog through stdlib logging to stderr (console or JSON) and into ``hub``.

    ``console=False`` (``logToStdout: upstream`` or ``none``) keeps swapper's own lines out of
    the terminal; they still reach ``hub``, so ``/logs`` and the streams show them.
    """
    numeric = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}.get(level, 20)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Records from plain stdlib loggers (children.py logs through ``logging``) get the same
    # level and timestamp as structlog's own.
    formatter = structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
        ],
    )
    root = logging.getLogger("swapper")
    root.handlers.clear()
    if console:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(formatter)
        root.addHandler(stderr)
    if hub is not None:
        to_hub = _HubHandler(hub)
        to_hub.setFormatter(formatter)
        root.addHandler(to_hub)
    root.setLevel(numeric)
    root.propagate = False
