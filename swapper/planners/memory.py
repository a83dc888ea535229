"""The memory policy: evict just enough to fit the target into its device's budget.

Owns: the last plan per target (a private cache for ``on_commit``'s log line, touched only by the
run loop's thread). It reads, never writes, the ``MemoryLedger`` (``swapper.ledger``) that the run
loop keeps up to date from NVML/psutil samples; ``evict_for`` is a pure function of (target, view,
ledger) and never logs.

Each model lives on one device: ``gpu`` (every GPU NVML reports, pooled) or ``ram``. Only models
on the target's device are eviction candidates. The target fits when both hold:

* budget: what the kept models hold plus the target's footprint ≤ the configured budget;
* physical: memory used by others (device use minus our children's sampled use) plus the same
  sum ≤ device total − reserve.

A running model "holds" the larger of its footprint and its sampled use; a footprint is the
measured one when known, else the estimate (``swapper.footprint``).

Victims are taken in order: idle before busy, lower priority first, least recently used first,
until the target fits; then any victim whose eviction turned out unnecessary is kept again
(last taken first). A busy victim makes the scheduler wait for it to drain; it never kills one.
A target whose known footprint exceeds what the device could ever give it raises
``Unplaceable``; one that only does not fit because of memory used outside swapper evicts every
candidate and starts anyway (``on_commit`` warns), since footprints and others' use are estimates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from swapper.gpu import Device
from swapper.ledger import Footprint, MemoryLedger, human
from swapper.memory import MemoryMonitor, make_monitor
from swapper.planners import PlanView, Unplaceable

if TYPE_CHECKING:
    from swapper.config import Config
    from swapper.gpu import Sampler

_log = structlog.get_logger("swapper.planner")

_DEVICE_NAMES = {"gpu": "GPU memory", "ram": "system RAM"}


@dataclass(frozen=True, slots=True)
class Plan:
    target: str
    device: Device
    need: Footprint
    evict: frozenset[str]
    held_after: int  # what swapper's models on the device hold once the target is loaded
    fits: bool  # False: even evicting every candidate leaves too little (others use the memory)


class MemoryPlanner:
    """``routing.router.use: memory``."""

    def __init__(
        self, config: Config, *, sampler: Sampler | None = None, monitor: MemoryMonitor | None = None
    ) -> None:
        self._config = config
        self.memory_monitor = monitor or make_monitor(config, sampler)
        self._ledger: MemoryLedger = self.memory_monitor.ledger
        self._last: dict[str, Plan] = {}

    @property
    def ledger(self) -> MemoryLedger:
        return self._ledger

    def evict_for(self, target: str, view: PlanView) -> frozenset[str]:
        if target in view.running:
            return frozenset()
        plan = self.plan(target, view)
        self._last[target] = plan
        return plan.evict

    def plan(self, target: str, view: PlanView) -> Plan:
        """The decision with its reasons; pure. Raises Unplaceable."""
        led = self._ledger
        device = led.device_of(target)
        cap = led.capacity(device)
        usable = cap.usable
        need = led.footprint(target)
        if usable is not None and need.bytes > usable:
            if need.source != "guess":
                raise Unplaceable(_too_big(target, device, need, cap.budget, cap.total, cap.reserve))
            need = Footprint(usable, "guess")  # a guess never refuses a model; it only evicts
        resident = [m for m in view.running if m != target and led.device_of(m) == device]
        held = {m: led.held(m) for m in resident}
        sampled = sum(led.current(m) or 0 for m in resident)
        external = max(0, cap.used - sampled) if cap.used is not None else 0

        def fits(kept: Iterable[str]) -> bool:
            mine = sum(held[m] for m in kept) + need.bytes
            if cap.budget is not None and mine > cap.budget:
                return False
            return cap.total is None or external + mine <= cap.total - cap.reserve

        order = sorted(resident, key=lambda m: _eviction_rank(m, view, self._config))
        evict: list[str] = []
        kept = set(resident)
        for victim in order:
            if fits(kept):
                break
            evict.append(victim)
            kept.discard(victim)
        ok = fits(kept)
        if ok:
            for victim in reversed(evict[:]):
                if fits(kept | {victim}):
                    evict.remove(victim)
                    kept.add(victim)
        held_after = sum(held[m] for m in kept) + need.bytes
        return Plan(target, device, need, frozenset(evict), held_after, ok)

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        plan = self._last.pop(target, None)
        if plan is None:
            return
        cap = self._ledger.capacity(plan.device)
        fields = {
            "target": target,
            "device": plan.device,
            "need": human(plan.need.bytes),
            "source": plan.need.source,
            "evict": sorted(evict),
            "held_after": human(plan.held_after),
            "usable": human(cap.usable),
        }
        if plan.fits:
            _log.info("memory plan", **fields)
        else:
            _log.warning(
                "memory plan: not enough free memory even after evicting every other model on the"
                " device (memory used outside swapper?); starting anyway",
                free=human(None if cap.total is None or cap.used is None else cap.total - cap.used),
                **fields,
            )


def _eviction_rank(model: str, view: PlanView, config: Config) -> tuple[bool, int, float, str]:
    """Sort key: idle before busy, then lower priority, then least recently used."""
    return (model in view.busy, config.models[model].priority, view.last_used.get(model, 0.0), model)


def _too_big(
    target: str, device: Device, need: Footprint, budget: int | None, total: int | None, reserve: int
) -> str:
    limits = []
    if budget is not None:
        limits.append(f"budget {human(budget)}")
    if total is not None:
        limits.append(f"total {human(total)} minus reserve {human(reserve)}")
    return (
        f"model '{target}' needs {human(need.bytes)} of {_DEVICE_NAMES[device]} ({need.source} footprint),"
        f" more than swapper may ever use there ({', '.join(limits)})"
    )
