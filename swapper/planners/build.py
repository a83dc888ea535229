"""Builds the planner a config names, once per (re)load.

Owns: nothing. Imports each planner at the top (the package's ``__init__`` holds only the
protocol and the shared helpers, so no planner module imports this one).
"""

from __future__ import annotations

from swapper.config.schema import Config
from swapper.memory.ledger import MemoryLedger
from swapper.planners import Pinning, Planner, pinned_of
from swapper.planners.group import GroupPlanner
from swapper.planners.matrix import MatrixPlanner
from swapper.planners.memory import MemoryPlanner

__all__ = ["make_planner"]


def make_planner(config: Config, *, ledger: MemoryLedger | None = None) -> Planner:
    """Builds the planner that ``routing.router.use`` names (with ``Pinning`` around it when a
    service is pinned). The memory planner reads ``ledger``, which the run loop's memory monitor
    feeds (a fresh one, holding estimates only, when none is given)."""
    planner = _make_planner(config, ledger)
    pinned = pinned_of(config)
    return Pinning(planner, pinned) if pinned else planner


def _make_planner(config: Config, ledger: MemoryLedger | None) -> Planner:
    use = config.routing.use
    if use == "group":
        return GroupPlanner(config)
    if use == "matrix":
        return MatrixPlanner(config)
    return MemoryPlanner(config, ledger or MemoryLedger(config))
