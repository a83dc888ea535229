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
import ssl
import time

import psutil
import structlog
from aiohttp import web

from swapper import __version__
from swapper.app import check, reload
from swapper.app.sdnotify import Notifier
from swapper.app.server import make_app
from swapper.app.site import FrontSite
from swapper.config import listen
from swapper.config.schema import DEFAULT_SHUTDOWN_TIMEOUT, Config
from swapper.config.sources import ConfigSources
from swapper.observe.events import EVENTS
from swapper.observe.logs import LogHub
from swapper.runtime import process
from swapper.runtime.orphans import owner_mark, sweep_orphans
from swapper.runtime.reaper import Reaper
from swapper.web.appkeys import RUNLOOP
from swapper.web.front import runner_options
from swapper.web.observe import metrics_app

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
    sources: ConfigSources | None = None,
    watch_config: bool = False,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop`` is set), then shuts down in order.

    With ``sources``, SIGHUP reloads them (and so does a change of their content when
    ``watch_config``). With ``tls``, the listener speaks HTTPS.
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
    # (which costs a spawn an extra exec: swapper/runtime/process.py).
    reaper = Reaper.start(owner_mark())
    process.rely_on_reaper()
    try:
        await _serve_app(config, host, port, logs, stop, hup, sources, watch_config, notifier, tls)
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
    sources: ConfigSources | None,
    watch_config: bool,
    notifier: Notifier,
    tls: ssl.SSLContext | None,
) -> None:
    app = make_app(config, logs)
    grace = config.shutdown_timeout
    runner = web.AppRunner(app, **runner_options(), shutdown_timeout=grace)
    await runner.setup()
    side: web.AppRunner | None = None
    cutting: asyncio.TimerHandle | None = None
    try:
        # Connections start on the front door's fast path; it hands anything else to the runner's
        # aiohttp server (swapper/web/front.py).
        site = FrontSite(runner, host, port, grace=grace, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(_listen_failure(host, port, exc)) from None
        url = listen.url_of(host, port, tls=tls is not None)
        urls = [url]
        if config.metrics_listen is not None:
            side = web.AppRunner(metrics_app(app))
            await side.setup()
            m_host, m_port = config.metrics_listen
            try:
                await web.TCPSite(side, m_host or None, m_port).start()
            except OSError as exc:
                raise ListenError(_listen_failure(m_host, m_port, exc)) from None
            urls.append(listen.url_of(m_host, m_port) + "/metrics")
        where = sources.describe() if sources is not None else None
        log.info("listening", version=__version__, listen=urls, config=where, **check.summary(config))
        _warn_exposure(config, host)
        notifier.notify("READY=1", f"STATUS=listening on {url}")
        async with asyncio.TaskGroup() as tasks:
            watcher = None
            if sources is not None:
                runloop = app[RUNLOOP]
                watcher = tasks.create_task(reload.watch_config(sources, runloop, hup, poll=watch_config))
            await stop.wait()
            log.info("shutting down", shutdown_timeout=grace)
            # What is still in flight when the grace runs out is cut: name it.
            cutting = asyncio.get_running_loop().call_later(grace, _log_cut, app)
            notifier.notify("STOPPING=1", "STATUS=draining requests, then stopping every model")
            if watcher is not None:
                watcher.cancel()
    finally:
        if side is not None:
            await side.cleanup()
        await runner.cleanup()
        if cutting is not None:
            cutting.cancel()


def _warn_exposure(config: Config, host: str) -> None:
    """One line when the network can reach a swapper that asks for no key."""
    if listen.is_loopback(host):
        return
    if not config.api_keys:
        log.warning(
            "listening beyond loopback with no apiKeys: anyone on the network can start models "
            "and read their logs; set apiKeys, or listen on 127.0.0.1",
            host=host or "every interface",
        )
    if config.metrics_listen is not None and not listen.is_loopback(config.metrics_listen[0]):
        log.warning(
            "metricsListen is beyond loopback and asks for no key", metrics_listen=config.metrics_listen
        )


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
