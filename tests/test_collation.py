"""Real-process scheduler behaviour: collation, admission, loading-state streams, cancellation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai

from swapper.core.states import State
from tests.test_swapping import ClientFactory, chat, client_for, fake_config, runloop, wait_until


async def test_abcabc_is_served_with_exactly_three_starts(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({m: "--load-delay 0.1" for m in "abc"})
    client = await client_for(aiohttp_client, cfg)
    starts: list[str] = []
    loop = runloop(client)
    original = loop.start_child

    def recording_start(model: str, start_id: int) -> None:
        starts.append(model)
        original(model, start_id)

    loop.start_child = recording_start  # type: ignore[method-assign]
    results = await asyncio.gather(*(chat(client, m) for m in "abcabc"))
    assert [r["model"] for r in results] == list("abcabc")
    assert sorted(starts) == ["a", "b", "c"]  # one start per model, however they interleaved


async def test_concurrency_limit_answers_429_before_any_byte(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--load-delay 0.5"}, a="concurrencyLimit: 2\nsendLoadingState: true")
    client = await client_for(aiohttp_client, cfg)
    body = {"model": "a", "stream": True, "max_tokens": 2, "messages": []}
    first = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
    await wait_until(lambda: runloop(client).snapshot()["a"].status.queued == 2)
    third = await client.post("/v1/chat/completions", json=body)
    assert third.status == 429
    assert third.headers["Retry-After"] == "1"
    assert third.headers["Content-Type"].startswith("application/json")
    assert (await third.json())["error"]["code"] == "concurrency_limit"
    for resp in await asyncio.gather(*first):
        assert resp.status == 200
        await resp.read()


async def _stream_with_openai(base_url: str, model: str) -> tuple[str, str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    reasoning, content = "", ""
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta: Any = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    finally:
        await client.close()
    return reasoning, content


async def test_loading_state_reasoning_stream_parses_with_openai(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--load-delay 1.2"}, extra="sendLoadingState: true")
    client = await client_for(aiohttp_client, cfg)
    reasoning, content = await _stream_with_openai(str(client.make_url("/v1")), "a")
    assert "loading model a" in reasoning and "Done!" in reasoning
    assert content  # the real stream followed on the same response


async def test_loading_state_comments_mode_is_invisible_to_openai(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--load-delay 1.2"}, extra="sendLoadingState: true\nloadingStateMode: comments")
    client = await client_for(aiohttp_client, cfg)
    reasoning, content = await _stream_with_openai(str(client.make_url("/v1")), "a")
    assert reasoning == "" and content
    raw = await client.post(
        "/v1/chat/completions", json={"model": "a", "stream": True, "max_tokens": 2, "messages": []}
    )
    assert b": " not in (await raw.read())[:2]  # model already ready: no preamble at all


async def test_no_preamble_for_non_streaming_requests(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config({"a": "--load-delay 0.3"}, extra="sendLoadingState: true")
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post("/v1/chat/completions", json={"model": "a", "max_tokens": 2})
    assert resp.headers["Content-Type"].startswith("application/json")
    assert json.loads(await resp.read())["model"] == "a"


async def test_load_failure_after_preamble_ends_stream_with_error_event(
    aiohttp_client: ClientFactory,
) -> None:
    cfg = fake_config({"a": "--exit-during-load"}, extra="sendLoadingState: true")
    client = await client_for(aiohttp_client, cfg)
    resp = await client.post("/v1/chat/completions", json={"model": "a", "stream": True, "messages": []})
    text = (await resp.read()).decode()
    assert resp.status == 200
    assert "model_load_failed" in text
    assert runloop(client).state("a") is State.STOPPED
