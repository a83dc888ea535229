"""Planners decide which running models must stop so that a target model can run.

Owns: nothing mutable shared with anyone; a planner may keep a private cache that only the run
loop's thread touches.

Contract (llama-swap's ``Swapper``, with one name): ``evict_for`` is a pure decision that the
scheduler calls speculatively on every request and every queue drain, so it must not log, mutate
or do I/O. ``on_commit`` runs once per swap that really starts and is the one place a planner may
log. A planner never sees processes: only model ids and the facts in ``PlanView``. ``build``
makes the planner a config names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from swapper.config.schema import Config


@dataclass(frozen=True, slots=True)
class PlanView:
    """What a planner may know about the moment it decides in."""

    # Models that hold (or are about to hold) resources: starting, ready, stopping, and the
    # targets of swaps in progress other than the one being planned.
    running: frozenset[str]
    # Models that must not be evicted right now (requests in flight or waiting on them).
    busy: frozenset[str] = frozenset()
    # model id -> monotonic time its last request finished (LRU order for the memory planner)
    last_used: Mapping[str, float] = field(default_factory=dict)


class Unplaceable(Exception):
    """The target can never run under this planner (e.g. bigger than the whole memory budget)."""


class Planner(Protocol):
    def evict_for(self, target: str, view: PlanView) -> frozenset[str]:
        """Returns the running models to stop before ``target`` may start; pure, never logs.

        Raises Unplaceable when no eviction could ever make room for ``target``.
        """
        ...

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        """Called once when a swap to ``target`` evicting ``evict`` really starts; may log."""
        ...


class OneAtATime:
    """llama-swap's implicit ``(default)`` group: starting any model stops every other one."""

    __slots__ = ()

    def evict_for(self, target: str, view: PlanView) -> frozenset[str]:
        return view.running - {target}

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        pass


def coexisting(planner: Planner, model: str, models: Iterable[str]) -> tuple[str, ...]:
    """The ``models`` that ``model`` may run beside under ``planner`` right now: starting either
    while the other runs evicts nothing of the other. Pure (``evict_for`` is), for status pages."""
    out = []
    for other in models:
        if other == model:
            continue
        try:
            clash = other in planner.evict_for(
                model, PlanView(frozenset({other}))
            ) or model in planner.evict_for(other, PlanView(frozenset({model})))
        except Unplaceable:
            clash = True
        if not clash:
            out.append(other)
    return tuple(sorted(out))


def pinned_of(config: Config) -> frozenset[str]:
    """The services a planner may never stop (``ModelConfig.pinned``)."""
    return frozenset(config.pinned())


class Pinning:
    """Any planner, with pinned services (``ModelConfig.pinned``) out of its reach: one is never
    evicted, and adopting one evicts nothing (it runs already; swapper only starts probing it).
    Every other attribute is the wrapped planner's (the memory planner's ``ledger``)."""

    __slots__ = ("inner", "pinned")

    def __init__(self, inner: Planner, pinned: frozenset[str]) -> None:
        self.inner = inner
        self.pinned = pinned

    def evict_for(self, target: str, view: PlanView) -> frozenset[str]:
        if target in self.pinned:
            return frozenset()
        return self.inner.evict_for(target, view) - self.pinned

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        if target not in self.pinned:
            self.inner.on_commit(target, evict)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)
