"""Advisory reads of the run loop's state, for handlers, status routes and the memory sampler:
never gate a decision on them.

Owns: nothing. ``RunLoop`` inherits these; it alone sets the attributes they read, in its own
task, and these only read them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from swapper.config.schema import Config
from swapper.core.scheduler import Scheduler
from swapper.core.states import ModelSnapshot, State
from swapper.memory.monitor import MemoryMonitor
from swapper.observe.logs import LogHub
from swapper.planners import coexisting
from swapper.runtime.children import Child
from swapper.runtime.services import ProbeFacts, Service

__all__ = ["LoopViews"]


class LoopViews:
    """The run loop's read-only side (see the module docstring)."""

    config: Config
    _sched: Scheduler
    _children: dict[str, Child | Service]
    _spawned_at: dict[str, float]
    _probes: dict[str, ProbeFacts]
    _memory: MemoryMonitor | None
    _logs: LogHub
    _idle: asyncio.Event

    async def wait_idle(self) -> None:
        """Waits until the inbox is empty and no child is starting or stopping (for tests)."""
        await self._idle.wait()

    def snapshot(self) -> dict[str, ModelSnapshot]:
        """An advisory view for status routes; never gate a decision on it."""
        now = time.monotonic()
        return {
            model: ModelSnapshot(
                status,
                self._children[model].pid if model in self._children else None,
                self._spawned_at.get(model),
            )
            for model, status in self._sched.status(now).items()
        }

    def state(self, model: str) -> State:
        return self._sched.state(model)

    def service_status(self, model: str) -> dict[str, Any] | None:
        """Advisory: a service's kind and last health probe (``services.ProbeFacts``); None for a
        model swapper spawns."""
        cfg = self.config.models.get(model)
        if cfg is None or cfg.service is None:
            return None
        return self._probes.get(model, ProbeFacts()).status(pinned=cfg.pinned)

    def coexists_with(self, model: str) -> tuple[str, ...]:
        """Advisory: the models ``model`` may run beside under the planner (``planners.coexisting``)."""
        return coexisting(self._sched.planner, model, self.config.models)

    def memory_status(self) -> dict[str, Any] | None:
        """Advisory: devices, footprints, per-child use (``MemoryLedger.status``); None unless
        ``routing.router.use`` is memory."""
        return None if self._memory is None else self._memory.status()

    @property
    def logs(self) -> LogHub:
        return self._logs

    def _pinned(self, model: str) -> bool:
        cfg = self.config.models.get(model)
        return cfg is not None and cfg.pinned

    def _pid(self, model: str) -> int | None:
        child = self._children.get(model)
        return child.pid if child else None

    def _child_pids(self) -> dict[str, int]:
        """For the memory sampler (an advisory read: samples are applied in ``_handle``)."""
        return {m: c.pid for m, c in self._children.items() if c.pid is not None}
