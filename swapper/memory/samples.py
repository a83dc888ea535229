"""The immutable records a memory sample is made of, and the ``Sampler`` protocol.

Owns: nothing mutable. Pure (no psutil, no NVML), so the ledger and the memory planner can read
samples without importing what takes them (``swapper.memory.gpu``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Device = Literal["gpu", "ram"]


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    """One device's memory: for ``gpu`` the sum over every GPU NVML reports."""

    total: int
    used: int

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


@dataclass(frozen=True, slots=True)
class GpuUsage:
    index: int
    name: str
    total: int
    used: int


@dataclass(frozen=True, slots=True)
class ChildUsage:
    """What one child's process tree holds right now."""

    pid: int  # the child (leader of the tree)
    ram: int  # USS summed over the tree (RSS where USS cannot be read or was not asked for)
    gpu: int | None  # NVML per-process used memory summed over the tree; None: not measurable
    processes: int
    gpus: Mapping[int, int] = field(default_factory=dict)  # GPU index -> bytes there (held only)
    rss: int = 0  # resident bytes summed over the tree (shared pages count once per process)


@dataclass(frozen=True, slots=True)
class MemorySample:
    at: float  # monotonic time the sample was begun
    ram: DeviceUsage
    gpus: tuple[GpuUsage, ...]  # empty without NVML
    children: Mapping[str, ChildUsage]  # model id -> its child's usage
    nvml_error: str | None = None  # why there are no GPUs (NVML absent, not opened yet...)

    @property
    def gpu(self) -> DeviceUsage | None:
        if not self.gpus:
            return None
        return DeviceUsage(sum(g.total for g in self.gpus), sum(g.used for g in self.gpus))


@dataclass(frozen=True, slots=True)
class ReleaseProbe:
    """Whether a stopped child's memory is free yet.

    A child leads its own process group and its helpers stay in it after it exits, so the group
    is what is watched: no snapshot of the process tree is needed before the stop.
    """

    alive: frozenset[int]  # live members of the group (zombies hold no memory and do not count)
    gpu_held: int  # bytes NVML attributes to the group's members and the pids asked about
    gpu_used: int | None  # bytes used over every GPU now; None without NVML


class Sampler(Protocol):
    """What ``swapper.memory.monitor`` needs from a sampler; blocking, called from worker threads."""

    def open(self) -> str | None:
        """Prepares sampling; returns why GPUs cannot be sampled, or None when they can."""
        ...

    def sample(self, children: Mapping[str, int], at: float) -> MemorySample:
        """Samples every device and the process tree of each ``model id -> pid``."""
        ...

    def probe(self, pgid: int, pids: frozenset[int]) -> ReleaseProbe:
        """What process group ``pgid`` (and ``pids``, which NVML may list after they died) holds."""
        ...

    def close(self) -> None: ...
