"""What the memory planner knows, and the run loop's side of measuring it.

Owns:

* ``MemoryLedger``: the facts a memory decision is made from: each device's latest sample, each
  child's current usage, every model's footprint (measured, else estimated), and which children
  are ready. **Only the run loop mutates it**, inside its message handlers (``on_sample``,
  ``on_ready``); the planner reads it synchronously from the same thread, so a decision never
  sees half an update.
* ``MemoryMonitor``: the run loop's helper for everything that waits: the sampler task (blocking
  NVML/psutil calls in a worker thread, results posted to the run loop as ``MemorySampled``), the
  persistence of measured footprints (a small JSON file, written from that task), and the bounded
  wait, inside a stop task, until a stopped child's memory is really free (llama-swap #97: the
  next start must not OOM on memory the driver has not given back yet).

A footprint is *measured* from the first sample begun after the child became ready (USS over its
process tree for RAM, NVML per-process memory over its tree for a GPU), then raised to the
largest usage seen while that child runs. Measurements are keyed by the model's command (with its
port masked), so changing ``-c`` or the model file forgets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from swapper.config import Config, MemoryConfig, ModelConfig
from swapper.footprint import GIB, MIB, Estimate, estimate
from swapper.gpu import ChildUsage, Device, DeviceUsage, GpuUsage, MemorySample, ProcessId, Sampler
from swapper.messages import MemorySampled

log = structlog.get_logger("swapper.memory")

SAMPLE_SECONDS: Final = 1.0
RELEASE_POLL: Final = 0.01  # first poll interval after a stop; doubles up to RELEASE_POLL_MAX
RELEASE_POLL_MAX: Final = 0.2
# A stopped child's GPU memory counts as released once device use fell by this share of what the
# child held (other processes may allocate meanwhile, so never wait for the full amount).
RELEASE_FRACTION: Final = 0.5
# Added to file-based estimates: runtime, compute buffers, and on a GPU the CUDA context.
OVERHEAD: Final[Mapping[Device, int]] = {"gpu": 384 * MIB, "ram": 64 * MIB}
STATE_VERSION: Final = 1
STATE_FILE_NAME: Final = "memory-footprints.json"

FootprintSource = Literal["measured", "override", "gguf", "file", "guess"]
ChildPids = Callable[[], Mapping[str, int]]


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


def default_state_file() -> Path:
    root = os.environ.get("SWAPPER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "swapper"
    return base / STATE_FILE_NAME


def fingerprint(model: ModelConfig) -> str:
    text = model.cmd_text
    if model.port is not None:
        text = text.replace(str(model.port), "${PORT}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_state(path: Path) -> dict[str, Measurement]:
    """Measurements saved by ``write_state``; an absent or damaged file is an empty one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        models = doc["models"] if doc.get("version") == STATE_VERSION else {}
        return {
            str(mid): Measurement(m["device"], int(m["bytes"]), str(m["cmd"]), float(m.get("at", 0)))
            for mid, m in models.items()
            if m.get("device") in ("gpu", "ram")
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable memory state file", path=str(path), error=str(exc))
        return {}


def write_state(path: Path, measurements: Mapping[str, Measurement]) -> None:
    """Atomically replaces ``path`` (blocking; run it in a thread)."""
    doc = {
        "version": STATE_VERSION,
        "models": {
            mid: {"device": m.device, "bytes": m.bytes, "cmd": m.cmd, "at": round(m.at, 3)}
            for mid, m in sorted(measurements.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
        m = self.measurements.get(model)
        if m is not None and m.cmd == self._fingerprints[model] and m.device == self.device_of(model):
            return Footprint(m.bytes, "measured")
        return self.estimate(model)

    def current(self, model: str) -> int | None:
        """What ``model``'s child holds on its device in the latest sample, if sampled."""
        usage = self.usage.get(model)
        if usage is None:
            return None
        return usage.ram if self.device_of(model) == "ram" else usage.gpu

    def held(self, model: str) -> int:
        """What a running ``model`` holds or will hold once loaded (the larger of the two)."""
        return max(self.footprint(model).bytes, self.current(model) or 0)

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
        if not fresh and old is not None and old.cmd == self._fingerprints[model] and old.device == device:
            if measured <= old.bytes + max(MIB, old.bytes // 50):
                return  # not a new peak worth writing down
            measured = max(measured, old.bytes)
        self.measurements[model] = Measurement(device, measured, self._fingerprints[model], time.time())
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
            models[model] = {
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
            "gpus": [
                {"index": g.index, "name": g.name, "total": g.total, "used": g.used, "free": g.total - g.used}
                for g in self.gpus
            ],
            "models": models,
        }


class ReleaseWatch:
    """Waits, after a child was stopped, until the memory its process tree held is free."""

    __slots__ = ("_model", "_sampler", "_tree", "_gpu_held", "_gpu_used", "_timeout")

    def __init__(
        self,
        model: str,
        sampler: Sampler,
        tree: frozenset[ProcessId],
        gpu_held: int,
        gpu_used: int | None,
        timeout: float,
    ) -> None:
        self._model = model
        self._sampler = sampler
        self._tree = tree
        self._gpu_held = gpu_held
        self._gpu_used = gpu_used
        self._timeout = timeout

    async def wait_released(self) -> float | None:
        """Returns the seconds it took, or None if it gave up after the release timeout."""
        if not self._tree:
            return 0.0
        began = time.monotonic()
        delay = RELEASE_POLL
        probe = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                while True:
                    probe = await asyncio.to_thread(self._sampler.probe, self._tree)
                    if probe.alive == 0 and probe.gpu_held == 0 and self._device_dropped(probe.gpu_used):
                        took = time.monotonic() - began
                        log.debug("memory released", model=self._model, seconds=round(took, 4))
                        return took
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RELEASE_POLL_MAX)
        log.warning(
            "memory not released in time; starting the next model anyway (raise releaseTimeout?)",
            model=self._model,
            timeout=self._timeout,
            processes_alive=probe.alive if probe else None,
            gpu_still_held=human(probe.gpu_held) if probe else None,
        )
        return None

    def _device_dropped(self, used_now: int | None) -> bool:
        if used_now is None or self._gpu_used is None or self._gpu_held <= 0:
            return True
        return used_now <= self._gpu_used - RELEASE_FRACTION * self._gpu_held


class MemoryMonitor:
    """The run loop's side of memory planning (see module doc). One per planner."""

    def __init__(self, ledger: MemoryLedger, sampler: Sampler, state_file: Path | None) -> None:
        self.ledger = ledger
        self._sampler = sampler
        self._state_file = state_file
        self._saved_version = ledger.version
        self._wake = asyncio.Event()
        self._failures = 0

    @staticmethod
    def of(planner: object) -> MemoryMonitor | None:
        """The monitor of a planner that plans by memory; None for any other planner."""
        monitor = getattr(planner, "memory_monitor", None)
        return monitor if isinstance(monitor, MemoryMonitor) else None

    # ---- run-loop task, before the loop takes its first message ----

    async def open(self, children: ChildPids) -> None:
        """Opens NVML and applies a first sample, so the first decision already knows the devices."""
        self.ledger.gpu_reason = await asyncio.to_thread(self._sampler.open)
        try:
            sample = await asyncio.to_thread(self._sampler.sample, children(), time.monotonic())
        except Exception:
            # Plan with budgets alone until a sample succeeds; never keep the loop from starting.
            log.exception("memory sampling failed")
        else:
            self.ledger.on_sample(sample)
        self._log_devices()

    def _log_devices(self) -> None:
        led, s = self.ledger, self.ledger.settings
        ram = led.capacity("ram")
        fields: dict[str, Any] = {
            "ram": human(ram.total),
            "ram_budget": human(s.ram_budget),
            "reserve": human(s.reserve),
            "state_file": str(self._state_file) if self._state_file else None,
        }
        if led.gpus:
            fields["gpus"] = ", ".join(f"{g.name} {human(g.total)}" for g in led.gpus)
            fields["gpu_budget"] = human(s.gpu_budget)
            log.info("memory planner: measuring GPUs with NVML and RAM with psutil", **fields)
        elif s.gpu_budget is not None:
            log.warning(
                f"memory planner: {self.ledger.gpu_reason}; GPU models are planned against gpuBudget with"
                " estimated footprints (GPU memory cannot be measured)",
                **fields,
            )
        else:
            log.info(
                f"memory planner: {self.ledger.gpu_reason}; every model is accounted in system RAM", **fields
            )

    # ---- the sampler task ----

    async def sample_forever(self, post: Callable[[MemorySampled], None], children: ChildPids) -> None:
        """Samples every ``SAMPLE_SECONDS`` (at once after ``on_ready``) and posts the result."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SAMPLE_SECONDS):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    sample = await asyncio.to_thread(self._sampler.sample, children(), time.monotonic())
                except Exception:
                    self._failures += 1
                    if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                        log.exception("memory sampling failed", failures=self._failures)
                    continue
                post(MemorySampled(sample))
                await self._persist()
        finally:
            self._persist_now()
            await asyncio.to_thread(self._sampler.close)

    async def _persist(self) -> None:
        if self._state_file is None or self.ledger.version == self._saved_version:
            return
        version, snapshot = self.ledger.version, dict(self.ledger.measurements)
        try:
            await asyncio.to_thread(write_state, self._state_file, snapshot)
        except OSError as exc:
            log.warning("cannot save measured footprints", path=str(self._state_file), error=str(exc))
        self._saved_version = version

    def _persist_now(self) -> None:
        """Shutdown's last write (blocking, but the file is small and the loop is ending)."""
        if self._state_file is None or self.ledger.version == self._saved_version:
            return
        try:
            write_state(self._state_file, self.ledger.measurements)
            self._saved_version = self.ledger.version
        except OSError as exc:
            log.warning("cannot save measured footprints", path=str(self._state_file), error=str(exc))

    # ---- run-loop handlers (never await) ----

    def on_sample(self, msg: MemorySampled) -> None:
        self.ledger.on_sample(msg.sample)

    def on_ready(self, model: str, pid: int | None) -> None:
        """``model``'s child became healthy: measure it with the next sample, taken now."""
        if pid is not None:
            self.ledger.on_ready(model, pid, time.monotonic())
            self._wake.set()

    def status(self) -> dict[str, Any]:
        return self.ledger.status()

    # ---- stop tasks ----

    async def watch_release(self, model: str, pid: int | None) -> ReleaseWatch:
        """Call before stopping ``pid``: notes its process tree and what it holds on the GPU."""
        timeout = self.ledger.settings.release_timeout
        if pid is None:
            return ReleaseWatch(model, self._sampler, frozenset(), 0, None, timeout)
        tree = await asyncio.to_thread(self._sampler.tree, pid)
        before = await asyncio.to_thread(self._sampler.probe, tree) if self.ledger.gpus else None
        gpu_held = before.gpu_held if before else 0
        return ReleaseWatch(
            model, self._sampler, tree, gpu_held, before.gpu_used if before else None, timeout
        )


def human(n: int | None) -> str | None:
    if n is None:
        return None
    if abs(n) >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def make_monitor(config: Config, sampler: Sampler | None = None) -> MemoryMonitor:
    """A monitor (and its ledger) for ``config``, restoring measured footprints from the state file."""
    from swapper.gpu import SystemSampler

    settings = config.routing.memory
    path = Path(settings.state_file).expanduser() if settings.state_file else default_state_file()
    ledger = MemoryLedger(config, saved=read_state(path))
    return MemoryMonitor(ledger, sampler or SystemSampler(), path)


__all__ = [
    "Capacity",
    "Footprint",
    "MemoryLedger",
    "MemoryMonitor",
    "Measurement",
    "ReleaseWatch",
    "default_state_file",
    "make_monitor",
    "read_state",
    "write_state",
]
