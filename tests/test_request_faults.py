"""Requests whose child fails under them: never replayed, never hung, always answered honestly.

Real fake-upstream children (``tests/upstreams``) that die of a request, stop (SIGSTOP) or go
silent; swapper in-process behind its front door. What these pin down:
  * a request the child may have read is never sent again: a child that dies of it gives the
    client a 502 envelope, and no second child ever sees that request (Go's Transport and
    nginx's ``proxy_next_upstream`` rule); the death is logged and counted as a crash, also
    when the next request finds the port refused before swapper read the exit;
  * a request cut by an unload (reload, shutdown) gets a 503 envelope when nothing was sent
    yet, and a stream ends with a final ``data: {"error": ...}`` event and a proper end, also
    when its child crashed mid-stream (never a bare close, never a silent end);
  * metrics and the activity log record how each request ended (``outcome``: ok, client_gone,
    cut, upstream_error, timeout) next to its status: a cut 200 stream is not a success.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psutil
import pytest

from swapper.config.load import parse_config
from swapper.config.schema import ConfigError
from swapper.config.timeouts import Timeouts
from swapper.core.messages import Unreachable
from swapper.core.states import State
from swapper.observe.activity import ACTIVITY
from tests.test_faults import error_of, with_model
from tests.test_metrics import scrape, settled, value
from tests.test_swapping import ClientFactory, chat, client_for, fake_config, pid_of, runloop

WaitUntil = Callable[..., Awaitable[None]]

CHAT = "/v1/chat/completions"


def received_by(client: Any, model: str) -> list[int]:
    """Starts recording the pids of ``model``'s children that log a request they received."""
    pids: list[int] = []

    def on_lines(source: str, lines: list[str]) -> None:
        # "fake_server[PID]: POST /v1/chat/completions received"
        for line in lines:
            if source == model and line.endswith(" received"):
                pids.append(int(line.split("[", 1)[1].split("]", 1)[0]))

    runloop(client).logs.listen(on_lines)
    return pids


def block_until_zombie(pid: int) -> None:
    """Polls (blocking the event loop on purpose) until ``pid`` has died, unreaped."""
    deadline = time.monotonic() + 5
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child did not die"
        time.sleep(0.005)


async def status_of(client: Any, model: str) -> dict[str, Any]:
    models = (await (await client.get("/v1/status")).json())["models"]
    found: dict[str, Any] = next(m for m in models if m["id"] == model)
    return found


async def test_a_request_that_kills_its_child_gets_a_502_and_reaches_no_second_child(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    # The child reads the request, works on it for 0.3 s, and dies of it (SIGKILL). Replaying it
    # would crash a second child the same way, and put every user of the model into backoff.
    client = await client_for(aiohttp_client, fake_config({"a": "--die-on-request 0.3"}))
    received = received_by(client, "a")
    resp = await client.post(CHAT, json={"model": "a", "max_tokens": 2000, "messages": []})
    assert len(received) == 1  # one child saw it, and only once
    assert resp.status == 502
    err = await error_of(resp)
    assert err["code"] == "bad_gateway"
    assert "during the request" in err["message"] and "not sent again" in err["message"]
    await wait_until(lambda: runloop(client).state("a") is State.STOPPED, what="the crash noticed")
    await runloop(client).wait_idle()
    assert runloop(client).snapshot()["a"].status.in_flight == 0
    status = await status_of(client, "a")
    assert status["unexpectedExits"] == 1
    assert status["lastError"]["message"] == f"pid {received[0]} exited unexpectedly (rc -9)"


async def test_a_refused_connection_to_a_child_that_died_is_counted_as_its_crash(
    aiohttp_client: ClientFactory,
) -> None:
    # The next request can find the dead child's port refused before swapper read its exit: the
    # refusal must not hide the crash ("refuses connections") nor count it twice.
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    await chat(client, "a")
    pid = pid_of(client, "a")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    block_until_zombie(pid)  # the event loop must not read the child's pidfd before the report
    loop = runloop(client)
    loop._post(Unreachable("a", pid))  # what a refused connect reports (RunLoop.reacquire)
    await loop.wait_idle()
    assert loop.state("a") is State.STOPPED
    status = await status_of(client, "a")
    assert status["unexpectedExits"] == 1
    assert status["lastError"]["message"] == f"pid {pid} exited unexpectedly (rc -9)"
    assert (await chat(client, "a"))["model"] == "a"  # the next request starts it afresh
    assert pid_of(client, "a") not in (None, pid)


def last_event(stream: bytes) -> dict[str, Any]:
    """The last SSE event's JSON."""
    last = stream.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: "), stream[-300:]
    event: dict[str, Any] = json.loads(last.removeprefix(b"data: "))
    return event


async def outcome_counts(client: Any, model: str) -> dict[str, float]:
    samples = await scrape(client)
    route = "/v1/chat/completions"
    return {
        outcome: value(samples, "swapper_request_outcomes_total", model=model, route=route, outcome=outcome)
        or 0
        for outcome in ("ok", "client_gone", "cut", "upstream_error", "timeout")
    }


def activity_outcomes(client: Any) -> list[tuple[int, str]]:
    return [(r.status or 0, r.outcome) for r in client.app[ACTIVITY].records()]


@pytest.mark.parametrize("chunked", [False, True], ids=["front door", "aiohttp path"])
async def test_an_unload_answers_the_request_it_cuts_with_a_503(
    aiohttp_client: ClientFactory, wait_until: WaitUntil, chunked: bool
) -> None:
    # Before: a bare connection close, counted as if the client had left.
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    await chat(client, "a")
    payload = json.dumps({"model": "a", "messages": [], "max_tokens": 4}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield payload

    data: Any = chunks() if chunked else payload
    headers = {"Content-Type": "application/json", "X-Fake-Delay": "60"}  # the child takes a minute
    pending = asyncio.ensure_future(client.post(CHAT, data=data, headers=headers))
    await wait_until(lambda: runloop(client).snapshot()["a"].status.in_flight == 1, what="in flight")
    began = time.monotonic()
    assert (await client.get("/unload")).status == 200
    resp = await asyncio.wait_for(pending, 10)
    assert resp.status == 503
    err = await error_of(resp)
    assert err["code"] == "model_unloaded" and "stopped during the request" in err["message"]
    assert time.monotonic() - began < 20  # not the child's minute
    await settled(client)
    assert activity_outcomes(client)[-1] == (503, "cut")
    counts = await outcome_counts(client, "a")
    assert (counts["ok"], counts["cut"]) == (1, 1)


async def test_an_unload_ends_a_stream_with_an_error_event(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 20"}))
    resp = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 500, "messages": []})
    assert resp.status == 200
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"data: ")
    assert (await client.get("/unload")).status == 200
    rest = await asyncio.wait_for(resp.read(), 10)  # a proper end: no ClientPayloadError
    assert b"[DONE]" not in rest
    assert last_event(rest)["error"]["code"] == "model_unloaded"
    await settled(client)
    assert activity_outcomes(client)[-1] == (200, "cut")
    assert client.app[ACTIVITY].records()[-1].as_json(False)["error_msg"].startswith("cut")
    assert (await outcome_counts(client, "a"))["cut"] == 1


async def test_a_stream_cut_by_a_crash_is_recorded_as_an_upstream_error_not_a_success(
    aiohttp_client: ClientFactory,
) -> None:
    # Before: the status (200) was recorded when the head came, so the truncated stream counted
    # as a success.
    client = await client_for(aiohttp_client, fake_config({"a": "--crash-after-bytes 400 --tps 500"}))
    resp = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 200, "messages": []})
    assert resp.status == 200
    body = await resp.read()
    assert last_event(body)["error"]["code"] == "bad_gateway"
    await settled(client)
    assert activity_outcomes(client) == [(200, "upstream_error")]
    samples = await scrape(client)
    assert value(samples, "swapper_requests_total", model="a", route=CHAT, status="2xx") == 1
    counts = await outcome_counts(client, "a")
    assert (counts["ok"], counts["upstream_error"]) == (0, 1)


# ---- timeouts ----------------------------------------------------------------------------------


def test_timeouts_decode_globally_and_per_model_with_llama_swaps_keys() -> None:
    cfg = fake_config(
        {"a": "", "b": ""},
        extra="timeouts: {responseHeader: 5, hung: 10, keepalive: 30}",
        a="timeouts: {connect: 2, request: 60, loadStall: 0, idleConn: 90}",
    )
    assert cfg.timeouts == Timeouts(connect=30, response_header=5, request=0, hung=10, load_stall=60)
    a, b = cfg.models["a"].timeouts, cfg.models["b"].timeouts
    assert a == Timeouts(connect=2, response_header=5, request=60, hung=10, load_stall=0)
    assert b == cfg.timeouts
    assert not cfg.warnings  # llama-swap's transport keys are accepted


@pytest.mark.parametrize("bad", ["{connect: -1}", "{hung: soon}", "5"])
def test_a_bad_timeout_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="timeouts"):
        fake_config({"a": ""}, a=f"timeouts: {bad}")


@pytest.mark.parametrize("chunked", [False, True], ids=["front door", "aiohttp path"])
async def test_a_child_that_sends_no_response_head_in_time_is_a_504(
    aiohttp_client: ClientFactory, chunked: bool
) -> None:
    # Before: no timeout at all; the client waited as long as the child did (here: forever).
    cfg = fake_config({"a": "--silent"}, a="timeouts: {responseHeader: 1}")
    client = await client_for(aiohttp_client, cfg)
    payload = json.dumps({"model": "a", "messages": []}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield payload

    data: Any = chunks() if chunked else payload
    began = time.monotonic()
    headers = {"Content-Type": "application/json"}
    resp = await asyncio.wait_for(client.post(CHAT, data=data, headers=headers), 10)
    took = time.monotonic() - began
    assert resp.status == 504
    err = await error_of(resp)
    assert err["code"] == "gateway_timeout" and "timeouts.responseHeader" in err["message"]
    assert 1 <= took < 8  # the load (about 0.1 s) is not counted: the head's wait begins at the send
    await settled(client)
    assert activity_outcomes(client) == [(504, "timeout")]
    assert runloop(client).state("a") is State.READY  # a slow child is not killed for it


async def test_a_stream_past_its_request_deadline_ends_with_an_error_event(
    aiohttp_client: ClientFactory,
) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 10"}, a="timeouts: {request: 1.5}"))
    began = time.monotonic()
    resp = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 500, "messages": []})
    assert resp.status == 200
    body = await asyncio.wait_for(resp.read(), 10)
    assert 1.5 <= time.monotonic() - began < 8
    assert last_event(body)["error"]["code"] == "gateway_timeout"
    await settled(client)
    assert activity_outcomes(client) == [(200, "timeout")]
    assert (await outcome_counts(client, "a"))["timeout"] == 1


# ---- hang detection ----------------------------------------------------------------------------


def probes(samples: dict[Any, float], model: str, result: str) -> float:
    return value(samples, "swapper_hang_probes_total", model=model, result=result) or 0


async def test_a_hung_child_ends_its_requests_with_504_and_is_killed(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    # The child reads a request, then stops (SIGSTOP). Before: the clients waited forever with
    # not one log line, /running said ready, and an unload took the whole unloadTimeout.
    cfg = fake_config({"a": "--stop-on-request 0.1"}, a="timeouts: {hung: 1}")
    client = await client_for(aiohttp_client, cfg)
    began = time.monotonic()
    plain = asyncio.ensure_future(client.post(CHAT, json={"model": "a", "messages": []}))
    await wait_until(lambda: pid_of(client, "a") is not None, what="spawned")
    pid = pid_of(client, "a")
    assert pid is not None
    resp = await asyncio.wait_for(plain, 15)
    took = time.monotonic() - began
    assert resp.status == 504
    err = await error_of(resp)
    assert err["code"] == "gateway_timeout" and "hung" in err["message"]
    assert took < 10  # hung (1 s) + the tick (1 s) + the probe (1 s), and the load
    await wait_until(lambda: runloop(client).state("a") is State.STOPPED, what="stopped")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    await settled(client)
    assert activity_outcomes(client) == [(504, "timeout")]
    status = await status_of(client, "a")
    assert status["unexpectedExits"] == 1 and "hung" in status["lastError"]["message"]
    assert probes(await scrape(client), "a", "hung") == 1


async def test_a_stream_on_a_child_that_hangs_ends_with_an_error_event(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--stop-after-bytes 300 --tps 200"}, a="timeouts: {hung: 1}")
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 500, "messages": []})
    assert resp.status == 200
    body = await asyncio.wait_for(resp.read(), 15)  # a proper end
    assert body.startswith(b"data: ") and b"[DONE]" not in body
    assert last_event(body)["error"]["code"] == "gateway_timeout"
    await settled(client)
    assert activity_outcomes(client) == [(200, "timeout")]


async def test_a_slow_child_that_answers_its_probe_is_left_alone(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    # Silent on its request (a long prompt on a CPU), but its health endpoint answers: not hung.
    cfg = fake_config({"a": "--silent"}, a="timeouts: {hung: 1}")
    client = await client_for(aiohttp_client, cfg)
    pending = asyncio.ensure_future(client.post(CHAT, json={"model": "a", "messages": []}))
    alive = 0.0

    async def probed() -> None:
        nonlocal alive
        alive = probes(await scrape(client), "a", "alive")

    deadline = time.monotonic() + 10
    while alive < 2:  # probed twice: once silent for 1 s, then again, watched afresh
        assert time.monotonic() < deadline, "the silent child was never probed"
        await probed()
        await asyncio.sleep(0.05)
    assert not pending.done()
    assert runloop(client).state("a") is State.READY
    assert probes(await scrape(client), "a", "hung") == 0
    assert (await client.get("/unload")).status == 200
    resp = await asyncio.wait_for(pending, 5)
    assert resp.status == 503


async def test_an_unload_of_a_stopped_child_does_not_wait_out_its_unload_timeout(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    # Before: SIGTERM to a stopped process waits until it runs again, so /unload took the whole
    # unloadTimeout, then SIGKILLed it. SIGCONT after SIGTERM lets it exit now.
    cfg = with_model(fake_config({"a": "--stop-on-request 0"}), "a", unload_timeout=8.0)
    client = await client_for(aiohttp_client, cfg)
    pending = asyncio.ensure_future(client.post(CHAT, json={"model": "a", "messages": []}))
    await wait_until(lambda: pid_of(client, "a") is not None, what="spawned")
    pid = pid_of(client, "a")
    assert pid is not None

    def stopped() -> bool:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED

    await wait_until(stopped, what="the child stopped itself")
    began = time.monotonic()
    assert (await client.get("/unload")).status == 200
    assert time.monotonic() - began < 6  # not its unloadTimeout (8 s)
    assert (await asyncio.wait_for(pending, 5)).status == 503


async def test_max_wait_holds_when_a_model_to_evict_hangs(
    aiohttp_client: ClientFactory, wait_until: WaitUntil
) -> None:
    # a and b swap (one default group). a hangs with a request in flight; b's request, queued
    # behind it, claims a once its maxWait (2 s) is up. Before: b waited as long as a hung.
    cfg = fake_config({"a": "--stop-on-request 0", "b": ""}, b="maxWait: 2")
    client = await client_for(aiohttp_client, cfg)
    stuck = asyncio.ensure_future(client.post(CHAT, json={"model": "a", "messages": []}))
    await wait_until(lambda: runloop(client).snapshot()["a"].status.in_flight == 1, what="a in flight")
    began = time.monotonic()
    resp = await asyncio.wait_for(client.post(CHAT, json={"model": "b", "messages": []}), 20)
    took = time.monotonic() - began
    assert resp.status == 200, await resp.text()
    assert took < 15  # maxWait (2 s), a second of silence, a tick, the probe (5 s), the kill, b's load
    assert (await asyncio.wait_for(stuck, 5)).status == 504  # a's request: answered, not hung


# ---- load stalls -------------------------------------------------------------------------------


async def test_a_load_that_stalls_fails_early_with_the_childs_last_lines(
    aiohttp_client: ClientFactory,
) -> None:
    # It never listens and prints nothing more: before, the load waited out healthCheckTimeout
    # (15 s here, 120 s by default).
    cfg = fake_config({"a": "--no-listen"}, a="timeouts: {loadStall: 1}")
    client = await client_for(aiohttp_client, cfg)
    began = time.monotonic()
    resp = await client.post(CHAT, json={"model": "a", "messages": []})
    took = time.monotonic() - began
    assert resp.status == 502
    err = await error_of(resp)
    assert err["code"] == "model_load_failed"
    assert "load stalled: no output and no health answer for 1s" in err["message"]
    assert "loading model a" in err["message"]  # the child's last words
    assert 1 <= took < 10  # not healthCheckTimeout (15 s)


async def test_a_load_that_keeps_printing_is_not_a_stall(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--no-listen --chatty-load --load-delay 2.5"}, a="timeouts: {loadStall: 1}")
    client = await client_for(aiohttp_client, cfg)
    began = time.monotonic()
    resp = await client.post(CHAT, json={"model": "a", "messages": []})
    took = time.monotonic() - began
    assert resp.status == 502
    assert "load stalled" in (await error_of(resp))["message"]
    assert took >= 3.4  # printed for 2.5 s (progress), then 1 s of silence


def test_a_health_check_timeout_raised_to_its_floor_is_said_once() -> None:
    cfg = parse_config("healthCheckTimeout: 5\nmodels:\n  a:\n    cmd: server --port ${PORT}\n")
    assert cfg.models["a"].health_check_timeout == 15
    assert [w for w in cfg.warnings if w.startswith("healthCheckTimeout")] == [
        "healthCheckTimeout: 5 is below the minimum of 15; using 15 (as llama-swap does; "
        "timeouts.loadStall fails a stalled load sooner)"
    ]


async def test_a_client_that_leaves_mid_stream_is_counted_as_gone(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 20"}))
    resp = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 500, "messages": []})
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away
    await settled(client)
    assert activity_outcomes(client) == [(200, "client_gone")]
    assert (await outcome_counts(client, "a"))["client_gone"] == 1
