"""The memory planner with real children on this machine's RAM: fake upstreams that hold 100 MiB.

Each fake server holds ~100 MiB of ballast plus its interpreter (~10 MiB private). The RAM budget
fits two of them but not three, so a third model must evict the least recently used idle one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.config.load import load_config, parse_config
from swapper.config.schema import Config
from swapper.core.states import State
from swapper.runtime.runloop import RunLoop
from swapper.web.appkeys import RUNLOOP

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
FAKE_SERVER = Path(__file__).parent / "upstreams" / "fake_server.py"
ROOT = Path(__file__).parent.parent
DEMO_READY = all((ROOT / ".demo" / p).exists() for p in ("bin/llama-server", "models/chat-a.gguf"))
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_text(
    state_file: Path,
    ports: dict[str, int],
    flags: dict[str, str],
    budget: str = "300MiB",
    memory: bool = True,
) -> str:
    lines = ["healthCheckTimeout: 15"]
    if memory:
        lines += [
            "routing:",
            "  router:",
            "    use: memory",
            "    settings:",
            "      memory:",
            f"        ramBudget: {budget}",
            "        reserve: 0",
            f"        stateFile: {state_file}",
            "        releaseTimeout: 5",
        ]
    lines.append("models:")
    for mid, port in ports.items():
        lines += [
            f"  {mid}:",
            f"    cmd: {sys.executable} -S {FAKE_SERVER} --port {port} --model-name {mid}"
            f" --alloc-mib 100 {flags.get(mid, '')}",
            f"    proxy: http://127.0.0.1:{port}",
            "    unloadTimeout: 2",
            "    memory: {estimate: 130MiB, device: cpu}",
        ]
    return "\n".join(lines)


def memory_yaml(state_file: Path, models: dict[str, str], budget: str = "300MiB") -> Config:
    return parse_config(memory_text(state_file, {m: free_port() for m in models}, models, budget))


def runloop(client: TestClient[Any, Any]) -> RunLoop:
    loop: RunLoop = client.app[RUNLOOP]
    return loop


async def chat(client: TestClient[Any, Any], model: str) -> None:
    resp = await client.post("/v1/chat/completions", json={"model": model, "max_tokens": 2, "messages": []})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["model"] == model


def running(client: TestClient[Any, Any]) -> set[str]:
    return {m for m, snap in runloop(client).snapshot().items() if snap.status.state is State.READY}


async def wait_until(cond: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def measured(client: TestClient[Any, Any], model: str) -> int | None:
    status = runloop(client).memory_status()
    assert status is not None
    entry = status["models"][model]
    return int(entry["footprint"]) if entry["source"] == "measured" else None


async def test_third_model_evicts_the_least_recently_used(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    state_file = tmp_path / "memory.json"
    client = await aiohttp_client(make_app(memory_yaml(state_file, {"a": "", "b": "", "c": ""})))
    await chat(client, "a")
    await chat(client, "b")
    assert running(client) == {"a", "b"}  # 2 x 130 MiB estimated fits in 300 MiB
    await chat(client, "a")  # a is now the most recently used
    await chat(client, "c")
    await runloop(client).wait_idle()
    assert running(client) == {"a", "c"}

    # Learned after ready: the 100 MiB ballast plus the interpreter's private memory.
    await wait_until(lambda: measured(client, "c") is not None, what="c's footprint to be measured")
    for model in ("a", "c"):
        footprint = measured(client, model)
        assert footprint is not None and 100 * MIB <= footprint <= 150 * MIB, footprint
    status = runloop(client).memory_status()
    assert status is not None and status["nvml"] is False
    assert status["devices"]["ram"]["budget"] == 300 * MIB
    assert status["models"]["c"]["pid"] == runloop(client).snapshot()["c"].pid

    await client.close()  # shutdown writes the measurements it has not saved yet
    saved = json.loads(state_file.read_text())["models"]
    # (b may have gone before its first sample: it was evicted the moment it had answered.)
    assert {"a", "c"} <= saved.keys()
    assert all(100 * MIB <= entry["bytes"] <= 150 * MIB for entry in saved.values())


async def test_a_busy_model_is_not_evicted_while_an_idle_one_can_go(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    cfg = memory_yaml(tmp_path / "memory.json", {"a": "--tps 40", "b": "", "c": ""})
    client = await aiohttp_client(make_app(cfg))
    await chat(client, "a")
    await chat(client, "b")
    # a is the least recently used, but it is streaming: b has to go instead.
    stream = await client.post(
        "/v1/chat/completions", json={"model": "a", "stream": True, "max_tokens": 20, "messages": []}
    )
    assert (await stream.content.readline()).startswith(b"data:")
    await chat(client, "c")
    assert running(client) == {"a", "c"}
    assert (await stream.read()).rstrip().endswith(b"data: [DONE]")


async def test_stopped_is_reported_only_once_the_tree_is_gone(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    # a forks a grandchild that ignores SIGTERM: its memory is free only once it died too.
    cfg = memory_yaml(tmp_path / "memory.json", {"a": "--fork-grandchild", "b": ""}, budget="200MiB")
    client = await aiohttp_client(make_app(cfg))
    await chat(client, "a")
    pid = runloop(client).snapshot()["a"].pid
    assert pid is not None
    tree = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    assert len(tree) == 2
    await chat(client, "b")
    assert runloop(client).state("a") is State.STOPPED
    for p in tree:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


async def test_a_model_bigger_than_the_budget_gets_507(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    cfg = memory_yaml(tmp_path / "memory.json", {"a": ""}, budget="100MiB")
    client = await aiohttp_client(make_app(cfg))
    resp = await client.post("/v1/chat/completions", json={"model": "a", "messages": []})
    assert resp.status == 507
    body = await resp.json()
    assert "model 'a' needs 130.0 MiB" in body["error"]["message"]
    assert runloop(client).snapshot()["a"].pid is None


@pytest.mark.skipif(not DEMO_READY, reason="run `python -m swapper.demo setup` first")
async def test_memory_example_measures_real_llama_servers(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/memory.yaml")
    memory = dataclasses.replace(cfg.routing.memory, state_file=str(tmp_path / "memory.json"))
    client = await aiohttp_client(
        make_app(dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, memory=memory)))
    )
    status = runloop(client).memory_status()
    assert status is not None
    before = status["models"]["chat-a"]
    assert before["source"] == "gguf" and "KV cache" in before["estimate_detail"]
    for model in ("chat-a", "chat-b"):
        resp = await client.post(
            "/v1/chat/completions", json={"model": model, "max_tokens": 2, "messages": []}
        )
        assert resp.status == 200, await resp.text()
        await wait_until(lambda m=model: measured(client, m) is not None, what=f"{model}'s footprint")  # type: ignore[misc]
        footprint = measured(client, model)
        # A tiny random model: a few MiB of private memory, well under the file+KV+overhead estimate.
        assert footprint is not None and MIB < footprint < before["estimate"], footprint


async def test_reload_keeps_what_was_measured_and_keeps_sampling(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    state, ports = tmp_path / "memory.json", {"a": free_port(), "b": free_port()}
    client = await aiohttp_client(make_app(parse_config(memory_text(state, ports, {}))))
    await chat(client, "a")
    await wait_until(lambda: measured(client, "a") is not None, what="a's footprint")
    footprint = measured(client, "a")
    changed = await runloop(client).reload(parse_config(memory_text(state, ports, {}, budget="250MiB")))
    assert changed == frozenset() and running(client) == {"a"}
    status = runloop(client).memory_status()
    assert status is not None and status["devices"]["ram"]["budget"] == 250 * MIB
    assert measured(client, "a") == footprint
    reloaded_at = time.time()
    await wait_until(
        lambda: (runloop(client).memory_status() or {})["sampled_at"] > reloaded_at, what="a sample"
    )
    await chat(client, "b")  # a's ~112 MiB measured + b's 130 MiB estimate fit in 250 MiB
    assert running(client) == {"a", "b"}


async def test_reload_into_and_out_of_the_memory_planner(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    state, ports = tmp_path / "memory.json", {"a": free_port()}
    client = await aiohttp_client(make_app(parse_config(memory_text(state, ports, {}, memory=False))))
    await chat(client, "a")
    assert runloop(client).memory_status() is None
    await runloop(client).reload(parse_config(memory_text(state, ports, {})))
    await wait_until(
        lambda: (runloop(client).memory_status() or {}).get("sampled_at") is not None, what="a sample"
    )
    status = runloop(client).memory_status()
    assert status is not None and status["models"]["a"]["pid"] == runloop(client).snapshot()["a"].pid
    await runloop(client).reload(parse_config(memory_text(state, ports, {}, memory=False)))
    assert runloop(client).memory_status() is None
    await chat(client, "a")
