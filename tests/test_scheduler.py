"""Pure scheduler tests: drive the on_* methods, assert on the recorded effects.

No event loop, no processes, no sleeps: time is an argument.
"""

from __future__ import annotations

import pytest

from swapper.core.errors import ConcurrencyLimit, ModelLoadFailed, ModelUnloaded, QueueFull, ShuttingDown
from swapper.core.scheduler import Scheduler
from swapper.core.states import InvalidTransition, Slot, State
from tests.fakes import FakeEffects, StubPlanner, config, model


class Harness:
    def __init__(self, *models: str, planner: StubPlanner | None = None, **cfg: object) -> None:
        per_model = cfg.pop("per_model", {})
        assert isinstance(per_model, dict)
        self.cfg = config(*(model(m, **per_model.get(m, {})) for m in models), **cfg)
        self.fx = FakeEffects()
        self.planner = planner or StubPlanner()
        self.s = Scheduler(self.cfg, self.planner, self.fx)
        self.now = 0.0
        self._ids = 0

    def req(self, model: str) -> int:
        self._ids += 1
        self.s.on_acquire(self._ids, model, self.now)
        return self._ids

    def ready(self, model: str) -> None:
        self.s.on_started(model, self.fx.start_id(model), None, self.now)

    def stopped(self, model: str) -> None:
        self.s.on_stopped(model, self.now)

    def done(self, req_id: int) -> None:
        self.s.on_release(req_id, self.now)

    def bring_up(self, model: str) -> int:
        """Starts ``model`` through a request and leaves it ready with that request in flight."""
        rid = self.req(model)
        for victim in list(self.fx.stops):
            if self.s.state(victim) is State.STOPPING:
                self.stopped(victim)
        self.ready(model)
        return rid


def test_cold_request_starts_model_then_serves() -> None:
    h = Harness("a")
    r = h.req("a")
    assert h.fx.starts == [("a", 1)] and h.fx.grants == []
    h.ready("a")
    assert h.fx.grants == [r]
    assert h.s.state("a") is State.READY


def test_fast_path_when_ready() -> None:
    h = Harness("a")
    h.done(h.bring_up("a"))
    r = h.req("a")
    assert h.fx.grants[-1] == r and len(h.fx.starts) == 1


def test_concurrent_cold_requests_join_one_start() -> None:
    h = Harness("a")
    rs = [h.req("a") for _ in range(3)]
    assert len(h.fx.starts) == 1
    h.ready("a")
    assert h.fx.grants == rs


def test_swap_stops_previous_then_starts() -> None:
    h = Harness("a", "b")
    h.done(h.bring_up("a"))
    rb = h.req("b")
    assert h.fx.stops == ["a"] and h.fx.starts == [("a", 1)]  # b waits for a to be gone
    h.stopped("a")
    assert h.fx.starts[-1][0] == "b"
    h.ready("b")
    assert h.fx.grants[-1] == rb


def test_busy_model_is_never_evicted() -> None:
    h = Harness("a", "b")
    ra1 = h.bring_up("a")
    ra2 = h.req("a")
    rb = h.req("b")
    assert h.fx.stops == [] and rb not in h.fx.grants
    h.done(ra1)
    assert h.fx.stops == []
    h.done(ra2)
    assert h.fx.stops == ["a"]
    h.stopped("a")
    h.ready("b")
    assert h.fx.grants[-1] == rb


def test_collation_abcabc_starts_each_model_once() -> None:
    h = Harness("a", "b", "c")
    ids = [h.req(m) for m in "abcabc"]
    order: list[str] = []
    for m in "abc":
        assert h.fx.starts[-1][0] == m
        order.append(m)
        h.ready(m)
        served = [r for r in h.fx.grants if ids.index(r) % 3 == "abc".index(m)]
        assert len(served) == 2
        for r in served:
            h.done(r)
        if m != "c":
            h.stopped(m)
    assert [m for m, _ in h.fx.starts] == ["a", "b", "c"]


def test_overlapping_evictions_serialise() -> None:
    planner = StubPlanner({"b": frozenset({"x"}), "c": frozenset({"x"}), "x": frozenset()})
    h = Harness("x", "b", "c", planner=planner)
    h.done(h.bring_up("x"))
    h.req("b")
    h.req("c")
    assert h.fx.stops == ["x"]
    assert [m for m, _ in h.fx.starts] == ["x"]
    h.stopped("x")
    # c's swap could not begin while b's eviction of x was in progress; now x is gone and b and
    # c can coexist under this planner, so c starts without a second stop of x.
    assert [m for m, _ in h.fx.starts] == ["x", "b", "c"] and h.fx.stops == ["x"]


def test_disjoint_swaps_run_in_parallel() -> None:
    h = Harness("a", "b", planner=StubPlanner({}))
    h.req("a")
    h.req("b")
    assert [m for m, _ in h.fx.starts] == ["a", "b"]


def test_request_during_stop_waits_then_restarts() -> None:  # llama-swap #946
    h = Harness("a", per_model={"a": {"ttl": 5.0}})
    h.done(h.bring_up("a"))
    h.now = 10.0
    h.s.on_tick(h.now)
    assert h.s.state("a") is State.STOPPING
    r = h.req("a")
    assert len(h.fx.starts) == 1
    h.stopped("a")
    assert len(h.fx.starts) == 2
    h.ready("a")
    assert h.fx.grants[-1] == r


def test_ttl_never_unloads_in_flight() -> None:
    h = Harness("a", per_model={"a": {"ttl": 2.0}})
    r = h.bring_up("a")
    h.now = 100.0
    h.s.on_tick(h.now)
    assert h.fx.stops == []
    h.done(r)
    h.now = 101.0
    h.s.on_tick(h.now)
    assert h.fx.stops == []
    h.now = 102.5
    h.s.on_tick(h.now)
    assert h.fx.stops == ["a"]


def test_load_failure_fails_every_waiter_and_next_request_retries() -> None:
    h = Harness("a")
    r1, r2 = h.req("a"), h.req("a")
    h.s.on_started("a", h.fx.start_id("a"), ModelLoadFailed("exited"), h.now)
    assert isinstance(h.fx.failures[r1], ModelLoadFailed) and r2 in h.fx.failures
    h.req("a")
    assert len(h.fx.starts) == 2


def test_release_of_queued_request_leaves_queue_without_start() -> None:
    h = Harness("a", "b")
    ra = h.bring_up("a")
    rb = h.req("b")
    h.done(rb)
    h.done(ra)
    assert h.fx.stops == [] and [m for m, _ in h.fx.starts] == ["a"]


def test_waiter_leaving_during_load_others_still_served() -> None:
    h = Harness("a")
    r1, r2 = h.req("a"), h.req("a")
    h.done(r1)
    h.fx.gone.add(r1)
    h.ready("a")
    assert h.fx.grants == [r2]


def test_grant_to_departed_requester_does_not_leak_in_flight() -> None:
    h = Harness("a", "b")
    r = h.req("a")
    h.fx.gone.add(r)
    h.ready("a")
    h.req("b")
    assert h.fx.stops == ["a"]  # a is idle: the lost grant was not counted
    h.done(r)  # the late Release is a no-op
    h.done(r)


def test_release_is_idempotent_and_unknown_ids_are_ignored() -> None:
    h = Harness("a")
    r = h.bring_up("a")
    h.done(r)
    h.done(r)
    h.done(999)
    assert h.s.status(h.now)["a"].in_flight == 0
    assert h.s.is_idle()


def test_concurrency_limit_rejects_with_retry_after() -> None:
    h = Harness("a", per_model={"a": {"concurrency_limit": 2}})
    h.req("a")
    h.req("a")
    r3 = h.req("a")
    err = h.fx.failures[r3]
    assert isinstance(err, ConcurrencyLimit) and err.code == "concurrency_limit"
    assert err.headers["Retry-After"] == "1"
    assert len(h.fx.starts) == 1


def test_queue_cap_answers_503() -> None:
    h = Harness("a", "b", max_queued=1)
    h.bring_up("a")
    h.req("b")
    r = h.req("b")
    assert isinstance(h.fx.failures[r], QueueFull)


def test_priority_orders_the_queue() -> None:
    prio = {"a": 10, "b": 5, "c": 5, "d": 1}
    h = Harness("x", "a", "b", "c", "d", per_model={m: {"priority": p} for m, p in prio.items()})
    rx = h.bring_up("x")
    for m in "bdca":
        h.req(m)
    h.done(rx)
    assert h.fx.stops == ["x"]
    h.stopped("x")
    assert h.fx.starts[-1][0] == "a"


def test_aging_lets_old_low_priority_request_go_first() -> None:
    h = Harness("x", "lo", "hi", per_model={"hi": {"priority": 5}})
    rx = h.bring_up("x")
    h.req("lo")
    h.now = 100.0  # lo has aged 10 points
    h.req("hi")
    h.done(rx)
    h.stopped("x")
    assert h.fx.starts[-1][0] == "lo"


def test_starvation_bound_stops_fast_path_for_claimed_model() -> None:
    h = Harness("a", "b", per_model={"b": {"max_wait": 30.0}})
    first = h.bring_up("a")
    rb = h.req("b")
    # Before the bound, new requests for a keep taking the fast path.
    h.now = 10.0
    fresh = h.req("a")
    assert fresh in h.fx.grants
    h.done(first)
    # Past the bound b claims a: new a requests queue, and b swaps in once a drains.
    h.now = 31.0
    h.s.on_tick(h.now)
    late = h.req("a")
    assert late not in h.fx.grants
    h.done(fresh)
    assert h.fx.stops == ["a"]
    h.stopped("a")
    h.ready("b")
    assert rb in h.fx.grants
    h.done(rb)
    h.stopped("b") if h.s.state("b") is State.STOPPING else None
    assert late not in h.fx.grants  # it waits for a's swap back


def test_continuous_load_cannot_hold_a_queued_swap_past_the_bound() -> None:
    h = Harness("a", "b", per_model={"b": {"max_wait": 5.0}})
    in_flight = [h.bring_up("a")]
    rb = h.req("b")
    # A stream of overlapping a requests: each arrives before the previous one finishes.
    for step in range(1, 40):
        h.now = step * 1.0
        h.s.on_tick(h.now)
        in_flight.append(h.req("a"))
        h.done(in_flight.pop(0))
        if h.fx.stops:
            break
    assert h.fx.stops == ["a"]
    assert h.now <= 5.0 + 2.0  # the bound plus the drain of what was in flight then
    h.stopped("a")
    h.ready("b")
    assert rb in h.fx.grants


def test_unload_fails_waiters_and_stops() -> None:
    h = Harness("a", "b")
    ra = h.bring_up("a")
    rb = h.req("b")
    h.s.on_unload(["a", "b"], h.now)
    assert isinstance(h.fx.failures[rb], ModelUnloaded)
    assert h.fx.stops == ["a"]
    h.done(ra)
    h.stopped("a")
    assert h.s.all_stopped(["a", "b"])


def test_unload_during_start_aborts_it_and_ignores_late_started() -> None:
    h = Harness("a")
    r = h.req("a")
    sid = h.fx.start_id("a")
    h.s.on_unload(["a"], h.now)
    assert isinstance(h.fx.failures[r], ModelUnloaded) and h.fx.stops == ["a"]
    h.s.on_started("a", sid, None, h.now)  # stale: already aborted
    assert h.s.state("a") is State.STOPPING
    h.stopped("a")
    assert h.s.state("a") is State.STOPPED


def test_crash_while_ready_marks_stopped_and_next_request_restarts() -> None:
    h = Harness("a")
    h.done(h.bring_up("a"))
    h.s.on_child_exited("a", h.now)
    assert h.s.state("a") is State.STOPPED
    h.req("a")
    assert len(h.fx.starts) == 2


def test_shutdown_fails_everything_and_refuses_new_requests() -> None:
    h = Harness("a", "b")
    h.bring_up("a")
    rb = h.req("b")
    h.s.on_shutdown(h.now)
    assert isinstance(h.fx.failures[rb], ShuttingDown)
    r = h.req("a")
    assert isinstance(h.fx.failures[r], ShuttingDown)


@pytest.mark.parametrize("unknown", ["nope", ""])
def test_unknown_model_fails(unknown: str) -> None:
    h = Harness("a")
    r = h.req(unknown)
    assert h.fx.failures[r].status == 404


def test_status_reports_queue_age() -> None:
    h = Harness("a", "b")
    h.bring_up("a")
    h.req("b")
    h.now = 7.0
    st = h.s.status(h.now)
    assert st["b"].queued == 1 and st["b"].oldest_wait == 7.0
    assert st["a"].in_flight == 1 and st["a"].state is State.READY


def test_load_abandoned_by_all_waiters_is_aborted_when_another_model_waits() -> None:
    h = Harness("a", "b")
    ra = h.req("a")
    h.req("b")  # queued behind a's load
    h.done(ra)
    assert h.fx.stops == ["a"]  # the start of a is aborted
    h.stopped("a")
    assert h.fx.starts[-1][0] == "b"


def test_load_abandoned_with_nobody_else_waiting_finishes() -> None:
    h = Harness("a")
    ra = h.req("a")
    h.done(ra)
    assert h.fx.stops == []
    h.ready("a")
    assert h.s.state("a") is State.READY


def test_queue_position_is_reported() -> None:
    h = Harness("a", "b", "c")
    h.bring_up("a")
    rb, rc = h.req("b"), h.req("c")
    assert (h.s.queue_position(rb), h.s.queue_position(rc)) == (1, 2)
    assert h.s.queue_position(1) is None


def test_reload_restarts_only_changed_models_after_they_drain() -> None:
    planner = StubPlanner({})  # a and b may run together
    h = Harness("a", "b", planner=planner)
    ra = h.bring_up("a")
    h.done(h.bring_up("b"))
    new = config(model("a", ttl=99.0), model("b"), model("c"))
    changed = h.s.on_reload(new, planner, h.now)
    assert changed == {"a"}
    assert h.fx.stops == []  # a has a request in flight: it finishes first
    r2 = h.req("a")
    assert r2 not in h.fx.grants  # new work waits for the restart
    h.done(ra)
    assert h.fx.stops == ["a"]
    h.stopped("a")
    h.ready("a")
    assert r2 in h.fx.grants and h.s.state("b") is State.READY
    h.req("c")
    assert h.fx.starts[-1][0] == "c"


def test_reload_removing_a_model_stops_it_and_forgets_it() -> None:
    h = Harness("a", "b")
    h.done(h.bring_up("a"))
    h.s.on_reload(config(model("b")), h.planner, h.now)
    assert h.fx.stops == ["a"]
    h.stopped("a")
    assert "a" not in h.s.status(h.now)
    r = h.req("a")
    assert h.fx.failures[r].status == 404


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_a_model_makes_only_the_state_changes_in_the_transition_table(old: State, new: State) -> None:
    slot = Slot(state=old)
    valid = {
        (State.STOPPED, State.STARTING),
        (State.STARTING, State.READY),
        (State.STARTING, State.STOPPING),
        (State.STARTING, State.STOPPED),
        (State.READY, State.STOPPING),
        (State.READY, State.STOPPED),
        (State.STOPPING, State.STOPPED),
    }
    if (old, new) in valid:
        slot.move(new)
        assert slot.state is new
    else:
        with pytest.raises(InvalidTransition, match=f"model state {old} cannot become {new}"):
            slot.move(new)
        assert slot.state is old
