"""Sampling: the NVML wrapper against a fake ``pynvml`` module, psutil against real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from swapper.memory import gpu
from swapper.memory.gpu import SystemSampler, open_nvml

MIB = 1024 * 1024


class FakeNvmlError(Exception):
    pass


@dataclass
class Mem:
    total: int
    used: int


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None


def fake_pynvml(
    monkeypatch: pytest.MonkeyPatch,
    *,
    gpus: int = 2,
    procs: dict[int, list[Proc]] | None = None,
    init_error: bool = False,
) -> types.SimpleNamespace:
    procs = procs or {}
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNvmlError("Driver Not Loaded")

    def graphics(handle: int) -> list[Proc]:
        raise FakeNvmlError("Not Supported")

    mod: Any = types.SimpleNamespace(
        NVMLError=FakeNvmlError,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: gpus,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"Fake H100",
        nvmlDeviceGetMemoryInfo=lambda h: Mem(80 * 1024 * MIB, (h + 1) * 1024 * MIB),
        nvmlDeviceGetComputeRunningProcesses=lambda h: procs.get(h, []),
        nvmlDeviceGetGraphicsRunningProcesses=graphics,
        calls=calls,
    )
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return mod  # type: ignore[no-any-return]


def test_nvml_devices_and_per_process_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    fake = fake_pynvml(monkeypatch, procs={0: [Proc(me, 300 * MIB)], 1: [Proc(me, 200 * MIB), Proc(1, None)]})
    sampler = SystemSampler()
    assert sampler.open() is None
    sample = sampler.sample({"me": me}, at=1.0)
    assert [(g.index, g.name, g.used) for g in sample.gpus] == [
        (0, "Fake H100", 1024 * MIB),
        (1, "Fake H100", 2048 * MIB),
    ]
    assert sample.gpu is not None and sample.gpu.total == 160 * 1024 * MIB
    usage = sample.children["me"]
    assert usage.pid == me and usage.gpu == 500 * MIB and usage.ram > 0 and usage.processes >= 1
    probe = sampler.probe(os.getpgrp(), frozenset({me}))
    assert me in probe.alive and probe.gpu_held == 500 * MIB and probe.gpu_used == 3072 * MIB
    sampler.close()
    assert fake.calls == ["init", "shutdown"]


def test_unknown_per_process_memory_is_not_a_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    fake_pynvml(monkeypatch, gpus=1, procs={0: [Proc(me, None)]})
    sampler = SystemSampler()
    sampler.open()
    assert sampler.sample({"me": me}, at=0.0).children["me"].gpu is None


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"init_error": True}, "NVML is not available (Driver Not Loaded)"),
        ({"gpus": 0}, "NVML reports no GPU"),
    ],
)
def test_no_nvml_is_a_reason_not_an_error(
    monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], reason: str
) -> None:
    fake_pynvml(monkeypatch, **kw)
    nvml, why = open_nvml()
    assert nvml is None and why == reason
    sampler = SystemSampler()
    assert sampler.open() == reason
    sample = sampler.sample({}, at=0.0)
    assert sample.gpus == () and sample.gpu is None and sample.ram.total > 0


def test_missing_package_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert open_nvml() == (None, "the nvidia-ml-py package is not installed")


GRANDPARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("started", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("ppid_map", ["psutil's", "process_iter"])
def test_real_sampler_measures_a_process_tree_and_sees_it_go(
    monkeypatch: pytest.MonkeyPatch, ppid_map: str
) -> None:
    if ppid_map == "process_iter":  # psutil without its private ppid table: the public way
        monkeypatch.setattr(gpu, "_PPID_MAP", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", GRANDPARENT], stdout=subprocess.PIPE, start_new_session=True
    )
    sampler = SystemSampler()
    sampler.open()  # no GPU here: returns the reason; with one, fine too
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        usage = sampler.sample({"p": proc.pid}, at=0.0).children["p"]
        assert usage.processes == 2 and usage.ram > MIB and usage.rss >= usage.ram
        # Without the USS read (what /metrics asks for) the same tree, by resident bytes.
        cheap = sampler.sample({"p": proc.pid}, at=0.0, private=False).children["p"]
        assert cheap.processes == 2 and cheap.ram == cheap.rss > MIB
        group = sampler.probe(proc.pid, frozenset()).alive
        assert len(group) == 2 and proc.pid in group
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    # The grandchild is reparented but stays in the group; until reaped it is a zombie, which
    # holds no memory.
    deadline = time.monotonic() + 5
    while sampler.probe(proc.pid, frozenset()).alive and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sampler.probe(proc.pid, frozenset()).alive == frozenset()
    sampler.close()


def test_an_exited_leader_is_not_sampled() -> None:
    proc = subprocess.Popen(["true"])
    sampler = SystemSampler()
    deadline = time.monotonic() + 5
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        assert sampler.sample({"z": proc.pid}, at=0.0).children == {}
    finally:
        proc.wait()


def hung_open(monkeypatch: pytest.MonkeyPatch) -> tuple[types.SimpleNamespace, threading.Event]:
    """A fake NVML whose nvmlInit records itself, then hangs until the returned event is set."""
    mod = fake_pynvml(monkeypatch)
    gate = threading.Event()

    def init() -> None:
        mod.calls.append("init")
        gate.wait()

    mod.nvmlInit = init
    return mod, gate


def wait_for(cond: Any) -> None:
    deadline = time.monotonic() + 5
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_one_open_however_many_readers_ask_and_sampling_never_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod, gate = hung_open(monkeypatch)
    sampler = SystemSampler()
    results: list[str | None] = []
    readers = [threading.Thread(target=lambda: results.append(sampler.open())) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        wait_for(lambda: mod.calls == ["init"])
        assert not sampler.opened
        sample = sampler.sample({}, at=0.0)  # while nvmlInit hangs: at once, without GPUs
        assert sample.gpus == () and sample.nvml_error == "NVML was not opened yet"
    finally:
        gate.set()
        for reader in readers:
            reader.join()
    assert results == [None, None, None] and mod.calls == ["init"] and sampler.opened
    assert len(sampler.sample({}, at=0.0).gpus) == 2
    sampler.close()
    sampler.close()
    assert mod.calls == ["init", "shutdown"]
    assert sampler.sample({}, at=0.0).gpus == ()


def test_a_close_during_a_hung_open_ends_the_session_once_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod, gate = hung_open(monkeypatch)
    sampler = SystemSampler()
    opener = threading.Thread(target=sampler.open)
    opener.start()
    wait_for(lambda: mod.calls == ["init"])
    sampler.close()  # shutdown while the driver is wedged
    gate.set()
    opener.join()
    assert mod.calls == ["init", "shutdown"]
    assert sampler.open() == "the sampler was closed" and sampler.sample({}, at=0.0).gpus == ()


def test_a_closed_sampler_opens_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = fake_pynvml(monkeypatch)
    sampler = SystemSampler()
    sampler.close()
    assert sampler.open() == "the sampler was closed" and mod.calls == []
