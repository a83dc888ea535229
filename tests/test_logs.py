"""The log rings behind /logs: bounded by bytes, kept a batch (one read of a pipe) at a time."""

from __future__ import annotations

import sys
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapper.app.server import make_app
from swapper.config.load import parse_config
from swapper.observe import logs
from swapper.observe.logs import RING_BYTES, LogHub, _Ring, tagged
from tests.test_memory_real import ClientFactory, free_port, runloop


def reference(batches: list[list[str]], tag: str = "") -> list[str]:
    """The rule, a line at a time: the newest lines whose bytes (a newline each) fit the budget,
    and always at least the newest line."""
    kept: deque[str] = deque()
    size = 0
    for batch in batches:
        for line in (tag + x for x in batch):
            kept.append(line)
            size += len(line) + 1
            while size > RING_BYTES and len(kept) > 1:
                size -= len(kept.popleft()) + 1
    return list(kept)


line = st.integers(min_value=0, max_value=9000).map(lambda n: "x" * n) | st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(line, min_size=1, max_size=30), min_size=1, max_size=40), st.sampled_from(["", "[a] "])
)
def test_a_ring_shows_what_a_line_by_line_ring_would(batches: list[list[str]], tag: str) -> None:
    ring = _Ring()
    for i, batch in enumerate(batches):
        given_batch = list(batch)
        ring.extend(batch, tag)
        assert list(ring) == reference(batches[: i + 1], tag)
        assert batch == given_batch  # the caller's list is never changed
        # It holds at most one batch beyond what it shows: without its oldest, under the budget.
        assert len(ring._sizes) == 1 or ring._bytes - ring._sizes[0] < RING_BYTES


def test_a_small_budget_is_enforced_across_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "RING_BYTES", 10)
    ring = _Ring()
    ring.extend(["aaaa", "bbbb"])  # 10 bytes: fits
    assert list(ring) == ["aaaa", "bbbb"]
    ring.extend(["c"])  # 12: the oldest line goes
    assert list(ring) == ["bbbb", "c"]
    ring.extend(["d" * 50])  # alone over the budget: kept, everything older goes
    assert list(ring) == ["d" * 50]


def test_the_hub_keeps_each_source_and_the_combined_log_in_order() -> None:
    hub = LogHub()
    heard: list[tuple[str, list[str]]] = []
    hub.listen(lambda source, lines: heard.append((source, list(lines))))
    hub.child_lines("a", "stdout", ["one", "two"])
    hub.add("swapper", ["mine"])
    hub.child_lines("b", "stderr", ["three"])
    assert hub.history("a") == ["one", "two"]
    assert hub.last_lines("a", 1) == ["two"]
    assert hub.history() == [tagged("a", "one"), tagged("a", "two"), "[swapper] mine", "[b] three"]
    assert heard == [("a", ["one", "two"]), ("swapper", ["mine"]), ("b", ["three"])]


# ---- one ring: a spawn's view of its model's ring ----


def test_a_spawns_output_reads_back_only_its_own_lines() -> None:
    hub = LogHub()
    first = hub.output("a")
    first("stdout", ["run 1: loading", "run 1: crashed"])
    second = hub.output("a")  # the next spawn of the same model
    assert second.last(10) == []
    second("stderr", ["run 2: loading"])
    second("cmd_stop", ["run 2: stopped"])
    assert second.last(10) == ["run 2: loading", "run 2: stopped"]
    assert second.last(1) == ["run 2: stopped"]
    assert first.last(10) == ["run 1: loading", "run 1: crashed", "run 2: loading", "run 2: stopped"]
    # One copy: /logs/a shows what both spawns said, and the reports read from it.
    assert hub.history("a") == first.last(10)
    assert hub.added("a") == 4 and hub.added("b") == 0


CRASHING = "import os, sys; print('run', os.getpid(), flush=True); sys.exit(1)"


async def test_a_load_failure_reports_its_own_spawns_lines_from_the_models_ring(
    aiohttp_client: ClientFactory,
) -> None:
    port = free_port()
    config = parse_config(
        "\n".join(
            [
                "healthCheckTimeout: 15",
                "models:",
                "  a:",
                f'    cmd: {sys.executable} -c "{CRASHING}"',
                f"    proxy: http://127.0.0.1:{port}",
            ]
        )
    )
    client = await aiohttp_client(make_app(config))
    reports = []
    for _ in range(2):  # the first failure is retried at once by the next request
        resp = await client.post("/v1/chat/completions", json={"model": "a", "messages": []})
        assert resp.status == 502
        message = (await resp.json())["error"]["message"]
        reports.append([line.strip() for line in message.split("last output:\n", 1)[1].splitlines()])
    runs = [line for line in runloop(client).logs.history("a") if line.startswith("run ")]
    # Two spawns in the model's one ring (what /logs/a shows); each report has its own spawn's line.
    assert len(runs) == 2 and runs[0] != runs[1]
    assert reports == [[runs[0]], [runs[1]]]
