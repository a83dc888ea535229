"""Scheduling decisions: which request is served, queued, joins a load, or starts a swap.

Owns: per-model state (stopped/starting/ready/stopping), in-flight request ids, swaps in
progress and their waiters, the queue, and admission counts. Only the run loop calls it, from one
task, so it needs no locks. It is sync and pure: time comes in as arguments, and every action
leaves through the ``Effects`` protocol (the scheduler's whole "syscall table"). It never awaits,
spawns, or logs speculative decisions.

Decision tree (``_decide``, shared by new requests and queue drains so the two never drift):
  0. (checked on arrival and before any start) the model's loads keep failing
                                               → fail at once: 503 + Retry-After (backoff)
  1. a swap to the model is in progress        → join it (collation: one load serves all)
  2. the model is ready                        → serve, unless an overdue request claimed it
  3. the model is stopping                     → queue; the drain after ``Stopped`` restarts it
  4. plan the eviction set for the model
  5. it collides with a swap in progress, touches a model an overdue request claimed,
     or would evict a busy model               → queue (a busy model is never evicted)
  6. otherwise                                 → start a swap (disjoint swaps run in parallel)

Starvation bound: a queued request older than its model's ``max_wait`` claims its target and the
models it must evict. Claimed models stop taking the fast path and no later swap may touch them,
so the swap happens as soon as the claimed models' in-flight requests drain. Queue order is
priority plus age (``AGING_PER_SECOND``), so a low-priority request is never starved either.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from swapper.config.schema import DEFAULT_UNLOAD_TIMEOUT, Config
from swapper.core.errors import (
    ConcurrencyLimit,
    ModelLoadFailed,
    ModelNotFound,
    ModelUnloaded,
    QueueFull,
    ShuttingDown,
    SwapperError,
)
from swapper.core.states import Effects, ModelStatus, Request, Slot, State, Swap
from swapper.planners import Planner, PlanView, Unplaceable

# One priority point per 10 s waited: a priority-0 request that has waited 100 s goes before a
# fresh priority-10 one.
AGING_PER_SECOND = 0.1

# Crash-loop backoff. One failed load is free (the next request retries at once: a port race or
# a transient OOM heals by itself); from the second failure in a row on, the model refuses new
# starts for 1 s, 2 s, 4 s ... (capped) and answers 503 + Retry-After at once, instead of
# respawning a child that dies again on every request (a restart storm). A ready child that
# exits on its own within STABLE_SECONDS (one that crashes on its first request, say) counts as a
# failed load too; a child that stays up that long clears the count.
BACKOFF_AFTER_FAILURES = 2
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 30.0
STABLE_SECONDS = 30.0


class Verdict(enum.Enum):
    SERVE = enum.auto()
    JOIN = enum.auto()
    QUEUE = enum.auto()
    START = enum.auto()


class Scheduler:
    def __init__(self, config: Config, planner: Planner, effects: Effects) -> None:
        self._config = config
        self._planner = planner
        self._fx = effects
        self._slots: dict[str, Slot] = {m: Slot() for m in config.models}
        self._swaps: dict[str, Swap] = {}
        self._queue: list[Request] = []
        self._by_id: dict[int, Request] = {}  # every admitted request not yet released
        self._seq = 0
        self._start_ids = 0
        self._shutting_down = False
        self._retiring: set[str] = set()  # changed by a reload: stop once in-flight work is done
        self._failures: dict[str, LoadFailures] = {}  # consecutive failed loads, per model
        self._ready_at: dict[str, float] = {}  # when each ready model's child became ready

    # ---- introspection (advisory reads; never gate a mutation on them from outside) ----

    def state(self, model: str) -> State:
        return self._slots[model].state

    def states(self) -> dict[str, State]:
        return {model: slot.state for model, slot in self._slots.items()}

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def status(self, now: float) -> dict[str, ModelStatus]:
        waiting: dict[str, list[float]] = {}
        for req in self._queue:
            waiting.setdefault(req.model, []).append(req.at)
        for swap in self._swaps.values():
            waiting.setdefault(swap.target, []).extend(r.at for r in swap.waiters)
        out = {}
        for model, slot in self._slots.items():
            ats = waiting.get(model, [])
            out[model] = ModelStatus(
                state=slot.state,
                in_flight=len(slot.in_flight),
                queued=len(ats),
                oldest_wait=(now - min(ats)) if ats else None,
            )
        return out

    def in_flight(self, model: str) -> frozenset[int]:
        slot = self._slots.get(model)
        return frozenset(slot.in_flight) if slot else frozenset()

    def queue_position(self, req_id: int) -> int | None:
        req = self._by_id.get(req_id)
        if req is None or req not in self._queue:
            return None
        return self._queue.index(req) + 1

    def swap_plan(self, model: str) -> tuple[float, frozenset[str]] | None:
        """Advisory: when the swap to ``model`` in progress was decided, and what it evicts."""
        swap = self._swaps.get(model)
        return None if swap is None else (swap.started_at, swap.evict)

    def is_idle(self) -> bool:
        """No request admitted, no swap in progress, no child starting or stopping."""
        return (
            not self._by_id
            and not self._swaps
            and all(s.state in (State.STOPPED, State.READY) for s in self._slots.values())
        )

    def all_stopped(self, models: Iterable[str]) -> bool:
        return all(self._slots[m].state is State.STOPPED for m in models if m in self._slots)

    # ---- messages ----

    def on_acquire(self, req_id: int, model: str, now: float) -> None:
        cfg = self._config.models.get(model)
        if cfg is None:
            self._fx.fail(req_id, ModelNotFound(f"model '{model}' is not configured"))
            return
        if self._shutting_down:
            self._fx.fail(req_id, ShuttingDown("swapper is shutting down"))
            return
        slot = self._slots[model]
        if slot.admitted >= cfg.concurrency_limit:
            self._fx.fail(req_id, _too_many(model, cfg.concurrency_limit))
            return
        if (refused := self._backoff(model, now)) is not None:
            self._fx.fail(req_id, refused)
            return
        self._seq += 1
        req = Request(req_id, model, now, self._seq, cfg.priority)
        verdict = self._decide(req, self._claimed(now), now)
        if verdict is Verdict.QUEUE and len(self._queue) >= self._config.max_queued:
            self._fx.fail(req_id, QueueFull("too many queued requests", headers={"Retry-After": "5"}))
            return
        slot.admitted += 1
        self._by_id[req_id] = req
        self._apply(req, verdict, now)

    def serves_now(self, model: str, now: float) -> bool:
        """Whether an Acquire of ``model`` at ``now`` would be granted at once. Changes nothing."""
        cfg = self._config.models.get(model)
        if cfg is None or self._shutting_down:
            return False
        slot = self._slots[model]
        if slot.state is not State.READY or model in self._swaps or model in self._retiring:
            return False
        if slot.admitted >= cfg.concurrency_limit or self._backoff(model, now) is not None:
            return False
        return not self._queue or model not in self._claimed(now)

    def admit_now(self, req_id: int, model: str, now: float) -> bool:
        """``on_acquire`` for a request ``serves_now`` says is served at once, minus the Effects
        grant: True with the request in flight (the caller hands out its lease), else False with
        nothing changed. Serving a ready model changes no state, so the caller owes no effects."""
        if not self.serves_now(model, now):
            return False
        self._seq += 1
        req = Request(req_id, model, now, self._seq, self._config.models[model].priority)
        slot = self._slots[model]
        slot.admitted += 1
        self._by_id[req_id] = req
        slot.in_flight.add(req_id)
        return True

    def release_now(self, req_id: int, now: float) -> bool:
        """``on_release`` of a request in flight while nothing is queued and nothing retires: the
        same bookkeeping, and True. Such a release changes no state and serves no waiter, so the
        caller owes no effects. False, with nothing changed, for any other release."""
        if self._queue or self._retiring:
            return False
        req = self._by_id.get(req_id)
        if req is None:
            return False
        slot = self._slots[req.model]
        if req_id not in slot.in_flight:
            return False
        del self._by_id[req_id]
        slot.admitted -= 1
        slot.in_flight.discard(req_id)
        slot.last_used = now
        return True

    def on_release(self, req_id: int, now: float) -> None:
        req = self._by_id.pop(req_id, None)
        if req is None:
            return  # never admitted, already failed, or released twice: nothing to undo
        slot = self._slots[req.model]
        slot.admitted -= 1
        if req_id in slot.in_flight:
            slot.in_flight.discard(req_id)
            slot.last_used = now
        elif req in self._queue:
            self._queue.remove(req)
        else:
            swap = self._swaps.get(req.model)
            if swap is not None and req in swap.waiters:
                swap.waiters.remove(req)
                if not swap.waiters and self._queue:
                    self._abort(swap)
        self._drain(now)

    def on_started(self, model: str, start_id: int, error: SwapperError | None, now: float) -> None:
        swap = self._swaps.get(model)
        if swap is None or swap.start_id != start_id:
            return  # the swap was aborted (unload, shutdown); its stop is already under way
        del self._swaps[model]
        self._note_load(model, error, now)
        slot = self._slots[model]
        if error is not None:
            slot.move(State.STOPPED)
            for req in swap.waiters:
                self._forget(req)
                self._fx.fail(req.req_id, error)
        else:
            slot.move(State.READY)
            slot.last_used = now
            for req in swap.waiters:
                self._serve(req)
        self._drain(now)

    def on_stopped(self, model: str, now: float) -> None:
        slot = self._slots.get(model)
        if slot is None:
            return
        slot.move(State.STOPPED)
        self._note_life(model, now, crashed=False)
        self._drop_removed()
        for swap in list(self._swaps.values()):
            self._maybe_issue_start(swap)
        self._drain(now)

    def on_child_exited(self, model: str, now: float) -> None:
        """The child died on its own. Only a ready one changes state here: a starting one fails
        through its start attempt, and a stopping one reports ``Stopped``."""
        slot = self._slots.get(model)
        if slot is not None and slot.state is State.READY:
            slot.move(State.STOPPED)
            self._note_life(model, now, crashed=True)
            self._retiring.discard(model)  # the next child starts with the new config anyway
            self._drain(now)

    def on_unreachable(self, model: str, now: float) -> None:
        """A ready child refuses connections: stop it (requests still on it are cut, as they are
        failing anyway), so the next request restarts it. Counts toward the crash-loop backoff
        like a quick crash, so a child that keeps doing this is not restarted per request."""
        slot = self._slots.get(model)
        if slot is None or slot.state is not State.READY:
            return
        self._note_life(model, now, crashed=True)
        # Not cut: requests granted to it will be refused too and retry; ones mid-stream on a
        # dead child end by themselves. Cutting them would drop them without an answer.
        self._stop(model, cut=False)
        self._drain(now)

    def on_tick(self, now: float) -> None:
        for model, slot in self._slots.items():
            cfg = self._config.models.get(model)
            ttl = cfg.ttl if cfg else 0.0
            if ttl > 0 and slot.state is State.READY and not slot.in_flight and now - slot.last_used >= ttl:
                self._stop(model)
        self._drain(now)

    def on_unload(self, models: Iterable[str], now: float) -> None:
        for model in models:
            if model in self._slots:
                self._unload(model, ModelUnloaded(f"model '{model}' was unloaded"))
        self._drain(now)

    def on_reload(self, config: Config, planner: Planner, now: float) -> frozenset[str]:
        """Adopts ``config``; returns the models that changed or went away.

        Only those are restarted: a changed model stops as soon as its in-flight requests finish
        (new requests for it queue meanwhile and restart it with the new settings), waiters on
        its load fail, and every other model keeps running untouched.
        """
        old = self._config.models
        changed = frozenset(m for m in old if config.models.get(m) != old[m])
        for model in changed:
            self._failures.pop(model, None)  # a fixed config deserves a retry at once
            slot = self._slots[model]
            if slot.state is State.READY and slot.in_flight:
                self._retiring.add(model)
            else:
                self._unload(model, ModelUnloaded(f"model '{model}' changed in a config reload"))
        self._config = config
        self._planner = planner
        for model in config.models:
            self._slots.setdefault(model, Slot())
        self._drop_removed()
        self._drain(now)
        return changed

    def on_shutdown(self, now: float) -> None:
        self._shutting_down = True
        for model in self._slots:
            self._unload(model, ShuttingDown("swapper is shutting down"))

    # ---- the decision ----

    def _decide(self, req: Request, claimed: frozenset[str], now: float) -> Verdict:
        model = req.model
        if model in self._swaps:
            return Verdict.JOIN
        state = self._slots[model].state
        if state is State.READY:
            return Verdict.QUEUE if model in claimed or model in self._retiring else Verdict.SERVE
        if state is not State.STOPPED:
            return Verdict.QUEUE
        try:
            evict = self._planner.evict_for(model, self._view(model))
        except Unplaceable:
            return Verdict.START  # _apply fails it with the planner's reason
        if self._collides(model, evict) or (evict | {model}) & claimed:
            return Verdict.QUEUE
        if any(self._slots[m].in_flight for m in evict):
            return Verdict.QUEUE
        return Verdict.START

    def _apply(self, req: Request, verdict: Verdict, now: float) -> None:
        if verdict is Verdict.SERVE:
            self._serve(req)
        elif verdict is Verdict.JOIN:
            self._swaps[req.model].waiters.append(req)
        elif verdict is Verdict.QUEUE:
            self._queue.append(req)
        else:
            self._start_swap(req, now)

    def _start_swap(self, req: Request, now: float) -> None:
        model = req.model
        if (refused := self._backoff(model, now)) is not None:  # a queued request, drained
            self._forget(req)
            self._fx.fail(req.req_id, refused)
            return
        try:
            evict = self._planner.evict_for(model, self._view(model))
        except Unplaceable as exc:
            self._forget(req)
            self._fx.fail(req.req_id, SwapperError(str(exc), status=507, code="insufficient_memory"))
            return
        self._start_ids += 1
        swap = Swap(model, evict, self._start_ids, [req], now)
        self._swaps[model] = swap
        self._slots[model].move(State.STARTING)
        self._planner.on_commit(model, evict)
        for victim in evict:
            if self._slots[victim].state is not State.STOPPING:
                self._stop(victim)
        self._maybe_issue_start(swap)

    def _maybe_issue_start(self, swap: Swap) -> None:
        if not swap.start_issued and self.all_stopped(swap.evict):
            swap.start_issued = True
            self._fx.start_child(swap.target, swap.start_id)

    def _drain(self, now: float) -> None:
        """Re-decides every queued request, oldest-and-most-important first."""
        for model in [m for m in self._retiring if not self._slots[m].in_flight]:
            self._retiring.discard(model)
            self._stop(model)
        if not self._queue:
            return
        self._queue.sort(key=lambda r: (-(r.priority + (now - r.at) * AGING_PER_SECOND), r.seq))
        pending, self._queue = self._queue, []
        claimed: frozenset[str] = frozenset()
        # A decision depends on the request's model, the claims and the scheduler's state, never
        # on the request itself. While every verdict is QUEUE (which changes no state) and the
        # claims stay the same, a model's next request gets the verdict its last one got: with
        # hundreds queued behind a busy model, each release then costs one decision per model
        # instead of one per queued request. Likewise an overdue request's claims depend only on
        # its model and the state.
        queued: set[str] = set()
        claiming: set[str] = set()
        models = self._config.models
        for req in pending:
            model = req.model
            verdict = Verdict.QUEUE if model in queued else self._decide(req, claimed, now)
            self._apply(req, verdict, now)
            if verdict is not Verdict.QUEUE:
                queued.clear()
                claiming.clear()
                continue
            queued.add(model)
            if model in claiming or now - req.at < models[model].max_wait:
                continue  # claims already in, or not overdue (the _claims_of test, inlined)
            claims = self._claims_of(req, now)
            if claims:
                claiming.add(model)
                if not claims <= claimed:
                    claimed |= claims
                    queued.clear()

    # ---- helpers ----

    def claimed(self, now: float) -> frozenset[str]:
        """The models overdue queued requests claim (their targets and eviction sets)."""
        return self._claimed(now) if self._queue else frozenset()

    def _claimed(self, now: float) -> frozenset[str]:
        claimed: set[str] = set()
        claiming: set[str] = set()  # models whose (identical) claims are already in
        models = self._config.models
        for req in self._queue:
            model = req.model
            if model in claiming or now - req.at < models[model].max_wait:
                continue  # claims already in, or not overdue (the _claims_of test, inlined)
            if claims := self._claims_of(req, now):
                claiming.add(model)
                claimed |= claims
        return frozenset(claimed)

    def _claims_of(self, req: Request, now: float) -> frozenset[str]:
        """An overdue queued request claims its target and everything it must evict."""
        if now - req.at < self._config.models[req.model].max_wait:
            return frozenset()
        try:
            evict = self._planner.evict_for(req.model, self._view(req.model))
        except Unplaceable:
            return frozenset()
        return evict | {req.model}

    @property
    def planner(self) -> Planner:
        """The planner in use (a reload replaces it); for advisory reads of its pure decisions."""
        return self._planner

    def _view(self, target: str) -> PlanView:
        running = frozenset(m for m, s in self._slots.items() if s.state is not State.STOPPED and m != target)
        busy = frozenset(m for m, s in self._slots.items() if s.in_flight) | frozenset(self._swaps)
        return PlanView(
            running=running,
            busy=busy,
            last_used={m: s.last_used for m, s in self._slots.items()},
        )

    def _collides(self, target: str, evict: frozenset[str]) -> bool:
        """Reports whether a swap to ``target`` would touch a swap already in progress."""
        for swap in self._swaps.values():
            if swap.target in evict or target in swap.evict or evict & swap.evict:
                return True
        return False

    def _note_load(self, model: str, error: SwapperError | None, now: float) -> None:
        if error is None:
            self._ready_at[model] = now  # the count stays until the child proves stable
        else:
            self._failures[model] = _next_failures(self._failures.get(model), error, now)

    def _note_life(self, model: str, now: float, *, crashed: bool) -> None:
        """A ready child's life ended: a stable one clears the failure count, a short one that
        ended in a crash adds to it (a stop of ours leaves it as it was)."""
        ready_at = self._ready_at.pop(model, None)
        if ready_at is None:
            return
        lived = now - ready_at
        if lived >= STABLE_SECONDS:
            self._failures.pop(model, None)
        elif crashed:
            error = ModelLoadFailed(f"model '{model}' exited {lived:.1f}s after it became ready")
            self._failures[model] = _next_failures(self._failures.get(model), error, now)

    def _backoff(self, model: str, now: float) -> SwapperError | None:
        """The error for a start of ``model`` refused because its loads keep failing, if any."""
        failures = self._failures.get(model)
        if (cfg := self._config.models.get(model)) is not None and cfg.pinned:
            return None  # adopting a pinned service is one probe: refused at once while it is down
        # Below the threshold there is no window at all: a request stamped a moment before the
        # failure was handled (it waited in the inbox behind it) must not be refused.
        if failures is None or failures.count < BACKOFF_AFTER_FAILURES or now >= failures.retry_at:
            return None
        wait = failures.retry_at - now
        return ModelLoadFailed(
            f"model '{model}' keeps failing to load ({failures.count} failures in a row); not retrying"
            f" for another {wait:.1f}s; last error: {failures.last_error.message}",
            status=503,
            code="model_load_backoff",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def _serve(self, req: Request) -> None:
        slot = self._slots[req.model]
        # The in-flight count grows only if the requester took the lease; otherwise no Release
        # would ever balance it and the model could never be evicted again.
        if self._fx.grant(req.req_id, req.model):
            slot.in_flight.add(req.req_id)
        else:
            self._forget(req)

    def _forget(self, req: Request) -> None:
        if self._by_id.pop(req.req_id, None) is not None:
            self._slots[req.model].admitted -= 1

    def _stop(self, model: str, *, cut: bool = True) -> None:
        # Any stop ends a retirement: an unload of a retiring model followed by its drain would
        # otherwise stop it twice, and the second Stopped would mark its next child stopped.
        self._retiring.discard(model)
        self._slots[model].move(State.STOPPING)
        cfg = self._config.models.get(model)  # None: removed by a reload, still draining
        self._fx.stop_child(model, cfg.unload_timeout if cfg else DEFAULT_UNLOAD_TIMEOUT, cut=cut)

    def _drop_removed(self) -> None:
        """Forgets models a reload removed, once they are stopped and nobody holds them."""
        for model in [m for m in self._slots if m not in self._config.models]:
            slot = self._slots[model]
            if slot.state is State.STOPPED and not slot.in_flight and model not in self._swaps:
                del self._slots[model]

    def _abort(self, swap: Swap) -> None:
        """Drops a load nobody waits for any more, because another model wants the room.

        With nobody else waiting the load is left to finish (the client may retry, llama-swap
        #727); here it would only delay the queue.
        """
        del self._swaps[swap.target]
        if swap.start_issued:
            self._stop(swap.target)
        else:
            self._slots[swap.target].move(State.STOPPED)

    def _unload(self, model: str, error: SwapperError) -> None:
        for req in [r for r in self._queue if r.model == model]:
            self._queue.remove(req)
            self._forget(req)
            self._fx.fail(req.req_id, error)
        swap = self._swaps.pop(model, None)
        if swap is not None:
            for req in swap.waiters:
                self._forget(req)
                self._fx.fail(req.req_id, error)
            if not swap.start_issued:
                self._slots[model].move(State.STOPPED)
                return
        if self._slots[model].state in (State.STARTING, State.READY):
            self._stop(model)


@dataclass(frozen=True, slots=True)
class LoadFailures:
    """Consecutive failed loads of one model (cleared by a successful load)."""

    count: int
    last_error: SwapperError
    retry_at: float  # no new start of the model before this time


def _next_failures(prev: LoadFailures | None, error: SwapperError, now: float) -> LoadFailures:
    count = 1 if prev is None else prev.count + 1
    delay = 0.0
    if count >= BACKOFF_AFTER_FAILURES:
        # The exponent is bounded so that a model failing for days cannot overflow a float.
        delay = min(BACKOFF_FIRST * 2.0 ** min(count - BACKOFF_AFTER_FAILURES, 32), BACKOFF_CAP)
    return LoadFailures(count, error, now + delay)


def _too_many(model: str, limit: int) -> ConcurrencyLimit:
    return ConcurrencyLimit(
        f"too many requests for model '{model}' (limit {limit})", headers={"Retry-After": "1"}
    )
