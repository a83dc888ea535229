"""The memory policy: evict just enough to fit the target into its device's budget.

Owns: the last plan per target (a private cache for ``on_commit``'s log line, touched only by the
run loop's thread). It reads, never writes, the ``MemoryLedger`` (``swapper.memory.ledger``) that the run
loop keeps up to date from NVML/psutil samples; ``evict_for`` is a pure function of (target, view,
ledger) and never logs.

Each model lives in ``ram`` or on one or more GPUs, each GPU planned on its own (its placement:
``swapper.config.placement``; its share of the footprint on each: ``MemoryLedger.need_on``). Only models
that share a device with the target are eviction candidates, and pinned services never are. The
target fits when, on every device it lives on, both hold:

* budget: what the kept models hold there plus the target's share ≤ the device's budget;
* physical: memory used there by others (device use minus our children's sampled use) plus the
  same sum ≤ device total − its reserve.

A running model "holds" the larger of its footprint and its sampled use; a footprint is the
measured one when known, else the estimate (``swapper.memory.footprint``).

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

from swapper.memory.ledger import Capacity, Dev, Footprint, MemoryLedger, human
from swapper.memory.samples import Device
from swapper.planners import PlanView, Unplaceable, pinned_of

if TYPE_CHECKING:
    from swapper.config.schema import Config

_log = structlog.get_logger("swapper.planner")

_DEVICE_NAMES = {"gpu": "GPU memory", "ram": "system RAM"}


@dataclass(frozen=True, slots=True)
class Plan:
    target: str
    device: Device
    need: Footprint
    evict: frozenset[str]
    held_after: int  # what swapper's models on the target's devices hold once it is loaded
    fits: bool  # False: even evicting every candidate leaves too little (others use the memory)
    devices: tuple[Dev, ...] = ("ram",)


class MemoryPlanner:
    """``routing.router.use: memory``."""

    def __init__(self, config: Config, ledger: MemoryLedger) -> None:
        self._config = config
        self._ledger = ledger  # fed by the run loop's memory monitor; read here, never written
        self._last: dict[str, Plan] = {}
        self._pinned = pinned_of(config)  # never candidates

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
        kind = led.device_of(target)
        devices = led.devices_of(target)
        caps = {d: led.capacity_on(d) for d in devices}
        need = led.footprint(target)
        needs = {d: led.need_on(target, d) for d in devices}
        for d in devices:
            usable = caps[d].usable
            if usable is not None and needs[d] > usable:
                if need.source != "guess":
                    raise Unplaceable(_too_big(target, d, needs[d], need.source, caps[d]))
                needs[d] = usable  # a guess never refuses a model; it only evicts
        on = {m: set(led.devices_of(m)) & set(devices) for m in view.running if m != target}
        resident = [m for m, shared in on.items() if shared]  # only models sharing a device
        held = {m: {d: led.held_on(m, d) for d in on[m]} for m in resident}
        external = {}
        for d in devices:
            sampled = sum(led.current_on(m, d) or 0 for m in resident if d in on[m])
            used = caps[d].used
            external[d] = max(0, used - sampled) if used is not None else 0

        def fits(kept: Iterable[str]) -> bool:
            kept = list(kept)
            for d in devices:
                cap = caps[d]
                mine = sum(held[m].get(d, 0) for m in kept) + needs[d]
                if cap.budget is not None and mine > cap.budget:
                    return False
                if cap.total is not None and external[d] + mine > cap.total - cap.reserve:
                    return False
            return True

        pinned = self._pinned
        order = sorted(
            (m for m in resident if m not in pinned), key=lambda m: _eviction_rank(m, view, self._config)
        )
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
        held_after = sum(sum(h.values()) for m, h in held.items() if m in kept) + sum(needs.values())
        return Plan(target, kind, need, frozenset(evict), held_after, ok, devices)

    def on_commit(self, target: str, evict: frozenset[str]) -> None:
        plan = self._last.pop(target, None)
        if plan is None:
            return
        caps = [self._ledger.capacity_on(d) for d in plan.devices]
        cap = caps[0] if len(caps) == 1 else self._ledger.capacity(plan.device)
        fields = {
            "target": target,
            "device": plan.device,
            "devices": [_name(d) for d in plan.devices],
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


def _name(dev: Dev) -> str:
    return "ram" if dev == "ram" else f"gpu{dev}"


def _too_big(target: str, dev: Dev, need: int, source: str, cap: Capacity) -> str:
    limits = []
    if cap.budget is not None:
        limits.append(f"budget {human(cap.budget)}")
    if cap.total is not None:
        limits.append(f"total {human(cap.total)} minus reserve {human(cap.reserve)}")
    where = _DEVICE_NAMES["ram"] if dev == "ram" else f"{_DEVICE_NAMES['gpu']} on GPU {dev}"
    return (
        f"model '{target}' needs {human(need)} of {where} ({source} footprint),"
        f" more than swapper may ever use there ({', '.join(limits)})"
    )
