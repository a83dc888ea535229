"""The run loop's side of memory planning: sampling, persistence, and waiting for memory.

Owns ``MemoryMonitor``, the run loop's helper for everything about memory that waits:

* the sampler task: blocking NVML/psutil calls in a worker thread every ``SAMPLE_SECONDS`` (and at
  once after a child became ready, to measure it), handed to a callback (the run loop posts each
  as a ``MemorySampled`` message, whose handler applies it to the ``MemoryLedger``);
* persistence of measured footprints: a small JSON file (``stateFile``, by default
  ``~/.cache/swapper/memory-footprints.json``) written from that task, atomically;
* the bounded wait, inside a stop task, until a stopped child's memory is really free
  (llama-swap #97: the next start must not OOM on memory not given back yet).

May not touch: scheduling decisions, children (it learns pids from the run loop), the sampler's
lifetime (it is the process's one sampler, shared with ``/metrics`` and ``/v1/status``, and closed
by whoever made it), and the ledger outside the run loop's handlers (``on_sample``/``on_ready`` are
called from them; the tasks here only read it, advisorily).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from swapper.config.schema import Config
from swapper.memory.ledger import Measurement, MemoryLedger, human
from swapper.memory.samples import MemorySample, Sampler

log = structlog.get_logger("swapper.memory.monitor")

SAMPLE_SECONDS: Final = 1.0
OPEN_TIMEOUT: Final = 10.0  # for NVML's initialisation, before the run loop takes messages
RELEASE_POLL: Final = 0.01  # first poll interval after a stop; doubles up to RELEASE_POLL_MAX
RELEASE_POLL_MAX: Final = 0.2
# A stopped child's GPU memory counts as released once device use fell by this share of what the
# child held (other processes may allocate meanwhile, so never wait for the full amount).
RELEASE_FRACTION: Final = 0.5
STATE_VERSION: Final = 1
STATE_FILE_NAME: Final = "memory-footprints.json"

ChildPids = Callable[[], Mapping[str, int]]


def default_state_file() -> Path:
    root = os.environ.get("SWAPPER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "swapper"
    return base / STATE_FILE_NAME


def read_state(path: Path) -> dict[str, Measurement]:
    """Measurements saved by ``write_state``; an absent or damaged file is an empty one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        models = doc["models"] if doc.get("version") == STATE_VERSION else {}
        return {
            str(mid): Measurement(
                m["device"],
                int(m["bytes"]),
                str(m["cmd"]),
                float(m.get("at", 0)),
                tuple(sorted((int(i), int(b)) for i, b in (m.get("gpus") or {}).items())),
            )
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
            | ({"gpus": {str(i): b for i, b in m.gpus}} if m.gpus else {})
            for mid, m in sorted(measurements.items())
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ReleaseWatch:
    """Waits, after a child was stopped, until the memory its process group held is free."""

    __slots__ = ("_model", "_sampler", "_pgid", "_pids", "_gpu_held", "_gpu_used", "_timeout")

    def __init__(
        self,
        model: str,
        sampler: Sampler,
        pgid: int | None,
        pids: frozenset[int],
        gpu_held: int,
        gpu_used: int | None,
        timeout: float,
    ) -> None:
        self._model = model
        self._sampler = sampler
        self._pgid = pgid
        self._pids = pids
        self._gpu_held = gpu_held
        self._gpu_used = gpu_used
        self._timeout = timeout

    async def wait_released(self) -> float | None:
        """Returns the seconds it took, or None if it gave up after the release timeout."""
        if self._pgid is None:
            return 0.0
        began = time.monotonic()
        delay = RELEASE_POLL
        probe = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                while True:
                    probe = await asyncio.to_thread(self._sampler.probe, self._pgid, self._pids)
                    if not probe.alive and probe.gpu_held == 0 and self._device_dropped(probe.gpu_used):
                        took = time.monotonic() - began
                        log.debug("memory released", model=self._model, seconds=round(took, 4))
                        return took
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RELEASE_POLL_MAX)
        log.warning(
            "memory not released in time; starting the next model anyway (raise releaseTimeout?)",
            model=self._model,
            timeout=self._timeout,
            processes_alive=sorted(probe.alive) if probe else None,
            gpu_still_held=human(probe.gpu_held) if probe else None,
        )
        return None

    def _device_dropped(self, used_now: int | None) -> bool:
        if used_now is None or self._gpu_used is None or self._gpu_held <= 0:
            return True
        return used_now <= self._gpu_used - RELEASE_FRACTION * self._gpu_held


class MemoryMonitor:
    """The run loop's side of memory planning (see module doc). One per run loop: a reload hands
    the new planner's ledger to the running monitor (``adopt``)."""

    def __init__(self, ledger: MemoryLedger, sampler: Sampler, state_file: Path | None) -> None:
        self.ledger = ledger
        self._sampler = sampler
        self._state_file = state_file
        self._saved_version = ledger.version
        self._wake = asyncio.Event()
        self._closed = False
        self._failures = 0

    # ---- run-loop task, before the loop takes its first message ----

    async def open(self, children: ChildPids) -> None:
        """Opens NVML and applies a first sample, so the first decision already knows the devices."""
        reason = await self._open_sampler()
        try:
            sample = await asyncio.to_thread(self._sampler.sample, children(), time.monotonic())
        except Exception:
            # Plan with budgets alone until a sample succeeds; never keep the loop from starting.
            log.exception("memory sampling failed")
            self.ledger.gpu_reason = reason
            self._log_devices(None, reason)
        else:
            self.ledger.on_sample(sample)
            self._log_devices(sample, reason)

    async def _open_sampler(self) -> str | None:
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                return await asyncio.to_thread(self._sampler.open)
        except TimeoutError:
            # A wedged driver can hang nvmlInit; requests must not wait on it. If it answers
            # later, its GPUs simply appear in the samples from then on.
            return f"NVML did not answer within {OPEN_TIMEOUT:.0f} s"

    def _log_devices(self, sample: MemorySample | None, reason: str | None) -> None:
        s = self.ledger.settings
        fields: dict[str, Any] = {
            "ram": human(sample.ram.total) if sample else None,
            "ram_budget": human(s.ram_budget),
            "reserve": human(s.reserve),
            "state_file": str(self._state_file) if self._state_file else None,
        }
        if sample is not None and sample.gpus:
            fields["gpus"] = ", ".join(f"{g.name} {human(g.total)}" for g in sample.gpus)
            fields["gpu_budget"] = human(s.gpu_budget)
            log.info("memory planner: measuring GPUs with NVML and RAM with psutil", **fields)
        elif s.gpu_budget is not None:
            log.warning(
                f"memory planner: {reason}; GPU models are planned against gpuBudget with"
                " estimated footprints (GPU memory cannot be measured)",
                **fields,
            )
        else:
            log.info(f"memory planner: {reason}; every model is accounted in system RAM", **fields)

    # ---- the sampler task ----

    async def sample_forever(
        self, post: Callable[[MemorySample], None], children: ChildPids, *, opened: bool = True
    ) -> None:
        """Samples every ``SAMPLE_SECONDS`` (at once after ``on_ready``) and posts the result, until
        ``close``. ``opened=False`` (a reload switched to the memory planner) opens NVML first."""
        reason = None if opened else await self._open_sampler()
        if not opened:
            self._wake.set()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SAMPLE_SECONDS):
                        await self._wake.wait()
                self._wake.clear()
                if self._closed:
                    break
                try:
                    sample = await asyncio.to_thread(self._sampler.sample, children(), time.monotonic())
                except Exception:
                    self._failures += 1
                    if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                        log.exception("memory sampling failed", failures=self._failures)
                    continue
                post(sample)
                if not opened:
                    opened = True
                    self._log_devices(sample, reason)
                await self._persist()
        finally:
            self._persist_now()  # the sampler is not closed here: metrics reads through it too

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

    def on_sample(self, sample: MemorySample) -> None:
        self.ledger.on_sample(sample)

    def on_ready(self, model: str, pid: int | None) -> None:
        """``model``'s child became healthy: measure it with the next sample, taken now."""
        if pid is not None:
            self.ledger.on_ready(model, pid, time.monotonic())
            self._wake.set()

    def on_stopping(self, model: str) -> None:
        """``model`` is being stopped: what its child holds from now on is no measurement."""
        self.ledger.on_stopping(model)

    def status(self) -> dict[str, Any]:
        return self.ledger.status()

    def adopt(self, other: MemoryMonitor) -> MemoryMonitor:
        """A reload built a new memory planner, whose monitor is ``other``: this monitor's sampler
        task carries on, now feeding ``other``'s ledger, which takes over what this one sampled
        and measured. Returns this monitor."""
        other.ledger.carry_over(self.ledger)
        self.ledger = other.ledger
        self._state_file = other._state_file
        self._saved_version = -1  # the new config may name another file: write it afresh
        return self

    def close(self) -> None:
        """A reload left the memory planner: the sampler task saves and ends."""
        self._closed = True
        self._wake.set()

    # ---- stop tasks ----

    async def watch_release(self, model: str, pid: int | None) -> ReleaseWatch:
        """Call before stopping ``pid``. Without GPUs it returns at once: a process group needs no
        snapshot. With GPUs it notes (one NVML probe, ~1 ms) what the group holds, to see it
        given back."""
        timeout = self.ledger.settings.release_timeout
        if pid is None or not self.ledger.gpus:
            return ReleaseWatch(model, self._sampler, pid, frozenset(), 0, None, timeout)
        before = await asyncio.to_thread(self._sampler.probe, pid, frozenset({pid}))
        pids = before.alive | {pid}
        return ReleaseWatch(model, self._sampler, pid, pids, before.gpu_held, before.gpu_used, timeout)


def make_monitor(config: Config, sampler: Sampler) -> MemoryMonitor:
    """A monitor (and its ledger) for ``config``, restoring measured footprints from the state file.

    ``sampler`` is the process's one sampler (``gpu.SystemSampler``): its maker closes it."""
    return MemoryMonitor(load_ledger(config), sampler, state_file(config))


def state_file(config: Config) -> Path:
    settings = config.routing.memory
    return Path(settings.state_file).expanduser() if settings.state_file else default_state_file()


def load_ledger(config: Config) -> MemoryLedger:
    """A ledger for ``config`` with the footprints measured before (the state file)."""
    return MemoryLedger(config, saved=read_state(state_file(config)))
