"""The group eviction policy: swap inside a group, exclusive across groups, persistent members.

Owns: nothing mutable; the membership table is built once in ``__init__`` and only read after.
``evict_for`` is a pure function of (target, running) that the scheduler calls speculatively on
every request and queue drain, so it never logs; ``on_commit`` logs one line per real swap.

The rule, for target T in group G and every running model M != T in group O::

    O is G  ->  evict M iff G.swap
    else    ->  evict M iff G.exclusive and not O.persistent

It is deliberately asymmetric: a target in a non-exclusive group never evicts a running
exclusive group (llama-swap keeps this for backwards compatibility), and ``persistent`` only
shields a group from *other* groups, never from swaps inside itself. A model in no group (one the
config does not know) is treated as a member of ``(default)`` (swap and exclusive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from swapper.config.schema import DEFAULT_GROUP, GroupConfig

if TYPE_CHECKING:
    from swapper.config.schema import Config
    from swapper.planners import PlanView

_log = structlog.get_logger("swapper.planner")


class GroupPlanner:
    """Evicts by group membership and the three group booleans (see the module docstring)."""

    __slots__ = ("_default", "_group_of")

    def __init__(self, config: Config) -> None:
        # The loader has checked the groups (every member a model, in one group only); not again here.
        self._group_of = config.routing.group_of()
        declared = [g for g in config.routing.groups if g.name == DEFAULT_GROUP]
        self._default = declared[0] if declared else GroupConfig(DEFAULT_GROUP, ())

    def group_of(self, model: str) -> GroupConfig:
        return self._group_of.get(model, self._default)

    def evict_for(self, target: str, view: PlanView) -> frozenset[str]:
        mine = self.group_of(target)
        return frozenset(m for m in view.running if m != target and self._evicts(mine, self.group_of(m)))

    @staticmethod
    def _evicts(mine: GroupConfig, theirs: GroupConfig) -> bool:
        if theirs.name == mine.name:
            return mine.swap
        return mine.exclusive and not theirs.persistent

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        _log.info("group swap", model=target, group=self.group_of(target).name, evict=sorted(evict))
