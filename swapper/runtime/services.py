"""A service swapper does not spawn (a model with ``proxy`` and no ``cmd``), in the run loop's hands.

Why: a broker's TTS, STT and image services run under systemd or Docker. swapper routes to them
like any model, but their process is not its child: ``Service`` stands where a ``children.Child``
stands for the run loop, with the same small surface (``spawn``, ``stop``, ``pid``, ``exited``...),
and behaves as a service must:

* **start** (``spawn``): a pinned service (no ``start``) is probed once: down means a 503 with
  ``retryable: true`` at once, never a wait for ``healthCheckTimeout``. A swappable one runs its
  ``start`` command, then the run loop waits for its health as for any child.
* **ready**: probed every ``probeInterval`` seconds (``watch``); the first failed probe reports it
  down (``on_down``, which the run loop handles as a child's unexpected exit), so the next request
  is refused at once while it stays down. ``pid`` is the process listening on its port (psutil),
  or the one in its ``pidFile``: what the memory planner measures.
* **stop**: a pinned service is never stopped: ``forget`` only drops swapper's hold on it. A
  swappable one runs its ``stop`` command (``${PID}`` replaced), then waits until its health check
  fails; the run loop then waits for its memory to be released, as for a child.
* never SIGKILLed (``kill`` does nothing), and left running when swapper shuts down.

The ``start``/``stop`` commands run without swapper's owner mark (``orphans``), in their own
session: what they leave running is the service's, not an orphan of swapper's to reap.

Owns: its watch task and its start/stop command processes; ``ProbeFacts``, the advisory record of
its last probe, is the run loop's (one per model, kept across restarts) and written only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import psutil
import structlog
from yarl import URL

from swapper.config.schema import ModelConfig
from swapper.core.errors import ModelLoadFailed, SwapperError
from swapper.core.phases import StopMarks
from swapper.runtime.children import Output, exit_reason
from swapper.runtime.orphans import OWNER_ENV

__all__ = ["ProbeFacts", "Service", "ServiceDown", "listener_pid"]

log = structlog.get_logger("swapper.runtime.services")

PROBE_TIMEOUT: Final = 2.0
DOWN_POLL: Final = 0.05  # after its stop command, how often a service is probed until it is down


class ServiceDown(SwapperError):
    """A service swapper does not spawn failed its health probe: retry once it is back."""

    status = 503
    code = "service_unavailable"


@dataclass(slots=True)
class ProbeFacts:
    """A service's last health probe (advisory, for ``/v1/status``)."""

    healthy: bool | None = None  # None: never probed
    at: float | None = None  # wall-clock time of the last probe
    error: str | None = None  # why the last failed probe failed

    def status(self, *, pinned: bool) -> dict[str, Any]:
        return {"pinned": pinned, "healthy": self.healthy, "lastProbe": self.at, "lastProbeError": self.error}


class Service:
    """The run loop's handle on one external service (see the module doc)."""

    external: Final = True

    def __init__(
        self,
        model: ModelConfig,
        session: aiohttp.ClientSession,
        facts: ProbeFacts,
        *,
        output: Output,
        on_down: Callable[[], None],
    ) -> None:
        assert model.service is not None
        self._model = model
        self._spec = model.service
        self._session = session
        self.facts = facts
        self._output = output  # its start/stop commands' lines (the log hub's ring of the model)
        self._on_down = on_down
        self._pid: int | None = None
        self._lines_seen = 0
        self._ended = asyncio.Event()  # stopped or forgotten
        self._stop_requested = False
        self._stop: asyncio.Future[int] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._signalled_at: float | None = None
        self._down_at: float | None = None
        self.first_ready_line_at: float | None = None

    def __repr__(self) -> str:
        return f"<Service {self._model.id!r} pid={self._pid}>"

    # ---- the Child surface the run loop and wait_healthy read ----

    @property
    def model(self) -> ModelConfig:
        return self._model

    @property
    def pid(self) -> int | None:
        """The process listening on its port (or in its ``pidFile``), once ready; None if unknown."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        return 0 if self._ended.is_set() else None

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def swappable(self) -> bool:
        return self._spec.swappable

    @property
    def lines_seen(self) -> int:
        return self._lines_seen

    @property
    def ready_lines_seen(self) -> int:
        return 0

    def exited(self) -> bool:
        return self._ended.is_set()

    async def wait_ready_line(self, after: int = 0) -> None:
        await self._ended.wait()  # a service prints nothing swapper reads: only its end wakes this

    def last_lines(self, n: int = 20) -> list[str]:
        return self._output.last(n) if n > 0 else []

    def batch_output(self, seconds: float) -> None:
        pass  # no output to batch

    def kill(self) -> None:
        pass  # never: swapper does not own the service's process

    def poll_exit(self) -> int | None:
        return None  # not swapper's process: a refusal is its probe's to judge

    def stop_marks(self) -> StopMarks:
        return StopMarks(self._signalled_at, self._down_at)

    # ---- start ----

    async def spawn(self) -> None:
        """Brings the service up: runs ``start``, or, for a pinned one, probes it once. Raises
        ``ServiceDown`` (503) or ``ModelLoadFailed``."""
        if self._spec.start is None:
            ok, why = await self.probe()
            if not ok:
                # Worth trying again once the next probe could have seen it back.
                retry = str(max(1, math.ceil(self._spec.probe_interval)))
                raise ServiceDown(
                    f"service '{self._model.id}' is down: {why}", headers={"Retry-After": retry}
                )
            return
        rc = await self._run("start", self._spec.start, self._model.health_check_timeout)
        if rc != 0:
            how = exit_reason(rc) if rc is not None else "timed out"
            msg = f"service '{self._model.id}': start command {how}"
            if lines := self.last_lines(10):
                msg += "; last output:\n" + "\n".join(f"  {line}" for line in lines)
            raise ModelLoadFailed(msg)

    async def find_pid(self) -> None:
        """Learns the service's process (for memory measurement and ``${PID}``), once healthy."""
        self._pid = await asyncio.to_thread(_find_pid, self._model, self._spec.pid_file)
        if self._pid is None:
            log.info("service process unknown; its memory is not measured", model=self._model.id)

    def watch(self) -> None:
        """Probes the ready service every ``probeInterval`` seconds; its first failed probe
        reports it down (``on_down``)."""
        if self._watch is None and not self._ended.is_set():
            self._watch = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self._spec.probe_interval)
            ok, why = await self.probe()
            if not ok:
                log.warning("service is down", model=self._model.id, why=why)
                self._on_down()
                return

    async def probe(self) -> tuple[bool, str]:
        """One health probe: GET ``checkEndpoint`` answers 200 (with ``checkEndpoint: none``, a
        TCP connection is accepted). Records it in ``facts``."""
        ok, why = await self._probe()
        self.facts.healthy, self.facts.at, self.facts.error = ok, time.time(), None if ok else why
        return ok, why

    async def _probe(self) -> tuple[bool, str]:
        endpoint = self._model.check_endpoint
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                if endpoint is None:
                    url = URL(self._model.proxy)
                    _, writer = await asyncio.open_connection(url.host, url.port)
                    writer.close()
                    return True, ""
                # Connection: close keeps the probe's connection out of any pool.
                async with self._session.get(
                    self._model.proxy + endpoint, allow_redirects=False, headers={"Connection": "close"}
                ) as resp:
                    await resp.read()
                    return resp.status == 200, f"GET {endpoint}: HTTP {resp.status}"
        except TimeoutError:
            return False, f"no answer within {PROBE_TIMEOUT:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    # ---- stop ----

    async def stop(self, grace: float) -> int:
        """Stops a swappable service: its ``stop`` command, then a wait (``grace`` seconds at most)
        until its health check fails. Returns the stop command's return code (-1: it timed out)."""
        if self._stop is None:
            self._stop = asyncio.ensure_future(self._stopped(grace))
        return await asyncio.shield(self._stop)

    async def _stopped(self, grace: float) -> int:
        self._cancel_watch()
        self._stop_requested = True
        assert self._spec.stop is not None
        argv = tuple(arg.replace("${PID}", str(self._pid or "")) for arg in self._spec.stop)
        self._signalled_at = time.monotonic()
        rc = await self._run("stop", argv, grace)
        deadline = self._signalled_at + grace
        while time.monotonic() < deadline:
            ok, _ = await self.probe()
            if not ok:
                break
            await asyncio.sleep(DOWN_POLL)
        else:
            log.warning("service still answers its health check after its stop command", model=self._model.id)
        self._down_at = time.monotonic()
        self._ended.set()
        log.info("service stopped", model=self._model.id, stop_rc=rc)
        return -1 if rc is None else rc

    def forget(self) -> None:
        """Drops swapper's hold on the service without stopping it (pinned, or swapper is ending)."""
        self._cancel_watch()
        self._stop_requested = True
        self._ended.set()

    def _cancel_watch(self) -> None:
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self._watch = None

    async def _run(self, what: str, argv: tuple[str, ...], limit: float) -> int | None:
        """Runs a start/stop command to its end (None: still running after ``limit`` seconds,
        then killed); its output goes to the model's log."""
        env = {**os.environ, **dict(self._model.env)}
        env.pop(OWNER_ENV, None)  # what it starts is the service's, not swapper's to reap
        log.info(f"service {what} command", model=self._model.id, argv=" ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ModelLoadFailed(
                f"service '{self._model.id}': cannot run its {what} command {argv[0]!r}: {exc}",
                retryable=False,
            ) from None
        try:
            async with asyncio.timeout(limit):
                out, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        lines = [line for line in out.decode("utf-8", "replace").splitlines() if line.strip()]
        if lines:
            self._lines_seen += len(lines)
            self._output(what, lines)
        return proc.returncode


def _find_pid(model: ModelConfig, pid_file: str | None) -> int | None:
    """The pid in ``pid_file`` if it names a live process, else the process listening on the
    proxy's port (blocking: psutil)."""
    if pid_file is not None:
        try:
            pid = int(Path(pid_file).expanduser().read_text().split()[0])
        except (OSError, ValueError, IndexError):
            log.warning("cannot read the service's pidFile", model=model.id, path=pid_file)
        else:
            if psutil.pid_exists(pid):
                return pid
    url = URL(model.proxy)
    return listener_pid(url.port or (443 if url.scheme == "https" else 80))


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` (any address), if this user may see it."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None
