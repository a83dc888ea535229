"""The web UI's routes without a browser: its files, ``GET /`` for browsers, the key, and the
API the pages use beside llama-swap's (load a model, the planner). The pages themselves are
driven in a real browser by ``test_ui_browser.py``."""

from __future__ import annotations

from swapper.core.states import State
from swapper.web.ui import load_files
from tests.test_swapping import ClientFactory, client_for, fake_config, runloop

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # a browser's


async def test_a_browser_asking_for_root_is_sent_to_the_ui(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    r = await client.get("/", headers=HTML, allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/ui/"
    r = await client.get("/ui", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/ui/"
    # Anything else is not a browser: a page naming the models, never a 404 (llama-server
    # answers / with HTML whatever is asked).
    r = await client.get("/", headers={"Accept": "application/json"}, allow_redirects=False)
    assert r.status == 200 and r.content_type == "text/html"
    assert '<a href="/upstream/a/">a</a>' in await r.text()


async def test_the_ui_files_come_from_the_package(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}))
    files = load_files()
    assert {"index.html", "app.js", "core.js", "style.css"} <= set(files)
    r = await client.get("/ui/")
    assert r.status == 200 and r.content_type == "text/html"
    index = await r.text()
    assert '<script type="module" src="app.js">' in index
    assert "http://" not in index and "https://" not in index  # nothing fetched from elsewhere
    for name, found in files.items():
        r = await client.get("/ui/" + name)
        assert r.status == 200 and await r.read() == found.body, name
        if name.endswith(".js"):
            assert r.content_type == "text/javascript"
            text = found.body.decode()
            assert "http://" not in text and "https://" not in text, name
    # Revalidation: the same file answers 304 to its ETag.
    etag = (await client.get("/ui/app.js")).headers["ETag"]
    assert (await client.get("/ui/app.js", headers={"If-None-Match": etag})).status == 304
    # A page's own path (a bookmark) is the app; a missing file is a 404.
    assert await (await client.get("/ui/models")).text() == index
    r = await client.get("/ui/missing.js")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_with_api_keys_the_ui_loads_but_its_data_needs_the_key(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": ""}, "apiKeys: [sekret]"))
    assert (await client.get("/ui/")).status == 200
    assert (await client.get("/ui/app.js")).status == 200
    r = await client.get("/", headers=HTML, allow_redirects=False)
    assert r.status == 302
    assert (await client.get("/", allow_redirects=False)).status == 401  # not a browser: keyed as before
    for path in ("/api/metrics", "/api/version", "/api/events", "/api/routing", "/v1/status"):
        assert (await client.get(path)).status == 401, path
    r = await client.get("/api/metrics", headers={"Authorization": "Bearer sekret"})
    assert r.status == 200 and await r.json() == []
    assert (await client.post("/api/models/load/a")).status == 401
    # A page's script gets its 401 without the Basic challenge that would make the browser stop
    # the request for a login prompt; other clients keep the challenge.
    assert (await client.get("/api/metrics")).headers["WWW-Authenticate"] == 'Basic realm="swapper"'
    r = await client.get("/api/metrics", headers={"X-Requested-With": "XMLHttpRequest"})
    assert r.status == 401 and "WWW-Authenticate" not in r.headers


async def test_load_starts_a_model_and_answers_once_it_is_ready(aiohttp_client: ClientFactory) -> None:
    config = fake_config({"a": "--load-delay 0.3", "b": ""}, **{"a": "aliases: [alpha]"})
    client = await client_for(aiohttp_client, config)
    r = await client.post("/api/models/load/alpha")
    assert r.status == 200 and await r.json() == {"msg": "ok", "model": "a"}
    loop = runloop(client)
    assert loop.state("a") is State.READY and loop.snapshot()["a"].status.in_flight == 0
    r = await client.post("/api/models/load/b")  # b's group swaps a out, as a request would
    assert r.status == 200 and loop.state("b") is State.READY and loop.state("a") is State.STOPPED
    r = await client.post("/api/models/load/ghost")
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


async def test_a_load_that_fails_says_why(aiohttp_client: ClientFactory) -> None:
    client = await client_for(aiohttp_client, fake_config({"a": "--exit-during-load"}))
    r = await client.post("/api/models/load/a")
    assert r.status == 502
    error = (await r.json())["error"]
    assert error["code"] == "model_load_failed" and "exited with code 1 while loading" in error["message"]


async def test_routing_names_the_planner_and_its_groups(aiohttp_client: ClientFactory) -> None:
    extra = "groups:\n  pair:\n    swap: false\n    members: [a, b]"
    client = await client_for(aiohttp_client, fake_config({"a": "", "b": "", "c": ""}, extra))
    body = await (await client.get("/api/routing")).json()
    assert body["use"] == "group"
    groups = {g["name"]: g for g in body["groups"]}
    assert groups["pair"]["members"] == ["a", "b"] and groups["pair"]["swap"] is False
    assert groups["(default)"]["members"] == ["c"]
