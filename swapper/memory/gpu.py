"""Memory sampling: GPUs through NVML (``pynvml``), system RAM and process trees through psutil.

Owns: the NVML session (``Nvml``), one per swapper process, inside its one ``SystemSampler``:
the memory monitor, ``/metrics`` and ``/v1/status`` all sample through it, so they see the same
process tree of each child (walked once per sample) and the same GPUs. A sample's records are
``samples``'s. Holds no policy and no scheduling state: ``swapper.memory.monitor`` decides what
a sample means.

Concurrency contract: every function and method here *blocks* (NVML calls, /proc reads), so
callers run them in a worker thread (``asyncio.to_thread``), never inside a run-loop handler.
They may run in several threads at once (the periodic sample, a stop's release probe, scrapes):
NVML is thread-safe, psutil keeps no shared state, and ``SystemSampler``'s only mutations (its
one open, its close) take its lock, which is never held across an NVML call.

Without NVML (no driver, no GPU, ``nvidia-ml-py`` missing) ``SystemSampler.open`` returns the
reason and every sample simply has no GPUs; nothing here raises because a GPU is absent.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil

from swapper.memory.samples import (
    ChildUsage,
    Device,
    DeviceUsage,
    GpuUsage,
    MemorySample,
    ReleaseProbe,
    Sampler,
)

# The records a sample is made of live in memory/samples.py (pure); they are re-exported here.
__all__ = [
    "ChildUsage",
    "Device",
    "DeviceUsage",
    "GpuUsage",
    "MemorySample",
    "Nvml",
    "ReleaseProbe",
    "Sampler",
    "SystemSampler",
    "gpu_used_by",
    "open_nvml",
    "used_by",
]


class Nvml:
    """An open NVML session; ``open_nvml`` makes one."""

    __slots__ = ("_nvml", "_handles", "_names")

    def __init__(self, nvml: Any, handles: list[Any], names: list[str]) -> None:
        self._nvml = nvml
        self._handles = handles
        self._names = names

    def devices(self) -> tuple[GpuUsage, ...]:
        out = []
        for index, handle in enumerate(self._handles):
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(GpuUsage(index, self._names[index], int(info.total), int(info.used)))
        return tuple(out)

    def processes(self) -> dict[int, int | None]:
        """pid -> bytes used over every GPU; None where the driver does not say (WDDM, some vGPU)."""
        return _summed(self.processes_by_gpu().values())

    def processes_by_gpu(self) -> dict[int, dict[int, int | None]]:
        """GPU index -> (pid -> bytes used there; None where the driver does not say)."""
        return {index: self._processes_on(handle) for index, handle in enumerate(self._handles)}

    def _processes_on(self, handle: Any) -> dict[int, int | None]:
        usage: dict[int, int | None] = {}
        for getter in (
            self._nvml.nvmlDeviceGetComputeRunningProcesses,
            self._nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            try:
                procs = getter(handle)
            except self._nvml.NVMLError:
                continue  # e.g. graphics processes are not supported on this device
            for proc in procs:
                used = proc.usedGpuMemory
                before = usage.get(proc.pid, 0)
                usage[proc.pid] = None if used is None or before is None else before + int(used)
        return usage

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


def _summed(tables: Iterable[Mapping[int, int | None]]) -> dict[int, int | None]:
    usage: dict[int, int | None] = {}
    for table in tables:
        for pid, used in table.items():
            before = usage.get(pid, 0)
            usage[pid] = None if used is None or before is None else before + used
    return usage


def open_nvml() -> tuple[Nvml | None, str | None]:
    """Initialises NVML; returns (session, None) or (None, why there is none)."""
    try:
        import pynvml
    except ImportError:
        return None, "the nvidia-ml-py package is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"NVML is not available ({exc})"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        names = [_text(pynvml.nvmlDeviceGetName(h)) for h in handles]
    except pynvml.NVMLError as exc:
        pynvml.nvmlShutdown()
        return None, f"NVML could not list GPUs ({exc})"
    if not handles:
        pynvml.nvmlShutdown()
        return None, "NVML reports no GPU"
    return Nvml(pynvml, handles, names), None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SystemSampler:
    """The one sampler of a swapper process: NVML when it opens, psutil always.

    The memory monitor, ``/metrics`` and ``/v1/status`` all read through it, so they share one
    NVML session and one walk of each child's process tree. Whoever makes it closes it, once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the open/close flags, never held across nvmlInit
        self._nvml: Nvml | None = None
        self._reason: str | None = "NVML was not opened yet"
        self._started = False  # an open was begun (by whichever reader came first)
        self._opened = threading.Event()  # ... and has ended, with a session or a reason
        self._closed = False

    @property
    def opened(self) -> bool:
        """The one open has ended (with a session or with a reason): ``open`` returns at once."""
        return self._opened.is_set()

    def open(self) -> str | None:
        """Opens NVML once per sampler; a later (or concurrent) call waits for that one open.

        nvmlInit can hang on a wedged driver, so callers bound their wait; if it answers later,
        its GPUs simply appear in the samples from then on.
        """
        with self._lock:
            if self._closed and not self._started:
                return "the sampler was closed"  # a reader after shutdown opens nothing
            first, self._started = not self._started, True
        if not first:
            self._opened.wait()
            return self._reason
        nvml, reason = open_nvml()
        with self._lock:
            if self._closed and nvml is not None:  # closed while nvmlInit hung: nobody reads it now
                nvml.close()
                nvml, reason = None, "the sampler was closed"
            self._nvml, self._reason = nvml, reason
        self._opened.set()
        return reason

    def sample(
        self, children: Mapping[str, int], at: float, *, private: bool = True, gpus: bool = True
    ) -> MemorySample:
        """Devices and each child's tree, walked once. ``private=False`` skips the USS read (a
        page-table walk, costly for a large model): ``ChildUsage.ram`` is then the RSS sum.
        ``gpus=False`` leaves NVML out (a reader's fallback after an NVML error)."""
        nvml = self._nvml if gpus else None
        vm = psutil.virtual_memory()
        # "used" as the kernel sees pressure: page cache that can be dropped counts as free.
        ram = DeviceUsage(int(vm.total), int(vm.total - vm.available))
        devices: tuple[GpuUsage, ...] = ()
        gpu_procs: dict[int, int | None] | None = None
        by_gpu: dict[int, dict[int, int | None]] = {}
        if nvml is not None:
            devices = nvml.devices()
            by_gpu = nvml.processes_by_gpu()
            gpu_procs = _summed(by_gpu.values())
        kids = _children_map() if children else {}
        usage = {}
        for model, pid in children.items():
            tree = [pid, *_descendants(pid, kids)]
            held, rss, alive = _ram_of(tree, private)
            if alive and alive[0] == pid:  # an exited leader's leftovers are no footprint
                on = {i: used_by(tree, procs) for i, procs in by_gpu.items()}
                usage[model] = ChildUsage(
                    pid,
                    held,
                    gpu_used_by(tree, gpu_procs),
                    len(alive),
                    {i: used for i, used in on.items() if used},
                    rss=rss,
                )
        return MemorySample(at, ram, devices, usage, self._reason if gpus else "NVML left out")

    def probe(self, pgid: int, pids: frozenset[int]) -> ReleaseProbe:
        alive = _group_members(pgid)
        gpu_held = 0
        gpu_used = None
        nvml = self._nvml
        if nvml is not None:
            procs = nvml.processes()
            gpu_held = sum(procs.get(pid) or 0 for pid in alive | pids)
            gpu_used = sum(g.used for g in nvml.devices())
        return ReleaseProbe(alive, gpu_held, gpu_used)

    def close(self) -> None:
        """Ends the NVML session (for good: a closed sampler samples without GPUs)."""
        with self._lock:
            self._closed = True
            nvml, self._nvml = self._nvml, None
            if nvml is not None:
                self._reason = "the sampler was closed"
        if nvml is not None:
            nvml.close()


# psutil's own pid -> ppid table, the one ``Process.children()`` builds on every call: one light
# pass over /proc, several times cheaper than ``process_iter(["ppid"])``, which makes a Process and
# a dict per pid (docs/performance.md). Private to psutil, hence the public fallback.
_PPID_MAP: Callable[[], dict[int, int]] | None = getattr(psutil, "_ppid_map", None)


def _children_map() -> dict[int, list[int]]:
    """ppid -> pids, from one pass over the process table (cheaper than one pass per child)."""
    kids: dict[int, list[int]] = {}
    if _PPID_MAP is not None:
        for pid, ppid in _PPID_MAP().items():
            kids.setdefault(ppid, []).append(pid)
        return kids
    for proc in psutil.process_iter(["ppid"]):
        parent = proc.info.get("ppid")
        if parent is not None:
            kids.setdefault(parent, []).append(proc.pid)
    return kids


def _descendants(pid: int, kids: Mapping[int, list[int]]) -> list[int]:
    out: list[int] = []
    todo = list(kids.get(pid, ()))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(kids.get(child, ()))
    return out


def _ram_of(pids: Iterable[int], private: bool) -> tuple[int, int, list[int]]:
    """(private bytes, resident bytes, those of ``pids`` alive), summed over ``pids``; zombies
    hold nothing. Private is USS (RSS where it cannot be read, or with ``private`` false)."""
    held_total = rss_total = 0
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if private:
                try:
                    info = proc.memory_full_info()
                    held, rss = int(info.uss), int(info.rss)
                except psutil.AccessDenied:
                    held = rss = int(proc.memory_info().rss)
            else:
                held = rss = int(proc.memory_info().rss)
        except psutil.Error:
            continue  # exited since the scan
        if rss:  # a zombie reads as all zeros
            held_total += held
            rss_total += rss
            alive.append(pid)
    return held_total, rss_total, alive


def used_by(pids: Iterable[int], procs: Mapping[int, int | None]) -> int:
    """What ``pids`` hold by one GPU's process table (unknown amounts count as nothing)."""
    return sum(procs.get(pid) or 0 for pid in pids)


def gpu_used_by(pids: Iterable[int], procs: Mapping[int, int | None] | None) -> int | None:
    """GPU memory the ``pids`` hold by NVML's per-process table; None when it cannot say."""
    if procs is None:
        return None
    total = 0
    for pid in pids:
        if pid in procs:
            used = procs[pid]
            if used is None:
                return None
            total += used
    return total


def _group_members(pgid: int) -> frozenset[int]:
    """Live (not zombie) processes of process group ``pgid``; one getpgid per process, ~1 µs each."""
    members = set()
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.add(pid)
        except (OSError, psutil.Error):
            continue  # gone meanwhile
    return frozenset(members)
