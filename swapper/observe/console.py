"""Console output (swapper's log lines, children's echoed output) that never blocks serving.

Why: a write to stderr blocks once its pipe is full. With nobody draining it (a terminal that
scrolls away under ``less``, a supervisor that stopped reading), a plain ``print`` on the event
loop froze every request, and the children behind it, whose own output then went unread too. A
reader that went away turned every batch of child output into a ``BrokenPipeError`` traceback.

So writes are queued, bounded (``LIMIT`` characters), and a thread writes them out. A write
that would overflow the queue is dropped and counted (``dropped``; the metric
``swapper_log_lines_dropped_total``); the next write that gets through is preceded by one line
saying how many were lost. A closed stream (``EPIPE``, ``EBADF``) ends console output quietly:
the rings behind ``/logs`` keep every line.

Owns: ``CONSOLE``, the one writer for the process (stderr, looked up at each write so that a
test's capture still sees it), and its thread, started at the first write. ``flush`` waits
(bounded) for what is queued, at exit too.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections import deque
from typing import Final

__all__ = ["CONSOLE", "LIMIT", "Console"]

LIMIT: Final = 1 << 20  # characters queued at most (the batch being written not counted)


class Console:
    """A bounded, non-blocking writer to stderr (see the module docstring)."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._pending: deque[str] = deque()
        self._size = 0
        self._cond = threading.Condition()
        self._writing = False
        self._thread: threading.Thread | None = None
        self.closed = False
        self.dropped = 0  # lines dropped since start
        self._unreported = 0  # of those, not yet said on the console

    def write(self, text: str, lines: int = 1) -> None:
        """Queues ``text`` (``lines`` lines, newline-terminated); never blocks on the stream."""
        if self.closed:
            return
        with self._cond:
            if self._size + len(text) > self._limit:
                self.dropped += lines
                self._unreported += lines
                return
            self._pending.append(text)
            self._size += len(text)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="console", daemon=True)
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float = 1.0) -> None:
        """Waits up to ``timeout`` seconds for the queued output to be written."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed or not (self._pending or self._writing), timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                text = "".join(self._pending)
                self._pending.clear()
                self._size = 0
                unreported, self._unreported = self._unreported, 0
                self._writing = True
            if unreported:
                text = f"swapper: {unreported} log lines dropped: stderr was not read fast enough\n" + text
            try:
                stream = sys.stderr
                stream.write(text)
                stream.flush()
            except (OSError, ValueError, AttributeError):  # closed, broken pipe, or no stderr at all
                with self._cond:
                    self.closed = True
                    self._pending.clear()
                    self._writing = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._writing = False
                self._cond.notify_all()


CONSOLE: Final = Console()
atexit.register(CONSOLE.flush)
