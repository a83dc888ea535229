"""Overlap: a start waits only for the stops its planner asked for.

When the planner says the target fits while another model is still stopping (the memory planner
with room to spare, a non-exclusive group, a model on another device), the new child is spawned
at once, not after the old one has exited; when the planner needs the stopping model gone, the
start waits for its ``Stopped``. Pure scheduler tests with the real planners: no processes.
"""

from __future__ import annotations

from swapper.config.schema import Config, GroupConfig, RoutingConfig
from swapper.core.scheduler import Scheduler
from swapper.core.states import State
from swapper.memory.gpu import GpuUsage
from swapper.planners.group import DEFAULT_GROUP, GroupPlanner
from tests.fakes import FakeEffects, model
from tests.test_planner_memory import FakeSampler, make, mib_model


def stopping_by_ttl(sched: Scheduler, fx: FakeEffects, name: str) -> None:
    """Brings ``name`` up through a request, releases it, and lets its TTL stop it."""
    sched.on_acquire(1, name, 0.0)
    sched.on_started(name, fx.start_id(name), None, 0.0)
    sched.on_release(1, 0.0)
    sched.on_tick(100.0)
    assert sched.state(name) is State.STOPPING and fx.stops == [name]


def test_memory_a_target_that_fits_beside_a_stopping_model_starts_at_once() -> None:
    planner, _ = make(mib_model("old", 400, ttl=1.0), mib_model("new", 400), mib_model("big", 800))
    fx = FakeEffects()
    sched = Scheduler(planner._config, planner, fx)
    stopping_by_ttl(sched, fx, "old")
    sched.on_acquire(2, "new", 100.0)
    assert [m for m, _ in fx.starts] == ["old", "new"]  # spawned while old is still stopping
    # One that does not fit beside it waits for the stop.
    sched.on_acquire(3, "big", 100.0)
    assert [m for m, _ in fx.starts] == ["old", "new"]
    sched.on_started("new", fx.start_id("new"), None, 100.0)
    sched.on_release(2, 100.0)
    sched.on_stopped("old", 100.1)
    assert fx.stops == ["old", "new"]  # big needs new's room too, now that it is idle
    sched.on_stopped("new", 100.2)
    assert [m for m, _ in fx.starts] == ["old", "new", "big"]


def test_memory_a_model_on_another_device_starts_while_the_old_one_stops() -> None:
    gpu = (GpuUsage(0, "Fake H100", 1000 * 1024 * 1024, 0),)
    planner, _ = make(
        mib_model("cpu-model", 900, memory_device="cpu", ttl=1.0),
        mib_model("gpu-model", 900, memory_device="gpu"),
        sampler=FakeSampler(reason=None, gpus=gpu),
    )
    fx = FakeEffects()
    sched = Scheduler(planner._config, planner, fx)
    stopping_by_ttl(sched, fx, "cpu-model")
    sched.on_acquire(2, "gpu-model", 100.0)
    assert [m for m, _ in fx.starts] == ["cpu-model", "gpu-model"]


def group_config(*groups: GroupConfig) -> Config:
    models = {m for g in groups for m in g.members}
    return Config(
        models={m: model(m, ttl=1.0) for m in sorted(models)},
        routing=RoutingConfig(use="group", groups=groups),
    )


def test_a_non_exclusive_group_starts_while_another_groups_model_stops() -> None:
    g1, g2 = GroupConfig("g1", ("old",), exclusive=False), GroupConfig("g2", ("new",), exclusive=False)
    cfg = group_config(g1, g2)
    fx = FakeEffects()
    sched = Scheduler(cfg, GroupPlanner(cfg), fx)
    stopping_by_ttl(sched, fx, "old")
    sched.on_acquire(2, "new", 100.0)
    assert [m for m, _ in fx.starts] == ["old", "new"]


def test_one_at_a_time_waits_for_the_stopping_model() -> None:
    cfg = group_config(GroupConfig(DEFAULT_GROUP, ("new", "old")))
    fx = FakeEffects()
    sched = Scheduler(cfg, GroupPlanner(cfg), fx)
    stopping_by_ttl(sched, fx, "old")
    sched.on_acquire(2, "new", 100.0)
    assert [m for m, _ in fx.starts] == ["old"] and fx.stops == ["old"]  # no second stop
    sched.on_stopped("old", 100.1)
    assert [m for m, _ in fx.starts] == ["old", "new"]
