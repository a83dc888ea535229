"""Live reload: only changed models restart; invalid configs are rejected and the old one serves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from swapper.app.reload import reload_once
from swapper.core.states import State
from tests.test_swapping import (
    FAKE,
    ClientFactory,
    chat,
    client_for,
    fake_config,
    free_port,
    pid_of,
    runloop,
)

TWO_TOGETHER = "routing:\n  router:\n    settings:\n      groups:\n        both:\n          swap: false\n"


def yaml_for(ports: dict[str, int], extra: dict[str, str] | None = None, groups: bool = True) -> str:
    lines = ["models:"]
    for mid, port in ports.items():
        lines += [
            f"  {mid}:",
            f"    cmd: {sys.executable} {FAKE} --port {port} --model-name {mid}",
            f"    proxy: http://127.0.0.1:{port}",
            "    unloadTimeout: 2",
        ]
        if extra and mid in extra:
            lines.append("    " + extra[mid])
    if groups:
        members = ", ".join(ports)
        lines += [TWO_TOGETHER.rstrip("\n") + f"\n          exclusive: false\n          members: [{members}]"]
    return "\n".join(lines) + "\n"


async def test_reload_restarts_only_the_changed_model(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    ports = {"a": free_port(), "b": free_port()}
    path = tmp_path / "models.yaml"
    path.write_text(yaml_for(ports))
    from swapper.config.load import load_config

    client = await client_for(aiohttp_client, load_config(str(path)))
    await chat(client, "a")
    await chat(client, "b")
    pid_a, pid_b = pid_of(client, "a"), pid_of(client, "b")

    path.write_text(yaml_for(ports, {"b": "ttl: 300"}))
    changed = await reload_once(path, runloop(client))
    assert changed == {"b"}
    await runloop(client).wait_idle()
    assert pid_of(client, "a") == pid_a  # untouched
    assert runloop(client).state("b") is State.STOPPED
    await chat(client, "b")
    assert pid_of(client, "b") not in (None, pid_b)
    running = await (await client.get("/running")).json()
    assert {r["model"]: r["ttl"] for r in running["running"]} == {"a": 0, "b": 300}


async def test_invalid_reload_keeps_the_old_config_serving(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    cfg = fake_config({"a": ""})
    client = await client_for(aiohttp_client, cfg)
    await chat(client, "a")
    pid = pid_of(client, "a")
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  a:\n    cmd: ''\n")
    assert await reload_once(path, runloop(client)) is None
    assert (await chat(client, "a"))["model"] == "a"
    assert pid_of(client, "a") == pid


def _get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: dict[str, object] = json.loads(resp.read())
        return body


def test_sighup_and_watch_config_reload_a_running_server(tmp_path: Path) -> None:
    ports = {"a": free_port()}
    path = tmp_path / "models.yaml"
    path.write_text(yaml_for(ports, groups=False))
    listen = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "swapper", "-c", str(path), "-l", f"127.0.0.1:{listen}", "--watch-config"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{listen}"

    def model_ids() -> list[str]:
        return [str(m["id"]) for m in _get(base + "/v1/models")["data"]]  # type: ignore[index]

    def poll(cond_ok: object, what: str) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                if cond_ok():  # type: ignore[operator]
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        poll(lambda: model_ids() == ["a"], "swapper never came up")
        ports["b"] = free_port()
        path.write_text(yaml_for(ports, groups=False))  # the watcher picks this up
        poll(lambda: model_ids() == ["a", "b"], "file change was not reloaded")
        del ports["b"]
        ports["c"] = free_port()
        path.write_text(yaml_for(ports, groups=False))
        proc.send_signal(signal.SIGHUP)
        poll(lambda: model_ids() == ["a", "c"], "SIGHUP did not reload")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
