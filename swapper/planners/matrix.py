"""The swap-matrix policy: keep the running models an allowed set lets stay, evicting the cheapest.

Owns: a one-entry solve cache and the last decision per target, both private and touched only by
the run loop's single thread (the cache is valid only because of that). The compiled matrix is
immutable. ``evict_for`` is pure from the caller's point of view (the cache never changes an
answer) and never logs; ``on_commit`` logs one INFO line per real swap.

The solve rule (llama-swap's ``Program.Solve``): if the target already runs, evict nothing.
Otherwise, over the sets in compiled order and each set's combinations in expansion order, take
every combination S containing the target, cost(S) = sum of ``evict_costs`` (default 1) of the
running models not in S, and pick the minimum; ties keep the first found. Evict ``running - S``.
A target that no set mentions runs alone: everything running is evicted. Combinations are never
enumerated: ``CompiledMatrix.project`` answers on the models that matter (see ``dsl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from swapper.config.dsl import CompiledMatrix

if TYPE_CHECKING:
    from swapper.config.schema import Config
    from swapper.planners import PlanView

__all__ = ["Decision", "MatrixPlanner", "solve"]

_log = structlog.get_logger("swapper.planner")


@dataclass(frozen=True, slots=True)
class Decision:
    target: str
    evict: frozenset[str]
    set_name: str | None  # None: no set mentions the target (or, when it runs, none holds R)
    cost: int


def solve(matrix: CompiledMatrix, target: str, running: frozenset[str]) -> Decision:
    """Applies the solve rule of the module docstring; pure."""
    if target in running:
        return Decision(target, frozenset(), matrix.first_set_holding(running), 0)
    universe = (target, *sorted(running))
    costs = [0] + [matrix.cost(model) for model in universe[1:]]
    # Holding the target outweighs keeping every running model: heaviest == cheapest with target.
    weights = [1 + sum(costs), *costs[1:]]
    best: tuple[int, str, int] | None = None  # (cost, set name, kept mask)
    for name in matrix.order:
        if not matrix.mentions(name, target):
            continue
        for mask in matrix.project(name, universe, weights):
            if not mask & 1:
                continue
            cost = sum(costs[i] for i in range(1, len(universe)) if not mask >> i & 1)
            if best is None or cost < best[0]:
                best = (cost, name, mask)
    if best is None:
        return Decision(target, running, None, sum(costs))
    cost, name, mask = best
    evict = frozenset(m for i, m in enumerate(universe) if i and not mask >> i & 1)
    return Decision(target, evict, name, cost)


class MatrixPlanner:
    """Minimum-eviction-cost choice among the configured sets (see the module docstring).

    Uses the matrix the loader compiled and checked (``RoutingConfig.compiled``); checks nothing again.
    """

    __slots__ = ("_cache", "_last", "matrix")

    def __init__(self, config: Config) -> None:
        compiled = config.routing.compiled
        if compiled is None:  # not a loaded config: the loader compiles the matrix when use is matrix
            raise ValueError("MatrixPlanner needs the compiled matrix of a loaded config")
        self.matrix = compiled
        self._cache: tuple[str, frozenset[str], Decision] | None = None
        self._last: dict[str, Decision] = {}

    def decide(self, target: str, running: frozenset[str]) -> Decision:
        cached = self._cache
        if cached is not None and cached[0] == target and cached[1] == running:
            return cached[2]
        decision = solve(self.matrix, target, running)
        self._cache = (target, running, decision)
        self._last[target] = decision
        return decision

    def evict_for(self, target: str, view: PlanView) -> frozenset[str]:
        return self.decide(target, view.running).evict

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        decision = self._last.get(target)
        if decision is None or decision.evict != evict:
            # Not the decision we last made for this target: the set is unknown, the cost is not.
            decision = Decision(target, evict, None, sum(self.matrix.cost(m) for m in evict))
        name = decision.set_name
        _log.info(
            "matrix swap",
            model=target,
            set=name,
            dsl=self.matrix.texts.get(name) if name is not None else None,
            evict=sorted(evict),
            cost=decision.cost,
        )
