"""A client cannot tell swapper from the llama-server behind it: the same calls, once against a real
llama-server directly and once through a one-model swapper running the same command, compared.

Each side is its own llama-server process with the same binary, model and flags, so deterministic
calls (``temperature: 0``) give the same text. What is compared: status, the JSON fields (their
names, and the values a client reads), the headers a client reads. Differences that are
swapper's on purpose are asserted as such, each with its reason:

* a CORS preflight's ``Allow-Headers`` names the requested headers (llama-server: ``*``, which a
  browser sending credentials reads as a header name) and ``Allow-Methods`` lists more methods;
* ``/v1/models``: ``aliases`` are swapper's names for the model; swapper adds ``status``,
  ``meta.swapper``; ``owned_by`` is ``swapper``;
* ``/metrics`` adds swapper's families and a ``model`` label to the child's.

Skipped when the demo upstreams are not set up (``python -m swapper.demo setup``).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.realstack import (
    DEMO_DIR,
    LlamaServer,
    SwapperProcess,
    demo_missing,
    free_port_block,
    running_swapper,
    wait_for,
)

MISSING = demo_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

LLAMA = str(DEMO_DIR / "bin" / "llama-server")
COMMON = ["-t", "1", "-c", "512", "-n", "64", "--no-warmup"]
CHAT_ARGS = [*COMMON, "-m", str(DEMO_DIR / "models" / "chat-a.gguf"), "--alias", "chat-a", "--metrics"]
EMBED_ARGS = [*COMMON, "-m", str(DEMO_DIR / "models" / "embed.gguf"), "--embedding", "--pooling", "mean"]
PROMPT: Any = [{"role": "user", "content": "Say something."}]  # Any: the SDKs want TypedDicts


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    """One request on its own connection (no proxy from the environment can step in)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@dataclass
class Pair:
    """A llama-server run directly, and a swapper with one model running the same command."""

    direct: str
    swapper: SwapperProcess

    @property
    def sides(self) -> tuple[str, str]:
        return self.direct, self.swapper.url

    def both(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> list[Reply]:
        return [call(url, method, path, body, headers) for url in self.sides]


def running_pair(tmp: Path, name: str, args: list[str]) -> Iterator[Pair]:
    """The two sides; the swapper side is left with its model unloaded after each test."""
    direct = LlamaServer([LLAMA, *args], tmp / f"{name}-direct.log")
    try:
        argv = " ".join([LLAMA, "--host", "127.0.0.1", "--port", "${PORT}", *args])
        config = tmp / f"{name}.yaml"
        config.write_text(
            f"startPort: {free_port_block(2)}\nhealthCheckTimeout: 60\nmodels:\n  m:\n    cmd: {argv}\n"
        )
        with running_swapper(config, tmp / f"{name}-swapper.log") as swapper:
            yield Pair(direct.url, swapper)
    finally:
        direct.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """swapper's cache (model-info.json) in a temporary directory, for the swappers started here."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWAPPER_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("compare-chat")
    (tmp / "slots").mkdir()
    yield from running_pair(tmp, "chat", [*CHAT_ARGS, "--slot-save-path", str(tmp / "slots")])


@pytest.fixture(scope="module")
def embed_pair(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Iterator[Pair]:
    yield from running_pair(tmp_path_factory.mktemp("compare-embed"), "embed", EMBED_ARGS)


@pytest.fixture
def chat(chat_pair: Pair) -> Iterator[Pair]:
    yield chat_pair
    chat_pair.swapper.unload()  # no child outlives the test (the leak check)


@pytest.fixture
def embed(embed_pair: Pair) -> Iterator[Pair]:
    yield embed_pair
    embed_pair.swapper.unload()


def openai_clients(pair: Pair) -> list[openai.OpenAI]:
    return [
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) for url in pair.sides
    ]


# ---- the SDKs, with model names llama-server ignores ----


@pytest.mark.parametrize("name", ["gpt-3.5-turbo", "test", "chat-a"])
def test_openai_chat_with_any_model_name(chat: Pair, name: str) -> None:
    direct, swapped = (
        c.chat.completions.create(model=name, messages=PROMPT, max_tokens=8, temperature=0)
        for c in openai_clients(chat)
    )
    assert swapped.choices[0].message.content == direct.choices[0].message.content
    assert swapped.model == direct.model
    assert swapped.usage is not None and direct.usage is not None  # cached tokens differ: the direct
    # server is warm, the swapper's child starts fresh for each test
    assert (swapped.usage.prompt_tokens, swapped.usage.completion_tokens) == (
        direct.usage.prompt_tokens,
        direct.usage.completion_tokens,
    )
    assert swapped.model_dump().keys() == direct.model_dump().keys()
    assert swapped.choices[0].model_dump().keys() == direct.choices[0].model_dump().keys()


def test_openai_chat_stream(chat: Pair) -> None:
    texts = []
    for client in openai_clients(chat):
        stream = client.chat.completions.create(
            model="gpt-4o", messages=PROMPT, max_tokens=8, temperature=0, stream=True
        )
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert texts[0] and texts[1] == texts[0]


def test_openai_legacy_completions(chat: Pair) -> None:
    direct, swapped = (
        c.completions.create(model="davinci-002", prompt="Once", max_tokens=6, temperature=0)
        for c in openai_clients(chat)
    )
    assert swapped.choices[0].text == direct.choices[0].text
    assert swapped.model_dump().keys() == direct.model_dump().keys()


def test_anthropic_messages(chat: Pair) -> None:
    replies = []
    for url in chat.sides:
        with anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
            replies.append(
                client.messages.create(
                    model="claude-3-5-haiku-latest",
                    max_tokens=8,
                    messages=PROMPT,
                    extra_body={"temperature": 0},
                )
            )
    direct, swapped = replies
    assert swapped.content == direct.content and swapped.stop_reason == direct.stop_reason
    assert swapped.model == direct.model and swapped.model_dump().keys() == direct.model_dump().keys()


def test_embeddings_with_any_model_name(embed: Pair) -> None:
    direct, swapped = (
        c.embeddings.create(model="text-embedding-3-small", input="hello") for c in openai_clients(embed)
    )
    assert len(swapped.data[0].embedding) == len(direct.data[0].embedding) > 0
    assert swapped.data[0].embedding == pytest.approx(direct.data[0].embedding, abs=1e-6)
    assert swapped.model_dump().keys() == direct.model_dump().keys()


# ---- raw routes ----


def test_headers_a_client_reads(chat: Pair) -> None:
    body = {"model": "x", "messages": PROMPT, "max_tokens": 2}
    direct, swapped = chat.both("POST", "/v1/chat/completions", body, {"Origin": "http://ui.example"})
    assert (swapped.status, swapped.headers["content-type"]) == (
        direct.status,
        direct.headers["content-type"],
    )
    assert swapped.headers["access-control-allow-origin"] == direct.headers["access-control-allow-origin"]
    direct, swapped = chat.both("POST", "/v1/chat/completions", {**body, "stream": True})
    assert swapped.headers["content-type"] == direct.headers["content-type"] == "text/event-stream"
    assert swapped.body.endswith(b"data: [DONE]\n\n") and direct.body.endswith(b"data: [DONE]\n\n")


def test_model_lists(chat: Pair) -> None:
    call(chat.swapper.url, "POST", "/completion", {"prompt": "hi", "n_predict": 1})  # loads it: learned

    def learned() -> Any:
        doc = call(chat.swapper.url, "GET", "/v1/models").json()
        return doc if "n_ctx_train" in doc["data"][0]["meta"] else None

    swapped = wait_for(learned, 30, "swapper to learn the model's facts")
    for path in ("/v1/models", "/models"):
        direct = call(chat.direct, "GET", path).json()
        assert direct.keys() <= swapped.keys()
        assert direct["data"][0].keys() <= swapped["data"][0].keys()
        theirs, ours = direct["data"][0]["meta"], swapped["data"][0]["meta"]
        assert {k: ours[k] for k in theirs} == theirs  # n_ctx, n_ctx_train, n_vocab, n_params, size...
        assert "swapper" in ours and swapped["data"][0]["status"] == {"value": "loaded"}
        assert swapped["data"][0]["id"] == "m" and swapped["data"][0]["aliases"] == []  # swapper's names
        assert direct["models"][0].keys() <= swapped["models"][0].keys()
        assert swapped["models"][0]["capabilities"] == direct["models"][0]["capabilities"]


def test_cors_preflight(chat: Pair) -> None:
    asked = {
        "Origin": "http://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization",
    }
    direct, swapped = chat.both("OPTIONS", "/v1/chat/completions", headers=asked)
    assert swapped.status == direct.status == 200
    for name in ("access-control-allow-origin", "access-control-allow-credentials"):
        assert swapped.headers[name] == direct.headers[name], name
    assert direct.headers["access-control-allow-headers"] == "*"
    assert swapped.headers["access-control-allow-headers"] == "content-type, authorization"  # see the doc
    for method in direct.headers["access-control-allow-methods"].split(", "):
        assert method in swapped.headers["access-control-allow-methods"]


def test_slot_actions(chat: Pair) -> None:
    call(chat.swapper.url, "POST", "/completion", {"prompt": "hi", "n_predict": 2, "id_slot": 0})
    call(chat.direct, "POST", "/completion", {"prompt": "hi", "n_predict": 2, "id_slot": 0})
    for action in ("save", "restore", "erase"):
        direct, swapped = chat.both("POST", f"/slots/0?action={action}", {"filename": "s.bin"})
        assert swapped.status == direct.status == 200, (action, swapped.body)
        theirs, ours = direct.json(), swapped.json()
        assert ours.keys() == theirs.keys()
        assert {
            k: ours[k] for k in ("id_slot", "filename", "n_saved", "n_restored", "n_erased") if k in ours
        } == {
            k: theirs[k] for k in ("id_slot", "filename", "n_saved", "n_restored", "n_erased") if k in theirs
        }
    direct, swapped = chat.both("POST", "/slots/0?action=nope", {})
    assert swapped.status == direct.status and swapped.json() == direct.json()
    direct, swapped = chat.both("GET", "/slots")
    assert swapped.status == direct.status == 200
    # A used slot lists its last task too; the direct server has served more: compare what all have.
    assert [(s["id"], s["n_ctx"]) for s in swapped.json()] == [(s["id"], s["n_ctx"]) for s in direct.json()]


def test_props(chat: Pair) -> None:
    direct, swapped = chat.both("GET", "/props")
    assert swapped.status == direct.status == 200
    assert swapped.json().keys() == direct.json().keys()
    assert (
        swapped.json()["default_generation_settings"]["n_ctx"]
        == direct.json()["default_generation_settings"]["n_ctx"]
    )
    direct, swapped = chat.both("POST", "/props", {})  # not started with --props: refused alike
    assert (swapped.status, swapped.json()) == (direct.status, direct.json())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"content": "hello world", "with_pieces": True}),
        ("/detokenize", {"tokens": [10, 20, 30]}),
        ("/apply-template", {"messages": PROMPT}),
        ("/v1/messages/count_tokens", {"model": "claude", "messages": PROMPT}),
    ],
)
def test_same_answers(chat: Pair, path: str, body: Any) -> None:
    direct, swapped = chat.both("POST", path, body)
    assert swapped.status == direct.status == 200
    assert swapped.json() == direct.json()


def test_unknown_route_is_a_404_on_both(chat: Pair) -> None:
    direct, swapped = chat.both("GET", "/no/such/route")
    assert swapped.status == direct.status == 404


def test_metrics(chat: Pair) -> None:
    call(chat.swapper.url, "POST", "/completion", {"prompt": "hi", "n_predict": 2})
    call(chat.direct, "POST", "/completion", {"prompt": "hi", "n_predict": 2})

    def families(text: bytes) -> dict[str, list[Any]]:
        return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}

    direct = families(call(chat.direct, "GET", "/metrics").body)
    merged = families(call(chat.swapper.url, "GET", "/metrics").body)
    assert direct and all(name.startswith("llamacpp:") for name in direct)
    for name, samples in direct.items():
        assert [s.labels for s in merged[name]] == [{**s.labels, "model": "m"} for s in samples], name
    assert "swapper_requests" in merged and "swapper_child_scrape_errors" in merged
    own = families(call(chat.swapper.url, "GET", "/metrics?model=m").body)  # the child's own
    assert own.keys() == direct.keys()


def test_concurrent_clients_are_served_not_refused(chat: Pair) -> None:
    """llama-swap's default concurrencyLimit (10) refused the 11th; llama-server queues it."""
    body = {"prompt": "hi", "n_predict": 2}
    for url in chat.sides:
        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(lambda u: call(u, "POST", "/completion", body).status, [url] * 24))
        assert statuses == [200] * 24, url
