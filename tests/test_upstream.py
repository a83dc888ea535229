"""/upstream/<model>/<path> passthrough, real fake upstreams."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from swapper.app.server import make_app
from swapper.config.schema import DEFAULT_UPSTREAM_IGNORE_PATHS
from swapper.core.states import State
from swapper.web.upstream import PathResolver
from tests.ops_helpers import ops_config, runloop
from tests.test_metrics import scrape, settled, value

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def raw(path: str) -> URL:
    """A request URL used byte for byte: no re-quoting of %2F and friends by the client."""
    return URL(path, encoded=True)


# ---- the resolver, pure ----

RESOLVER = PathResolver(
    {"m1": "m1", "author": "author", "author/model": "author/model", "alias": "m1", "a/b/c": "a/b/c"},
    DEFAULT_UPSTREAM_IGNORE_PATHS,
)


@pytest.mark.parametrize(
    ("raw_rest", "expected"),
    [
        ("m1", ("m1", "m1", "")),
        ("m1/", ("m1", "m1", "/")),
        ("m1/v1/models?x", ("m1", "m1", "/v1/models?x")),
        ("alias/x", ("m1", "alias", "/x")),
        ("author/x", ("author", "author", "/x")),
        ("author/model/x/y", ("author/model", "author/model", "/x/y")),  # longest wins
        ("author/model", ("author/model", "author/model", "")),
        ("author%2Fmodel/x%2Fy", ("author/model", "author%2Fmodel", "/x%2Fy")),
        ("a/b/c/d", ("a/b/c", "a/b/c", "/d")),
        ("a/b/x", None),
        ("m2/x", None),
        ("", None),
    ],
)
def test_resolver_split(raw_rest: str, expected: tuple[str, str, str] | None) -> None:
    assert RESOLVER.split(raw_rest) == expected


@pytest.mark.parametrize(
    ("rest", "ignored"),
    [
        ("/app.js", True),
        ("/static/x.CSS", False),
        ("/favicon.ico", True),
        ("/", False),
        ("/v1/models", False),
    ],
)
def test_resolver_ignored(rest: str, ignored: bool) -> None:
    assert RESOLVER.ignored(rest) is ignored


def test_resolver_with_no_models() -> None:
    assert PathResolver({}).split("x/y") is None


# ---- end to end ----


@pytest.mark.parametrize(
    ("method", "status"), [("GET", 301), ("HEAD", 301), ("POST", 308), ("PUT", 308), ("DELETE", 308)]
)
async def test_model_without_slash_redirects(aiohttp_client: ClientFactory, method: str, status: int) -> None:
    client = await aiohttp_client(make_app(ops_config({"m1": "", "author/model": ""})))
    resp = await client.request(method, raw("/upstream/m1?a=1&b=%2F"), allow_redirects=False)
    assert resp.status == status
    assert resp.headers["Location"] == "/upstream/m1/?a=1&b=%2F"
    resp = await client.request(method, raw("/upstream/author%2Fmodel"), allow_redirects=False)
    assert resp.status == status
    assert resp.headers["Location"] == "/upstream/author%2Fmodel/"
    assert runloop(client).state("m1") is State.STOPPED


async def test_ignored_path_of_stopped_model_is_409_and_loads_nothing(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m1": ""})))
    resp = await client.get("/upstream/m1/assets/app.js")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["message"] == "model m1 is not loaded; path matches upstream.ignorePaths"
    await runloop(client).wait_idle()
    snap = runloop(client).snapshot()["m1"]
    assert snap.status.state is State.STOPPED and snap.pid is None
    # Once loaded by a non-ignored path, the same asset is served.
    root = await client.get("/upstream/m1/")
    assert root.status == 200
    assert (await root.json())["path"] == "/"
    asset = await client.get("/upstream/m1/assets/app.js")
    assert asset.status == 200
    assert (await asset.json())["path"] == "/assets/app.js"


async def test_custom_ignore_paths(aiohttp_client: ClientFactory) -> None:
    cfg = ops_config({"m1": ""}, "upstream:\n  ignorePaths: ['^/slots']")
    client = await aiohttp_client(make_app(cfg))
    assert (await client.get("/upstream/m1/slots")).status == 409
    assert runloop(client).state("m1") is State.STOPPED
    resp = await client.get("/upstream/m1/app.js")  # the default pattern no longer applies
    assert resp.status == 200


async def test_plain_get_loads_the_model_and_strips_the_prefix(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"author/model": "", "author": ""})))
    resp = await client.get(raw("/upstream/author/model/files/a%2Fb%20c?q=1%2F2&r"))
    assert resp.status == 200, await resp.text()
    echo = await resp.json()
    assert echo["model_name"] == "author/model"  # the longest name wins over "author"
    assert echo["method"] == "GET"
    assert echo["raw_path"] == "/files/a%2Fb%20c?q=1%2F2&r"  # the client's encoding, untouched
    assert runloop(client).state("author/model") is State.READY
    assert runloop(client).state("author") is State.STOPPED


async def test_encoded_model_name_and_upstream_json_route(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"author/model": ""})))
    resp = await client.get(raw("/upstream/author%2Fmodel/v1/models"))
    assert resp.status == 200
    body = await resp.json()
    assert body["data"][0]["id"] == "author/model"  # the fake's own /v1/models


async def test_post_body_and_alias_pass_through_unshaped(aiohttp_client: ClientFactory) -> None:
    cfg = ops_config(
        {"m1": ""},
        m1="aliases: [fast]\nuseModelName: openai/x\nfilters:\n  stripParams: temperature",
    )
    client = await aiohttp_client(make_app(cfg))
    payload = b'{"model": "whatever", "temperature": 0.5}'
    resp = await client.post(
        "/upstream/fast/v1/anything", data=payload, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    echo = await resp.json()
    assert echo["model_name"] == "m1"
    assert echo["method"] == "POST"
    assert echo["path"] == "/v1/anything"
    assert base64.b64decode(echo["body_b64"]) == payload  # no useModelName, no filters


async def test_upstream_chat_streams(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m1": ""})))
    resp = await client.post(
        "/upstream/m1/v1/chat/completions", json={"stream": True, "max_tokens": 3, "messages": []}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert (await resp.read()).rstrip().endswith(b"data: [DONE]")


async def test_unknown_model_is_404(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m1": ""})))
    resp = await client.get("/upstream/nope/x")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"
    resp = await client.post("/upstream/")
    assert resp.status == 404


@pytest.mark.parametrize("path", ["/upstream", "/upstream/"])
async def test_upstream_index_redirects_to_the_model_list(aiohttp_client: ClientFactory, path: str) -> None:
    client = await aiohttp_client(make_app(ops_config({"m1": ""})))
    resp = await client.get(path, allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == "/v1/models"
    followed = await client.get(path)
    assert (await followed.json())["object"] == "list"
    # A browser goes to the web UI's model page, as llama-swap sends it to its own.
    resp = await client.get(path, headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/#/models"


async def test_load_failure_is_reported(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m1": "--exit-during-load"})))
    resp = await client.get("/upstream/m1/")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "model_load_failed"


async def test_passthrough_requests_are_tracked_like_model_requests(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m1": ""})))
    assert (await client.get("/upstream/m1/props")).status == 200
    assert (await client.post("/upstream/m1/v1/chat/completions", json={"max_tokens": 2})).status == 200
    await settled(client)
    samples = await scrape(client)
    route = "/upstream/{rest}"  # the route's template: bounded, whatever the paths
    assert value(samples, "swapper_requests_total", model="m1", route=route, status="2xx") == 2
    assert value(samples, "swapper_queue_wait_seconds_count", model="m1") == 2
    assert value(samples, "swapper_ttfb_seconds_count", model="m1") == 2


async def test_passthrough_to_a_deaf_child_restarts_it_instead_of_502(aiohttp_client: ClientFactory) -> None:
    # After one answer the child closes its listener but stays alive, counted ready: the next
    # request is refused before anything was sent, so it is retried on a restarted child.
    client = await aiohttp_client(make_app(ops_config({"m1": "--deaf-after 1"})))
    assert (await client.get("/upstream/m1/props")).status == 200
    first = runloop(client).snapshot()["m1"].pid
    resp = await client.get("/upstream/m1/props")
    assert resp.status == 200, await resp.text()
    assert runloop(client).snapshot()["m1"].pid not in (None, first)
    await settled(client)
    assert runloop(client).snapshot()["m1"].status.in_flight == 0
