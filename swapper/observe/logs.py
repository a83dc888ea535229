"""Logging set-up and the per-model ring buffers behind ``/logs``.

Owns: structlog configuration, and ``LogHub``: one bounded ring of recent lines per source
(``swapper`` and each model id), a combined ring, and the listeners told of every new line. A
model's ring is the only copy swapper keeps of its children's output: ``/logs``, the crash
report of a load that failed (through ``ChildOutput``, one spawn's view of it) and the tail logged
when a child exits all read it.
Console output (stderr) goes through ``console.CONSOLE``, which never blocks the event loop.
Everything here runs on the event loop's thread; children's output arrives through ``child_lines``
(a sync callback, with the lines of one read). Listeners are sync and must only append to
something bounded (the event bus, whose per-stream ``events.Feed`` drops the oldest lines for a
slow reader), so a slow log reader can never stall a child's stdout.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator

import structlog

from swapper.observe.console import CONSOLE

SWAPPER = "swapper"
RING_BYTES = 100 * 1024

Listener = Callable[[str, list[str]], None]  # (source, lines added together)


class _Ring:
    """The last ``RING_BYTES`` of lines (at least the newest line), a newline each counted.

    Kept a batch at a time: a batch is the lines of one read of a child's pipe (a ready
    llama-server's ~9 lines a request come dozens at a time), and adding one is a few C-level
    calls, whatever its length, not Python a line, which cost more than the requests that made
    the lines. A batch goes whole once the newer ones hold ``RING_BYTES`` without it, so the ring
    holds up to a batch more than it shows; reading (rare: /logs, error reports) trims to the
    line. In the combined ring a batch carries its source's tag, put on its lines when read.
    """

    __slots__ = ("_batches", "_bytes", "_sizes", "added")

    def __init__(self) -> None:
        self._batches: deque[tuple[str, list[str]]] = deque()  # (tag, lines), oldest first
        self._sizes: deque[int] = deque()  # bytes of each batch as shown: tag, line, newline
        self._bytes = 0
        self.added = 0  # lines ever added: a spawn's mark (``ChildOutput``)

    def extend(self, lines: list[str], tag: str = "") -> None:
        self.added += len(lines)
        size = sum(map(len, lines)) + len(lines) * (1 + len(tag))
        self._batches.append((tag, lines))
        self._sizes.append(size)
        self._bytes += size
        while len(self._sizes) > 1 and self._bytes - self._sizes[0] >= RING_BYTES:
            self._batches.popleft()
            self._bytes -= self._sizes.popleft()

    def __iter__(self) -> Iterator[str]:
        shown = [tag + line if tag else line for tag, lines in self._batches for line in lines]
        excess = self._bytes - RING_BYTES
        drop = 0
        while excess > 0 and drop < len(shown) - 1:  # the fewest oldest lines that cover it
            excess -= len(shown[drop]) + 1
            drop += 1
        return iter(shown[drop:])


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
        self._all.extend(lines, tagged(source, ""))
        for listener in self._listeners:
            listener(source, lines)

    def child_lines(self, model: str, stream: str, lines: list[str]) -> None:
        self.add(model, lines)
        if self._echo_upstream:
            CONSOLE.write("".join(tagged(model, line) + "\n" for line in lines), len(lines))

    def history(self, source: str | None = None) -> list[str]:
        if source is None:
            return list(self._all)
        return list(self._rings.get(source, ()))

    def last_lines(self, source: str, n: int, since: int = 0) -> list[str]:
        """The last ``n`` lines of ``source``, of those added after the ``since``-th (``added``)."""
        ring = self._rings.get(source)
        n = 0 if ring is None else min(n, ring.added - since)
        return list(ring)[-n:] if ring is not None and n > 0 else []

    def added(self, source: str) -> int:
        """How many lines ``source`` has had so far."""
        ring = self._rings.get(source)
        return 0 if ring is None else ring.added

    def output(self, model: str) -> ChildOutput:
        """Where one spawn of ``model``'s child sends its output (see ``ChildOutput``)."""
        return ChildOutput(self, model)

    def listen(self, listener: Listener) -> None:
        """Calls ``listener(source, lines)`` for the lines added from now on, as they come."""
        self._listeners = (*self._listeners, listener)

    def unlisten(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)


class ChildOutput:
    """One spawn's output, kept in the hub's ring of its model (the only copy): a child's
    ``on_lines`` (``__call__``), and its ``last`` lines for a crash report, which are only this
    spawn's (the ring also holds the model's earlier runs)."""

    __slots__ = ("_hub", "_mark", "_model")

    def __init__(self, hub: LogHub, model: str) -> None:
        self._hub = hub
        self._model = model
        self._mark = hub.added(model)

    def __call__(self, stream: str, lines: list[str]) -> None:
        self._hub.child_lines(self._model, stream, lines)

    def last(self, n: int) -> list[str]:
        return self._hub.last_lines(self._model, n, self._mark)


def tagged(source: str, line: str) -> str:
    """A line of the combined log: its source in brackets, then the line."""
    return f"[{source}] {line}"


class _ConsoleHandler(logging.Handler):
    """To stderr through ``console.CONSOLE``: never blocks, never raises (see ``console``)."""

    def emit(self, record: logging.LogRecord) -> None:
        CONSOLE.write(self.format(record) + "\n")


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
    # Records from plain stdlib loggers (runtime/children.py logs through ``logging``) get the same
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
        stderr = _ConsoleHandler()
        stderr.setFormatter(formatter)
        root.addHandler(stderr)
    if hub is not None:
        to_hub = _HubHandler(hub)
        to_hub.setFormatter(formatter)
        root.addHandler(to_hub)
    root.setLevel(numeric)
    root.propagate = False
