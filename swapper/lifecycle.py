"""The composition root: start serving, wait for a signal, then shut down in order.

Owns: construction order, signal handling (handlers only set an event), the start-up line and
the service manager's readiness notices (``sdnotify``: READY once listening, STOPPING on a
signal), and the shutdown sequence under one deadline:
  1. stop accepting connections;
  2. let in-flight requests finish, up to ``grace`` seconds (aiohttp's runner does this);
  3. the run loop fails every waiter and stops every child (process groups, SIGKILL after each
     model's unloadTimeout);
  4. close the upstream ``ClientSession``.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import time
from pathlib import Path

import psutil
import structlog
from aiohttp import web

from swapper import __version__, check, process
from swapper.config import DEFAULT_SHUTDOWN_TIMEOUT, Config
from swapper.events import EVENTS
from swapper.front import FrontSite, runner_options
from swapper.logs import LogHub
from swapper.orphans import owner_mark, sweep_orphans
from swapper.reaper import Reaper
from swapper.reload import watch_config as watch
from swapper.routes import RUNLOOP
from swapper.sdnotify import Notifier
from swapper.server import make_app

log = structlog.get_logger("swapper")

SHUTDOWN_GRACE = DEFAULT_SHUTDOWN_TIMEOUT  # shutdownTimeout's default


class ListenError(Exception):
    """The listening address could not be bound (in use, not ours to take): said in one line."""


async def serve(
    config: Config,
    host: str,
    port: int,
    *,
    logs: LogHub | None = None,
    stop: asyncio.Event | None = None,
    config_path: Path | None = None,
    watch_config: bool = False,
) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop`` is set), then shuts down in order.

    With ``config_path``, SIGHUP reloads it (and so does a change of its content when
    ``watch_config``).
    """
    stop = stop or asyncio.Event()
    hup = asyncio.Event()
    notifier = Notifier.from_environment()  # before any child or the reaper is spawned
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    if killed := await asyncio.to_thread(sweep_orphans):
        log.warning("reclaimed children of a swapper that died", pids=killed)
    # Ends our children and their forks if we are SIGKILLed, so they need no parent-death signal
    # (which costs a spawn an extra exec: swapper/process.py).
    reaper = Reaper.start(owner_mark())
    process.rely_on_reaper()
    try:
        await _serve_app(config, host, port, logs, stop, hup, config_path, watch_config, notifier)
    finally:
        process.rely_on_reaper(False)
        await asyncio.to_thread(reaper.stop)  # every child is stopped: it finds nothing to kill
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def _serve_app(
    config: Config,
    host: str,
    port: int,
    logs: LogHub | None,
    stop: asyncio.Event,
    hup: asyncio.Event,
    config_path: Path | None,
    watch_config: bool,
    notifier: Notifier,
) -> None:
    app = make_app(config, logs)
    grace = config.shutdown_timeout
    runner = web.AppRunner(app, **runner_options(), shutdown_timeout=grace)
    await runner.setup()
    cutting: asyncio.TimerHandle | None = None
    try:
        # Connections start on the front door's fast path; it hands anything else to the runner's
        # aiohttp server (swapper/front.py).
        site = FrontSite(runner, host, port, grace=grace)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(_listen_failure(host, port, exc)) from None
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        where = str(config_path) if config_path is not None else None
        log.info("listening", version=__version__, listen=[url], config=where, **check.summary(config))
        notifier.notify("READY=1", f"STATUS=listening on {url}")
        async with asyncio.TaskGroup() as tasks:
            watcher = None
            if config_path is not None:
                runloop = app[RUNLOOP]
                watcher = tasks.create_task(watch(config_path, runloop, hup, poll=watch_config))
            await stop.wait()
            log.info("shutting down", shutdown_timeout=grace)
            # What is still in flight when the grace runs out is cut: name it.
            cutting = asyncio.get_running_loop().call_later(grace, _log_cut, app)
            notifier.notify("STOPPING=1", "STATUS=draining requests, then stopping every model")
            if watcher is not None:
                watcher.cancel()
    finally:
        await runner.cleanup()
        if cutting is not None:
            cutting.cancel()


def _log_cut(app: web.Application) -> None:
    if tracks := app[EVENTS].in_flight():
        cut = [
            f"#{t.req_id} {t.method} {t.path} ({t.model}, {time.perf_counter() - t.started:.0f}s)"
            for t in tracks
        ]
        log.warning("shutdownTimeout is up: cutting the requests still in flight", requests=cut)


def _listen_failure(host: str, port: int, exc: OSError) -> str:
    """One line: the address, why, and which process holds it when that can be found out."""
    why = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        holder = _port_holder(port)
        why = "address already in use" + (f" (by {holder})" if holder else "")
    return f"cannot listen on {host}:{port}: {why}"


def _port_holder(port: int) -> str | None:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid}, {proc.name()}"
    except (psutil.Error, OSError):
        pass
    return None
