"""The activity log (``swapper.observe.activity``): token counts from an answer's tail, the ring, captures.

Pure tests of the parsing and the bounds, then a real swapper app in front of fake-upstream
children: every receiving path (the front door inline and in a task, aiohttp's relay, /upstream)
leaves a record with the counts the child reported.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import deque
from typing import Any

import pytest

from swapper.observe.activity import TAIL, ActivityLog, Capture, Captures, parse_tokens, tail_of
from swapper.observe.events import EVENTS, EventBus
from tests.test_swapping import ClientFactory, client_for, fake_config

CHAT = "/v1/chat/completions"

# llama-server's last two stream events, as measured (timings override usage's counts).
LLAMA_TAIL = (
    b'data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":"chat.completion.chunk",'
    b'"usage":{"completion_tokens":5,"prompt_tokens":20,"total_tokens":25,'
    b'"prompt_tokens_details":{"cached_tokens":19}},'
    b'"timings":{"cache_n":19,"prompt_n":1,"prompt_ms":0.6,"prompt_per_second":1631.3,'
    b'"predicted_n":5,"predicted_ms":1.08,"predicted_per_second":3696.8}}\n\ndata: [DONE]\n\n'
)


# ---- parsing (pure) ----


def test_llama_timings_override_usage_and_give_speeds() -> None:
    tokens = parse_tokens(LLAMA_TAIL)
    assert (tokens.input, tokens.output, tokens.cached) == (1, 5, 19)
    assert tokens.prompt_per_second == 1631.3 and tokens.tokens_per_second == 3696.8
    assert tokens.draft == -1  # not in these timings


def test_openai_usage_with_cached_details() -> None:
    body = json.dumps(
        {
            "choices": [{"message": {"content": 'he said "usage": 3'}}],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        }
    ).encode()
    tokens = parse_tokens(body)
    assert (tokens.input, tokens.output, tokens.cached) == (12, 4, 8)
    assert tokens.tokens_per_second == -1.0  # no timings, and not a stream


def test_the_last_usage_wins_and_generated_text_is_not_mistaken_for_it() -> None:
    # Generated text that spells a usage object is escaped inside JSON: only real keys count.
    first = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    text = b'data: {"choices":[{"delta":{"content":"\\"usage\\": {\\"prompt_tokens\\": 99}"}}]}\n\n'
    last = b'data: {"usage":{"input_tokens":7,"output_tokens":9,"cache_read_input_tokens":2}}\n\n'
    tokens = parse_tokens(first + text + last)
    assert (tokens.input, tokens.output, tokens.cached) == (7, 9, 2)
    assert parse_tokens(first + text).output == 1


def test_a_tail_without_counts_or_cut_mid_object_says_unknown() -> None:
    assert parse_tokens(b'{"data":[{"embedding":[0.1]}]}').as_json() == {
        "cache_tokens": -1,
        "draft_tokens": -1,
        "draft_acc_tokens": -1,
        "input_tokens": -1,
        "output_tokens": -1,
        "prompt_per_second": -1.0,
        "tokens_per_second": -1.0,
    }
    assert parse_tokens(b'"prompt_tokens":3}, "usage": {"prompt_tok').input == -1
    assert (
        parse_tokens("caf\u00e9".encode()[-2:] + b'{"usage":{"prompt_tokens":2}}').input == 2
    )  # mid-character start


def test_error_messages_come_from_the_body() -> None:
    assert (
        parse_tokens(b'{"error":{"message":"context too long","code":400}}', error=True).error
        == "context too long"
    )
    assert parse_tokens(b'{"detail":"nope"}', error=True).error == "nope"
    assert parse_tokens(b"<html>", error=True).error is None


def test_tail_of_keeps_the_last_bytes_across_reads() -> None:
    assert tail_of(deque([b"abc", b"def"])) == b"abcdef"
    big = b"x" * (3 * TAIL)
    assert tail_of(deque([big, b"end"])) == (big + b"end")[-TAIL:]
    assert tail_of(deque()) == b""


# ---- captures and the ring (pure) ----


def test_captures_stay_within_their_budget_oldest_out_first() -> None:
    captures = Captures(budget=100)

    def capture(size: int) -> Capture:
        c = Capture(limit=100)
        c.request("/v1/x", b"", b"q" * size)
        return c

    assert captures.put(1, capture(40)) and captures.put(2, capture(40))
    assert captures.put(3, capture(40))  # evicts 1
    assert 1 not in captures and 2 in captures and 3 in captures and captures.used == 80
    assert not captures.put(4, capture(101))  # larger than the whole budget: not kept
    assert 4 not in captures and captures.used == 80


def test_a_capture_cuts_a_body_at_its_limit_and_redacts_secrets() -> None:
    c = Capture(limit=10)
    c.response(200, [(b"Set-Cookie", b"s=1"), (b"Content-Type", b"text/event-stream")])
    for piece in (b"12345", b"6789", b"more"):
        c.add(piece)
    # The exchange records the request as it finishes; the budget then decides on the whole.
    c.request("/v1/chat/completions", b"Authorization: Bearer sk-1\r\nX-Api-Key: k\r\nAccept: */*\r\n", b"")
    out = c.as_json(5)
    assert out["req_headers"] == {"Authorization": "[REDACTED]", "X-Api-Key": "[REDACTED]", "Accept": "*/*"}
    assert out["resp_headers"] == {"Set-Cookie": "[REDACTED]", "Content-Type": "text/event-stream"}
    assert base64.b64decode(out["resp_body"]) == b"123456789" and out["resp_body_truncated"]


def test_the_ring_keeps_the_last_n_and_skips_upstream_assets() -> None:
    bus = EventBus()
    log = ActivityLog.make(limit=2, capture_bytes=0)
    bus.subscribe(log)
    for i in range(3):
        bus.track(i, "m", CHAT, "POST", CHAT).done()
    bus.track(9, "m", "/upstream/{rest}", "GET", "/upstream/m/index.js").done()  # a model's own UI
    assert [r.id for r in log.records()] == [2, 3]


# ---- through a real swapper ----


async def records(client: Any, n: int) -> list[dict[str, Any]]:
    """The activity log once it holds ``n`` records (a request is recorded as its handler ends,
    which may be just after its client has the last byte)."""
    deadline = time.monotonic() + 10
    while True:
        found: list[dict[str, Any]] = await (await client.get("/api/metrics")).json()
        if len(found) >= n:
            return found
        assert time.monotonic() < deadline, f"activity log has only {found}"
        await asyncio.sleep(0.01)


def chat_body(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6, **kw}


async def test_every_path_records_its_requests_tokens(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--tps 200"}))
    plain = chat_body("a")
    streamed = chat_body("a", stream=True, max_tokens=9)
    upstream = chat_body("a", max_tokens=3)
    r = await client.post(CHAT, json=plain)  # starts the child: the front door, in a task
    assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 6
    r = await client.post(CHAT, json=plain)  # ready: the front door inline
    await r.read()
    r = await client.post(CHAT, json=streamed)  # SSE events paced apart: the tail spans reads
    assert b"[DONE]" in await r.read()
    r = await client.post("/upstream/a/v1/chat/completions", json=upstream)  # aiohttp's relay
    await r.read()
    got = await records(client, 4)
    assert [e["id"] for e in got] == [1, 2, 3, 4]
    prompt = len(json.dumps(plain).encode()) // 4  # what the fake reports
    assert [(e["tokens"]["input_tokens"], e["tokens"]["output_tokens"]) for e in got] == [
        (prompt, 6),
        (prompt, 6),
        (len(json.dumps(streamed).encode()) // 4, 9),
        (len(json.dumps(upstream).encode()) // 4, 3),
    ]
    first, _, stream, _ = got
    assert first["queue_wait_ms"] > 0 and first["ttfb_ms"] >= first["queue_wait_ms"]  # it waited for a load
    assert all(e["resp_status_code"] == 200 and e["model"] == "a" and "error_msg" not in e for e in got)
    assert all(e["duration_ms"] >= e["ttfb_ms"] > 0 for e in got)
    assert stream["resp_content_type"] == "text/event-stream"
    assert stream["tokens"]["tokens_per_second"] > 0  # from first byte to end: no timings from the fake
    assert got[-1]["req_path"] == "/upstream/a/v1/chat/completions"
    assert not any(e["has_capture"] for e in got)


async def test_errors_are_recorded_with_their_message(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    body = b'{"error":{"message":"prompt is too long","type":"invalid_request_error"}}'
    raw = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )
    r = await client.post(CHAT, json=chat_body("a"), headers={"X-Fake-Raw": base64.b64encode(raw).decode()})
    assert r.status == 400
    [entry] = await records(client, 1)
    assert entry["resp_status_code"] == 400 and entry["error_msg"] == "prompt is too long"


async def test_activity_api_filters_sorts_and_pages(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": ""}, "metricsMaxInMemory: 4"))
    for model, tokens in (("a", 1), ("b", 5), ("a", 3), ("b", 2), ("a", 4)):
        r = await client.post(CHAT, json=chat_body(model, max_tokens=tokens))
        await r.read()
    got = await records(client, 4)
    assert [e["id"] for e in got] == [2, 3, 4, 5]  # the ring keeps the last metricsMaxInMemory

    async def activity(query: str) -> dict[str, Any]:
        r = await client.get("/api/metrics/activity?" + query)
        assert r.status == 200, await r.text()
        page: dict[str, Any] = await r.json()
        return page

    page = await activity("")
    assert [e["id"] for e in page["data"]] == [5, 4, 3, 2]  # newest first by default
    assert (page["page"], page["limit"], page["total"], page["total_pages"]) == (1, 25, 4, 1)
    page = await activity("model=a&sort=generated&order=asc")
    assert [e["tokens"]["output_tokens"] for e in page["data"]] == [3, 4]
    page = await activity("limit=3&page=2&order=asc")
    assert [e["id"] for e in page["data"]] == [5] and page["total_pages"] == 2
    page = await activity("min_id=3&max_id=4")
    assert [e["id"] for e in page["data"]] == [4, 3]
    for bad in ("limit=0", "limit=1000", "page=x", "sort=nope", "order=up"):
        r = await client.get("/api/metrics/activity?" + bad)
        assert r.status == 400, bad
        assert (await r.json())["error"]["code"] == "bad_request"


async def test_no_activity_log_when_metrics_max_in_memory_is_0(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}, "metricsMaxInMemory: 0"))
    r = await client.post(CHAT, json=chat_body("a"))
    await r.read()
    assert await (await client.get("/api/metrics")).json() == []
    bus = client.app[EVENTS]
    assert not any(isinstance(o, ActivityLog) for o in bus._observers)


async def test_captures_keep_whole_exchanges_when_asked(aiohttp_client: ClientFactory) -> None:
    config = fake_config({"a": ""}, "captureBuffer: 64KiB\napiKeys: [sekret]")
    client = await client_for(aiohttp_client, config)
    auth = {"Authorization": "Bearer sekret"}
    plain, streamed = chat_body("a"), chat_body("a", stream=True)
    for body in (plain, streamed):
        r = await client.post(CHAT, json=body, headers=auth)
        await r.read()
    got = await (await client.get("/api/metrics", headers=auth)).json()
    assert [e["has_capture"] for e in got] == [True, True]
    one = await (await client.get("/api/captures/1", headers=auth)).json()
    assert one["req_path"] == CHAT and json.loads(base64.b64decode(one["req_body"])) == plain
    assert one["req_headers"]["Authorization"] == "[REDACTED]"
    assert json.loads(base64.b64decode(one["resp_body"]))["usage"]["completion_tokens"] == 6
    two = await (await client.get("/api/captures/2", headers=auth)).json()
    assert base64.b64decode(two["resp_body"]).endswith(b"data: [DONE]\n\n")
    assert two["resp_headers"]["Content-Type"] == "text/event-stream"
    assert (await client.get("/api/captures/x", headers=auth)).status == 400
    assert (await client.get("/api/captures/99", headers=auth)).status == 404
    assert (await client.get("/api/captures/1")).status == 401


async def test_captures_are_off_by_default(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    r = await client.get("/api/captures/1")
    assert r.status == 404
    assert "captureBuffer" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("path", ["/api/version"])
async def test_version(aiohttp_client: ClientFactory, path: str) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    body = await (await client.get(path)).json()
    assert set(body) == {"version", "commit", "build_date"} and body["version"]
