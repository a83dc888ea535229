"""Services swapper does not spawn (``proxy`` without ``cmd``), issue 21.

Real-process tests: swapper in-process; each service is a fake upstream (``tests/upstreams``)
that the test starts itself (a pinned service, as systemd or Docker would run it) or that a
``start`` command starts detached (``tests/upstreams/service_ctl.py``, a stand-in for
``systemctl``). Every service process is killed by the test's fixture, since swapper, by design,
never kills one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp.test_utils import TestClient

from swapper.config.load import parse_config
from swapper.config.schema import ConfigError
from swapper.core.states import State
from tests.conftest import _fake_server_cmd
from tests.test_swapping import FAKE, ClientFactory, client_for, free_port, runloop, wait_until

CTL = Path(__file__).parent / "upstreams" / "service_ctl.py"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Services:
    """Service processes a test runs outside swapper; all killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pid_files: list[Path] = []

    def run(self, port: int, name: str) -> subprocess.Popen[bytes]:
        """Starts a fake upstream as a service (what systemd would run) and waits for its port."""
        proc = subprocess.Popen(
            _fake_server_cmd(port, "--model-name", name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def ctl(self, name: str, port: int) -> tuple[str, str, Path]:
        """``start``/``stop`` commands for a fake service on ``port`` and its pid file."""
        pid_file = self.tmp / f"{name}.pid"
        self.pid_files.append(pid_file)
        base = f"{sys.executable} -S {CTL}"
        start = f"{base} start --pid-file {pid_file} --port {port} --model-name {name}"
        stop = f"{base} stop --pid-file {pid_file}"
        return start, stop, pid_file

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid_file in self.pid_files:
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    svc = Services(tmp_path)
    try:
        yield svc
    finally:
        svc.close()


async def wait_port(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            await asyncio.sleep(0.02)


def llm_model(port: int) -> str:
    return (
        f"  llm:\n    cmd: {sys.executable} {FAKE} --port {port} --model-name llm\n"
        f"    proxy: http://127.0.0.1:{port}\n    unloadTimeout: 2\n"
    )


async def post(client: TestClient[Any, Any], model: str) -> Any:
    return await client.post("/v1/chat/completions", json={"model": model, "max_tokens": 2, "messages": []})


async def test_pinned_service_is_adopted_routed_never_evicted_or_stopped(
    aiohttp_client: ClientFactory, services: Services
) -> None:
    port = free_port()
    proc = services.run(port, "kokoro")
    await wait_port(port)
    cfg = parse_config(
        f"models:\n  kokoro:\n    proxy: http://127.0.0.1:{port}\n    probeInterval: 0.2\n"
        + llm_model(free_port())
        + "routes:\n  /v1/tts: {model: kokoro, path: /v1/audio/speech}\n"
    )
    client = await client_for(aiohttp_client, cfg)
    loop = runloop(client)
    # Adopted at start-up: it shows as ready, with its process found by its port.
    await wait_until(lambda: loop.state("kokoro") is State.READY)
    running = (await (await client.get("/running")).json())["running"]
    assert [(r["model"], r["pid"], r["service"]["pinned"]) for r in running] == [("kokoro", proc.pid, True)]
    echo = await (await client.post("/v1/tts", json={"input": "hi"})).json()
    assert (echo["pid"], echo["path"]) == (proc.pid, "/v1/audio/speech")
    # The default planner runs one model at a time, but never evicts a pinned service...
    assert (await post(client, "llm")).status == 200
    assert loop.state("kokoro") is State.READY and loop.state("llm") is State.READY
    # ...nor does an unload of everything stop it.
    assert (await client.get("/unload")).status == 200
    assert loop.state("kokoro") is State.READY and loop.state("llm") is State.STOPPED
    status = await (await client.get("/v1/status")).json()
    entry = next(m for m in status["models"] if m["id"] == "kokoro")
    assert entry["service"]["healthy"] is True and entry["service"]["lastProbe"]
    await client.close()  # swapper shuts down...
    assert proc.poll() is None  # ...and leaves the service running


async def test_a_service_whose_probe_failed_is_refused_at_once(
    aiohttp_client: ClientFactory, services: Services
) -> None:
    port = free_port()
    proc = services.run(port, "kokoro")
    await wait_port(port)
    cfg = parse_config(f"models:\n  kokoro:\n    proxy: http://127.0.0.1:{port}\n    probeInterval: 0.1\n")
    client = await client_for(aiohttp_client, cfg)
    loop = runloop(client)
    await wait_until(lambda: loop.state("kokoro") is State.READY)
    proc.kill()
    proc.wait()
    await wait_until(lambda: loop.state("kokoro") is State.STOPPED)  # its next probe failed
    began = time.monotonic()
    resp = await post(client, "kokoro")
    assert time.monotonic() - began < 2.0  # refused at once, not after healthCheckTimeout (120 s)
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"  # probeInterval 0.1 s, rounded up
    err = (await resp.json())["error"]
    assert err["code"] == "service_unavailable" and err["retryable"] is True
    status = await (await client.get("/v1/status")).json()
    entry = next(m for m in status["models"] if m["id"] == "kokoro")
    assert entry["service"]["healthy"] is False and entry["service"]["lastProbeError"]
    # Back up (systemd restarted it): the next request adopts it again.
    again = services.run(port, "kokoro")
    await wait_port(port)
    resp = await post(client, "kokoro")
    assert resp.status == 200 and (await resp.json())["model"] == "kokoro"
    assert loop.snapshot()["kokoro"].pid == again.pid


async def test_swappable_service_is_started_evicted_by_its_stop_command_and_restarted(
    aiohttp_client: ClientFactory, services: Services
) -> None:
    port = free_port()
    start, stop, pid_file = services.ctl("comfy", port)
    cfg = parse_config(
        f"models:\n  comfy:\n    proxy: http://127.0.0.1:{port}\n    start: {start}\n    stop: {stop}\n"
        f"    pidFile: {pid_file}\n    unloadTimeout: 5\n" + llm_model(free_port())
    )
    client = await client_for(aiohttp_client, cfg)
    loop = runloop(client)
    assert loop.state("comfy") is State.STOPPED  # a swappable service is started on demand
    resp = await post(client, "comfy")
    assert resp.status == 200 and (await resp.json())["model"] == "comfy"
    first = int(pid_file.read_text())
    assert loop.snapshot()["comfy"].pid == first  # from its pidFile
    # Another model evicts it: its stop command runs, and the swap waits until it is down.
    assert (await post(client, "llm")).status == 200
    assert loop.state("comfy") is State.STOPPED
    await wait_until(lambda: gone(first))
    resp = await post(client, "comfy")
    assert resp.status == 200
    second = int(pid_file.read_text())
    assert second != first and loop.snapshot()["comfy"].pid == second
    # An explicit unload stops it too.
    await client.post("/api/models/unload/comfy")
    assert loop.state("comfy") is State.STOPPED
    await wait_until(lambda: gone(second))


async def test_stop_command_gets_the_listening_process_as_pid(
    aiohttp_client: ClientFactory, services: Services
) -> None:
    port = free_port()
    start, _, pid_file = services.ctl("svc", port)
    cfg = parse_config(
        f"models:\n  svc:\n    proxy: http://127.0.0.1:{port}\n    start: {start}\n"
        "    stop: kill ${PID}\n    unloadTimeout: 5\n"
    )
    client = await client_for(aiohttp_client, cfg)
    assert (await post(client, "svc")).status == 200
    pid = int(pid_file.read_text())
    assert runloop(client).snapshot()["svc"].pid == pid  # no pidFile: the process on its port
    await client.post("/api/models/unload/svc")
    await wait_until(lambda: gone(pid))


async def test_failing_start_command_is_a_retryable_load_failure(
    aiohttp_client: ClientFactory, services: Services
) -> None:
    port = free_port()
    start, stop, _ = services.ctl("svc", port)
    cfg = parse_config(
        f"models:\n  svc:\n    proxy: http://127.0.0.1:{port}\n    start: {start} --fail\n    stop: {stop}\n"
    )
    client = await client_for(aiohttp_client, cfg)
    resp = await post(client, "svc")
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert "start command exited with code 3" in err["message"] and "failing on purpose" in err["message"]
    assert err["retryable"] is True


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("    stop: systemctl stop x\n", "needs a start command too"),
        ("    cmd: llama-server --port 9\n    start: x\n", "only for a service without cmd"),
        ("    probeInterval: 0\n", "probeInterval: must be a number"),
        ("    start: ''\n", "start: must not be empty"),
    ],
)
def test_bad_service_configs(model: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"models:\n  svc:\n    proxy: http://127.0.0.1:9999\n{model}")
    assert message in str(info.value)


def test_a_model_needs_cmd_or_proxy() -> None:
    with pytest.raises(ConfigError, match="cmd: is required"):
        parse_config("models:\n  svc:\n    name: x\n")
    cfg = parse_config("models:\n  svc:\n    proxy: http://127.0.0.1:9999\n    ttl: 60\n")
    assert cfg.models["svc"].pinned and cfg.models["svc"].ttl == 0  # a pinned service never idles out


async def test_a_reload_adopts_a_pinned_service_it_adds(
    aiohttp_client: ClientFactory, services: Services, tmp_path: Path
) -> None:
    from swapper.app.reload import reload_once

    port = free_port()
    proc = services.run(port, "kokoro")
    await wait_port(port)
    first = llm_model(free_port())
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + first)
    client = await client_for(aiohttp_client, parse_config(path.read_text()))
    path.write_text(f"models:\n{first}  kokoro:\n    proxy: http://127.0.0.1:{port}\n")
    assert await reload_once(path, runloop(client)) == frozenset()
    assert runloop(client).state("kokoro") is State.READY  # adopted at once, not at its first request
    assert runloop(client).snapshot()["kokoro"].pid == proc.pid
