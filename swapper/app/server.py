"""Builds the aiohttp application: route table, app state, and the run loop's lifetime.

Owns: the ``Application`` and the ``cleanup_ctx`` that starts the run loop and the shared
``ClientSession`` and stops them in order (run loop first, so children stop while the session
can still be used by in-flight requests it is failing, then the session).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from swapper.app import preload
from swapper.config.schema import Config
from swapper.http import cors, peers, relay
from swapper.memory.gpu import SystemSampler
from swapper.observe import modelinfo
from swapper.observe.events import EVENTS
from swapper.observe.logs import LogHub
from swapper.runtime.runloop import RunLoop
from swapper.web import auth, ui, upstream
from swapper.web.appkeys import CONFIG, MODEL_INFO, RUNLOOP, SESSION
from swapper.web.observe import add_admin_routes
from swapper.web.profiles import add_profile_routes
from swapper.web.routes import add_routes

# Longer than any sane unloadTimeout: stops run in parallel, so this is per shutdown, not per model.
SHUTDOWN_BACKSTOP = 60.0
log = structlog.get_logger("swapper")

RUNLOOP_TASK = web.AppKey("runloop_task", asyncio.Task[None])
LOGS = web.AppKey("logs", LogHub)
# The process's one memory sampler (one NVML session, one tree walk): the memory monitor, /metrics
# and /v1/status read through it. Made here, closed here, once, after the run loop has ended.
SAMPLER = web.AppKey("sampler", SystemSampler)


def make_app(config: Config, logs: LogHub | None = None) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[LOGS] = logs or LogHub()
    app[SAMPLER] = SystemSampler()  # opens nothing until a reader needs NVML
    if config.api_keys:  # no keys, no middleware: zero per-request cost
        app.middlewares.append(auth.middleware(config.api_keys))
    cors.add_routes(
        app, config.cors_origins
    )  # before add_routes: its catch-all would answer OPTIONS with 404
    upstream.add_routes(app, config)
    add_admin_routes(
        app, app[LOGS], app[SAMPLER], metrics_route=config.metrics_listen is None
    )  # before add_routes, whose catch-all would shadow them
    add_profile_routes(app)  # before add_routes' catch-all
    app[MODEL_INFO] = modelinfo.ModelInfo(modelinfo.default_path())
    app[EVENTS].subscribe(app[MODEL_INFO])
    ui.add_routes(app)  # after the admin routes (their bus), before add_routes' catch-all
    add_routes(app)
    app.cleanup_ctx.append(_runloop_ctx)
    app.cleanup_ctx.append(peers.peers_ctx)  # closed before the run loop stops
    # After _runloop_ctx: cancelled before the run loop shuts down. Pinned services are adopted.
    if config.preload or config.pinned():
        app.cleanup_ctx.append(preload.preload_ctx)
    return app


async def _runloop_ctx(app: web.Application) -> AsyncIterator[None]:
    session = relay.make_session()
    runloop = RunLoop(
        app[CONFIG],
        session,
        logs=app[LOGS],
        events=app[EVENTS],
        pool=relay.pool_of(session),
        sampler=app[SAMPLER],
    )
    app[SESSION] = session
    app[RUNLOOP] = runloop
    app[MODEL_INFO].attach(lambda: runloop.config, session)
    task = asyncio.get_running_loop().create_task(runloop.run(), name="swapper-runloop")
    app[RUNLOOP_TASK] = task
    try:
        yield
    finally:
        # Children stop before the session closes; the loop's task ends once they are all gone.
        # The backstop bounds the whole sequence even if a stop wedges: a swapper that never
        # exits is worse than one that SIGKILLs its children on the way out.
        try:
            async with asyncio.timeout(SHUTDOWN_BACKSTOP):
                await runloop.shutdown()
                await task
        except TimeoutError:
            log.error("shutdown overran its deadline; killing every child", seconds=SHUTDOWN_BACKSTOP)
            runloop.kill_all()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app[MODEL_INFO].close()
        await session.close()
        # After the run loop (its monitor samples through it) and before the app's cleanup ends;
        # a scrape still in a worker thread at worst samples without GPUs.
        await asyncio.to_thread(app[SAMPLER].close)
