"""The actor: one task that owns every child process and all scheduling state.

Owns: the inbox, the ``Scheduler``, the ``children`` dict, the start/stop tasks, the reply
futures of waiting requests, and pending unload replies. HTTP handlers reach it only through the
client methods (``acquire``, ``release``, ``unload``, ``shutdown``), which post messages.

Concurrency contract: ``_handle`` and every ``Effects`` method are plain ``def``s run by the loop
task between two inbox reads, so no decision is ever interleaved with another. Slow work (spawn,
health wait, stop) runs in tasks this object owns and comes back as ``Started``/``Stopped``/
``ChildExited`` messages. Internal senders use ``put_nowait``: the inbox is unbounded (admission
limits live in the scheduler), so the loop can never deadlock posting to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, assert_never

import aiohttp
import structlog

from swapper.config.schema import Config
from swapper.core.errors import GatewayTimeout, ModelLoadFailed, ShuttingDown, SwapperError
from swapper.core.messages import (
    Acquire,
    ChildExited,
    HangProbed,
    Holder,
    Lease,
    MemorySampled,
    Message,
    Release,
    Reload,
    Shutdown,
    Started,
    Stopped,
    Tick,
    Unload,
    Unreachable,
)
from swapper.core.phases import StartMarks, StopMarks, SwapTimelines
from swapper.core.scheduler import Scheduler
from swapper.core.selection import Selection
from swapper.core.states import State
from swapper.memory.monitor import MemoryMonitor, make_monitor
from swapper.memory.samples import MemorySample, Sampler
from swapper.observe.events import EventBus
from swapper.observe.logs import LogHub
from swapper.planners import Planner
from swapper.planners.build import make_planner
from swapper.runtime import process
from swapper.runtime.children import Child
from swapper.runtime.hang import CLAIMED_SILENCE, PROBE_TIMEOUT, HangWatch, probe
from swapper.runtime.health import ensure_port_free, wait_healthy
from swapper.runtime.services import ProbeFacts, Service
from swapper.runtime.spawning import _health_url, _stop_if_spawned
from swapper.runtime.views import LoopViews
from swapper.wire.h1pool import H1Pool

log = structlog.get_logger("swapper.runtime.runloop")

TICK_SECONDS = 1.0


# A ready child's output is read at most this often: a read per log line would cost more CPU than
# proxying the request that logged it, and each read is a wake-up (children.Child.batch_output).
# /logs and the log streams see a line up to this much after it was written.
OUTPUT_BATCH_SECONDS: Final = 0.05
# Messages a request posts; only these may be handled in the poster's task (see _post).
_INLINE: Final = frozenset({Acquire, Release})


class RunLoop(LoopViews):
    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        *,
        logs: LogHub | None = None,
        planner: Planner | None = None,
        events: EventBus | None = None,
        pool: H1Pool | None = None,
        sampler: Sampler,
    ) -> None:
        self.config = config
        self._session = session
        # The forwarding client: health probes go through it, and a stop closes its idle
        # connections to the child (see stop_child()).
        self._pool = pool
        self._logs = logs or LogHub()
        self._events = events or EventBus()  # told of states, starts and exits; never awaited
        # The run loop owns the memory monitor; the memory planner reads the ledger it feeds. The
        # sampler is the process's one (shared with /metrics and /v1/status); its maker closes it.
        self._sampler = sampler
        self._memory = make_monitor(config, sampler) if config.routing.use == "memory" else None
        planner = planner or make_planner(config, ledger=self._memory.ledger if self._memory else None)
        self._sched = Scheduler(config, planner, self)
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._children: dict[str, Child | Service] = {}
        self._probes: dict[str, ProbeFacts] = {}  # each service's last probe, across its restarts
        self._spawned_at: dict[str, float] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._timelines = SwapTimelines()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._replies: dict[int, asyncio.Future[Lease]] = {}
        self._holders: dict[int, Holder] = {}  # req_id -> who serves it (see Holder)
        self._hangs = HangWatch()
        self._probing: dict[str, asyncio.Task[None]] = {}  # model -> its hang probe
        self._unload_replies: list[tuple[frozenset[str], asyncio.Future[None]]] = []
        self._ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._done = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False  # run() is taking messages: Acquire/Release may be handled inline
        self._handling = False  # inside _process: a post from a handler must queue, not recurse
        # Profiles and selectors: handlers read and reserve through it, never the loop itself.
        self.selection = Selection()

    # ---- client methods: the only way in from other tasks ----

    def new_request_id(self) -> int:
        return next(self._ids)

    async def acquire(
        self,
        req_id: int,
        model: str,
        *,
        on_wait: Callable[[], None] | None = None,
        holder: Holder | None = None,
    ) -> Lease:
        """Waits until ``model`` may serve this request; pair with ``release`` in ``finally``.

        ``on_wait`` is called once the request is admitted but has to wait (load or queue).
        ``holder`` (default: the calling task) is what a stop of the model cancels.
        """
        if self._done:
            raise ShuttingDown("swapper is shutting down")
        reply: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        task = holder or asyncio.current_task()
        self._post(Acquire(req_id, model, reply, time.monotonic(), on_wait, task))
        return await reply

    def try_acquire(self, req_id: int, model: str, holder: Holder | None = None) -> Lease | None:
        """The lease at once if ``model`` can serve this request now, else None with nothing changed.

        For the front door's fast path (``front``): a request that would have to wait (a load, a
        queue, a refusal) is then served by the full ``acquire`` path instead. Pair a lease with
        ``release`` in ``finally``, as with ``acquire``; ``holder`` (default: the calling task) is
        what a stop of the model cancels.
        """
        if not self._may_inline() or not self._sched.admit_now(req_id, model, time.monotonic()):
            return None
        # No message, no future: the scheduler took it in flight, and serving changes no state,
        # so there is nothing to settle or announce (what _process would do after an Acquire).
        if holder is None:
            holder = asyncio.current_task(self._loop)  # the cached loop: get_running_loop() costs a getpid()
        if holder is not None:
            self._holders[req_id] = holder
        return Lease(req_id, model, self.config.models[model].proxy, self._pid(model))

    async def reacquire(self, lease: Lease, holder: Holder | None = None) -> Lease:
        """After the upstream refused ``lease``'s connection: releases it, reports the child as
        unreachable (the loop restarts it unless its exit was already seen), and waits for a new
        lease on the same model under a new request id. Release the returned lease instead."""
        self.release(lease.req_id)  # first: the restart must not cancel this request as in flight
        self._post(Unreachable(lease.model, lease.pid))
        req_id = self.new_request_id()
        try:
            return await self.acquire(req_id, lease.model, holder=holder)
        except BaseException:
            self.release(req_id)  # cancelled while waiting: the caller only knows the old id
            raise

    def queue_position(self, req_id: int) -> int | None:
        """Advisory: 1-based place in the queue, None when not queued (e.g. waiting on a load)."""
        return self._sched.queue_position(req_id)

    def release(self, req_id: int) -> None:
        now = time.monotonic()
        if self._may_inline() and self._sched.release_now(req_id, now):
            # The common release (nothing waits, nothing retires): no message, nothing to settle
            # or announce, as with try_acquire's grant.
            self._holders.pop(req_id, None)
            return
        self._post(Release(req_id, now))

    async def unload(self, models: Iterable[str] | None = None) -> None:
        """Stops ``models`` (every model when None) and returns once they have all stopped."""
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(Unload(None if models is None else frozenset(models), reply))
        await reply

    async def reload(self, config: Config) -> frozenset[str]:
        """Adopts a validated ``config``; returns the models it restarts (changed or removed).

        Raises what building the new planner raises (e.g. a matrix DSL error), before anything
        changes.
        """
        memory = make_monitor(config, self._sampler) if config.routing.use == "memory" else None
        planner = make_planner(config, ledger=memory.ledger if memory else None)
        reply: asyncio.Future[frozenset[str]] = asyncio.get_running_loop().create_future()
        self._post(Reload(config, planner, reply, memory))
        return await reply

    async def shutdown(self) -> None:
        if self._done:
            return
        reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._post(Shutdown(reply))
        await reply

    def kill_all(self) -> None:
        """Last resort when shutdown overruns its deadline: SIGKILL every child's group now."""
        for child in self._children.values():
            if child.pid is not None and not child.exited():
                child.kill()

    # ---- the loop ----

    async def run(self) -> None:
        """Runs until a ``Shutdown`` has stopped every child."""
        ticker = self._spawn(self._tick_forever())
        try:
            await asyncio.to_thread(process.prepare)  # off the first spawn's path
            if self._memory is not None:
                # The first sample is applied before the first decision; later ones are messages.
                await self._memory.open(self._child_pids)
                _ = self._spawn(self._memory.sample_forever(self._post_sample, self._child_pids))
            self._loop = asyncio.get_running_loop()
            self._running = True
            while not self._done:
                self._process(await self._inbox.get())
        finally:
            self._running = False
            ticker.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _post(self, msg: Message) -> None:
        if type(msg) in _INLINE and self._may_inline():
            # The request path's messages skip the inbox when nothing is ahead of them: handlers
            # never await, so handling one now, in the poster's task, is exactly what the loop
            # would do next, minus two task switches per request (scripts/bench_proxy.py).
            self._process(msg)
            return
        self._idle.clear()
        self._inbox.put_nowait(msg)

    def _may_inline(self) -> bool:
        return (
            self._running
            and not self._handling
            and not self._sched.shutting_down  # a release may end it: the loop must see that
            and self._inbox.empty()
        )

    def _process(self, msg: Message) -> None:
        self._handling = True
        try:
            self._handle(msg)
            self._settle()
            self._events.sync_states(self._sched.states())
        finally:
            self._handling = False

    def _handle(self, msg: Message) -> None:
        now = time.monotonic()
        match msg:
            case Acquire(req_id, model, reply, at, on_wait, task):
                self._replies[req_id] = reply
                if task is not None:
                    self._holders[req_id] = task
                self._sched.on_acquire(req_id, model, at)
                if on_wait is not None and not reply.done():
                    on_wait()
            case Release(req_id, at):
                self._replies.pop(req_id, None)
                self._holders.pop(req_id, None)
                self._sched.on_release(req_id, at)
            case Started(model, start_id, error, marks):
                self._starting.pop(model, None)
                timeline = self._timelines.take(model, start_id)
                if error is not None:
                    self._children.pop(model, None)
                    log.warning("model failed to start", model=model, error=error.message)
                    self._events.child_start_failed(model, error.message)
                else:
                    log.info("model ready", model=model, pid=self._pid(model))
                    if (child := self._children.get(model)) is not None:
                        child.batch_output(OUTPUT_BATCH_SECONDS)
                        if isinstance(child, Service):
                            child.watch()
                    if self._memory is not None:
                        self._memory.on_ready(model, self._pid(model))
                self._sched.on_started(model, start_id, error, now)
                if error is None and timeline is not None and marks is not None:
                    timeline.add_start(marks)
                    timeline.mark("granted", time.monotonic())
                    self._events.swap_ready(timeline)  # the bus adds the first byte relayed
                if (
                    error is None
                    and (child := self._children.get(model))
                    and (rc := child.poll_exit()) is not None
                ):
                    # Gone after its probe answered (a squatter on its port can answer for it): the
                    # exit came while the start owned it, so it is this message's to handle.
                    self._on_child_exited(model, child.pid or 0, rc, now)
            case Stopped(model, marks):
                self._stopping.pop(model, None)
                self._children.pop(model, None)
                self._spawned_at.pop(model, None)
                if marks is not None:
                    self._timelines.stopped(model, marks, now)
                self._sched.on_stopped(model, now)
            case ChildExited(model, pid, returncode):
                self._on_child_exited(model, pid, returncode, now)
            case Unreachable(model, pid):
                child = self._children.get(model)
                ready = self._sched.state(model) is State.READY
                if pid is not None and child is not None and child.pid == pid and ready:
                    if (exit_code := child.poll_exit()) is not None:
                        # It died (its exit not yet read): a crash, whatever the refusal says.
                        self._on_child_exited(model, pid, exit_code, now)
                    else:
                        log.warning("model refuses connections; restarting it", model=model, pid=pid)
                        self._events.child_unreachable(model, pid)
                        self._sched.on_unreachable(model, now)
            case Tick(at):
                self._sched.on_tick(at)
                self._watch_hangs(at)
            case HangProbed(model, pid, silent, failure):
                self._probing.pop(model, None)
                self._on_hang_probed(model, pid, silent, failure, now)
            case Unload(models, reply):
                targets = frozenset(self.config.models) if models is None else models
                targets = frozenset(m for m in targets if not self._pinned(m))  # never stopped
                self._unload_replies.append((targets, reply))
                self._sched.on_unload(targets, now)
            case Reload(config, planner, reply, memory):
                self._memory = self._reload_memory(memory)  # before on_reload decides with it
                changed = self._sched.on_reload(config, planner, now)
                self.config = config
                if not reply.done():
                    reply.set_result(changed)
            case Shutdown(reply):
                self._sched.on_shutdown(now)
                self._unload_replies.append((frozenset(self.config.models), reply))
            case MemorySampled():
                if self._memory is not None:
                    self._memory.on_sample(msg.sample)
            case _:
                assert_never(msg)

    def _settle(self) -> None:
        """After each message: answer finished unloads, note idleness, notice shutdown's end."""
        still = []
        for models, reply in self._unload_replies:
            if self._sched.all_stopped(models) and models.isdisjoint(self._stopping):
                if not reply.done():
                    reply.set_result(None)
            else:
                still.append((models, reply))
        self._unload_replies = still
        if (
            self._sched.shutting_down
            and not self._unload_replies
            and all(child.exited() or child.pid is None for child in self._children.values())
        ):
            self._done = True
        if self._inbox.empty() and not self._starting and not self._stopping:
            self._idle.set()

    def _watch_hangs(self, now: float) -> None:
        """Probes each ready model with requests in flight that has been silent for its
        ``timeouts.hung`` (see ``hang``), or for ``CLAIMED_SILENCE`` if an overdue request waits
        on it: a hung model in an eviction set must not stretch ``maxWait`` by ``hung``."""
        claimed = self._sched.claimed(now)
        for model, child in self._children.items():
            hung = limit = child.model.timeouts.hung
            if model in claimed and limit > 0:
                limit = min(limit, CLAIMED_SILENCE)  # silent that long: probed, as patiently as ever
            busy = self._sched.state(model) is State.READY and self._sched.in_flight(model)
            if not busy or limit <= 0 or child.pid is None or self._pool is None or model in self._probing:
                self._hangs.forget(model)
                continue
            progress = self._pool.reads(child.model.proxy) + child.lines_seen
            silent = self._hangs.silent_for(model, progress, now)
            if silent >= limit and (url := _health_url(child)) is not None:
                coro = self._probe_hang(model, child.pid, silent, url, min(hung, PROBE_TIMEOUT))
                self._probing[model] = self._spawn(coro)

    async def _probe_hang(self, model: str, pid: int, silent: float, url: str, limit: float) -> None:
        assert self._pool is not None
        self._post(HangProbed(model, pid, silent, await probe(self._pool, url, limit)))

    def _on_hang_probed(self, model: str, pid: int, silent: float, failure: str | None, now: float) -> None:
        self._hangs.forget(model)  # alive: watched afresh from now; hung: stopped below
        child = self._children.get(model)
        if child is not None and child.pid == pid:
            self._events.hang_probed(model, pid, failure)
        if (
            failure is None
            or child is None
            or child.pid != pid
            or self._sched.state(model) is not State.READY
        ):
            return
        why = f"no byte for {silent:.0f}s with requests in flight, and its health probe failed: {failure}"
        log.warning("model hung; killing its process group", model=model, pid=pid, why=why)
        self._events.child_hung(model, pid, why)
        err = GatewayTimeout(f"model {model!r} hung ({why}); it was killed and restarts on the next request")
        for req_id in self._sched.in_flight(model):
            if (holder := self._holders.get(req_id)) is not None:
                holder.cancel(err)
        child.kill()  # SIGKILL to the group: a stopped process ignores SIGTERM
        self._sched.on_unreachable(model, now)  # stopped, counted toward the crash-loop backoff

    def _on_child_exited(self, model: str, pid: int, returncode: int, now: float) -> None:
        child = self._children.get(model)
        # (A service whose process is unknown reports pid 0.)
        if child is None or (child.pid or 0) != pid or model in self._starting or model in self._stopping:
            return  # stale, or a start/stop task already owns this exit
        del self._children[model]
        self._spawned_at.pop(model, None)
        tail = " | ".join(self._logs.last_lines(model, 3))
        log.warning("model exited unexpectedly", model=model, pid=pid, returncode=returncode, tail=tail)
        self._events.child_exited(model, pid, returncode)
        self._sched.on_child_exited(model, now)

    # ---- Effects: called by the scheduler inside _handle; they never await ----

    def start_child(self, model: str, start_id: int) -> None:
        cfg = self.config.models[model]
        child: Child | Service
        if cfg.service is not None:
            child = Service(
                cfg,
                self._session,
                self._probes.setdefault(model, ProbeFacts()),
                output=self._logs.output(model),
                on_down=lambda: self._post(ChildExited(model, child.pid or 0, -1)),
            )
        else:
            child = Child(
                cfg,
                output=self._logs.output(model),
                on_exit=lambda returncode: self._on_exit(cfg.id, child, returncode),
            )
        self._children[model] = child
        self._spawned_at[model] = time.time()
        self._timelines.begin(model, start_id, self._sched.swap_plan(model))
        self._starting[model] = self._spawn(self._start(child, start_id))

    def stop_child(self, model: str, grace: float, *, cut: bool = True) -> None:
        if self._memory is not None:
            self._memory.on_stopping(model)  # samples from now on see it shutting down: not learned
        starting = self._starting.pop(model, None)
        if starting is not None:
            starting.cancel()
        self._timelines.drop(model)
        # Requests still streaming from it (an unload, a reload) are cut here: a llama-server
        # with an open response ignores SIGTERM until its client hangs up, so waiting for them
        # would only turn every such stop into a SIGKILL after the grace period.
        for req_id in self._sched.in_flight(model) if cut else ():
            if (holder := self._holders.get(req_id)) is not None:
                holder.cancel()
        child = self._children.get(model)
        if child is not None and self._pool is not None:
            # Before the signal (which _stop sends, a loop turn after these closes): an idle
            # keep-alive connection holds up llama-server's exit until its connection thread
            # next looks (every 10 ms).
            self._pool.close_idle(child.model.proxy)
        self._stopping[model] = self._spawn(self._stop(model, child, starting, grace))

    def grant(self, req_id: int, model: str) -> bool:
        reply = self._replies.pop(req_id, None)
        if reply is None or reply.done():
            return False
        reply.set_result(Lease(req_id, model, self.config.models[model].proxy, self._pid(model)))
        return True

    def fail(self, req_id: int, error: SwapperError) -> None:
        reply = self._replies.pop(req_id, None)
        if reply is not None and not reply.done():
            reply.set_exception(error)

    # ---- tasks ----

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start(self, child: Child | Service, start_id: int) -> None:
        model = child.model.id
        began = time.monotonic()
        try:
            await ensure_port_free(child.model)
            spawning = time.monotonic()
            await child.spawn()
            execed = time.monotonic()
            timeout = child.model.health_check_timeout
            stall = child.model.timeouts.load_stall
            await wait_healthy(
                self._session, child, _health_url(child), timeout, pool=self._pool, stall=stall
            )
            healthy = time.monotonic()
            if isinstance(child, Service):
                await child.find_pid()
        except SwapperError as exc:
            await _stop_if_spawned(child, grace=1.0)
            self._post(Started(model, start_id, exc))
        except Exception as exc:  # a bug must fail the waiters, not wedge the model as "starting"
            log.exception("start failed", model=model)
            await _stop_if_spawned(child, grace=1.0)
            self._post(Started(model, start_id, ModelLoadFailed(f"start failed: {exc!r}")))
        else:
            seconds = healthy - began
            log.debug("model healthy", model=model, seconds=round(seconds, 4))
            self._events.child_ready(model, seconds)
            marks = StartMarks(spawning, execed, child.first_ready_line_at, healthy)
            self._post(Started(model, start_id, None, marks))

    async def _stop(
        self, model: str, child: Child | Service | None, starting: asyncio.Task[None] | None, grace: float
    ) -> None:
        if starting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        marks = None
        if isinstance(child, Service):
            marks = await self._stop_service(model, child, grace)
        elif child is not None and child.pid is not None:  # a spawn that failed left nothing to stop
            release = await self._memory.watch_release(model, child.pid) if self._memory is not None else None
            returncode = await child.stop(grace=grace)
            log.info("model stopped", model=model, returncode=returncode)
            if release is not None:
                # Stopped only once the memory is free, so the next start cannot OOM (llama-swap #97).
                await release.wait_released()
            marks = child.stop_marks()
        self._post(Stopped(model, marks))

    async def _stop_service(self, model: str, service: Service, grace: float) -> StopMarks:
        """A swappable service runs its stop command and is waited for until its health fails and
        its memory is free; a pinned one, or any at shutdown, is only let go (never stopped)."""
        if not service.swappable or self._sched.shutting_down:
            service.forget()
            return service.stop_marks()
        pid = service.pid
        release = await self._memory.watch_release(model, pid) if self._memory is not None and pid else None
        await service.stop(grace)
        if release is not None:
            await release.wait_released()
        return service.stop_marks()

    def _on_exit(self, model: str, child: Child | Service, returncode: int) -> None:
        if child.pid is not None and not child.stop_requested:
            self._post(ChildExited(model, child.pid, returncode))

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self._post(Tick(time.monotonic()))

    def _post_sample(self, sample: MemorySample) -> None:
        self._post(MemorySampled(sample))

    def _reload_memory(self, new: MemoryMonitor | None) -> MemoryMonitor | None:
        """The memory monitor after a reload (``new``: the new config's): the running one adopts
        the new ledger (keeping what it sampled and measured), or sampling starts or ends."""
        if self._memory is not None and new is not None:
            return self._memory.adopt(new)
        if self._memory is not None:
            self._memory.close()
        elif new is not None:
            _ = self._spawn(new.sample_forever(self._post_sample, self._child_pids, opened=False))
        return new
