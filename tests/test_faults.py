"""Fault injection: children that crash, hang, ignore signals or never run; swapper SIGKILLed.

Most tests run swapper in-process with real fake-upstream children (``tests/upstreams``); the
crash-loop backoff is also tested as a pure state machine, and the SIGKILL test runs
``python -m swapper`` as a real process. Nothing sleeps to wait for a state: waits poll with a
deadline (``wait_until``) or await the run loop's events.

Behaviour these tests pin down:
  * a child that dies while loading fails its waiters at once with a 502 JSON error naming the
    exit and the child's last output, far below ``healthCheckTimeout``;
  * a child that dies mid-stream cuts the client's stream (no clean end, no ``[DONE]``), and the
    next request starts a fresh child; one that dies while idle disappears from /running;
  * a child that ignores SIGTERM is SIGKILLed after ``unloadTimeout`` and reaped;
  * a missing or non-executable binary is a 502 that names the binary (it used to hang the
    request and wedge the model as starting);
  * a crash loop backs off (503 + Retry-After, with the last error) instead of respawning the
    child on every request;
  * another process on the model's port: see ``test_port_taken_*`` for what swapper can and
    cannot tell apart;
  * swapper SIGKILLed (idle, mid-load, mid-stream, with a request queued) leaves no child
    behind, 20 times, and no grandchild forked by a child either (swapper/runtime/reaper.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient

from swapper.config.schema import Config
from swapper.core.errors import ModelLoadFailed
from swapper.core.scheduler import BACKOFF_CAP, STABLE_SECONDS
from swapper.core.states import State
from swapper.runtime import runloop as runloop_module
from tests.conftest import TAG_ENV
from tests.frontserver import FrontTestServer
from tests.rawhttp import read_request
from tests.test_scheduler import Harness
from tests.test_swapping import FAKE, ClientFactory, chat, client_for, fake_config, free_port, pid_of, runloop

WaitUntil = Callable[..., Awaitable[None]]

CHAT = "/v1/chat/completions"


def front_handed(client: TestClient[Any, Any]) -> int:
    """How many connections the front door handed to aiohttp (tests/frontserver.py)."""
    server = client.server
    assert isinstance(server, FrontTestServer)
    return server.front_site.front.handed


def with_model(cfg: Config, model: str, **changes: Any) -> Config:
    """``cfg`` with some fields of one model replaced (after parsing, so no YAML tricks)."""
    models = dict(cfg.models)
    models[model] = dataclasses.replace(models[model], **changes)
    return dataclasses.replace(cfg, models=models)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def error_of(resp: Any) -> dict[str, Any]:
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert body["src"] == "swapper"
    err: dict[str, Any] = body["error"]
    return err


async def running_models(client: TestClient[Any, Any]) -> dict[str, dict[str, Any]]:
    body = await (await client.get("/running")).json()
    return {r["model"]: r for r in body["running"]}


# ---- children that die --------------------------------------------------------------------


async def test_crash_before_healthy_is_a_fast_502_with_the_childs_output(
    aiohttp_client: ClientFactory,
) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--exit-during-load"}))
    began = time.monotonic()
    resp = await client.post(CHAT, json={"model": "a", "messages": []})
    elapsed = time.monotonic() - began
    assert resp.status == 502
    err = await error_of(resp)
    assert err["code"] == "model_load_failed" and err["type"] == "server_error"
    assert "exited with code 1 while loading" in err["message"]
    assert "failed to load model" in err["message"]  # the child's own last words
    assert elapsed < 5.0  # healthCheckTimeout is 15 s: the exit is noticed, not timed out
    assert runloop(client).state("a") is State.STOPPED
    assert pid_of(client, "a") is None


async def test_crash_mid_stream_ends_the_stream_with_an_error_and_next_request_restarts(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--crash-after-bytes 400 --tps 500"}))
    resp = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 200, "messages": []})
    assert resp.status == 200
    first_pid = pid_of(client, "a")
    received = await resp.read()  # a proper end, after a final error event: never a silent [DONE]
    assert received.startswith(b"data:")
    assert b"[DONE]" not in received
    last = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "bad_gateway"
    await wait_until(lambda: runloop(client).state("a") is State.STOPPED, what="a stopped")
    await runloop(client).wait_idle()
    assert "a" not in await running_models(client)
    assert runloop(client).snapshot()["a"].status.in_flight == 0
    # The next request starts a new child (it crashes on streams only, so this one is served).
    assert (await chat(client, "a"))["model"] == "a"
    assert first_pid is not None and pid_of(client, "a") not in (None, first_pid)


async def test_crash_while_idle_leaves_running_and_next_request_restarts(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--exit-after 1.5"}))
    await chat(client, "a")
    first_pid = pid_of(client, "a")
    assert first_pid is not None
    assert (await running_models(client))["a"]["state"] == "ready"
    await wait_until(lambda: pid_of(client, "a") is None, within=10, what="the crash to be noticed")
    assert runloop(client).state("a") is State.STOPPED
    assert "a" not in await running_models(client)
    assert gone(first_pid)
    assert (await chat(client, "a"))["model"] == "a"
    assert pid_of(client, "a") not in (None, first_pid)


async def test_never_healthy_fails_at_the_health_timeout_and_kills_the_child(
    aiohttp_client: ClientFactory,
) -> None:
    cfg = with_model(fake_config({"a": "--never-healthy"}), "a", health_check_timeout=0.5)
    client = await client_for(aiohttp_client, cfg)
    pids: list[int] = []

    def on_lines(source: str, lines: list[str]) -> None:
        # "fake_server[PID]: loading model a"
        for line in lines:
            if source == "a" and "loading model" in line:
                pids.append(int(line.split("[", 1)[1].split("]", 1)[0]))

    runloop(client).logs.listen(on_lines)
    began = time.monotonic()
    resp = await client.post(CHAT, json={"model": "a"})
    elapsed = time.monotonic() - began
    assert resp.status == 502
    err = await error_of(resp)
    assert err["code"] == "model_load_failed"
    assert "health check timed out after 0.5s" in err["message"]
    assert "HTTP 503" in err["message"]  # why the last probe failed
    assert 0.5 <= elapsed < 5.0
    assert pids and all(gone(pid) for pid in pids)
    assert pid_of(client, "a") is None


async def test_child_ignoring_sigterm_is_killed_after_unload_timeout(aiohttp_client: ClientFactory) -> None:
    grace = 0.5
    cfg = with_model(fake_config({"a": "--ignore-sigterm"}), "a", unload_timeout=grace)
    client = await client_for(aiohttp_client, cfg)
    await chat(client, "a")
    pid = pid_of(client, "a")
    assert pid is not None
    began = time.monotonic()
    resp = await client.get("/unload")
    elapsed = time.monotonic() - began
    assert resp.status == 200
    assert grace <= elapsed < grace + 3.0  # waited out the grace, then SIGKILL, not forever
    assert gone(pid)
    assert runloop(client).state("a") is State.STOPPED
    assert await running_models(client) == {}


async def test_missing_binary_is_a_502_naming_it(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "llama-server"
    cfg = with_model(fake_config({"a": ""}), "a", cmd=(str(missing), "--port", "1"), cmd_text=f"{missing}")
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post(CHAT, json={"model": "a"})
    assert resp.status == 502
    err = await error_of(resp)
    assert err["code"] == "model_load_failed"
    assert str(missing) in err["message"] and "no such file" in err["message"]
    assert runloop(client).state("a") is State.STOPPED


async def test_binary_not_executable_is_a_502_saying_so(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\nexit 0\n")  # mode 0644: not executable
    cfg = with_model(fake_config({"a": ""}), "a", cmd=(str(script),), cmd_text=str(script))
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post(CHAT, json={"model": "a"})
    assert resp.status == 502
    err = await error_of(resp)
    assert str(script) in err["message"] and "permission denied" in err["message"]


# ---- another process on the model's port ----------------------------------------------------


@pytest.fixture
def squatter_socket() -> Iterator[socket.socket]:
    """A listening socket that never accepts: connections queue in the backlog, unanswered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


async def test_port_taken_by_a_silent_process_is_a_load_failure(
    aiohttp_client: ClientFactory, squatter_socket: socket.socket
) -> None:
    """The child cannot bind, exits rc 1, and the exit fails the load at once.

    The health probe reaches the squatter and waits for an answer that never comes; the exit
    watcher does not wait for the probe, so the request still fails fast.
    """
    port = squatter_socket.getsockname()[1]
    cfg = fake_config({"a": ""})
    cmd = (sys.executable, str(FAKE), "--port", str(port), "--model-name", "a")
    cfg = with_model(cfg, "a", cmd=cmd, cmd_text=" ".join(cmd), proxy=f"http://127.0.0.1:{port}")
    client = await client_for(aiohttp_client, cfg)
    began = time.monotonic()
    resp = await client.post(CHAT, json={"model": "a"})
    assert resp.status == 502
    err = await error_of(resp)
    assert "exited with code 1 while loading" in err["message"]
    assert "address already in use" in err["message"].lower()
    assert time.monotonic() - began < 5.0
    assert runloop(client).state("a") is State.STOPPED


async def test_a_child_that_exits_as_its_start_succeeds_is_seen_exited(
    aiohttp_client: ClientFactory, wait_until: WaitUntil, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its exit reaches the loop while the start still owns it (the probe answered: a squatter on
    its port can answer for it), so ChildExited is dropped as the start's business; the start then
    succeeds. The loop must still see the exit when it handles Started, not keep a dead child as
    ready with its pid."""
    real_wait = runloop_module.wait_healthy

    async def healthy_then_gone(session: Any, child: Any, *args: Any, **kwargs: Any) -> None:
        await real_wait(session, child, *args, **kwargs)
        await child.wait_exited()  # gone before the loop hears of the start

    monkeypatch.setattr(runloop_module, "wait_healthy", healthy_then_gone)
    client = await client_for(aiohttp_client, fake_config({"a": "--exit-after 0.3"}))
    loop = runloop(client)
    lease = await loop.acquire(loop.new_request_id(), "a")
    loop.release(lease.req_id)
    await wait_until(lambda: loop.state("a") is State.STOPPED, within=10, what="the exit seen")
    assert pid_of(client, "a") is None


async def test_port_taken_by_a_healthy_server_is_an_inherent_limitation(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    """A squatter that answers 200 on /health passes the readiness probe.

    The probe runs right after spawn, before the child has even tried to bind, so swapper takes
    the squatter for the model and forwards the first request to it (llama-swap behaves the same:
    readiness is "the URL answers"). What swapper does guarantee: the child's exit (rc 1, port
    in use) is noticed, the model goes back to stopped with no pid, nothing leaks, and the next
    request starts a fresh child rather than trusting a dead one. Avoid it by not configuring
    ports that other services use (``${PORT}`` allocation picks free ones).
    """
    hits: list[str] = []

    async def squatter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = await read_request(reader)
        assert got is not None
        hits.append(got[0].split(b" ", 2)[1].decode())
        body = b'{"squatter": true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(squatter, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        cmd = (sys.executable, str(FAKE), "--port", str(port), "--model-name", "a")
        cfg = with_model(
            fake_config({"a": ""}), "a", cmd=cmd, cmd_text=" ".join(cmd), proxy=f"http://127.0.0.1:{port}"
        )
        client = await client_for(aiohttp_client, cfg)
        resp = await client.post(CHAT, json={"model": "a"})
        # Either the squatter answered (observed: the first probe wins the race against the
        # child's start-up) or the exit was seen first; never a hang, never a 5xx from a proxy
        # error that leaves the model "ready".
        if resp.status == 200:
            assert await resp.json() == {"squatter": True}
            assert "/health" in hits
        else:
            assert resp.status == 502
            assert "exited with code 1" in (await error_of(resp))["message"]
        await wait_until(lambda: pid_of(client, "a") is None, within=10, what="the child's exit")
        await runloop(client).wait_idle()
        assert runloop(client).state("a") is State.STOPPED
        assert runloop(client).snapshot()["a"].status.in_flight == 0


# ---- crash loops back off ---------------------------------------------------------------------


def fail_load(h: Harness, model: str, why: str = "exited with code 1 while loading") -> None:
    h.s.on_started(model, h.fx.start_id(model), ModelLoadFailed(why), h.now)


def test_backoff_first_failure_retries_at_once() -> None:
    h = Harness("a")
    r1 = h.req("a")
    fail_load(h, "a")
    assert isinstance(h.fx.failures[r1], ModelLoadFailed) and h.fx.failures[r1].status == 502
    h.req("a")
    assert len(h.fx.starts) == 2


def test_backoff_second_failure_refuses_starts_with_503_and_retry_after() -> None:
    h = Harness("a")
    for _ in range(2):
        h.req("a")
        fail_load(h, "a", "exited with code 1 while loading; last output: boom")
    starts = len(h.fx.starts)
    r = h.req("a")
    err = h.fx.failures[r]
    assert err.status == 503 and err.code == "model_load_backoff"
    assert err.headers == {"Retry-After": "1"}
    assert "keeps failing to load (2 failures in a row)" in err.message
    assert "last error: exited with code 1 while loading; last output: boom" in err.message
    assert len(h.fx.starts) == starts  # no spawn while backing off
    assert h.s.is_idle()  # the refused request was never admitted
    h.now = 0.999
    h.req("a")
    assert len(h.fx.starts) == starts
    h.now = 1.0
    h.req("a")
    assert len(h.fx.starts) == starts + 1


def test_backoff_doubles_up_to_the_cap() -> None:
    h = Harness("a")
    windows = []
    for _ in range(9):
        h.req("a")  # starts a load, or joins the one the previous round's request started
        fail_load(h, "a")
        r = h.req("a")
        err = h.fx.failures.get(r)
        windows.append(0 if err is None else int(err.headers["Retry-After"]))
        h.now += windows[-1]
    assert windows == [0, 1, 2, 4, 8, 16, 30, 30, 30]
    assert max(windows) == BACKOFF_CAP


def test_backoff_a_stable_child_resets_the_count() -> None:
    h = Harness("a")
    for _ in range(3):
        h.req("a")
        fail_load(h, "a")
        h.now += 10.0
    rid = h.req("a")
    h.ready("a")
    h.done(rid)
    h.now += STABLE_SECONDS
    h.s.on_child_exited("a", h.now)  # crashes after a stable life: the count starts over
    h.req("a")
    fail_load(h, "a")
    starts = len(h.fx.starts)
    h.req("a")  # one failure after a stable run: retried at once
    assert len(h.fx.starts) == starts + 1


def test_backoff_counts_a_child_that_dies_soon_after_it_became_ready() -> None:
    # It loads fine and crashes on its first request: without this, a restart per request.
    h = Harness("a")
    for round_ in range(2):
        rid = h.req("a")
        h.ready("a")
        h.now += 0.5
        h.s.on_child_exited("a", h.now)
        h.done(rid)
        assert len(h.fx.starts) == round_ + 1
    err = h.fx.failures[h.req("a")]
    assert err.status == 503 and err.code == "model_load_backoff"
    assert "exited 0.5s after it became ready" in err.message
    assert len(h.fx.starts) == 2
    h.now += 1.0
    h.req("a")
    assert len(h.fx.starts) == 3  # the window is over: one more try


def test_backoff_ignores_our_own_stops() -> None:
    h = Harness("a", "b")
    for _ in range(3):  # a loads, then is evicted by b at once, three times
        ra = h.req("a")
        h.ready("a")
        h.done(ra)
        rb = h.req("b")
        h.s.on_stopped("a", h.now)
        h.ready("b")
        h.done(rb)
        h.req("a")
        h.s.on_stopped("b", h.now)
    assert not h.fx.failures


def test_backoff_does_not_touch_other_models_or_joined_waiters() -> None:
    h = Harness("a", "b")
    waiters = [h.req("a") for _ in range(3)]
    fail_load(h, "a")
    assert all(h.fx.failures[r].status == 502 for r in waiters)  # each waiter exactly once
    h.req("a")
    fail_load(h, "a")
    rb = h.req("b")
    h.ready("b")
    assert rb in h.fx.grants
    assert h.fx.failures[h.req("a")].status == 503


def test_backoff_is_cleared_when_a_reload_changes_the_model() -> None:
    h = Harness("a", "b")
    for _ in range(2):
        h.req("a")
        fail_load(h, "a")
    for _ in range(2):
        h.req("b")
        fail_load(h, "b")
    fixed = dataclasses.replace(h.cfg.models["a"], cmd_text="fixed")
    h.s.on_reload(dataclasses.replace(h.cfg, models={**h.cfg.models, "a": fixed}), h.planner, h.now)
    starts = len(h.fx.starts)
    h.req("a")  # changed: retried at once
    assert len(h.fx.starts) == starts + 1
    assert h.fx.failures[h.req("b")].status == 503  # unchanged: still backing off


async def test_crash_loop_backs_off_instead_of_respawning(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--exit-during-load"}))
    spawns = 0

    def on_lines(source: str, lines: list[str]) -> None:
        nonlocal spawns
        spawns += sum(source == "a" and "loading model a" in line for line in lines)

    runloop(client).logs.listen(on_lines)
    for _ in range(2):
        resp = await client.post(CHAT, json={"model": "a"})
        assert resp.status == 502
    assert spawns == 2
    # A burst while backing off: answered at once, no child spawned for any of them.
    began = time.monotonic()
    burst = await asyncio.gather(*(client.post(CHAT, json={"model": "a"}) for _ in range(20)))
    refused = [r for r in burst if r.status == 503]
    if time.monotonic() - began < 0.9:  # the 1 s window cannot have run out
        assert len(refused) == 20 and spawns == 2
    assert refused, [r.status for r in burst]
    err = await error_of(refused[0])
    assert err["code"] == "model_load_backoff"
    assert "keeps failing to load" in err["message"] and "exited with code 1" in err["message"]
    assert int(refused[0].headers["Retry-After"]) >= 1
    await runloop(client).wait_idle()
    assert runloop(client).snapshot()["a"].status.queued == 0
    assert pid_of(client, "a") is None


async def test_a_child_that_dies_on_every_first_request_backs_off(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    # Healthy, then dead as soon as it streams a byte: each request used to respawn it.
    client = await client_for(aiohttp_client, fake_config({"a": "--crash-after-bytes 1"}))
    for _ in range(2):
        resp = await client.post(CHAT, json={"model": "a", "stream": True})
        with contextlib.suppress(aiohttp.ClientError):
            await resp.read()  # cut off: the child died mid-stream
        await wait_until(lambda: runloop(client).state("a") is State.STOPPED, within=10.0, what="exit seen")
    resp = await client.post(CHAT, json={"model": "a", "stream": True})
    assert resp.status == 503
    err = await error_of(resp)
    assert err["code"] == "model_load_backoff" and "after it became ready" in err["message"]
    assert int(resp.headers["Retry-After"]) >= 1
    assert pid_of(client, "a") is None


@pytest.mark.parametrize("chunked", [False, True], ids=["front door", "aiohttp path"])
async def test_a_child_that_stops_listening_is_restarted_not_a_502(
    aiohttp_client: ClientFactory, chunked: bool
) -> None:
    # After one answer the child closes its listener but stays alive, counted ready: the next
    # request is refused. It must be restarted and the request served, not answered 502. A
    # chunked upload is handed to aiohttp's path (web/routes.py); a sized one stays on the front door.
    client = await client_for(aiohttp_client, fake_config({"a": "--deaf-after 1"}))
    await chat(client, "a")
    first = pid_of(client, "a")
    payload = json.dumps({"model": "a", "stream": True, "max_tokens": 2}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield payload

    data: Any = chunks() if chunked else payload
    resp = await client.post(CHAT, data=data, headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert pid_of(client, "a") not in (None, first)  # a new child answered
    assert first is not None and not psutil.pid_exists(first)  # stopped and reaped before the restart
    await runloop(client).wait_idle()
    assert runloop(client).snapshot()["a"].status.in_flight == 0
    assert front_handed(client) == (1 if chunked else 0)
    # A failure of a ready model, counted as one (the stop that restarted it is not a second).
    [a] = (await (await client.get("/v1/status")).json())["models"]
    assert a["unexpectedExits"] == 1
    assert a["lastError"]["message"] == f"pid {first} refused connections; restarted"


def test_unreachable_stops_a_ready_model_once_and_counts_toward_backoff() -> None:
    h = Harness("a")
    rid = h.req("a")
    h.ready("a")
    h.done(rid)
    h.s.on_unreachable("a", h.now)
    assert h.fx.stops == ["a"] and h.s.state("a") is State.STOPPING
    h.s.on_unreachable("a", h.now)  # a second report of the same child: nothing more
    assert h.fx.stops == ["a"]
    r2 = h.req("a")  # waits for the stop, then restarts the model
    h.stopped("a")
    assert len(h.fx.starts) == 2
    h.ready("a")
    assert r2 in h.fx.grants
    h.done(r2)
    h.s.on_unreachable("a", h.now)  # again at once: the second quick failure in a row
    h.stopped("a")
    assert h.fx.failures[h.req("a")].code == "model_load_backoff"


# ---- swapper SIGKILLed ------------------------------------------------------------------------

# Where swapper is when it dies; each round takes the next one.
KILL_ROUNDS = 20
KILL_MOMENTS = ("idle", "loading", "streaming", "queued")

# A client in its own process, so that swapper dies with the request open.
_CLIENT = """
import sys, urllib.request
req = urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions", data=sys.argv[2].encode(),
    headers={"Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=30).read()
except Exception:
    pass
"""


def _get_json(listen: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{listen}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def _poll(cond: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Polls a condition on other processes (no event reports those) until a deadline."""
    deadline = time.monotonic() + within
    while True:
        try:
            if cond():
                return
        except (OSError, urllib.error.URLError):
            pass  # not listening yet
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _fakes_of_this_test() -> list[psutil.Process]:
    """Live fake servers (and their grandchildren) carrying this test's leak-check tag."""
    tag = os.environ[TAG_ENV]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "fake_server.py" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            if proc.environ().get(TAG_ENV) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _kill_config(tmp_path: Path, b_flags: str = "--load-delay 0.3") -> Path:
    lines = ["healthCheckTimeout: 30", "models:"]
    for mid, flags in (("a", "--tps 50"), ("b", b_flags)):
        port = free_port()
        lines += [
            f"  {mid}:",
            f"    cmd: {sys.executable} -S {FAKE} --port {port} --model-name {mid} {flags}",
            f"    proxy: http://127.0.0.1:{port}",
        ]
    path = tmp_path / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _model_status(listen: int, model: str) -> dict[str, Any]:
    running = _get_json(listen, "/running")["running"]
    return next((r for r in running if r["model"] == model), {})


def _bring_to(moment: str, listen: int, clients: list[subprocess.Popen[bytes]]) -> None:
    """Leaves swapper (a is up) in ``moment``; requests that must stay open run in ``clients``."""

    def send(body: dict[str, Any]) -> None:
        argv = [sys.executable, "-c", _CLIENT, str(listen), json.dumps(body)]
        clients.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    if moment == "loading":  # b is loading (0.3 s); a was stopped for it
        send({"model": "b", "max_tokens": 2})
        _poll(lambda: _model_status(listen, "b").get("state") == "starting", "b to start")
        _poll(lambda: _model_status(listen, "b").get("pid") is not None, "b's spawn")
    elif moment in ("streaming", "queued"):  # a streams (2 s); for "queued", b waits behind it
        send({"model": "a", "max_tokens": 100, "stream": True})
        _poll(lambda: _model_status(listen, "a").get("inFlight") == 1, "a's stream")
        if moment == "queued":
            send({"model": "b", "max_tokens": 2})
            _poll(lambda: _model_status(listen, "b").get("queued") == 1, "b to queue")


def _kill_round(cfg: Path, moment: str, label: str) -> None:
    listen = free_port()
    argv = [sys.executable, "-m", "swapper", "-c", str(cfg), "-l", f"127.0.0.1:{listen}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        _poll(lambda: _get_json(listen, "/running") is not None, "swapper to listen")
        body = json.dumps({"model": "a", "max_tokens": 2}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{listen}{CHAT}", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            assert resp.status == 200
        _bring_to(moment, listen, clients)
        before = psutil.Process(proc.pid).children(recursive=True)
        assert before, f"{label}: no child up before the kill"
    finally:
        proc.kill()
        proc.wait()
    # Dead means exited: an orphan stays a zombie until the reaper (PID 1) gets to it, which in
    # some containers takes a second; a zombie holds no port, memory or pipe.
    _poll(lambda: all(gone(p.pid) for p in before), f"{label}: every child of swapper to exit", within=10)
    _poll(lambda: not _fakes_of_this_test(), f"{label}: no fake server left", within=10)
    for client in clients:
        assert client.wait(timeout=30) == 0  # its connection was reset: it did not hang


def test_sigkill_of_swapper_leaves_no_child_20_times(tmp_path: Path) -> None:
    cfg = _kill_config(tmp_path)
    for round_no in range(KILL_ROUNDS):
        moment = KILL_MOMENTS[round_no % len(KILL_MOMENTS)]
        _kill_round(cfg, moment, f"round {round_no} ({moment})")


def test_sigkill_of_swapper_also_kills_grandchildren(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG is not inherited across fork: the grandchild dies by the reaper's hand.
    cfg = _kill_config(tmp_path, b_flags="--fork-grandchild")
    listen = free_port()
    argv = [sys.executable, "-m", "swapper", "-c", str(cfg), "-l", f"127.0.0.1:{listen}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _poll(lambda: _get_json(listen, "/running") is not None, "swapper to listen")
        body = json.dumps({"model": "b", "max_tokens": 2}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{listen}{CHAT}", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            assert resp.status == 200
        _poll(lambda: len(_fakes_of_this_test()) == 2, "b and its grandchild")
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 3.0
        while (left := _fakes_of_this_test()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not left, f"survivors: {[p.cmdline()[-1] for p in left]}"
    finally:
        proc.kill()
        proc.wait()
        for leftover in _fakes_of_this_test():  # clean up here, so the leak check sees no leftover
            leftover.kill()
