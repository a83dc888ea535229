"""Requests whose child fails under them: never replayed, never hung, always answered honestly.

Real fake-upstream children (``tests/upstreams``) that die of a request, stop (SIGSTOP) or go
silent; swapper in-process behind its front door. What these pin down:
  * a request the child may have read is never sent again: a child that dies of it gives the
    client a 502 envelope, and no second child ever sees that request (Go's Transport and
    nginx's ``proxy_next_upstream`` rule); the death is logged and counted as a crash, also
    when the next request finds the port refused before swapper read the exit.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from swapper.messages import Unreachable
from swapper.scheduler import State
from tests.test_faults import error_of
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
    began = time.monotonic()
    resp = await client.post(CHAT, json={"model": "a", "max_tokens": 2000, "messages": []})
    took = time.monotonic() - began
    assert len(received) == 1  # one child saw it, and only once
    assert resp.status == 502
    err = await error_of(resp)
    assert err["code"] == "bad_gateway"
    assert "during the request" in err["message"] and "not sent again" in err["message"]
    assert took < 5.0
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
