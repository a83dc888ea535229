"""Kind routes (``routes:``): a path names its model, as a GPU broker's ``/v1/tts`` does (issue 21).

Real-process tests: swapper in-process, fake upstream children (``tests/upstreams``), whose echo
route answers with the method, path, query and body it received. Requests on a route's path name
no model; they go through the same scheduler, limits and metrics as any model request.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from aiohttp import FormData

from swapper.config.kindroutes import KindRoute, KindRoutes, parse_routes
from swapper.config.load import parse_config
from swapper.config.schema import ConfigError
from swapper.core.states import State
from tests.test_swapping import ClientFactory, client_for, fake_config, pid_of, runloop, wait_until

ROUTES = """
routes:
  /v1/tts: {model: kokoro, path: /v1/audio/speech}
  /v1/stt: {model: whisper, path: /v1/audio/transcriptions}
  /v1/llm: {model: qwen-alias, path: /v1/chat/completions}
  /v1/ping: {model: kokoro, path: /ping, method: POST}
  /audio/: {model: kokoro, prefix: true}
  /v1/audio/speech: whisper
"""


def broker_like(**per_model: str) -> Any:
    return fake_config(
        {"kokoro": "", "whisper": "", "qwen": ""}, extra=ROUTES, qwen="aliases: [qwen-alias]", **per_model
    )


async def test_a_route_needs_no_model_and_goes_upstream_on_its_path(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, broker_like())
    resp = await client.post("/v1/tts?voice=af", json={"input": "hello", "voice": "af"})
    assert resp.status == 200, await resp.text()
    echo = await resp.json()
    assert echo["model_name"] == "kokoro"
    assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/v1/audio/speech", "voice=af")
    assert base64.b64decode(echo["body_b64"]) == b'{"input": "hello", "voice": "af"}'
    # An alias names the route's model; the chat shape comes back from the right child.
    chat = await client.post(
        "/v1/llm", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert chat.status == 200 and (await chat.json())["model"] == "qwen"


def wav_form() -> FormData:
    form = FormData()
    form.add_field("file", b"RIFF" + bytes(range(256)) * 8, filename="a.wav")
    return form


async def test_multipart_upload_on_a_route(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, broker_like())
    resp = await client.post("/v1/stt", data=wav_form())
    assert resp.status == 200, await resp.text()
    assert "whisper" in (await resp.json())["text"]


async def test_prefix_route_passes_the_rest_of_the_path(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, broker_like())
    resp = await client.get("/audio/2024/out%20put.wav?dl=1")
    assert resp.status == 200, await resp.text()
    echo = await resp.json()
    assert echo["model_name"] == "kokoro"
    assert echo["method"] == "GET"
    assert echo["raw_path"] == "/audio/2024/out%20put.wav?dl=1"
    bare = await (await client.get("/audio")).json()
    assert bare["path"] == "/audio"
    # A sibling path that only shares the prefix's letters is not under the route.
    assert (await client.get("/audiobooks/x")).status == 404


async def test_route_method_overrides_the_requests(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, broker_like())
    echo = await (await client.get("/v1/ping")).json()
    assert (echo["method"], echo["path"]) == ("POST", "/ping")


async def test_route_over_an_inference_path_wins_over_the_body(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, broker_like())
    for _ in range(2):  # the front door hands it to aiohttp, keep-alive or not
        resp = await client.post("/v1/audio/speech", json={"model": "kokoro", "input": "x"})
        assert resp.status == 200
        assert (await resp.json())["model_name"] == "whisper"


async def test_routes_share_the_scheduler_swaps_and_metrics(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, broker_like())
    assert (await client.post("/v1/tts", json={"input": "a"})).status == 200
    kokoro = pid_of(client, "kokoro")
    assert kokoro is not None
    # The default planner runs one model at a time: the STT route swaps the TTS child out.
    assert (await client.post("/v1/stt", data=wav_form())).status == 200
    assert runloop(client).state("kokoro") is State.STOPPED
    running = await (await client.get("/running")).json()
    assert [r["model"] for r in running["running"]] == ["whisper"]
    metrics = await (await client.get("/metrics")).text()
    assert 'swapper_requests_total{model="kokoro",route="/v1/tts",status="2xx"} 1.0' in metrics
    assert 'swapper_requests_total{model="whisper",route="/v1/stt",status="2xx"} 1.0' in metrics


async def test_routes_obey_the_models_concurrency_limit(aiohttp_client: ClientFactory) -> None:
    cfg = fake_config(
        {"kokoro": "--load-delay 0.5"}, extra="routes:\n  /v1/tts: kokoro", kokoro="concurrencyLimit: 1"
    )
    client = await client_for(aiohttp_client, cfg)
    first = asyncio.ensure_future(client.post("/v1/tts", json={"input": "a"}))
    await wait_until(lambda: runloop(client).snapshot()["kokoro"].status.queued == 1)
    resp = await client.post("/v1/tts", json={"input": "b"})
    assert resp.status == 429
    assert (await resp.json())["error"]["retryable"] is True
    assert (await first).status == 200


async def test_a_body_swapper_cannot_read_goes_through_verbatim(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, broker_like())
    raw = b"{not json at all"
    resp = await client.post("/v1/tts", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert base64.b64decode((await resp.json())["body_b64"]) == raw


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ("/v1/tts: {model: nope}", "unknown model 'nope'"),
        ("/v1/tts: {path: /x}", "model: is required"),
        ("/v1/models: a", "swapper's own paths"),
        ("/v1: {model: a, prefix: true}", "swapper's own paths"),
        ("/api/x: a", "swapper's own paths"),
        ("/v1/tts: {model: a, method: FETCH}", "method: must be one of"),
        ("/v1/tts: {model: a, prefix: yes}", "prefix: must be true or false"),
        ("/v1/tts: {model: a, colour: red}", "unknown key 'colour'"),
        ("v1/tts: a", "must be a path starting with '/'"),
        ("/v1/t%20s: a", "must be a path starting with '/'"),
        ("/: {model: a, prefix: true}", "cannot take every path"),
    ],
)
def test_bad_routes_are_config_errors(routes: str, message: str) -> None:
    model = "models:\n  a:\n    cmd: x --port ${PORT}\n    proxy: http://127.0.0.1:${PORT}\n"
    text = f"{model}routes:\n  {routes}\n"
    with pytest.raises(ConfigError, match="routes") as info:
        parse_config(text)
    assert message in str(info.value)


def test_prefix_routes_match_longest_first_at_segment_boundaries() -> None:
    routes = parse_routes(
        {"/a/": {"model": "m1", "prefix": True}, "/a/b": {"model": "m2", "prefix": True}, "/a/b/c": "m3"},
        lambda name: name,
    )
    assert isinstance(routes, KindRoutes) and len(routes) == 3

    def model_of(path: str) -> str | None:
        route = routes.match(path)
        return None if route is None else route.model

    assert [model_of(p) for p in ("/a", "/a/x", "/a/b", "/a/b/x", "/a/b/c", "/ab", "/b")] == [
        "m1",
        "m1",
        "m2",
        "m2",
        "m3",
        None,
        None,
    ]
    assert KindRoute("/audio", "k", "/files/", None, True).target("/audio/x.wav", "q=1") == "/files/x.wav?q=1"
    assert KindRoute("/audio", "k", "/files", None, True).target("/audio", "") == "/files"
    assert not parse_routes(None, lambda name: name)
