"""Readiness of a freshly spawned child: ``wait_healthy()``.

Owns: nothing that outlives a call, and no task: probes run in the caller's task.

May not touch: spawning or killing processes (the caller stops a child that failed to become
healthy), and the child's state beyond reading it.

Why not the reference's fixed schedule (250 ms, then a probe per second): a small llama-server
is healthy ~30 ms after spawn, so a swap should cost little more than that. We probe
immediately when the child prints a readiness line (llama-server's "server is listening": then
one probe is all it takes), and otherwise at intervals backing off from 10 ms to 50 ms, but
only while the child is silent: one that is printing is loading (``_Poller.run``). A child that
exits while loading fails the wait at once instead of at the deadline (a missing model or a
port in use makes llama-server exit within ~50 ms).

Concurrency contract: a coroutine; cancelling it leaves the child alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final, Protocol

import aiohttp
from yarl import URL

from swapper.config.schema import ModelConfig
from swapper.core.errors import ModelLoadFailed
from swapper.runtime.children import exit_reason
from swapper.wire.h1pool import H1Pool

FIRST_INTERVAL: Final = 0.01
MAX_INTERVAL: Final = 0.05
# A silent child is probed at 10, 22, 38, 58 ms, then every 50 ms: a slow cap would add up to a
# whole interval to every swap of a server that prints no readiness line.
BACKOFF: Final = 1.25
QUIET_PROBE_EVERY: Final = 0.25  # a child that keeps printing is still probed this often
PROBE_TIMEOUT: Final = 2.0
LINES_IN_ERRORS: Final = 10
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_CLOSE: Final = b"Connection: close\r\n"


class LoadingChild(Protocol):
    """What ``wait_healthy`` reads from a child; ``children.Child`` is one, test fakes can be too.

    Contract: ``wait_ready_line`` also returns once the child has exited, and then ``exited()``
    is True and ``returncode`` is set.
    """

    @property
    def model(self) -> ModelConfig: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def ready_lines_seen(self) -> int: ...

    @property
    def lines_seen(self) -> int: ...

    def exited(self) -> bool: ...

    async def wait_ready_line(self, after: int = 0) -> None: ...

    def last_lines(self, n: int = 20) -> list[str]: ...


async def wait_healthy(
    session: aiohttp.ClientSession,
    child: LoadingChild,
    url: str | None,
    load_timeout: float,
    *,
    first_interval: float = FIRST_INTERVAL,
    max_interval: float = MAX_INTERVAL,
    probe_timeout: float = PROBE_TIMEOUT,
    pool: H1Pool | None = None,
    stall: float = 0.0,
) -> None:
    """Returns once GET ``url`` answers 200; returns at once if ``url`` is None (no check).

    Raises ModelLoadFailed as soon as the child exits (with its exit code and last output
    lines), or after ``load_timeout`` seconds (the model's ``health_check_timeout``).
    Connection errors and non-200 answers are the normal state of a loading server and only
    mean "poll again". ``first_interval``/``max_interval`` bound the backoff between probes; a
    readiness line from the child cuts any wait short. With ``pool`` (the forwarding client,
    ``relay.pool_of``) probes go through it instead of ``session``.

    ``stall`` (``timeouts.loadStall``; 0: none): a child that prints nothing and gives no HTTP
    answer to its probes (a 503 "loading" is one) for this long has stalled, and the load fails
    then, not at ``load_timeout``. A child that keeps printing may take all of ``load_timeout``
    (Ollama's stall rule).
    """
    if url is None:
        return
    poller = _Poller(session, child, url, first_interval, max_interval, probe_timeout, pool, stall)
    try:
        async with asyncio.timeout(load_timeout):
            healthy = await poller.run()
    except TimeoutError:
        why = f"health check timed out after {load_timeout:g}s (GET {url}: {poller.last_failure})"
        raise ModelLoadFailed(_with_output(child, why)) from None
    except _Stalled:
        why = (
            f"load stalled: no output and no health answer for {stall:g}s "
            f"(timeouts.loadStall; GET {url}: {poller.last_failure})"
        )
        raise ModelLoadFailed(_with_output(child, why)) from None
    if not healthy:
        rc = child.returncode
        why = f"{exit_reason(rc)} while loading" if rc is not None else "exited while loading"
        raise ModelLoadFailed(_with_output(child, why))


def _with_output(child: LoadingChild, why: str) -> str:
    msg = f"model {child.model.id!r} {why}"
    if lines := child.last_lines(LINES_IN_ERRORS):
        msg += "; last output:\n" + "\n".join(f"  {line}" for line in lines)
    return msg


class _Stalled(Exception):
    """The loading child made no progress for ``timeouts.loadStall`` seconds."""


class _Poller:
    """Probes until one probe answers 200, remembering why the last one did not."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        child: LoadingChild,
        url: str,
        first_interval: float,
        max_interval: float,
        probe_timeout: float,
        pool: H1Pool | None,
        stall: float = 0.0,
    ) -> None:
        self._session = session
        self._stall = stall
        self._child = child
        self._url = url
        self._first_interval = first_interval
        self._max_interval = max_interval
        self._timeout = aiohttp.ClientTimeout(total=probe_timeout)
        self._probe_timeout = probe_timeout
        self._pool = pool
        self._parsed = URL(url)
        self.last_failure = "no probe finished"
        self.answered = False  # some probe got an HTTP answer since this was last cleared

    async def run(self) -> bool:
        """True once a probe passed; False if the child exited first.

        Nothing listens the moment a child is spawned, and a child that is printing is still
        loading (a small llama-server prints ~40 lines in its ~30 ms): it is probed when it
        prints a readiness line, or once it has been silent for an interval, or at least every
        ``QUIET_PROBE_EVERY`` seconds. Each probe that fails costs ~0.3 ms of CPU, taken from a
        child that is loading on the same machine.
        """
        loop = asyncio.get_running_loop()
        interval = self._first_interval
        probe = False
        lines = self._child.lines_seen
        last_probe = progress_at = loop.time()
        progress = lines
        while True:
            # Read before probing: a line printed while the probe is in flight must wake us.
            seen = self._child.ready_lines_seen
            if self._child.exited():
                return False
            if self._child.lines_seen != progress or self.answered:  # output or an answer: alive
                progress, progress_at, self.answered = self._child.lines_seen, loop.time(), False
            elif self._stall > 0 and loop.time() - progress_at >= self._stall:
                raise _Stalled
            if probe:
                last_probe = loop.time()
                if await self._probe():
                    return True
            try:
                async with asyncio.timeout(interval):
                    await self._child.wait_ready_line(after=seen)
                probe = True
            except TimeoutError:
                interval = min(interval * BACKOFF, self._max_interval)
                printed, lines = self._child.lines_seen != lines, self._child.lines_seen
                probe = not printed or loop.time() - last_probe >= QUIET_PROBE_EVERY

    async def _probe(self) -> bool:
        if self._pool is not None:
            return await self._probe_with_pool(self._pool)
        try:
            # Connection: close keeps probe connections out of the shared pool, where they would
            # outlive this child and fail the next request sent to a new child on the same port.
            async with self._session.get(
                self._url, timeout=self._timeout, allow_redirects=False, headers={"Connection": "close"}
            ) as resp:
                await resp.read()
                self.answered = True
                if resp.status == 200:
                    return True
                self.last_failure = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.last_failure = _why(exc)
        return False

    async def _probe_with_pool(self, pool: H1Pool) -> bool:
        """The same probe through the forwarding client: a third of aiohttp's CPU a probe."""
        try:
            async with asyncio.timeout(self._probe_timeout):
                # fresh and Connection: close: the connection never enters the pool (see _probe).
                resp = await pool.request("GET", self._parsed, _CLOSE, b"", fresh=True)
        except (ConnectionError, TimeoutError, OSError) as exc:
            self.last_failure = _why(exc)
            return False
        resp.close()
        self.answered = True
        if resp.status == 200:
            return True
        self.last_failure = f"HTTP {resp.status}"
        return False


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def ensure_port_free(model: ModelConfig) -> None:
    """Fails fast if something already listens on the port the model's child is to bind.

    Otherwise the first health probe would reach that squatter, and a squatter that answers 200
    would be taken for the model. Checked only for a ``${PORT}`` the config allocated on a
    loopback proxy: other proxies may legitimately point at a server that is already up.
    """
    url = URL(model.proxy)
    if model.port is None or url.port != model.port or url.host not in _LOOPBACK:
        return
    try:
        async with asyncio.timeout(0.5):
            _, writer = await asyncio.open_connection(url.host, model.port)
    except (OSError, TimeoutError):
        return  # refused (free), or nothing answered: let the child try
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise ModelLoadFailed(
        f"model {model.id!r}: port {model.port} is already in use by another process; "
        "change startPort or stop that process"
    )
