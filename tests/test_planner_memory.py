"""The memory planner, its ledger and monitor, with a fake sampler: no processes, no NVML."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from swapper.config.schema import Config, MemoryConfig, ModelConfig, RoutingConfig
from swapper.core.errors import SwapperError
from swapper.core.scheduler import Scheduler
from swapper.core.states import State
from swapper.memory.footprint import MIB
from swapper.memory.gpu import ChildUsage, DeviceUsage, GpuUsage, MemorySample, ReleaseProbe
from swapper.memory.ledger import OVERHEAD, Footprint, Measurement, MemoryLedger, fingerprint
from swapper.memory.monitor import MemoryMonitor, read_state, write_state
from swapper.planners import PlanView, Unplaceable
from swapper.planners.build import make_planner
from swapper.planners.memory import MemoryPlanner
from tests.fakes import FakeEffects, model

GIB = 1024 * MIB


@dataclass
class FakeSampler:
    """Serves scripted samples and release probes; records what it was asked."""

    reason: str | None = "NVML is not available (fake)"
    ram_total: int = 1000 * MIB
    ram_used: int = 0  # by everything except the children in ``children``
    gpus: tuple[GpuUsage, ...] = ()
    children: dict[str, ChildUsage] = field(default_factory=dict)
    probes: list[ReleaseProbe] = field(default_factory=list)  # popped one per probe; the last repeats
    probed: int = 0
    closed: bool = False

    def open(self) -> str | None:
        return self.reason

    def sample(self, children: Mapping[str, int], at: float) -> MemorySample:
        kids = {m: u for m, u in self.children.items() if children.get(m) == u.pid}
        used = self.ram_used + sum(u.ram for u in kids.values())
        return MemorySample(at, DeviceUsage(self.ram_total, used), self.gpus, kids, self.reason)

    def probe(self, pgid: int, pids: frozenset[int]) -> ReleaseProbe:
        self.probed += 1
        return self.probes.pop(0) if len(self.probes) > 1 else self.probes[0]

    def close(self) -> None:
        self.closed = True


def memory_config(*models: ModelConfig, **settings: Any) -> Config:
    memory = MemoryConfig(**{"reserve": 0, **settings})
    return Config(models={m.id: m for m in models}, routing=RoutingConfig(use="memory", memory=memory))


def mib_model(mid: str, mib: int | None, **kw: Any) -> ModelConfig:
    return model(mid, memory_estimate=None if mib is None else mib * MIB, **kw)


# Each planner's monitor, as the run loop would hold it (the planner only reads the ledger).
_MONITORS: dict[int, MemoryMonitor] = {}


def monitor_of(planner: MemoryPlanner) -> MemoryMonitor:
    return _MONITORS[id(planner)]


def make(
    *models: ModelConfig, sampler: FakeSampler | None = None, state_file: Path | None = None, **settings: Any
) -> tuple[MemoryPlanner, FakeSampler]:
    config = memory_config(*models, **settings)
    sampler = sampler or FakeSampler()
    saved = read_state(state_file) if state_file else {}
    monitor = MemoryMonitor(MemoryLedger(config, saved=saved), sampler, state_file)
    planner = MemoryPlanner(config, monitor.ledger)
    _MONITORS[id(planner)] = monitor
    planner.ledger.on_sample(sampler.sample({}, 0.0))
    return planner, sampler


def view(running: set[str], busy: set[str] = frozenset(), **last_used: float) -> PlanView:  # type: ignore[assignment]
    return PlanView(running=frozenset(running), busy=frozenset(busy), last_used=last_used)


# ---- decisions ----


def test_fits_without_eviction() -> None:
    planner, _ = make(mib_model("a", 300), mib_model("b", 300))
    assert planner.evict_for("b", view({"a"})) == frozenset()


def test_already_running_target_evicts_nothing() -> None:
    planner, _ = make(mib_model("a", 900), mib_model("b", 900))
    assert planner.evict_for("a", view({"a", "b"})) == frozenset()


def test_evicts_least_recently_used_idle_model() -> None:
    planner, _ = make(mib_model("a", 400), mib_model("b", 400), mib_model("c", 400))
    assert planner.evict_for("c", view({"a", "b"}, a=5.0, b=3.0)) == {"b"}
    assert planner.evict_for("c", view({"a", "b"}, a=3.0, b=5.0)) == {"a"}


def test_evicts_as_many_as_needed_and_no_more() -> None:
    models = [mib_model(m, 300) for m in "abc"] + [mib_model("big", 800)]
    planner, _ = make(*models)
    assert planner.evict_for("big", view({"a", "b", "c"}, a=1.0, b=2.0, c=3.0)) == {"a", "b", "c"}
    planner2, _ = make(*[mib_model(m, 300) for m in "abc"], mib_model("mid", 500))
    assert planner2.evict_for("mid", view({"a", "b", "c"}, a=1.0, b=2.0, c=3.0)) == {"a", "b"}


def test_an_unneeded_victim_is_kept() -> None:
    # LRU order takes the small model first, but only the big one had to go.
    planner, _ = make(mib_model("small", 100), mib_model("large", 600), mib_model("t", 500))
    assert planner.evict_for("t", view({"small", "large"}, small=1.0, large=2.0)) == {"large"}


def test_idle_model_goes_before_an_older_busy_one() -> None:
    planner, _ = make(mib_model("a", 400), mib_model("b", 400), mib_model("c", 400))
    assert planner.evict_for("c", view({"a", "b"}, busy={"a"}, a=1.0, b=9.0)) == {"b"}


def test_busy_model_is_named_only_when_nothing_else_makes_room() -> None:
    planner, _ = make(mib_model("a", 600), mib_model("b", 100), mib_model("c", 600))
    assert planner.evict_for("c", view({"a", "b"}, busy={"a"}, a=1.0, b=2.0)) == {"a"}


def test_scheduler_waits_for_a_busy_victim_to_drain() -> None:
    planner, _ = make(mib_model("a", 600), mib_model("b", 600))
    fx = FakeEffects()
    sched = Scheduler(planner._config, planner, fx)
    sched.on_acquire(1, "a", 0.0)
    sched.on_started("a", fx.start_id("a"), None, 0.1)
    assert fx.grants == [1]
    sched.on_acquire(2, "b", 0.2)  # a is busy: b must wait, a keeps serving
    assert fx.stops == [] and sched.state("a") is State.READY
    sched.on_release(1, 0.3)
    assert fx.stops == ["a"]
    sched.on_stopped("a", 0.4)
    assert [m for m, _ in fx.starts] == ["a", "b"]


def test_lower_priority_is_evicted_first() -> None:
    planner, _ = make(mib_model("vip", 400, priority=10), mib_model("low", 400), mib_model("c", 400))
    # vip is the least recently used, but low has the lower priority.
    assert planner.evict_for("c", view({"vip", "low"}, vip=1.0, low=9.0)) == {"low"}


def test_only_models_on_the_targets_device_are_candidates() -> None:
    gpu = (GpuUsage(0, "Fake H100", 1000 * MIB, 0),)
    models = (
        mib_model("g1", 600, memory_device="gpu"),
        mib_model("g2", 600, memory_device="gpu"),
        mib_model("cpu", 900, memory_device="cpu"),
    )
    planner, _ = make(*models, sampler=FakeSampler(reason=None, gpus=gpu))
    assert planner.ledger.device_of("g1") == "gpu" and planner.ledger.device_of("cpu") == "ram"
    assert planner.evict_for("g2", view({"g1", "cpu"}, cpu=0.0, g1=5.0)) == {"g1"}


def test_without_nvml_gpu_models_are_accounted_in_ram() -> None:
    planner, _ = make(mib_model("g", 100, memory_device="gpu"))
    assert planner.ledger.device_of("g") == "ram"


def test_a_gpu_budget_without_nvml_plans_the_gpu_by_budget() -> None:
    planner, _ = make(mib_model("g1", 300, memory_device="auto"), mib_model("g2", 300), gpu_budget=500 * MIB)
    assert planner.ledger.device_of("g1") == "gpu"
    assert planner.evict_for("g2", view({"g1"})) == {"g1"}


def test_budget_and_reserve_limit_the_device() -> None:
    models = (mib_model("a", 300), mib_model("b", 300))
    assert make(*models, ram_budget=500 * MIB)[0].evict_for("b", view({"a"})) == {"a"}
    assert make(*models, reserve=500 * MIB)[0].evict_for("b", view({"a"})) == {"a"}
    assert make(*models, reserve=400 * MIB)[0].evict_for("b", view({"a"})) == frozenset()


def test_memory_used_outside_swapper_counts() -> None:
    planner, _ = make(mib_model("a", 300), mib_model("b", 300), sampler=FakeSampler(ram_used=500 * MIB))
    assert planner.evict_for("b", view({"a"})) == {"a"}


def test_not_fitting_only_because_of_others_evicts_everything_and_warns() -> None:
    planner, _ = make(mib_model("a", 100), mib_model("b", 600), sampler=FakeSampler(ram_used=800 * MIB))
    plan = planner.plan("b", view({"a"}))
    assert plan.evict == {"a"} and not plan.fits
    planner.evict_for("b", view({"a"}))
    with capture_logs() as logs:
        planner.on_commit("b", frozenset({"a"}))
    assert [e["log_level"] for e in logs] == ["warning"]
    assert "starting anyway" in logs[0]["event"]


def test_bigger_than_the_budget_is_unplaceable() -> None:
    planner, _ = make(mib_model("a", 100), mib_model("huge", 600), ram_budget=500 * MIB)
    with pytest.raises(Unplaceable, match=r"model 'huge' needs 600\.0 MiB of system RAM .*budget 500\.0 MiB"):
        planner.evict_for("huge", view({"a"}))


def test_scheduler_answers_unplaceable_with_507() -> None:
    planner, _ = make(mib_model("huge", 2000))
    fx = FakeEffects()
    Scheduler(planner._config, planner, fx).on_acquire(1, "huge", 0.0)
    err = fx.failures[1]
    assert isinstance(err, SwapperError) and err.status == 507 and "huge" in err.message
    assert fx.starts == []


def test_a_guess_never_makes_a_model_unplaceable() -> None:
    # No -m in cmd and no estimate: a flat guess (1 GiB) is capped at the budget.
    planner, _ = make(mib_model("a", 100), mib_model("unknown", None), ram_budget=500 * MIB)
    assert planner.ledger.footprint("unknown").source == "guess"
    assert planner.evict_for("unknown", view({"a"})) == {"a"}


def test_on_commit_logs_the_plan() -> None:
    planner, _ = make(mib_model("a", 400), mib_model("b", 400), mib_model("c", 400))
    evict = planner.evict_for("c", view({"a", "b"}, a=1.0, b=2.0))
    with capture_logs() as logs:
        planner.on_commit("c", evict)
        planner.on_commit("c", evict)  # no plan left: silent
    assert len(logs) == 1
    assert logs[0]["evict"] == ["a"] and logs[0]["need"] == "400.0 MiB" and logs[0]["source"] == "override"


def test_make_planner_builds_the_memory_planner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPPER_CACHE", str(tmp_path))
    config = memory_config(mib_model("a", 1))
    ledger = MemoryLedger(config)
    planner = make_planner(config, ledger=ledger)
    assert isinstance(planner, MemoryPlanner)
    assert planner.ledger is ledger  # the monitor's, which the run loop owns and feeds


# ---- learning ----


def sample_with(sampler: FakeSampler, at: float, **children: ChildUsage) -> MemorySample:
    sampler.children = dict(children)
    return sampler.sample({m: u.pid for m, u in children.items()}, at)


def test_learns_the_measured_footprint_after_ready() -> None:
    planner, sampler = make(mib_model("a", 400), mib_model("b", 400), mib_model("c", 400))
    led = planner.ledger
    usage = ChildUsage(pid=42, ram=150 * MIB, gpu=None, processes=1)
    led.on_sample(sample_with(sampler, 1.0, a=usage))
    assert led.footprint("a") == Footprint(400 * MIB, "override")  # not ready yet: not learned
    led.on_ready("a", 42, at=2.0)
    led.on_sample(sample_with(sampler, 1.5, a=usage))  # begun before ready: ignored
    assert led.footprint("a").source == "override"
    with capture_logs() as logs:
        led.on_sample(sample_with(sampler, 2.5, a=usage))
    assert led.footprint("a") == Footprint(150 * MIB, "measured")
    assert logs[0]["event"] == "measured footprint" and logs[0]["measured"] == "150.0 MiB"
    # A higher peak while it runs is remembered; a dip is not.
    led.on_sample(sample_with(sampler, 3.0, a=replace(usage, ram=180 * MIB)))
    led.on_sample(sample_with(sampler, 4.0, a=replace(usage, ram=90 * MIB)))
    assert led.footprint("a").bytes == 180 * MIB
    # The next run starts afresh from its own measurement.
    led.on_ready("a", 43, at=5.0)
    led.on_sample(sample_with(sampler, 6.0, a=replace(usage, pid=43, ram=120 * MIB)))
    assert led.footprint("a").bytes == 120 * MIB


def test_a_measured_footprint_changes_the_decision() -> None:
    planner, sampler = make(mib_model("a", 600), mib_model("b", 600))
    assert planner.evict_for("b", view({"a"})) == {"a"}
    planner.ledger.on_ready("a", 7, at=0.0)
    planner.ledger.on_sample(sample_with(sampler, 1.0, a=ChildUsage(7, 200 * MIB, None, 1)))
    assert planner.evict_for("b", view({"a"})) == frozenset()


def test_sampled_use_above_the_footprint_counts() -> None:
    planner, sampler = make(mib_model("a", 200), mib_model("b", 600))
    assert planner.evict_for("b", view({"a"})) == frozenset()
    planner.ledger.on_sample(sample_with(sampler, 1.0, a=ChildUsage(7, 500 * MIB, None, 1)))
    assert planner.evict_for("b", view({"a"})) == {"a"}


def test_a_gpu_model_nvml_shows_holding_nothing_keeps_its_estimate() -> None:
    gpu = (GpuUsage(0, "Fake", 1000 * MIB, 0),)
    planner, sampler = make(
        mib_model("g", 300, memory_device="gpu"), sampler=FakeSampler(reason=None, gpus=gpu)
    )
    planner.ledger.on_ready("g", 9, at=0.0)
    with capture_logs() as logs:
        planner.ledger.on_sample(sample_with(sampler, 1.0, g=ChildUsage(9, 50 * MIB, 0, 1)))
        planner.ledger.on_sample(sample_with(sampler, 2.0, g=ChildUsage(9, 50 * MIB, 0, 1)))
    assert planner.ledger.footprint("g").source == "override"
    assert len(logs) == 1 and logs[0]["log_level"] == "warning"
    planner.ledger.on_ready("g", 10, at=3.0)
    planner.ledger.on_sample(sample_with(sampler, 4.0, g=ChildUsage(10, 50 * MIB, 280 * MIB, 1)))
    assert planner.ledger.footprint("g") == Footprint(280 * MIB, "measured")


def test_file_estimates_get_the_device_overhead() -> None:
    planner, _ = make(replace(model("x"), cmd=("llama-server", "-m", "/nonexistent/x.gguf")))
    fp = planner.ledger.footprint("x")
    assert fp.source == "guess" and fp.bytes == 1 * GIB + OVERHEAD["ram"]


# ---- persistence ----


def test_persists_and_restores_measured_footprints(tmp_path: Path) -> None:
    path = tmp_path / "state" / "memory.json"
    models = (mib_model("a", 400, port=5801), mib_model("b", 400))
    planner, sampler = make(*models, state_file=path)
    planner.ledger.on_ready("a", 42, at=0.0)
    planner.ledger.on_sample(sample_with(sampler, 1.0, a=ChildUsage(42, 123 * MIB, None, 1)))
    write_state(path, planner.ledger.measurements)
    doc = json.loads(path.read_text())
    assert doc["models"]["a"]["bytes"] == 123 * MIB and doc["models"]["a"]["device"] == "ram"

    restored, _ = make(*models, state_file=path)
    assert restored.ledger.footprint("a") == Footprint(123 * MIB, "measured")
    assert restored.ledger.footprint("b").source == "override"
    # Another port is the same command; another context size is not.
    moved = replace(models[0], port=5900, cmd_text=models[0].cmd_text)
    assert fingerprint(moved) == fingerprint(models[0])
    changed = replace(models[0], cmd_text=models[0].cmd_text + " -c 8192")
    assert make(changed, models[1], state_file=path)[0].ledger.footprint("a").source == "override"


def test_state_of_models_not_in_this_config_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "memory.json"
    write_state(path, {"other": Measurement("gpu", 5 * GIB, "abc", 1.0)})
    planner, _ = make(mib_model("a", 1), state_file=path)
    assert planner.ledger.measurements["other"].bytes == 5 * GIB


def test_a_damaged_state_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "memory.json"
    path.write_text("{not json")
    with capture_logs() as logs:
        assert read_state(path) == {}
    assert logs[0]["log_level"] == "warning"
    assert read_state(tmp_path / "missing.json") == {}


# ---- the monitor: sampler task, release waits, status ----


async def test_open_applies_a_first_sample_and_says_once_why_there_is_no_gpu() -> None:
    config = memory_config(mib_model("a", 1))
    ledger = MemoryLedger(config)
    monitor = MemoryMonitor(ledger, FakeSampler(ram_total=2 * GIB), None)
    with capture_logs() as logs:
        await monitor.open(dict)
    assert ledger.capacity("ram").total == 2 * GIB
    assert len(logs) == 1 and "NVML is not available (fake)" in logs[0]["event"]
    assert "system RAM" in logs[0]["event"]


async def test_sampler_task_measures_at_once_after_ready_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "memory.json"
    planner, sampler = make(mib_model("a", 400), state_file=path)
    monitor = monitor_of(planner)
    sampler.children = {"a": ChildUsage(42, 111 * MIB, None, 1)}
    posted: list[MemorySample] = []
    measured = asyncio.Event()

    def post(sample: MemorySample) -> None:  # stands in for the run loop: apply in the handler
        posted.append(sample)
        monitor.on_sample(sample)
        if planner.ledger.footprint("a").source == "measured":
            measured.set()

    task = asyncio.ensure_future(monitor.sample_forever(post, lambda: {"a": 42}))
    monitor.on_ready("a", 42)  # wakes the sampler now rather than a second from now
    async with asyncio.timeout(0.9):
        await measured.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not sampler.closed  # the process's one sampler: closed by its maker, not the monitor
    assert read_state(path)["a"].bytes == 111 * MIB


async def test_waits_until_the_stopped_tree_is_gone() -> None:
    planner, sampler = make(mib_model("a", 100), release_timeout=5.0)
    sampler.probes = [ReleaseProbe(frozenset({42, 43}), 0, None), ReleaseProbe(frozenset({43}), 0, None)]
    sampler.probes.append(ReleaseProbe(frozenset(), 0, None))
    watch = await monitor_of(planner).watch_release("a", 42)
    assert sampler.probed == 0  # without GPUs nothing is probed before the stop
    took = await watch.wait_released()
    assert took is not None and sampler.probed == 3


async def test_waits_until_the_gpu_gives_the_memory_back() -> None:
    gpu = (GpuUsage(0, "Fake", 1000 * MIB, 0),)
    planner, sampler = make(
        mib_model("a", 100), sampler=FakeSampler(reason=None, gpus=gpu), release_timeout=5.0
    )
    sampler.probes = [ReleaseProbe(frozenset({42}), 400 * MIB, 900 * MIB)]  # held before the stop
    watch = await monitor_of(planner).watch_release("a", 42)
    sampler.probed = 0
    sampler.probes = [
        ReleaseProbe(frozenset(), 400 * MIB, 900 * MIB),  # exited, but NVML still lists it
        ReleaseProbe(frozenset(), 0, 880 * MIB),  # not listed, but the device has not freed it yet
        ReleaseProbe(frozenset(), 0, 520 * MIB),
    ]
    assert await watch.wait_released() is not None
    assert sampler.probed == 3


async def test_gives_up_waiting_after_the_release_timeout() -> None:
    planner, sampler = make(mib_model("a", 100), release_timeout=0.05)
    sampler.probes = [ReleaseProbe(frozenset({42}), 0, None)]
    watch = await monitor_of(planner).watch_release("a", 42)
    with capture_logs() as logs:
        assert await watch.wait_released() is None
    assert logs[-1]["log_level"] == "warning" and logs[-1]["processes_alive"] == [42]


async def test_nothing_to_wait_for_without_a_pid() -> None:
    planner, sampler = make(mib_model("a", 100))
    watch = await monitor_of(planner).watch_release("a", None)
    assert await watch.wait_released() == 0.0 and sampler.probed == 0


def test_status_is_plain_json() -> None:
    gpu = (GpuUsage(0, "Fake H100", 80 * GIB, 1 * GIB),)
    planner, sampler = make(
        mib_model("a", 400, memory_device="gpu"),
        mib_model("c", 100, memory_device="cpu"),
        sampler=FakeSampler(reason=None, gpus=gpu),
    )
    planner.ledger.on_sample(sample_with(sampler, 1.0, c=ChildUsage(5, 90 * MIB, None, 1)))
    status = json.loads(json.dumps(monitor_of(planner).status()))
    assert status["nvml"] is True
    assert status["devices"]["gpu"]["total"] == 80 * GIB and status["devices"]["gpu"]["free"] == 79 * GIB
    assert status["devices"]["ram"]["usable"] == 1000 * MIB
    assert status["gpus"][0]["name"] == "Fake H100"
    assert status["models"]["a"]["device"] == "gpu" and status["models"]["a"]["used"] is None
    expected = {"device": "ram", "pid": 5, "used": 90 * MIB, "source": "override"}
    assert status["models"]["c"].items() >= expected.items()


def test_nothing_is_learned_once_the_stop_was_decided() -> None:
    # Evicted before its first sample: what is left while it shuts down is no footprint.
    planner, sampler = make(mib_model("a", 400))
    led = planner.ledger
    led.on_ready("a", 42, at=0.0)
    monitor_of(planner).on_stopping("a")
    led.on_sample(sample_with(sampler, 1.0, a=ChildUsage(42, 3 * MIB, None, 1)))
    assert led.footprint("a").source == "override"


async def test_a_reload_hands_the_ledger_over_and_close_ends_sampling(tmp_path: Path) -> None:
    old, sampler = make(mib_model("a", 400), mib_model("b", 400), state_file=tmp_path / "old.json")
    old.ledger.on_ready("a", 42, at=0.0)
    old.ledger.on_sample(sample_with(sampler, 1.0, a=ChildUsage(42, 111 * MIB, None, 1)))
    new, _ = make(mib_model("a", 400), ram_budget=500 * MIB, state_file=tmp_path / "new.json")
    monitor = monitor_of(old).adopt(monitor_of(new))
    assert monitor is monitor_of(old) and monitor.ledger is new.ledger
    assert new.ledger.footprint("a") == Footprint(111 * MIB, "measured")
    assert new.ledger.capacity("ram") == replace(old.ledger.capacity("ram"), budget=500 * MIB)
    assert new.ledger.status()["nvml_unavailable_reason"] == "NVML is not available (fake)"

    posted: list[MemorySample] = []
    task = asyncio.ensure_future(monitor.sample_forever(posted.append, lambda: {"a": 42}))
    monitor.close()
    await task  # ends on its own, saving under the new config's file
    assert read_state(tmp_path / "new.json")["a"].bytes == 111 * MIB
