"""One sampler per swapper process: the memory monitor, ``/metrics`` and ``/v1/status`` share its
NVML session and its walk of each child's process tree.

Real children (fake upstreams, one with a grandchild) behind a fake ``pynvml`` that records its
sessions (``tests/fake_nvml.py``); everything above it is swapper's real code.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import SAMPLER, make_app
from swapper.observe import metrics as metrics_module
from tests import fake_nvml
from tests.test_gpus_real import gpu_config
from tests.test_memory_real import ClientFactory, chat, runloop, wait_until
from tests.test_metrics import parse, scrape, value
from tests.test_swapping import fake_config

MIB = 1024 * 1024
GRANDCHILD_MIB = 50  # what the fake NVML says each fake server's grandchild holds on GPU 0


class TreeNvml(fake_nvml.FakeNvml):
    """The fake NVML, plus: a fake server's grandchild (``--fork-grandchild``) holds GPU memory
    too, so a reader that misses the grandchild reports less than one that sees it."""

    def holders(self) -> dict[int, dict[int, int]]:
        held = super().holders()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "fake_server.py-grandchild" not in (proc.info.get("cmdline") or []):
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if self.tag is not None and proc.environ().get("SWAPPER_TEST_TAG") != self.tag:
                    continue
            except psutil.Error:
                continue
            held[0][proc.pid] = GRANDCHILD_MIB * MIB
        return held


def recording(monkeypatch: pytest.MonkeyPatch, fake: fake_nvml.FakeNvml) -> list[str]:
    """Installs ``fake`` as ``pynvml``; returns the list its nvmlInit/nvmlShutdown calls go to."""
    calls: list[str] = []
    mod: Any = fake.module()
    mod.nvmlInit = lambda: calls.append("init")
    mod.nvmlShutdown = lambda: calls.append("shutdown")
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return calls


async def test_one_nvml_session_and_one_tree_for_the_ledger_metrics_and_status(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recording(monkeypatch, TreeNvml(1, 1000))
    config = gpu_config(tmp_path / "state.json", {"a": ("--fork-grandchild --vram-mib 100", "")})
    client: TestClient[Any, Any] = await aiohttp_client(make_app(config))
    await chat(client, "a")

    def ledger_usage() -> dict[str, Any]:
        status = runloop(client).memory_status()
        assert status is not None
        usage: dict[str, Any] = status["models"]["a"]
        return usage

    # The ledger measures the whole tree: the server's 100 MiB and its grandchild's 50.
    held = (100 + GRANDCHILD_MIB) * MIB
    await wait_until(lambda: ledger_usage()["source"] == "measured")
    assert ledger_usage()["device"] == "gpu" and ledger_usage()["used"] == held
    samples = await scrape(client)
    assert value(samples, "swapper_model_vram_bytes", model="a") == held
    rss = value(samples, "swapper_model_rss_bytes", model="a")
    assert rss is not None and rss > 0
    status = await (await client.get("/v1/status")).json()
    (entry,) = [m for m in status["models"] if m["id"] == "a"]
    assert entry["vramBytes"] == held and entry["rssBytes"] > 0
    assert [g["name"] for g in status["gpus"]] == ["Fake GPU 0"]

    # Both readers, through one session: the monitor opened it before the first scrape.
    assert calls == ["init"]
    await client.close()
    assert calls == ["init", "shutdown"]  # closed once, at shutdown


async def test_a_scrape_does_not_wait_on_a_hung_nvml_init(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_nvml.FakeNvml(1, 1000)
    mod: types.SimpleNamespace = fake.module()
    answer = threading.Event()
    inits: list[str] = []

    def hung_init() -> None:
        inits.append("init")
        answer.wait()  # a wedged driver: nvmlInit returns only when the test lets it

    mod.nvmlInit = hung_init
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.setattr(metrics_module, "OPEN_WAIT", 0.05)
    client: TestClient[Any, Any] = await aiohttp_client(make_app(fake_config({"a": ""})))
    try:
        await chat(client, "a")
        for _ in range(3):  # the first waits OPEN_WAIT for the open, later ones not at all
            samples = await scrape(client)
            assert value(samples, "swapper_model_rss_bytes", model="a")
            assert value(samples, "swapper_gpu_memory_total_bytes", gpu="0", name="Fake GPU 0") is None
        status = await (await client.get("/v1/status")).json()
        assert status["gpus"] == []
        assert inits == ["init"]
    finally:
        answer.set()
    sampler = client.app[SAMPLER]
    await wait_until(lambda: sampler.opened)
    samples = parse(await (await client.get("/metrics")).text())
    assert value(samples, "swapper_gpu_memory_total_bytes", gpu="0", name="Fake GPU 0") == 1000 * MIB
    assert inits == ["init"]
