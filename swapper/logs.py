"""Logging set-up and the per-model ring buffers behind ``/logs``.

Owns: structlog configuration, and ``LogHub``: one bounded ring of recent lines per source
(``swapper`` and each model id) plus live subscribers. Everything here runs on the event loop's
thread; children's output arrives through ``child_line`` (a sync callback), so a slow log reader
can never stall a child's stdout: subscribers get lines through bounded queues and lose the
oldest when they fall behind.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Iterator

import structlog

SWAPPER = "swapper"
RING_BYTES = 100 * 1024
SUBSCRIBER_QUEUE = 1000


class _Ring:
    __slots__ = ("_bytes", "_lines")

    def __init__(self) -> None:
        self._lines: deque[str] = deque()
        self._bytes = 0

    def append(self, line: str) -> None:
        self._lines.append(line)
        self._bytes += len(line) + 1
        while self._bytes > RING_BYTES and len(self._lines) > 1:
            self._bytes -= len(self._lines.popleft()) + 1

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines)


class LogHub:
    """Recent output of swapper and of every child, and live feeds of it."""

    def __init__(self, *, echo_upstream: bool = False) -> None:
        self._rings: dict[str, _Ring] = {}
        self._all = _Ring()
        self._subscribers: set[tuple[str | None, asyncio.Queue[str]]] = set()
        self._echo_upstream = echo_upstream

    def add(self, source: str, line: str) -> None:
        tagged = f"[{source}] {line}"
        self._rings.setdefault(source, _Ring()).append(line)
        self._all.append(tagged)
        for want, queue in self._subscribers:
            if want is None or want == source:
                if queue.full():
                    queue.get_nowait()  # drop the oldest: a slow reader must not stall anyone
                queue.put_nowait(line if want else tagged)

    def child_line(self, model: str, stream: str, line: str) -> None:
        self.add(model, line)
        if self._echo_upstream:
            print(f"[{model}] {line}", file=sys.stderr)

    def history(self, source: str | None = None) -> list[str]:
        if source is None:
            return list(self._all)
        return list(self._rings.get(source, ()))

    def last_lines(self, source: str, n: int) -> list[str]:
        return list(self._rings.get(source, ()))[-n:]

    def subscribe(self, source: str | None) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add((source, queue))
        return queue

    def unsubscribe(self, source: str | None, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard((source, queue))


class _HubHandler(logging.Handler):
    def __init__(self, hub: LogHub) -> None:
        super().__init__()
        self._hub = hub

    def emit(self, record: logging.LogRecord) -> None:
        self._hub.add(SWAPPER, self.format(record))


def setup_logging(level: str, fmt: str, hub: LogHub | None) -> None:
    """Routes structlog through stdlib logging to stderr (console or JSON) and into ``hub``."""
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
    formatter = structlog.stdlib.ProcessorFormatter(processor=renderer)
    root = logging.getLogger("swapper")
    root.handlers.clear()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    if hub is not None:
        to_hub = _HubHandler(hub)
        to_hub.setFormatter(formatter)
        root.addHandler(to_hub)
    root.setLevel(numeric)
    root.propagate = False
