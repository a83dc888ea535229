"""What the memory planner knows: devices, footprints, and what each child holds.

Owns: ``MemoryLedger``, the facts a memory decision is made from: each device's latest sample,
each child's current usage, every model's footprint (measured, else estimated), and which children
are ready. **Only the run loop mutates it**, inside its message handlers (``on_sample`` on
``MemorySampled``, ``on_ready`` on a healthy ``Started``); the planner reads it synchronously from
the same thread, so a decision never sees half an update. Nothing here blocks or awaits.

A footprint is *measured* from the first sample begun after the child became ready (USS over its
process tree for RAM, NVML per-process memory over its tree for a GPU), then raised to the largest
use seen while that child runs. Measurements are keyed by the model's command with its port
masked (``fingerprint``), so changing ``-c`` or the model file forgets them; ``swapper.memory.monitor``
persists them.

Each GPU is its own device: a GPU model's *placement* (``swapper.config.placement``: its config, env and
flags, else the GPUs NVML saw it on, else all of them) says which GPUs it lives on and what share
of its footprint each holds (``need_on``), and every GPU has its own ``capacity_on`` (its total,
its use, ``gpuBudget`` or its own ``gpus.<i>.budget``, and its reserve). ``device_of`` still says
the kind ("gpu" or "ram"); ``devices_of`` the devices planned (``"ram"`` or GPU indices).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog

from swapper.config.placement import Placement, configured, split
from swapper.config.schema import Config, MemoryConfig, ModelConfig
from swapper.memory.footprint import GIB, MIB, Estimate, estimate
from swapper.memory.samples import ChildUsage, Device, DeviceUsage, GpuUsage, MemorySample

# A planned device: system RAM, or one GPU by its NVML index.
Dev = int | Literal["ram"]

log = structlog.get_logger("swapper.memory.monitor")

# Added to file-based estimates: runtime, compute buffers, and on a GPU the CUDA context.
OVERHEAD: Final[Mapping[Device, int]] = {"gpu": 384 * MIB, "ram": 64 * MIB}

FootprintSource = Literal["measured", "override", "gguf", "file", "guess"]


@dataclass(frozen=True, slots=True)
class Footprint:
    bytes: int
    source: FootprintSource


@dataclass(frozen=True, slots=True)
class Measurement:
    """A remembered footprint: persisted, and reused while the command stays the same."""

    device: Device
    bytes: int
    cmd: str  # command fingerprint
    at: float  # wall-clock time of the measurement
    gpus: tuple[tuple[int, int], ...] = ()  # (GPU index, bytes) where it was held, for a GPU model


@dataclass(frozen=True, slots=True)
class Capacity:
    total: int | None  # sampled device total; None for a GPU NVML cannot see
    used: int | None  # sampled, by everything on the device
    budget: int | None  # configured budget for swapper's models
    reserve: int

    @property
    def usable(self) -> int | None:
        """The most swapper's models may hold on the device together."""
        physical = None if self.total is None else self.total - self.reserve
        limits = [x for x in (self.budget, physical) if x is not None]
        return max(0, min(limits)) if limits else None


def fingerprint(model: ModelConfig) -> str:
    text = model.cmd_text
    if model.port is not None:
        text = text.replace(str(model.port), "${PORT}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class MemoryLedger:
    """Facts for the memory planner; mutated only by the run loop's handlers (see module doc)."""

    def __init__(
        self,
        config: Config,
        estimates: Mapping[str, Estimate] | None = None,
        saved: Mapping[str, Measurement] | None = None,
    ) -> None:
        self._models = config.models
        self.settings: MemoryConfig = config.routing.memory
        self._estimates = (
            dict(estimates) if estimates is not None else {m: estimate(c) for m, c in self._models.items()}
        )
        saved = saved or {}
        # Measurements of models this config does not have (another config sharing the file) are
        # kept and written back untouched.
        self.measurements: dict[str, Measurement] = dict(saved)
        self._fingerprints = {mid: fingerprint(m) for mid, m in self._models.items()}
        self.version = 0  # bumped when ``measurements`` changes, for the persister
        self.gpu_reason: str | None = "not sampled yet"  # why GPUs are not sampled; None when they are
        self.ram: DeviceUsage | None = None
        self.gpus: tuple[GpuUsage, ...] = ()
        self.sampled_at: float | None = None  # wall clock
        self.usage: dict[str, ChildUsage] = {}
        self._ready: dict[str, tuple[int, float]] = {}  # model -> (pid, monotonic time it became ready)
        self._fresh: set[str] = set()  # ready, not measured yet in this run
        self._unmeasurable: set[str] = set()  # warned once

    # ---- queries: pure reads ----

    @property
    def plans_gpu(self) -> bool:
        """Whether GPU models are planned on a GPU: NVML sees one, or a GPU budget is configured."""
        return bool(self.gpus) or self.settings.gpu_budget is not None

    def device_of(self, model: str) -> Device:
        cfg = self._models[model]
        if cfg.memory_device == "cpu" or not self.plans_gpu:
            return "ram"
        if cfg.memory_device == "gpu":
            return "gpu"
        return "ram" if self._estimates[model].cpu_only else "gpu"

    def estimate(self, model: str) -> Footprint:
        est = self._estimates[model]
        if est.source == "override":
            return Footprint(est.bytes, "override")
        return Footprint(est.bytes + OVERHEAD[self.device_of(model)], est.source)

    def footprint(self, model: str) -> Footprint:
        """What ``model`` needs on its device: measured when known for this command, else estimated."""
        m = self._valid_measurement(model)
        if m is not None:
            return Footprint(m.bytes, "measured")
        return self.estimate(model)

    def _valid_measurement(self, model: str) -> Measurement | None:
        m = self.measurements.get(model)
        if m is not None and m.cmd == self._fingerprints[model] and m.device == self.device_of(model):
            return m
        return None

    def current(self, model: str) -> int | None:
        """What ``model``'s child holds on its device in the latest sample, if sampled."""
        usage = self.usage.get(model)
        if usage is None:
            return None
        return usage.ram if self.device_of(model) == "ram" else usage.gpu

    def held(self, model: str) -> int:
        """What a running ``model`` holds or will hold once loaded (the larger of the two)."""
        return max(self.footprint(model).bytes, self.current(model) or 0)

    # ---- per device (each GPU on its own) ----

    def gpu_indices(self) -> tuple[int, ...]:
        """The GPUs planned: NVML's, else one GPU 0 planned by ``gpuBudget`` alone."""
        return tuple(g.index for g in self.gpus) or ((0,) if self.settings.gpu_budget is not None else ())

    def placement(self, model: str) -> Placement:
        """Which GPUs a GPU ``model`` lives on, and its share on each (``swapper.config.placement``)."""
        cfg = self._models[model]
        found = configured(cfg.memory_gpus, cfg.env, cfg.cmd)
        if found is not None:
            return found
        seen = self._observed(model)
        if seen:
            whole = sum(seen.values())
            return Placement(tuple(seen), tuple(seen[g] / whole for g in seen), "observed")
        gpus = self.gpu_indices() or (0,)
        return Placement(gpus, tuple(1 / len(gpus) for _ in gpus), "all")

    def _observed(self, model: str) -> dict[int, int]:
        """GPU -> bytes its processes held there: sampled now, else as measured (ascending GPUs)."""
        usage = self.usage.get(model)
        if usage is not None and usage.gpus:
            return dict(sorted(usage.gpus.items()))
        m = self._valid_measurement(model)
        return dict(sorted(m.gpus)) if m is not None and m.gpus else {}

    def devices_of(self, model: str) -> tuple[Dev, ...]:
        if self.device_of(model) == "ram":
            return ("ram",)
        return self.placement(model).gpus

    def need_on(self, model: str, dev: Dev) -> int:
        """What ``model`` needs on ``dev``: its footprint, or on a GPU its share of it."""
        fp = self.footprint(model).bytes
        if dev == "ram":
            return fp
        return split(fp, self.placement(model)).get(dev, 0)

    def current_on(self, model: str, dev: Dev) -> int | None:
        """What ``model``'s child holds on ``dev`` in the latest sample, if sampled."""
        usage = self.usage.get(model)
        if usage is None:
            return None
        if dev == "ram":
            return usage.ram if self.device_of(model) == "ram" else None
        if usage.gpus:
            return usage.gpus.get(dev, 0)
        return None if usage.gpu is None else split(usage.gpu, self.placement(model)).get(dev, 0)

    def held_on(self, model: str, dev: Dev) -> int:
        return max(self.need_on(model, dev), self.current_on(model, dev) or 0)

    def capacity_on(self, dev: Dev) -> Capacity:
        if dev == "ram":
            return self.capacity("ram")
        s = self.settings
        gpu = next((g for g in self.gpus if g.index == dev), None)
        budget, reserve = s.gpu_budget_of(dev), s.reserve_of(dev)
        if gpu is None:
            return Capacity(None, None, budget, reserve)
        return Capacity(gpu.total, gpu.used, budget, reserve)

    def capacity(self, device: Device) -> Capacity:
        s = self.settings
        if device == "ram":
            ram = self.ram
            if ram is None:
                return Capacity(None, None, s.ram_budget, s.reserve)
            return Capacity(ram.total, ram.used, s.ram_budget, s.reserve)
        gpus = self.gpus
        total = sum(g.total for g in gpus) if gpus else None
        used = sum(g.used for g in gpus) if gpus else None
        return Capacity(total, used, s.gpu_budget, s.reserve)

    # ---- mutations: run-loop handlers only ----

    def on_sample(self, sample: MemorySample) -> None:
        self.ram = sample.ram
        self.gpus = sample.gpus
        self.gpu_reason = sample.nvml_error
        self.sampled_at = time.time()
        self.usage = dict(sample.children)
        for model, usage in sample.children.items():
            ready = self._ready.get(model)
            if (
                model in self._models
                and ready is not None
                and ready[0] == usage.pid
                and sample.at >= ready[1]
            ):
                self._learn(model, usage)

    def on_ready(self, model: str, pid: int, at: float) -> None:
        self._ready[model] = (pid, at)
        self._fresh.add(model)

    def on_stopping(self, model: str) -> None:
        self._ready.pop(model, None)
        self._fresh.discard(model)

    def carry_over(self, old: MemoryLedger) -> None:
        """After a reload: what ``old`` (the previous config's ledger) sampled and measured."""
        self.gpu_reason, self.ram, self.gpus = old.gpu_reason, old.ram, old.gpus
        self.sampled_at = old.sampled_at
        self.usage = dict(old.usage)
        self.measurements.update(old.measurements)  # newer than the file; fingerprints decide use
        self._ready = {m: r for m, r in old._ready.items() if m in self._models}
        self._fresh = old._fresh & self._ready.keys()
        self._unmeasurable = set(old._unmeasurable)
        self.version += 1

    def _learn(self, model: str, usage: ChildUsage) -> None:
        device = self.device_of(model)
        measured = usage.ram if device == "ram" else usage.gpu
        if not measured:
            # A GPU model that NVML shows holding nothing: a CPU-only build, or NVML reporting
            # host pids inside a container. Learning 0 would pack the GPU; keep the estimate.
            if model not in self._unmeasurable:
                self._unmeasurable.add(model)
                log.warning(
                    "cannot measure footprint; planning with the estimate", model=model, device=device
                )
            return
        fresh = model in self._fresh
        self._fresh.discard(model)
        old = self.measurements.get(model)
        where = tuple(sorted(usage.gpus.items())) if device == "gpu" else ()
        if not fresh and old is not None and old.cmd == self._fingerprints[model] and old.device == device:
            if measured <= old.bytes + max(MIB, old.bytes // 50):
                return  # not a new peak worth writing down
            measured = max(measured, old.bytes)
        self.measurements[model] = Measurement(
            device, measured, self._fingerprints[model], time.time(), where
        )
        self.version += 1
        if fresh:
            log.info(
                "measured footprint",
                model=model,
                device=device,
                measured=human(measured),
                estimated=human(self.estimate(model).bytes),
                processes=usage.processes,
            )

    # ---- status ----

    def status(self) -> dict[str, Any]:
        """Plain dicts for a status endpoint (bytes throughout)."""
        devices: dict[str, Any] = {}
        for device in ("ram", "gpu"):
            cap = self.capacity(device)
            if device == "gpu" and cap.total is None and cap.budget is None:
                continue
            devices[device] = {
                "total": cap.total,
                "used": cap.used,
                "free": None if cap.total is None or cap.used is None else max(0, cap.total - cap.used),
                "budget": cap.budget,
                "reserve": cap.reserve,
                "usable": cap.usable,
            }
        models = {}
        for model in self._models:
            fp, usage = self.footprint(model), self.usage.get(model)
            place = self.placement(model) if self.device_of(model) == "gpu" else None
            models[model] = {
                "gpus": None if place is None else list(place.gpus),
                "placement": None if place is None else place.source,
                "perGpu": None if place is None else {str(g): self.need_on(model, g) for g in place.gpus},
                "device": self.device_of(model),
                "footprint": fp.bytes,
                "source": fp.source,
                "estimate": self.estimate(model).bytes,
                "estimate_detail": self._estimates[model].detail,
                "pid": usage.pid if usage else None,
                "used": self.current(model),
                "ram": usage.ram if usage else None,
                "gpu": usage.gpu if usage else None,
            }
        return {
            "sampled_at": self.sampled_at,
            "nvml": bool(self.gpus),
            "nvml_unavailable_reason": self.gpu_reason,
            "devices": devices,
            "gpus": [self._gpu_status(index) for index in self.gpu_indices()],
            "models": models,
        }

    def _gpu_status(self, index: int) -> dict[str, Any]:
        """One GPU: its memory, what swapper may use of it, and swapper's models on it."""
        cap = self.capacity_on(index)
        gpu = next((g for g in self.gpus if g.index == index), None)
        resident = sorted(m for m in self._ready if m in self._models and index in self.devices_of(m))
        return {
            "index": index,
            "name": gpu.name if gpu else None,
            "total": cap.total,
            "used": cap.used,
            "free": None if cap.total is None or cap.used is None else max(0, cap.total - cap.used),
            "reserved": cap.reserve,
            "budget": cap.budget,
            "usable": cap.usable,
            "models": {m: self.held_on(m, index) for m in resident},
        }


def human(n: int | None) -> str | None:
    if n is None:
        return None
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"
