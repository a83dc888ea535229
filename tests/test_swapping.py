"""Real-process tests: swapper in-process, fake upstream servers as real children."""

from __future__ import annotations

import asyncio
import base64
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
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.config.load import parse_config
from swapper.config.schema import Config
from swapper.core.states import State
from swapper.runtime.runloop import RunLoop
from swapper.web.appkeys import RUNLOOP

FAKE = Path(__file__).parent / "upstreams" / "fake_server.py"

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_config(models: dict[str, str], extra: str = "", **per_model: str) -> Config:
    """A config whose models run the fake server; ``models`` maps id -> extra fake flags."""
    lines = [f"startPort: {free_port()}", "healthCheckTimeout: 15", extra, "models:"]
    for mid, flags in models.items():
        port = free_port()
        lines += [
            f"  {mid}:",
            f"    cmd: {sys.executable} {FAKE} --port {port} --model-name {mid} {flags}",
            f"    proxy: http://127.0.0.1:{port}",
            "    unloadTimeout: 2",
        ]
        if mid in per_model:
            lines += ["    " + line for line in per_model[mid].splitlines()]
    return parse_config("\n".join(lines))


async def client_for(aiohttp_client: ClientFactory, config: Config) -> TestClient[Any, Any]:
    return await aiohttp_client(make_app(config))


def runloop(client: TestClient[Any, Any]) -> RunLoop:
    return client.app[RUNLOOP]


async def chat(client: TestClient[Any, Any], model: str, **kw: Any) -> dict[str, Any]:
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw},
    )
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def pid_of(client: TestClient[Any, Any], model: str) -> int | None:
    return runloop(client).snapshot()[model].pid


async def wait_until(cond: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_swap_a_b_a_stops_the_previous_child(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}))
    assert (await chat(client, "a"))["model"] == "a"
    pid_a = pid_of(client, "a")
    assert pid_a is not None
    assert (await chat(client, "b"))["model"] == "b"
    assert not psutil.pid_exists(pid_a) or psutil.Process(pid_a).status() == psutil.STATUS_ZOMBIE
    running = await (await client.get("/running")).json()
    assert [(r["model"], r["state"]) for r in running["running"]] == [("b", "ready")]
    assert (await chat(client, "a"))["model"] == "a"
    assert pid_of(client, "b") is None


async def test_concurrent_cold_requests_start_one_child(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--load-delay 0.3"}))
    results = await asyncio.gather(*(chat(client, "a") for _ in range(5)))
    assert all(r["model"] == "a" for r in results)
    pids = {r.get("pid") for r in results} - {None}
    assert len(pids) <= 1
    assert pid_of(client, "a") is not None


async def test_busy_model_is_not_evicted_until_its_stream_ends(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 50", "b": ""}))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "a", "stream": True, "max_tokens": 20, "messages": []},
    )
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data:")
    b_task = asyncio.ensure_future(chat(client, "b"))
    await wait_until(lambda: runloop(client).snapshot()["b"].status.queued == 1)
    assert runloop(client).state("a") is State.READY
    rest = await resp.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert (await b_task)["model"] == "b"


async def test_crash_mid_stream_then_next_request_restarts(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--crash-after-bytes 300 --tps 200"})
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "a", "stream": True, "max_tokens": 50, "messages": []}
    )
    first_pid = pid_of(client, "a")
    # The stream ends with a final error event, so the client can tell.
    assert b'data: {"error": ' in await resp.read()
    await wait_until(lambda: runloop(client).state("a") is State.STOPPED)
    # The replacement child crashes again on streams but serves a non-streaming request.
    assert (await chat(client, "a"))["model"] == "a"
    assert first_pid is not None and pid_of(client, "a") not in (None, first_pid)


async def test_child_exiting_during_load_fails_fast(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--exit-during-load"}))
    began = time.monotonic()
    resp = await client.post("/v1/chat/completions", json={"model": "a"})
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "model_load_failed"
    assert time.monotonic() - began < 5.0  # far below healthCheckTimeout (15 s)
    assert runloop(client).state("a") is State.STOPPED


async def test_never_healthy_times_out(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--never-healthy"})
    short = dataclasses.replace(cfg.models["a"], health_check_timeout=0.5)
    client = await client_for(aiohttp_client, dataclasses.replace(cfg, models={"a": short}))
    resp = await client.post("/v1/chat/completions", json={"model": "a"})
    assert resp.status == 502
    assert "timed out" in (await resp.json())["error"]["message"]
    assert pid_of(client, "a") is None


async def test_multipart_routes_by_field_and_forwards_bytes(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "whisper": ""}))
    form = FormData()
    form.add_field("model", "whisper")
    form.add_field("file", b"\x00RIFF" + bytes(range(256)) * 40, filename="x.wav")
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 200, await resp.text()
    assert "whisper" in (await resp.json())["text"]


async def test_query_model_and_byte_identical_body(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}, extra="", a="aliases: [alpha]"))
    props = await client.get("/props?model=alpha")
    assert (await props.json())["model_name"] == "a"
    raw = b'{"model": "alpha",  "prompt": "x\\u00e9", "n": [1, 2]}'
    resp = await client.post("/tokenize", data=raw, headers={"Content-Type": "application/json"})
    echoed = await resp.json()
    assert base64.b64decode(echoed["body_b64"]) == raw
    assert echoed["path"] == "/tokenize"


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"{not json", "application/json", 400, None),
        (b'{"model": "nope"}', "application/json", 404, "model_not_found"),
    ],
)
async def test_bad_requests_get_json_errors(
    aiohttp_client: ClientFactory, body: bytes, ctype: str, status: int, code: str | None
) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}))
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": ctype})
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err["message"]
    if code:
        assert err["code"] == code
    assert runloop(client).snapshot()["a"].status.state is State.STOPPED


async def test_no_model_with_two_models_and_none_loaded_is_400(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}))
    resp = await client.post("/v1/chat/completions", json={"messages": []})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "model_required"
    await chat(client, "b")
    # Drop-in for one llama-server URL: with exactly one model loaded, a bare request goes there.
    resp = await client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 2})
    assert (await resp.json())["model"] == "b"


async def test_body_over_limit_is_413(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": ""}, extra="maxBodyBytes: 1024")
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post("/v1/chat/completions", data=b"x" * 4096)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_models_list_running_and_unload(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "", "b": "", "hidden": ""}, hidden="unlisted: true")
    client = await client_for(aiohttp_client, cfg)
    await chat(client, "a")
    listing = await (await client.get("/v1/models")).json()
    assert [(m["id"], m["status"]["value"]) for m in listing["data"]] == [
        ("a", "loaded"),
        ("b", "unloaded"),
    ]
    pid = pid_of(client, "a")
    assert (await client.get("/unload")).status == 200
    assert pid is not None and not psutil.pid_exists(pid)
    assert (await (await client.get("/running")).json()) == {"running": []}


async def test_unload_one_by_alias_and_unknown_is_404(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"org/a": ""}, **{"org/a": "aliases: [short]"})
    client = await client_for(aiohttp_client, cfg)
    await chat(client, "org/a")
    assert (await client.post("/api/models/unload/org/a")).status == 200
    assert runloop(client).state("org/a") is State.STOPPED
    resp = await client.post("/api/models/unload/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"


async def test_unknown_route_and_wrong_method_are_json(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    resp = await client.get("/nope")
    assert resp.status == 404 and "error" in await resp.json()
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405 and "POST" in resp.headers["Allow"]


async def test_client_disconnect_while_queued_frees_its_place(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 20", "b": ""}))
    stream = await client.post(
        "/v1/chat/completions", json={"model": "a", "stream": True, "max_tokens": 10, "messages": []}
    )
    await stream.content.readline()
    queued = asyncio.ensure_future(client.post("/v1/chat/completions", json={"model": "b"}))
    await wait_until(lambda: runloop(client).snapshot()["b"].status.queued == 1)
    queued.cancel()
    await wait_until(lambda: runloop(client).snapshot()["b"].status.queued == 0)
    await stream.read()
    await runloop(client).wait_idle()
    assert runloop(client).state("b") is State.STOPPED  # nobody wants b any more: never started
    assert runloop(client).state("a") is State.READY


def test_sigkill_of_swapper_leaves_no_child(tmp_path: Path) -> None:
    import subprocess

    cfg = tmp_path / "models.yaml"
    port, listen = free_port(), free_port()
    cfg.write_text(
        f"models:\n  a:\n    cmd: {sys.executable} {FAKE} --port {port}\n    proxy: http://127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "swapper", "--config", str(cfg), "--listen", f"127.0.0.1:{listen}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import urllib.request

        deadline = time.monotonic() + 20
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{listen}/v1/chat/completions",
                    data=json.dumps({"model": "a", "max_tokens": 2}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                urllib.request.urlopen(req, timeout=10).read()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        proc.kill()
        proc.wait()


async def test_unload_cuts_in_flight_streams_so_the_child_exits_on_sigterm(
    aiohttp_client: ClientFactory,
) -> None:
    # --defer-sigterm: like llama-server, a SIGTERM waits for the open response to finish.
    cfg = fake_config({"a": "--defer-sigterm --tps 20"})
    long = dataclasses.replace(cfg.models["a"], unload_timeout=30.0)
    client = await client_for(aiohttp_client, dataclasses.replace(cfg, models={"a": long}))
    resp = await client.post(
        "/v1/chat/completions", json={"model": "a", "stream": True, "max_tokens": 2000, "messages": []}
    )
    await resp.content.readline()
    pid = pid_of(client, "a")
    assert pid is not None
    proc = psutil.Process(pid)
    assert (await client.get("/unload")).status == 200
    # Well inside the 30 s grace, and no SIGKILL was needed: the child exited on its SIGTERM.
    assert not psutil.pid_exists(pid) or proc.status() == psutil.STATUS_ZOMBIE
    assert any("no request in flight, exiting" in line for line in runloop(client).logs.history("a"))
    rest = await resp.read()  # cut: a final error event, then a proper end
    assert b'"code": "model_unloaded"' in rest and b"[DONE]" not in rest


async def test_shutdown_backstop_kills_a_child_whose_stop_wedges(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import swapper.app.server

    monkeypatch.setattr(swapper.app.server, "SHUTDOWN_BACKSTOP", 1.0)
    cfg = fake_config({"a": "--ignore-sigterm"})
    stubborn = dataclasses.replace(cfg.models["a"], unload_timeout=600.0)
    client = await client_for(aiohttp_client, dataclasses.replace(cfg, models={"a": stubborn}))
    await chat(client, "a")
    pid = pid_of(client, "a")
    assert pid is not None
    proc = psutil.Process(pid)
    began = time.monotonic()
    await client.close()  # runs the app's cleanup: the run loop's shutdown, then the backstop
    assert time.monotonic() - began < 30  # nowhere near the 600 s grace
    await wait_until(lambda: not psutil.pid_exists(pid) or proc.status() == psutil.STATUS_ZOMBIE)
