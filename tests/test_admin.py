"""/v1/status, /logs, /logs/stream and /api/events against real fake-upstream children."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import ClientResponse

from swapper.observe.events import EVENTS
from tests.test_swapping import ClientFactory, chat, client_for, fake_config, runloop, wait_until

CHAT = "/v1/chat/completions"
# What a request event may say: ids and timings. Never headers, query or body.
REQUEST_KEYS = {"id", "timestamp", "model", "req_path", "method", "state", "elapsed_ms", "wait_ms", "status"}
READ_LIMIT = 20.0  # a guard against a hung stream, not a timing assertion


async def read_lines_until(resp: ClientResponse, done: Callable[[str], bool]) -> list[str]:
    """Reads a text stream line by line up to and including the first line ``done`` accepts."""
    lines: list[str] = []
    async with asyncio.timeout(READ_LIMIT):
        while True:
            raw = await resp.content.readline()
            assert raw, f"stream ended before the line we wait for; got {lines}"
            lines.append(raw.decode().rstrip("\n"))
            if done(lines[-1]):
                return lines


async def read_frame(resp: ClientResponse) -> tuple[str, Any]:
    """The next SSE event: (type, data) from llama-swap's envelope (data is a JSON string)."""
    async with asyncio.timeout(READ_LIMIT):
        data = None
        while True:
            raw = (await resp.content.readline()).decode()
            assert raw, "event stream ended"
            line = raw.rstrip("\n")
            if line.startswith("data:"):
                data = line[len("data:") :].strip()
            elif not line and data is not None:
                envelope = json.loads(data)
                return envelope["type"], json.loads(envelope["data"])


def state_of(frame_data: list[dict[str, Any]], model: str) -> str:
    return next(str(m["state"]) for m in frame_data if m["id"] == model)


async def test_status_shows_children_requests_and_swapper(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}))
    await chat(client, "a")
    await wait_until(lambda: not client.app[EVENTS].in_flight())
    resp = await client.get("/v1/status")
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"swapper", "gpus", "models", "queues", "requests", "memory"}
    assert body["memory"] is None  # only the memory planner keeps a ledger
    assert body["swapper"]["rssBytes"] > 0 and body["swapper"]["uptimeSeconds"] >= 0
    assert isinstance(body["gpus"], list)
    a, b = body["models"]
    assert a["id"] == "a" and a["state"] == "ready"
    assert a["pid"] == runloop(client).snapshot()["a"].pid is not None
    assert a["rssBytes"] > 0 and a["uptimeSeconds"] >= 0
    assert a["requestsTotal"] == 1 and a["lastUsed"] is not None
    assert a["starts"] == 1 and a["lastLoadSeconds"] > 0
    assert a["inFlight"] == 0 and a["queued"] == 0 and a["lastError"] is None
    assert b["state"] == "stopped" and b["pid"] is None and b["rssBytes"] is None
    assert b["requestsTotal"] == 0 and b["lastUsed"] is None
    assert body["queues"] == [] and body["requests"] == []


async def test_status_shows_a_queued_request_and_its_age(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 20", "b": ""}))
    stream = await client.post(CHAT, json={"model": "a", "stream": True, "max_tokens": 10, "messages": []})
    await stream.content.readline()
    queued = asyncio.ensure_future(chat(client, "b"))
    await wait_until(lambda: runloop(client).snapshot()["b"].status.queued == 1)
    body = await (await client.get("/v1/status")).json()
    [queue] = body["queues"]
    assert queue["model"] == "b" and queue["queued"] == 1 and queue["oldestWaitSeconds"] >= 0
    states = {(r["model"], r["state"]) for r in body["requests"]}
    assert states == {("a", "serving"), ("b", "waiting")}
    assert all(set(r) <= REQUEST_KEYS for r in body["requests"])
    await stream.read()
    await queued


async def test_status_keeps_the_last_error(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--exit-during-load"}))
    assert (await client.post(CHAT, json={"model": "a"})).status == 502
    [a] = (await (await client.get("/v1/status")).json())["models"]
    assert a["lastError"]["message"].startswith("start failed") and a["lastError"]["at"]


async def logged(client: Any, model: str, text: str) -> None:
    """Waits until ``model``'s output holds ``text``: a ready child's output is read in batches
    (children.Child.batch_output), so a line may arrive a few ms after the response it logged."""
    await wait_until(lambda: any(text in line for line in runloop(client).logs.history(model)))


async def test_logs_holds_swapper_and_child_output(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    await chat(client, "a")
    await logged(client, "a", "POST /v1/chat/completions 200")
    resp = await client.get("/logs")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert "[a] fake_server[" in text and "loading model a" in text
    assert "POST /v1/chat/completions 200" in text


async def test_log_stream_no_history_sends_only_new_lines(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    await chat(client, "a")
    await logged(client, "a", "POST /v1/chat/completions 200")  # its lines are history now
    stream = await client.get("/logs/stream/a?no-history")
    assert stream.status == 200 and stream.headers["X-Accel-Buffering"] == "no"
    resp = await client.post("/v1/embeddings", json={"model": "a", "input": "x"})
    assert resp.status == 200
    lines = await read_lines_until(stream, lambda line: "POST /v1/embeddings 200" in line)
    assert not any("chat/completions" in line or "loading model" in line for line in lines)
    assert all(not line.startswith("[") for line in lines)  # one source: raw lines, untagged
    stream.close()


async def test_combined_stream_sends_history_then_tagged_lines(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"org/a": ""}))
    await chat(client, "org/a")
    stream = await client.get("/logs/stream")
    history = await read_lines_until(stream, lambda line: "POST /v1/chat/completions 200" in line)
    assert any(line.startswith("[org/a] ") and "loading model org/a" in line for line in history)
    stream.close()
    by_id = await client.get("/logs/stream/org/a")  # ids with '/' work
    lines = await read_lines_until(by_id, lambda line: "loading model org/a" in line)
    assert lines[-1].startswith("fake_server[")
    by_id.close()


async def test_log_stream_of_unknown_source_is_400(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    resp = await client.get("/logs/stream/nope")
    assert resp.status == 400
    assert "invalid log source" in (await resp.json())["error"]["message"]


async def test_streams_end_cleanly_when_the_server_shuts_down(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    logs = await client.get("/logs/stream?no-history")
    events = await client.get("/api/events")
    await read_frame(events)
    await client.app.shutdown()  # what the runner's cleanup does first: on_shutdown
    async with asyncio.timeout(READ_LIMIT):
        await logs.read()  # a clean end of the chunked body: a reset would raise here
        await events.read()


async def test_events_report_model_states_and_requests(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}))
    events = await client.get("/api/events")
    assert events.headers["Content-Type"] == "text/event-stream"
    # llama-swap's burst on connect: log history (swapper's, then the children's), states, UI
    # settings, the active profile, the requests in flight.
    burst = [await read_frame(events) for _ in range(6)]
    assert [kind for kind, _ in burst] == [
        "logData",
        "logData",
        "modelStatus",
        "uiConfig",
        "profileChanged",
        "inflight",
    ]
    assert [data["source"] for _, data in burst[:2]] == ["proxy", "upstream"]
    assert "listening" not in burst[1][1]["data"]  # children's lines only
    models = burst[2][1]
    assert [m["id"] for m in models] == ["a", "b"]
    states = [state_of(models, "a")]
    assert burst[3][1] == {"activity": {"session_id": ["X-Session-ID", "X-Litellm-Session-Id"]}}
    assert burst[4][1] == {"active": None}
    assert burst[5][1] == {"operation": "snapshot", "requests": []}

    await chat(client, "a")
    assert (await client.post("/api/models/unload/a")).status == 200

    requests: list[dict[str, Any]] = []
    logs: list[dict[str, Any]] = []
    activity: list[dict[str, Any]] = []
    while states[-1] != "stopped" or len(states) == 1:
        kind, data = await read_frame(events)
        if kind == "modelStatus":
            if state_of(data, "a") != states[-1]:
                states.append(state_of(data, "a"))
            assert state_of(data, "b") == "stopped"
        elif kind == "inflight":
            requests.append(data)
        elif kind == "logData":
            logs.append(data)
        elif kind == "activity":
            activity.append(data)
    assert activity == [{"id": 1}]  # the chat's activity row, for the client to fetch
    assert states == ["stopped", "starting", "ready", "stopping", "stopped"]
    assert [r["operation"] for r in requests] == ["upsert", "upsert", "remove"]
    finished = requests[-1]["request"]
    assert finished["model"] == "a" and finished["req_path"] == CHAT and finished["status"] == 200
    assert all(set(r["request"]) <= REQUEST_KEYS for r in requests)
    assert any(entry.get("model") == "a" and "loading model a" in entry["data"] for entry in logs)
    assert all(entry["source"] in ("proxy", "upstream") for entry in logs)
    events.close()
