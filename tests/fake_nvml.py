"""A fake ``pynvml`` with N GPUs whose memory is held by real fake-upstream processes.

Installed in ``sys.modules`` (``install``), it stands behind swapper's own NVML seam
(``swapper.memory.gpu.open_nvml`` imports ``pynvml``), so everything above it is swapper's real code:
the sampler, the ledger, the planner, the release wait. Each live process whose command line runs
``fake_server.py`` with ``--vram-mib N`` "holds" N MiB, split evenly over the GPUs in its
``--vram-gpus`` (else those in its ``CUDA_VISIBLE_DEVICES``, else GPU 0), as a CUDA process would
show in ``nvmlDeviceGetComputeRunningProcesses``; a GPU's used memory is its ``baseline`` (others'
use) plus what those processes hold. A process that exits stops holding at once.

Only processes of this test run are seen (those carrying its ``SWAPPER_TEST_TAG``), so another
pytest on the same machine cannot disturb the numbers.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

MIB = 1024 * 1024


class FakeNvmlError(Exception):
    pass


@dataclass
class _Mem:
    total: int
    used: int


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int | None


def _option(cmdline: list[str], name: str) -> str | None:
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
    return None


class FakeNvml:
    """The state behind the fake module: GPU totals and baselines (MiB), and a tag filter."""

    def __init__(self, gpus: int, total_mib: int, baseline_mib: dict[int, int] | None = None) -> None:
        self.gpus = gpus
        self.total = total_mib * MIB
        self.baseline = {i: (baseline_mib or {}).get(i, 0) * MIB for i in range(gpus)}
        self.tag = os.environ.get("SWAPPER_TEST_TAG")

    def holders(self) -> dict[int, dict[int, int]]:
        """GPU index -> pid -> bytes, from the live fake servers of this test."""
        held: dict[int, dict[int, int]] = {i: {} for i in range(self.gpus)}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if not any(arg.endswith("fake_server.py") for arg in cmdline):
                continue
            mib = _option(cmdline, "--vram-mib")
            if not mib or int(mib) <= 0:
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = proc.environ()
            except psutil.Error:
                continue
            if self.tag is not None and env.get("SWAPPER_TEST_TAG") != self.tag:
                continue
            where = _option(cmdline, "--vram-gpus") or env.get("CUDA_VISIBLE_DEVICES") or "0"
            gpus = [int(g) for g in where.split(",") if g.strip().isdigit() and int(g) < self.gpus]
            for gpu in gpus:
                held[gpu][proc.pid] = int(mib) * MIB // len(gpus)
        return held

    def module(self) -> types.SimpleNamespace:
        def memory(handle: int) -> _Mem:
            used = self.baseline[handle] + sum(self.holders()[handle].values())
            return _Mem(self.total, used)

        def compute(handle: int) -> list[_Proc]:
            return [_Proc(pid, used) for pid, used in self.holders()[handle].items()]

        def graphics(handle: int) -> list[_Proc]:
            raise FakeNvmlError("Not Supported")

        mod: Any = types.SimpleNamespace(
            NVMLError=FakeNvmlError,
            nvmlInit=lambda: None,
            nvmlShutdown=lambda: None,
            nvmlDeviceGetCount=lambda: self.gpus,
            nvmlDeviceGetHandleByIndex=lambda i: i,
            nvmlDeviceGetName=lambda h: f"Fake GPU {h}".encode(),
            nvmlDeviceGetMemoryInfo=memory,
            nvmlDeviceGetComputeRunningProcesses=compute,
            nvmlDeviceGetGraphicsRunningProcesses=graphics,
        )
        return mod  # type: ignore[no-any-return]


def install(
    monkeypatch: pytest.MonkeyPatch, gpus: int, total_mib: int, baseline_mib: dict[int, int] | None = None
) -> FakeNvml:
    """Puts a fake ``pynvml`` with ``gpus`` GPUs of ``total_mib`` each in ``sys.modules``."""
    fake = FakeNvml(gpus, total_mib, baseline_mib)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake
