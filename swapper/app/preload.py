"""``hooks.on_startup.preload``: load models at startup, before any client asks for them.

Owns: one background task per application, started and cancelled by ``preload_ctx`` (an aiohttp
``cleanup_ctx`` entry that must come after the one that starts the run loop, so that the task is
cancelled before the run loop shuts down).

Must not touch: children or scheduler state. Each model goes through the run loop like a request
(``acquire``, then at once ``release``), so preloading respects groups, the swap matrix, memory
planning and the queue, and the model then stays loaded like any other (its TTL counts from the
release). Models are loaded one after the other, in the configured order: preloading several
models of one exclusive group loads and swaps them in turn, leaving the last one loaded, exactly
as llama-swap does.

A model that fails to load is logged and skipped; preload never brings the server down. It stops
early once the run loop is shutting down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import structlog
from aiohttp import web

from swapper.core.errors import ShuttingDown, SwapperError
from swapper.runtime.runloop import RunLoop
from swapper.web.appkeys import CONFIG, RUNLOOP

__all__ = ["preload", "preload_ctx"]

log = structlog.get_logger("swapper.app.preload")


async def preload(runloop: RunLoop, models: Sequence[str]) -> list[str]:
    """Loads ``models`` in order through ``runloop``; returns the ones that became ready."""
    loaded: list[str] = []
    for model in models:
        began = time.monotonic()
        req_id = runloop.new_request_id()
        try:
            await runloop.acquire(req_id, model)
        except ShuttingDown:
            return loaded
        except SwapperError as err:
            log.warning("preload failed", model=model, error=err.message)
            continue
        finally:
            runloop.release(req_id)
        loaded.append(model)
        log.info("model preloaded", model=model, seconds=round(time.monotonic() - began, 3))
    return loaded


async def preload_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs ``preload`` for the app's ``config.preload`` in the background while the app lives.

    Pinned services (``ModelConfig.pinned``) come first: they run already, so adopting them (one
    probe each) evicts nothing, and they show in ``/running`` and ``/v1/status`` from the start."""
    config = app[CONFIG]
    pinned = [m for m in config.pinned() if m not in config.preload]
    models = [*pinned, *config.preload]
    task = asyncio.get_running_loop().create_task(preload(app[RUNLOOP], models), name="swapper-preload")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])
        # A bug in preload is reported, and must not stop the shutdown that follows.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("preload task failed", exc_info=exc)
