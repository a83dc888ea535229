"""The log rings behind /logs: bounded by bytes, kept a batch (one read of a pipe) at a time."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapper.observe import logs
from swapper.observe.logs import RING_BYTES, LogHub, _Ring, tagged


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
