"""Hang detection: a ready child with requests in flight that has gone silent is probed.

Why: a child that stops (SIGSTOP, a deadlock, a GPU hang) hangs its clients forever, while
``/running`` still says ready, and keeps a swap waiting on its in-flight work. No peer
(llama-swap, Ollama, LocalAI) detects this.

The rule: progress is any byte from the child, on its upstream connections (``H1Pool.reads``)
or its output pipes (``Child.lines_seen``). A model with requests in flight whose progress has
not moved for ``timeouts.hung`` seconds gets one health probe. A probe that does not answer 200
within ``PROBE_TIMEOUT`` (or ``hung``, if shorter) means hung: the run loop ends its requests
with a 504 (or a final error event), SIGKILLs its process group (a stopped process ignores
SIGTERM) and counts it as a crash. A probe that answers means slow, not hung (a long prompt on a
CPU sends nothing for minutes): it is left alone and watched again from now.

Owns: ``HangWatch``, the run loop's per-model record of the last progress seen and when it
moved. Pure and synchronous; the probe is a coroutine the run loop runs as a task.
"""

from __future__ import annotations

import asyncio
from typing import Final

from yarl import URL

from swapper.wire.h1pool import H1Pool

__all__ = ["CLAIMED_SILENCE", "PROBE_TIMEOUT", "HangWatch", "probe"]

PROBE_TIMEOUT: Final = 5.0
# Seconds of silence after which a model that an overdue queued request waits on (``maxWait``)
# is probed, whatever its ``hung``: a probe costs a busy llama-server nothing, a hung model in
# an eviction set would otherwise hold the swap for ``hung`` seconds more.
CLAIMED_SILENCE: Final = 1.0


class HangWatch:
    """When each watched model's progress count last moved (run-loop owned)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}

    def silent_for(self, model: str, progress: int, now: float) -> float:
        """Seconds since ``model``'s progress count last changed (0 when it just did, or when
        it is first seen)."""
        seen = self._seen.get(model)
        if seen is None or seen[0] != progress:
            self._seen[model] = (progress, now)
            return 0.0
        return now - seen[1]

    def forget(self, model: str) -> None:
        """Stops watching ``model`` (idle, stopped, or just probed alive): it starts afresh."""
        self._seen.pop(model, None)


async def probe(pool: H1Pool, url: str, limit: float) -> str | None:
    """GETs ``url`` on a fresh connection; None if it answered 200 within ``limit`` seconds,
    else why not."""
    try:
        async with asyncio.timeout(limit):
            resp = await pool.request("GET", URL(url, encoded=True), b"", b"", fresh=True)
            try:
                status = resp.status
                while await resp.readany():
                    pass
            finally:
                resp.close()
    except TimeoutError:
        return f"no answer within {limit:g}s"
    except OSError as exc:
        return f"{exc!r}"
    return None if status == 200 else f"HTTP {status}"
