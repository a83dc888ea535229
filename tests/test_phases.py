"""A swap's phases: the timeline's arithmetic, the bus completing it at the first byte relayed,
and the phases of real swaps (fake upstream children) in /metrics and the debug log."""

from __future__ import annotations

import math

from structlog.testing import capture_logs

from swapper.core.phases import PHASES, TOTAL, StartMarks, StopMarks, SwapTimeline
from swapper.core.states import State
from swapper.observe.events import EventBus, Observer
from tests.test_metrics import scrape, settled, value
from tests.test_swapping import ClientFactory, chat, client_for, fake_config, runloop

PHASE_METRIC = "swapper_swap_phase_seconds"


def full_timeline() -> SwapTimeline:
    t = SwapTimeline("b")
    t.mark("decided", 10.0)
    t.add_stops([StopMarks(10.001, 10.004), StopMarks(10.002, 10.006)])
    t.mark("stopped", 10.007)
    t.add_start(StartMarks(spawning=10.008, exec=10.010, ready_line=10.040, healthy=10.041))
    t.mark("granted", 10.042)
    t.mark("first_byte", 10.045)
    return t


def test_phases_are_the_gaps_between_marks_and_add_up_to_the_total() -> None:
    phases = full_timeline().phases()
    assert list(phases) == [*PHASES, TOTAL]
    # Two victims: the swap waited for the later signal and the later exit.
    assert math.isclose(phases["stop_signal"], 0.002)
    assert math.isclose(phases["old_exit"], 0.004)
    assert math.isclose(phases["ready_line"], 0.030)
    assert math.isclose(phases["first_byte"], 0.003)
    assert math.isclose(phases[TOTAL], 0.045)
    assert math.isclose(sum(v for k, v in phases.items() if k != TOTAL), phases[TOTAL])


def test_a_start_without_victims_or_readiness_line_has_only_its_own_phases() -> None:
    t = SwapTimeline("a")
    t.mark("decided", 1.0)
    t.add_start(StartMarks(spawning=1.001, exec=1.003, ready_line=None, healthy=1.020))
    t.mark("granted", 1.021)
    phases = t.phases()
    assert list(phases) == ["pre_spawn", "exec", "healthy", "granted", TOTAL]
    assert math.isclose(phases["healthy"], 0.017)  # from exec: no line to split it


def test_a_readiness_line_read_after_the_probe_passed_is_not_a_phase() -> None:
    t = SwapTimeline("a")
    t.mark("decided", 1.0)
    t.add_start(StartMarks(spawning=1.001, exec=1.003, ready_line=1.030, healthy=1.020))
    assert "ready_line" not in t.phases()


def test_a_mark_taken_before_the_previous_one_is_a_zero_phase_and_the_total_still_adds_up() -> None:
    t = SwapTimeline("b")
    t.mark("decided", 5.0)
    t.add_stops([StopMarks(4.9, 5.003)])  # a victim already stopping (a TTL) before the decision
    t.mark("stopped", 5.004)
    phases = t.phases()
    assert phases["stop_signal"] == 0.0
    assert math.isclose(phases["old_exit"], 0.003)
    assert math.isclose(sum(v for k, v in phases.items() if k != TOTAL), phases[TOTAL])


class Timed(Observer):
    def __init__(self) -> None:
        self.timed: list[SwapTimeline] = []

    def swap_timed(self, timeline: SwapTimeline) -> None:
        self.timed.append(timeline)


def ready_swap(bus: EventBus, model: str) -> SwapTimeline:
    t = SwapTimeline(model)
    t.mark("decided", 0.0)
    t.mark("granted", 0.001)
    bus.sync_states({model: State.STARTING})
    bus.swap_ready(t)
    bus.sync_states({model: State.READY})
    return t


def test_the_first_response_of_the_model_completes_its_swap_once() -> None:
    bus, seen = EventBus(), Timed()
    bus.subscribe(seen)
    timeline = ready_swap(bus, "b")
    other = bus.track(1, "a", "/v1/chat/completions", "POST", "/v1/chat/completions")
    other.granted()
    other.forwarded(200, 0.001)
    assert seen.timed == []  # another model's response is not this swap's first byte
    for req_id in (2, 3):
        track = bus.track(req_id, "b", "/v1/chat/completions", "POST", "/v1/chat/completions")
        track.granted()
        track.forwarded(200, 0.001)
    assert seen.timed == [timeline]
    assert "first_byte" in timeline.marks


def test_a_swap_whose_model_stops_before_any_response_completes_without_a_first_byte() -> None:
    bus, seen = EventBus(), Timed()
    bus.subscribe(seen)
    timeline = ready_swap(bus, "b")
    bus.sync_states({"b": State.STOPPING})
    assert seen.timed == [timeline]
    assert "first_byte" not in timeline.marks
    assert TOTAL in timeline.phases()


async def test_a_real_swap_records_every_phase_in_metrics_and_the_debug_log(
    aiohttp_client: ClientFactory,
) -> None:
    client = await client_for(
        aiohttp_client, fake_config({"a": "--print-ready", "b": "--print-ready --load-delay 0.3"})
    )
    with capture_logs() as logs:
        await chat(client, "a")  # a cold start: nothing to stop
        await chat(client, "b")  # a swap: stops a, then starts b
        await settled(client)
    samples = await scrape(client)

    for phase in (*PHASES, TOTAL):
        assert value(samples, f"{PHASE_METRIC}_count", model="b", phase=phase) == 1, phase
    for phase in ("stop_signal", "old_exit", "stopped"):
        assert value(samples, f"{PHASE_METRIC}_count", model="a", phase=phase) is None, phase
    assert value(samples, f"{PHASE_METRIC}_count", model="a", phase="first_byte") == 1
    # b's /health turns 200 (and it prints its readiness line) 0.3 s after it starts: that wait
    # is the child's own, and lands in ready_line, not in swapper's phases around it.
    ready_line = value(samples, f"{PHASE_METRIC}_sum", model="b", phase="ready_line")
    assert ready_line is not None and ready_line >= 0.3
    total = value(samples, f"{PHASE_METRIC}_sum", model="b", phase=TOTAL)
    parts = [value(samples, f"{PHASE_METRIC}_sum", model="b", phase=p) for p in PHASES]
    assert total is not None and math.isclose(sum(p or 0.0 for p in parts), total, rel_tol=1e-9)

    lines = [entry for entry in logs if entry["event"] == "swap phases"]
    assert [entry["model"] for entry in lines] == ["a", "b"]
    assert list(lines[1]["phases_ms"]) == [*PHASES, TOTAL]
    assert lines[1]["log_level"] == "debug"


async def test_a_swap_closes_idle_connections_to_the_old_child_before_signalling_it(
    aiohttp_client: ClientFactory,
) -> None:
    # llama-server's exit on SIGTERM waits until its connection thread notices an idle
    # keep-alive connection; the fake reports how many client connections were open instead.
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}))
    await chat(client, "a")
    await chat(client, "a")  # the forwarding pool now holds an idle connection to a
    await chat(client, "b")
    await settled(client)
    said = [line for line in runloop(client).logs.last_lines("a", 50) if "SIGTERM received" in line]
    assert len(said) == 1 and "with 0 client connections open" in said[0], said
