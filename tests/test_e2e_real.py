"""End to end against REAL inference servers: a swapper process on the shipped ``models.yaml``.

One swapper process (``python -m swapper``) serves the whole module, on the shipped config with
only ``startPort`` moved to free ports and ``unloadTimeout`` shortened (see ``UNLOAD_TIMEOUT``).
Its children are real ``llama-server`` and ``whisper-server`` processes on tiny random-weight
models (``python -m swapper.demo setup``); the module is skipped when those are not set up.

Clients are the real ``openai`` and ``anthropic`` SDKs, plus raw aiohttp where a test must
control the connection (read one chunk, then stop reading or hang up). The ``stack`` fixture
unloads everything after each test, so every test starts with no model loaded and the leak check
(conftest) sees no child left behind.

Facts about the real servers these tests lean on (each measured by a test here):
random weights never sample EOS, so every request sends max_tokens (finish reason "length");
temperature 0 is deterministic and chat-a/chat-b answer differently; ``n_probs: 512`` (the whole
vocabulary) turns a 512-token answer into ~18 MB, which keeps a response in flight for as long
as the client does not read it; and llama-server ignores SIGTERM while a non-streamed response
is still being written, so stopping it then needs swapper's SIGKILL escalation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import psutil
import pytest

from tests.realstack import (
    WAV,
    SwapperProcess,
    demo_missing,
    derived_config,
    gone,
    running_swapper,
    wait_for,
)

MISSING = demo_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

UNLOAD_TIMEOUT = 2.0  # top-level unloadTimeout of the test config (the shipped one uses the 10 s default)
MARGIN = 3.0  # slack on top of UNLOAD_TIMEOUT for two busy cores
PROMPT: Any = [{"role": "user", "content": "Say something."}]  # Any: the SDKs want TypedDicts
# A response that stays in flight while unread: 512 tokens x 512 probabilities each, ~18 MB.
HUGE = {"prompt": "hi", "n_predict": 100000, "n_probs": 512}


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swapper_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwapperProcess]:
    workdir = tmp_path_factory.mktemp("e2e")
    config = derived_config(workdir / "models.yaml", unloadTimeout=UNLOAD_TIMEOUT)
    with running_swapper(config, workdir / "swapper.log") as stack:
        yield stack


@pytest.fixture
def stack(swapper_proc: SwapperProcess) -> Iterator[SwapperProcess]:
    """The module's swapper, left with nothing loaded after the test."""
    yield swapper_proc
    swapper_proc.unload()
    assert swapper_proc.running() == []
    assert swapper_proc.server_children() == [], swapper_proc.log_tail()


@pytest.fixture
def oai(stack: SwapperProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
def claude(stack: SwapperProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=stack.url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # force_close: every request gets its own connection, so closing a response hangs up for real.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


def chat_text(client: openai.OpenAI, model: str, max_tokens: int = 8) -> tuple[str, str]:
    """(answering model, text) of a deterministic chat completion."""
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0)
    return r.model, r.choices[0].message.content or ""


def pid_of(stack: SwapperProcess, model: str) -> int:
    entry = next(r for r in stack.running() if r["model"] == model)
    assert entry["state"] == "ready" and entry["pid"], entry
    return int(entry["pid"])


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def poll(predicate: Any, within: float, what: str) -> Any:
    """Async ``wait_for``: ``predicate`` is an async callable; returns its first truthy value."""
    deadline = time.monotonic() + within
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


async def drain(resp: aiohttp.ClientResponse) -> tuple[int, bool]:
    """Reads what is left of a response: (bytes, complete). A cut connection is not an error here."""
    n = 0
    try:
        async for chunk in resp.content.iter_any():
            n += len(chunk)
    except aiohttp.ClientPayloadError:
        return n, False
    return n, True


# ---- OpenAI SDK --------------------------------------------------------------------------------


def test_chat_completion_through_an_alias(oai: openai.OpenAI, stack: SwapperProcess) -> None:
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=8, temperature=0)
    assert r.model == "chat-a"  # llama-server's --alias, i.e. the model that really answered
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert stack.states() == {"chat-a": "ready"}


def test_chat_completion_stream(oai: openai.OpenAI, stack: SwapperProcess) -> None:
    stream = oai.chat.completions.create(
        model="chat-b",
        messages=PROMPT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)  # returns only if the stream really ends
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip()
    assert finishes == ["length"]
    assert {c.model for c in chunks} == {"chat-b"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    # Same request, raw: the SSE body ends with the [DONE] sentinel.
    status, raw, headers = stack.request(
        "POST",
        "/v1/chat/completions",
        {"model": "chat-b", "messages": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True},
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert raw.rstrip().endswith(b"data: [DONE]")
    deltas = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"]) == text


def test_legacy_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="chat-b", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.model == "chat-b"
    assert r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 6


def test_embeddings_by_id_and_by_alias(oai: openai.OpenAI) -> None:
    by_id = oai.embeddings.create(model="embed", input=["hello", "another text"])
    by_alias = oai.embeddings.create(model="text-embedding-3-small", input=["hello", "another text"])
    for result in (by_id, by_alias):
        vectors = [d.embedding for d in result.data]
        assert [len(v) for v in vectors] == [64, 64]
        assert all(isinstance(x, float) for x in vectors[0])
        assert vectors[0] != vectors[1]
    assert by_id.data[0].embedding == pytest.approx(by_alias.data[0].embedding)


def test_audio_transcription_multipart(oai: openai.OpenAI, stack: SwapperProcess) -> None:
    # temperature_inc=0 (an extra multipart field, which must reach whisper-server too) turns off
    # whisper's temperature fallback: ~1 s instead of 5-13 s on random weights. The shipped -nf flag
    # does not do that in this whisper-server build (its server ignores no_fallback).
    with WAV.open("rb") as audio:
        result = oai.audio.transcriptions.create(
            model="whisper", file=audio, extra_body={"temperature_inc": "0"}, timeout=120
        )
    assert isinstance(result.text, str) and result.text.strip()
    assert stack.states() == {"whisper": "ready"}


# ---- Anthropic SDK -----------------------------------------------------------------------------


def test_anthropic_messages(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model="chat-b", max_tokens=6, messages=PROMPT)
    assert m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 6
    texts = [b.text for b in m.content if b.type == "text"]
    assert texts and texts[0]


def test_anthropic_messages_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="chat-a", max_tokens=6, messages=PROMPT) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6


# ---- llama-server's own routes -----------------------------------------------------------------


def test_native_completion_and_props(stack: SwapperProcess) -> None:
    body = stack.json("POST", "/completion", {"model": "chat-b", "prompt": "hi", "n_predict": 4})
    assert body["model"] == "chat-b" and body["content"] and body["stop"] is True
    assert body["tokens_predicted"] == 4
    # No model at all: defaultModel (chat-a) answers.
    body = stack.json("POST", "/completion", {"prompt": "hi", "n_predict": 4})
    assert body["model"] == "chat-a" and body["content"]
    # Streamed: llama-server's native stream has no [DONE]; its last event says stop.
    status, raw, _ = stack.request("POST", "/completion", {"prompt": "hi", "n_predict": 4, "stream": True})
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: ")]
    assert status == 200 and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events).strip()
    # GET with ?model= swaps too; /props names the file the server really loaded.
    props = stack.json("GET", "/props?model=chat-b")
    assert Path(props["model_path"]).name == "chat-b.gguf"
    assert stack.states() == {"chat-b": "ready"}


# ---- swapping ----------------------------------------------------------------------------------


def test_swap_a_b_a_serves_from_the_right_model(oai: openai.OpenAI, stack: SwapperProcess) -> None:
    model, text_a = chat_text(oai, "chat-a")
    assert model == "chat-a" and text_a
    assert [(r["model"], r["state"], r["inFlight"]) for r in stack.running()] == [("chat-a", "ready", 0)]
    pid_a = pid_of(stack, "chat-a")
    assert Path(stack.json("GET", "/props?model=chat-a")["model_path"]).name == "chat-a.gguf"

    model, text_b = chat_text(oai, "chat-b")
    assert model == "chat-b"
    assert text_b != text_a  # other weights, same prompt, temperature 0
    assert stack.states() == {"chat-b": "ready"}
    assert gone(pid_a), "chat-a's llama-server survived the swap"
    pid_b = pid_of(stack, "chat-b")
    assert Path(stack.json("GET", "/props?model=chat-b")["model_path"]).name == "chat-b.gguf"

    model, again = chat_text(oai, "chat-a")
    assert (model, again) == ("chat-a", text_a)  # a fresh chat-a process answers the same
    assert stack.states() == {"chat-a": "ready"}
    assert gone(pid_b)


async def test_running_while_a_busy_model_holds_off_a_swap(
    stack: SwapperProcess, http: aiohttp.ClientSession
) -> None:
    url = stack.url
    busy = await http.post(url + "/completion", json={"model": "chat-a", "stream": True, **HUGE})
    assert busy.status == 200
    assert await busy.content.readany()  # streaming; we now stop reading, so it stays in flight
    pid_a = pid_of(stack, "chat-a")

    async def chat_b() -> dict[str, Any]:
        body = {"model": "chat-b", "messages": PROMPT, "max_tokens": 4}
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
            return result

    waiting = asyncio.ensure_future(chat_b())

    async def both_visible() -> dict[str, dict[str, Any]] | None:
        rows = {r["model"]: r for r in (await get_json(http, url + "/running"))["running"]}
        return rows if rows.get("chat-b", {}).get("queued") == 1 else None

    rows = await poll(both_visible, 10, "chat-b to queue behind the busy chat-a")
    assert (rows["chat-a"]["state"], rows["chat-a"]["inFlight"]) == ("ready", 1)
    assert (rows["chat-b"]["state"], rows["chat-b"]["inFlight"]) == ("stopped", 0)
    assert rows["chat-b"]["oldestWaitSeconds"] is not None
    assert not waiting.done()

    busy.close()  # hang up mid-stream: chat-a is released, and the swap goes ahead
    answer = await asyncio.wait_for(waiting, 20)
    assert answer["model"] == "chat-b"
    running = (await get_json(http, url + "/running"))["running"]
    assert [(r["model"], r["state"]) for r in running] == [("chat-b", "ready")]
    assert gone(pid_a)


def test_unload_stops_every_child(oai: openai.OpenAI, stack: SwapperProcess) -> None:
    chat_text(oai, "chat-a", max_tokens=2)
    pid = pid_of(stack, "chat-a")
    assert [p.pid for p in stack.server_children()] == [pid]
    status, raw, _ = stack.request("GET", "/unload")
    assert (status, raw) == (200, b"OK")
    assert stack.running() == []
    assert gone(pid)
    assert stack.server_children() == []
    assert not any(
        "llama-server" in " ".join(p.info["cmdline"] or []) and p.info["ppid"] == stack.proc.pid
        for p in psutil.process_iter(["cmdline", "ppid"])
    )


# ---- connections that end early ----------------------------------------------------------------


async def test_client_disconnect_mid_stream_frees_the_slot(
    stack: SwapperProcess, http: aiohttp.ClientSession
) -> None:
    url = stack.url
    props = await get_json(http, url + "/props?model=chat-a")
    slots = int(props["total_slots"])
    pid = pid_of(stack, "chat-a")
    for _ in range(slots + 2):  # more hang-ups than llama-server has slots
        resp = await http.post(url + "/completion", json={"model": "chat-a", "stream": True, **HUGE})
        assert resp.status == 200
        assert await resp.content.readany()
        resp.close()

    async def released() -> bool:
        rows = (await get_json(http, url + "/running"))["running"]
        if [(r["model"], r["inFlight"]) for r in rows] != [("chat-a", 0)]:
            return False
        states = await get_json(http, url + "/slots?model=chat-a")
        return not any(s["is_processing"] for s in states)

    await poll(released, 10, "swapper and llama-server to release every aborted request")
    body = {"model": "chat-a", "messages": PROMPT, "max_tokens": 4}
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["usage"]["completion_tokens"] == 4
    assert pid_of(stack, "chat-a") == pid  # the same child served it: nothing was restarted


async def test_unload_while_streaming(stack: SwapperProcess, http: aiohttp.ClientSession) -> None:
    url = stack.url
    resp = await http.post(url + "/completion", json={"model": "chat-a", "stream": True, **HUGE})
    assert resp.status == 200 and await resp.content.readany()
    pid = pid_of(stack, "chat-a")
    started = time.monotonic()
    async with http.post(url + "/api/models/unload/chat-a") as unload:
        assert unload.status == 200
    took = time.monotonic() - started
    assert took < UNLOAD_TIMEOUT + MARGIN, f"unload took {took:.2f}s"
    assert gone(pid)
    rest = await asyncio.wait_for(resp.read(), MARGIN)
    # The stream was cut, and the client was told so: a final error event, then a proper end.
    assert b'"code": "model_unloaded"' in rest.rstrip().rsplit(b"\n\n", 1)[-1]
    resp.close()
    assert (await get_json(http, url + "/running"))["running"] == []


async def test_unload_with_a_response_in_flight_escalates_within_the_grace(
    stack: SwapperProcess, http: aiohttp.ClientSession
) -> None:
    """llama-server ignores SIGTERM while a non-streamed response is being written; unload must
    still return within unloadTimeout (then SIGKILL), and leave chat-a able to start again."""
    url = stack.url
    resp = await http.post(url + "/completion", json={"model": "chat-a", **HUGE})
    assert resp.status == 200  # headers are out, ~18 MB of body follow that we do not read
    pid = pid_of(stack, "chat-a")
    started = time.monotonic()
    async with http.get(url + "/unload") as unload:
        assert unload.status == 200
    took = time.monotonic() - started
    assert took < UNLOAD_TIMEOUT + MARGIN, f"unload took {took:.2f}s\n{stack.log_tail()}"
    assert gone(pid)
    _, complete = await asyncio.wait_for(drain(resp), MARGIN)
    assert not complete
    resp.close()
    body = {"model": "chat-a", "messages": PROMPT, "max_tokens": 4}
    async with http.post(url + "/v1/chat/completions", json=body) as again:
        assert again.status == 200 and (await again.json())["model"] == "chat-a"


# ---- swapper killed ----------------------------------------------------------------------------


def test_sigkilled_swapper_leaves_no_children(tmp_path: Path) -> None:
    # A group that keeps both loaded at once (the shipped config swaps one model at a time).
    both = {"both": {"swap": False, "exclusive": True, "members": ["chat-a", "whisper"]}}
    config = derived_config(tmp_path / "models.yaml", groups=both)
    stack = SwapperProcess(config, tmp_path / "swapper.log")
    try:
        model = stack.json(
            "POST", "/v1/chat/completions", {"model": "chat-a", "messages": PROMPT, "max_tokens": 2}
        )["model"]
        assert model == "chat-a"
        # Any request routed to whisper loads it; whisper-server has no /props, hence the 404.
        assert stack.request("GET", "/props?model=whisper")[0] == 404
        assert stack.states() == {"chat-a": "ready", "whisper": "ready"}
        children = stack.server_children()
        assert len(children) == 2
    finally:
        stack.kill()
    wait_for(lambda: all(gone(p.pid) for p in children), 5, "children of a SIGKILLed swapper to die")
