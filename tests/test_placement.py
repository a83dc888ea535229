"""Per-GPU planning, pure: where a model lives (``swapper.config.placement``) and the planner's decisions
over two and four GPUs with scripted samples (no processes; ``tests/test_gpus_real.py`` runs the
same with real children and a fake NVML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swapper.config.load import parse_config
from swapper.config.placement import configured, parse_devices, split
from swapper.config.schema import ConfigError, GpuLimits
from swapper.config.services import ServiceSpec
from swapper.memory.footprint import MIB
from swapper.memory.gpu import ChildUsage, GpuUsage
from swapper.memory.ledger import Measurement
from swapper.memory.monitor import read_state, write_state
from swapper.planners import PlanView, Unplaceable, coexisting
from tests.test_planner_memory import FakeSampler, make, mib_model, sample_with


def gpus(n: int, total_mib: int = 1000, used: dict[int, int] | None = None) -> tuple[GpuUsage, ...]:
    return tuple(GpuUsage(i, f"gpu{i}", total_mib * MIB, (used or {}).get(i, 0) * MIB) for i in range(n))


def on(mid: str, mib: int, devices: tuple[int, ...] | None, **kw: Any) -> Any:
    return mib_model(mid, mib, memory_gpus=devices, memory_device="gpu", **kw)


def view(running: set[str], **last_used: float) -> PlanView:
    return PlanView(running=frozenset(running), last_used=last_used)


# ---- where a model lives ----


@pytest.mark.parametrize(
    ("devices", "env", "argv", "expected"),
    [
        ((1,), [("CUDA_VISIBLE_DEVICES", "0")], ["-dev", "CUDA0"], ((1,), "config")),
        (None, [("CUDA_VISIBLE_DEVICES", "2,3")], [], ((2, 3), "env")),
        (None, [("CUDA_VISIBLE_DEVICES", "2,3")], ["--device", "CUDA1"], ((3,), "flags")),
        (None, [], ["-dev", "CUDA1,CUDA0"], ((0, 1), "flags")),
        (None, [], ["--tensor-split", "0,3,1"], ((1, 2), "flags")),
        (None, [], ["-sm", "none", "-mg", "2"], ((2,), "flags")),
        (None, [], ["-mg", "2"], None),  # layer split over every GPU: main-gpu alone says nothing
        (None, [("CUDA_VISIBLE_DEVICES", "GPU-1234")], [], None),  # UUIDs are not indices
        (None, [], ["-m", "x.gguf"], None),
    ],
)
def test_placement_sources_in_order(
    devices: tuple[int, ...] | None, env: list[tuple[str, str]], argv: list[str], expected: Any
) -> None:
    found = configured(devices, env, argv)
    assert (None if found is None else (found.gpus, found.source)) == expected


def test_tensor_split_shares_the_footprint() -> None:
    place = configured(None, [], ["-ts", "3,1"])
    assert place is not None and place.gpus == (0, 1)
    assert split(400 * MIB, place) == {0: 300 * MIB, 1: 100 * MIB}


def test_devices_and_gpu_limits_in_the_config() -> None:
    cfg = parse_config(
        "routing: {router: {use: memory, settings: {memory:\n"
        "  {gpuBudget: 8GiB, gpus: {1: {budget: 4GiB, reserve: 0}}}}}}\n"
        "models:\n  m:\n    cmd: x -m y --port ${PORT}\n    memory: {devices: [1, 0]}\n"
    )
    assert cfg.models["m"].memory_gpus == (0, 1)
    mem = cfg.routing.memory
    assert mem.gpus == {1: GpuLimits(4 * 1024 * MIB, 0)}
    assert (mem.gpu_budget_of(0), mem.gpu_budget_of(1)) == (8 * 1024 * MIB, 4 * 1024 * MIB)
    assert (mem.reserve_of(0), mem.reserve_of(1)) == (mem.reserve, 0)
    with pytest.raises(ConfigError, match="memory.devices: must be a GPU index"):
        parse_config("models:\n  m:\n    cmd: x --port ${PORT}\n    memory: {devices: [gpu1]}\n")
    with pytest.raises(ValueError, match="at least one"):
        parse_devices([], "p")


# ---- decisions over several GPUs ----


def test_two_gpus_the_victim_is_on_the_targets_gpu_not_the_oldest_overall() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(2))
    planner, _ = make(on("a", 900, (0,)), on("c", 900, (1,)), on("b", 400, (1,)), sampler=sampler)
    # a is the least recently used, but it is on GPU 0; pooled (1800 + 400 > 2000) it would go.
    assert planner.evict_for("b", view({"a", "c"}, a=1.0, c=2.0)) == {"c"}


def test_two_gpus_a_model_that_cannot_fit_its_gpu_does_not_look_as_if_it_fits() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(2))
    planner, _ = make(on("a", 500, (0,)), on("c", 800, (1,)), on("b", 600, (1,)), sampler=sampler)
    # Pooled: 500 + 800 + 600 <= 2000 "fits"; GPU 1 has 200 left.
    assert planner.evict_for("b", view({"a", "c"})) == {"c"}


def test_four_gpus_only_models_sharing_a_gpu_compete() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(4))
    models = [on("m01", 1200, (0, 1)), on("m2", 800, (2,)), on("m3", 800, (3,)), on("t12", 1000, (1, 2))]
    planner, _ = make(*models, sampler=sampler)
    assert planner.evict_for("t12", view({"m01", "m2", "m3"})) == {"m01", "m2"}
    # A target on GPU 3 alone only weighs m3.
    planner2, _ = make(*models, on("t3", 300, (3,)), sampler=sampler)
    assert planner2.evict_for("t3", view({"m01", "m2", "m3"})) == {"m3"}
    assert planner2.evict_for("t3", view({"m01", "m2"})) == frozenset()


def test_others_use_and_reserve_count_per_gpu() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(2, used={1: 300}))
    planner, _ = make(on("a", 600, (0,)), on("b", 600, (1,)), sampler=sampler, reserve=200 * MIB)
    # GPU 1: 300 used by someone else + 600 > 1000 - 200; GPU 0 is empty apart from a.
    plan = planner.plan("b", view({"a"}))
    assert plan.evict == frozenset() and not plan.fits  # a does not share GPU 1: nothing helps


def test_a_gpus_own_budget_and_unplaceable_names_the_gpu() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(2))
    planner, _ = make(on("a", 700, (0,)), on("b", 700, (1,)), sampler=sampler, gpus={1: GpuLimits(500 * MIB)})
    assert planner.evict_for("a", view(set())) == frozenset()
    with pytest.raises(Unplaceable, match="GPU memory on GPU 1.*budget 500.0 MiB"):
        planner.evict_for("b", view({"a"}))


def test_without_nvml_per_gpu_budgets_still_plan_each_gpu() -> None:
    planner, _ = make(on("a", 700, (0,)), on("b", 700, (1,)), gpu_budget=1000 * MIB)
    assert planner.evict_for("b", view({"a"})) == frozenset()  # pooled budget: 1400 > 1000


def test_pinned_services_are_never_memory_victims() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(1))
    svc = on("svc", 600, (0,), service=ServiceSpec())
    planner, _ = make(svc, on("llm", 300, (0,)), on("big", 500, (0,)), sampler=sampler)
    assert planner.evict_for("big", view({"svc", "llm"}, svc=0.0, llm=9.0)) == {"llm"}
    plan = planner.plan("big", view({"svc"}))
    assert plan.evict == frozenset() and not plan.fits


def test_unknown_placement_is_every_gpu_until_nvml_sees_it() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(2))
    planner, _ = make(mib_model("u", None, memory_device="gpu"), sampler=sampler)
    led = planner.ledger
    assert (led.placement("u").gpus, led.placement("u").source) == ((0, 1), "all")
    led.on_ready("u", 42, 0.0)
    led.on_sample(sample_with(sampler, 1.0, u=ChildUsage(42, 10 * MIB, 300 * MIB, 1, {1: 300 * MIB})))
    assert (led.placement("u").gpus, led.placement("u").source) == ((1,), "observed")
    assert led.measurements["u"].gpus == ((1, 300 * MIB),)
    assert led.need_on("u", 1) == 300 * MIB and led.need_on("u", 0) == 0


def test_per_gpu_measurements_persist(tmp_path: Path) -> None:
    path = tmp_path / "fp.json"
    write_state(path, {"u": Measurement("gpu", 5 * MIB, "abc", 1.0, ((0, 2 * MIB), (3, 3 * MIB)))})
    assert read_state(path)["u"].gpus == ((0, 2 * MIB), (3, 3 * MIB))


def test_what_coexists_follows_the_gpus() -> None:
    sampler = FakeSampler(reason=None, gpus=gpus(2))
    planner, _ = make(on("a", 900, (0,)), on("c", 900, (1,)), on("b", 400, (1,)), sampler=sampler)
    assert coexisting(planner, "a", ["a", "b", "c"]) == ("b", "c")
    assert coexisting(planner, "b", ["a", "b", "c"]) == ("a",)
