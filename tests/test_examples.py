"""Every example config under examples/ loads, and its planner can be built."""

from __future__ import annotations

from pathlib import Path

import pytest

from swapper.config.load import load_config
from swapper.planners.build import make_planner

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWAPPER_CACHE", str(tmp_path))  # a memory planner reads its state file here
    monkeypatch.chdir(path.parent.parent)  # paths in examples are relative to the repository root
    config = load_config(str(path))
    assert config.models
    assert not [w for w in config.warnings if "unknown key" in w], config.warnings
    make_planner(config)


def test_memory_example_is_planned_by_memory() -> None:
    config = load_config(str(Path(__file__).parent.parent / "examples" / "memory.yaml"))
    assert config.routing.use == "memory"
    memory = config.routing.memory
    assert memory.ram_budget == 160 * 1024 * 1024 and memory.reserve == 1024**3
    assert config.models["embed"].memory_device == "cpu"
    assert config.models["whisper"].memory_estimate == 96 * 1024 * 1024
    assert config.models["chat-a"].priority == 10
