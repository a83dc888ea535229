"""One ledger per GPU (issue 21), with real children and a fake NVML of two and four GPUs.

The fake ``pynvml`` (``tests/fake_nvml.py``) stands behind swapper's own NVML seam; the children are
fake upstreams that "hold" GPU memory where their ``--vram-gpus`` or ``CUDA_VISIBLE_DEVICES`` say.
Everything else is swapper's real code: sampling, measured footprints, the per-GPU planner, the
release wait. No real GPU is used here.

Eviction cases (each GPU 1000 MiB, reserve 0):
  * two GPUs: a model that does not fit next to the model on its GPU evicts that one, never the
    model on the other GPU (pooled, all three "fit" in 2000 MiB and the GPU would run out);
  * two GPUs, gpuBudget 1000 MiB: a model on GPU 1 does not evict a model on GPU 0 (pooled, the
    budget was shared, and GPU 0's model was evicted for nothing);
  * four GPUs: a model split over GPUs 1 and 2 evicts the model split over 0 and 1 and the one on
    2, and leaves the one on 3 alone;
  * four GPUs: a model with no placement is planned over all GPUs at first, then where NVML saw it
    (GPU 3), which is persisted; only models sharing GPU 3 compete with it afterwards;
  * per-GPU budget: a model over GPU 1's own budget gets 507 naming GPU 1; the same on GPU 0 runs;
  * a swappable service (started detached by its start command) is measured on GPU 1 through its
    pidFile's process, and evicted by a model on GPU 1 (its stop command), not by one on GPU 0.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.config.load import parse_config
from swapper.config.schema import Config
from swapper.core.states import State
from tests import fake_nvml
from tests.test_memory_real import FAKE_SERVER, ClientFactory, chat, free_port, runloop, wait_until
from tests.test_services import Services, gone


def gpu_config(state_file: Path, models: dict[str, tuple[str, str]], memory: str = "") -> Config:
    """``models``: id -> (fake server flags, extra YAML lines for the model, ``;``-separated)."""
    lines = [
        "healthCheckTimeout: 15",
        "routing:",
        "  router:",
        "    use: memory",
        "    settings:",
        "      memory:",
        "        reserve: 0",
        f"        stateFile: {state_file}",
        "        releaseTimeout: 5",
        *[f"        {line}" for line in memory.splitlines() if line],
        "models:",
    ]
    for mid, (flags, extra) in models.items():
        port = free_port()
        lines += [
            f"  {mid}:",
            f"    cmd: {sys.executable} -S {FAKE_SERVER} --port {port} --model-name {mid} {flags}",
            f"    proxy: http://127.0.0.1:{port}",
            "    unloadTimeout: 2",
            *[f"    {line.strip()}" for line in extra.split(";") if line.strip()],
        ]
    return parse_config("\n".join(lines))


def states(client: TestClient[Any, Any]) -> dict[str, str]:
    return {m: s.status.state.value for m, s in runloop(client).snapshot().items()}


def memory(client: TestClient[Any, Any]) -> dict[str, Any]:
    status = runloop(client).memory_status()
    assert status is not None
    return status


async def test_two_gpus_evict_only_on_the_targets_gpu(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.install(monkeypatch, gpus=2, total_mib=1000)
    cfg = gpu_config(
        tmp_path / "fp.json",
        {
            "a": ("--vram-mib 700 --vram-gpus 0", "memory: {estimate: 700MiB, devices: [0]}"),
            "b": ("--vram-mib 700", "memory: {estimate: 700MiB}; env: [CUDA_VISIBLE_DEVICES=1]"),
            "c": ("--vram-mib 600 --vram-gpus 1", "memory: {estimate: 600MiB, devices: 1}"),
        },
    )
    client = await aiohttp_client(make_app(cfg))
    await chat(client, "a")
    await chat(client, "b")
    assert states(client) == {"a": "ready", "b": "ready", "c": "stopped"}
    await chat(client, "c")  # GPU 1: 700 + 600 > 1000; GPU 0 is not its business
    assert states(client) == {"a": "ready", "b": "stopped", "c": "ready"}
    status = await (await client.get("/v1/status")).json()
    gpus = {g["index"]: g for g in status["memory"]["gpus"]}
    assert set(gpus) == {0, 1}
    top = {
        g["index"]: (g["models"], g["reservedBytes"], g["totalBytes"] - g["usedBytes"])
        for g in status["gpus"]
    }
    assert {i: t[:2] for i, t in top.items()} == {0: (["a"], 0), 1: (["c"], 0)}
    assert all(g["freeBytes"] == free for g, (_, _, free) in zip(status["gpus"], top.values(), strict=True))
    await wait_until(lambda: memory(client)["gpus"][1]["used"] == 600 * fake_nvml.MIB, what="GPU 1 sampled")
    gpu1 = memory(client)["gpus"][1]
    assert (gpu1["total"], gpu1["used"], gpu1["free"], gpu1["reserved"]) == (
        1000 * fake_nvml.MIB,
        600 * fake_nvml.MIB,
        400 * fake_nvml.MIB,
        0,
    )
    assert list(gpu1["models"]) == ["c"] and list(memory(client)["gpus"][0]["models"]) == ["a"]
    placement = {m: (e["gpus"], e["placement"]) for m, e in status["memory"]["models"].items()}
    assert placement == {"a": ([0], "config"), "b": ([1], "env"), "c": ([1], "config")}


async def test_a_shared_budget_no_longer_evicts_the_other_gpus_model(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.install(monkeypatch, gpus=2, total_mib=4000)
    cfg = gpu_config(
        tmp_path / "fp.json",
        {
            "a": ("--vram-mib 700 --vram-gpus 0", "memory: {estimate: 700MiB, devices: [0]}"),
            "d": ("--vram-mib 700 --vram-gpus 1", "memory: {estimate: 700MiB, devices: [1]}"),
        },
        memory="gpuBudget: 1000MiB",
    )

    client = await aiohttp_client(make_app(cfg))
    await chat(client, "a")
    await chat(client, "d")
    assert states(client) == {"a": "ready", "d": "ready"}


async def test_four_gpus_split_models_evict_what_shares_a_gpu(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.install(monkeypatch, gpus=4, total_mib=1000)
    cfg = gpu_config(
        tmp_path / "fp.json",
        {
            "m01": ("--vram-mib 1200 --vram-gpus 0,1", "memory: {estimate: 1200MiB, devices: [0, 1]}"),
            "m2": ("--vram-mib 800 --vram-gpus 2", "memory: {estimate: 800MiB, devices: [2]}"),
            "m3": ("--vram-mib 800 --vram-gpus 3", "memory: {estimate: 800MiB, devices: [3]}"),
            "t12": ("--vram-mib 1000 --vram-gpus 1,2", "memory: {estimate: 1000MiB, devices: [1, 2]}"),
            "t0": ("--vram-mib 300 --vram-gpus 0", "memory: {estimate: 300MiB, devices: [0]}"),
        },
    )

    client = await aiohttp_client(make_app(cfg))
    for model in ("m01", "m2", "m3"):
        await chat(client, model)
    await chat(client, "t12")  # GPU 1: 600 + 500, GPU 2: 800 + 500: both over 1000
    assert states(client) == {
        "m01": "stopped",
        "m2": "stopped",
        "m3": "ready",
        "t12": "ready",
        "t0": "stopped",
    }
    await chat(client, "t0")  # GPU 0 is free now: nothing to evict
    assert states(client) == {"m01": "stopped", "m2": "stopped", "m3": "ready", "t12": "ready", "t0": "ready"}


async def test_four_gpus_placement_learned_from_nvml_and_persisted(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.install(monkeypatch, gpus=4, total_mib=1000)
    state_file = tmp_path / "fp.json"
    cfg = gpu_config(
        state_file,
        {
            "u": ("--vram-mib 500 --vram-gpus 3", ""),  # nothing says where: planned over all GPUs
            "on3": ("--vram-mib 600 --vram-gpus 3", "memory: {estimate: 600MiB, devices: [3]}"),
            "on0": ("--vram-mib 900 --vram-gpus 0", "memory: {estimate: 900MiB, devices: [0]}"),
        },
    )

    client = await aiohttp_client(make_app(cfg))
    await wait_until(lambda: memory(client)["nvml"], what="NVML opened")
    before = memory(client)["models"]["u"]
    assert (before["gpus"], before["placement"]) == ([0, 1, 2, 3], "all")
    await chat(client, "u")
    await wait_until(lambda: memory(client)["models"]["u"]["source"] == "measured", what="u measured")
    after = memory(client)["models"]["u"]
    assert (after["gpus"], after["placement"], after["footprint"]) == ([3], "observed", 500 * fake_nvml.MIB)
    await wait_until(state_file.exists, what="footprints persisted")
    saved = json.loads(state_file.read_text())["models"]["u"]
    assert saved["gpus"] == {"3": 500 * fake_nvml.MIB}
    await chat(client, "on0")  # GPU 0 only: u (on GPU 3) stays
    assert states(client)["u"] == "ready"
    await chat(client, "on3")  # GPU 3: 500 + 600 > 1000
    assert states(client) == {"u": "stopped", "on3": "ready", "on0": "ready"}


async def test_a_gpus_own_budget_refuses_only_there(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.install(monkeypatch, gpus=2, total_mib=1000)
    cfg = gpu_config(
        tmp_path / "fp.json",
        {
            "big0": ("--vram-mib 700 --vram-gpus 0", "memory: {estimate: 700MiB, devices: [0]}"),
            "big1": ("--vram-mib 700 --vram-gpus 1", "memory: {estimate: 700MiB, devices: [1]}"),
        },
        memory="gpus:\n  1: {budget: 500MiB, reserve: 100MiB}",
    )

    client = await aiohttp_client(make_app(cfg))
    resp = await client.post("/v1/chat/completions", json={"model": "big1", "messages": []})
    assert resp.status == 507
    err = (await resp.json())["error"]
    assert "GPU 1" in err["message"] and "budget 500.0 MiB" in err["message"] and err["retryable"] is False
    await chat(client, "big0")
    gpu1 = memory(client)["gpus"][1]
    assert (gpu1["budget"], gpu1["reserved"]) == (500 * fake_nvml.MIB, 100 * fake_nvml.MIB)
    assert runloop(client).state("big1") is State.STOPPED


async def test_a_swappable_service_is_measured_on_its_gpu_and_evicted_there(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service swapper does not spawn is measured through the process in its pidFile, planned
    on its GPU, and evicted only by a model on that GPU (its stop command; then the release wait)."""
    fake_nvml.install(monkeypatch, gpus=2, total_mib=1000)
    svc = Services(tmp_path)
    try:
        port = free_port()
        start, stop, pid_file = svc.ctl("image", port)
        cfg = gpu_config(
            tmp_path / "fp.json",
            {
                "llm0": ("--vram-mib 800 --vram-gpus 0", "memory: {estimate: 800MiB, devices: [0]}"),
                "llm1": ("--vram-mib 500 --vram-gpus 1", "memory: {estimate: 500MiB, devices: [1]}"),
            },
        )
        image = parse_config(
            f"models:\n  image:\n    proxy: http://127.0.0.1:{port}\n"
            f"    start: {start} --vram-mib 600 --vram-gpus 1\n    stop: {stop}\n    pidFile: {pid_file}\n"
            "    unloadTimeout: 5\n    memory: {devices: [1]}\n"
        ).models["image"]
        client = await aiohttp_client(make_app(replace(cfg, models={**cfg.models, "image": image})))
        await chat(client, "llm0")
        await chat(client, "image")
        pid = int(pid_file.read_text())
        await wait_until(
            lambda: memory(client)["models"]["image"]["source"] == "measured", what="image measured"
        )
        entry = memory(client)["models"]["image"]
        assert (entry["pid"], entry["footprint"], entry["gpus"]) == (pid, 600 * fake_nvml.MIB, [1])
        await chat(client, "llm1")  # GPU 1: 600 + 500 > 1000: the service goes, llm0 on GPU 0 stays
        assert states(client) == {"llm0": "ready", "llm1": "ready", "image": "stopped"}
        assert gone(pid)  # stopped by its stop command, and its memory given back before llm1 started
    finally:
        svc.close()
