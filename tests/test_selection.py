"""Profiles and selectors: which model a requested name means (pure tests of ``Selection``), then
the same through HTTP with real children: llama-swap's profile routes, pins applied before
aliases, a warm selector following what is loaded, and the records ``/v1/models`` lists.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from swapper.config.load import parse_config
from swapper.config.schema import Config, PeerModel
from swapper.core.errors import ModelNotFound
from swapper.core.selection import NoTarget, Selection
from swapper.core.states import State
from tests.test_swapping import ClientFactory, chat, client_for, fake_config, runloop

S = State
BASE = """
models:
  a: {cmd: 'srv ${PORT}', aliases: [alpha]}
  b: {cmd: 'srv ${PORT}'}
  c: {cmd: 'srv ${PORT}'}
groups:
  g: {swap: false, exclusive: false, members: [a, b, c]}
peers:
  far: {proxy: 'http://10.0.0.9:8080', models: [x, a]}
selectors:
  pinned: {strategy: pin, targets: [b, a]}
  warmest: {strategy: warm, targets: [a, b, c]}
  spill: {strategy: spillover, targets: [a, b, far/x], settings: {spillover: 2}}
profiles:
  coding: {pins: {alpha: c, gone: ~, cloud: far/x, auto: warmest}}
"""


@pytest.fixture
def config() -> Config:
    return parse_config(BASE)


def test_local_names_win_over_bare_peer_names(config: Config) -> None:
    sel = Selection()
    assert sel.choose("a", config, {}).local == "a"  # peer far also lists "a"
    assert sel.choose("far/a", config, {}).peer == PeerModel("far", "a")
    assert sel.choose("x", config, {}).peer == PeerModel("far", "x")
    with pytest.raises(ModelNotFound):
        sel.choose("nothing", config, {})


def test_pin_is_always_the_first_target(config: Config) -> None:
    choice = Selection().choose("pinned", config, {"a": S.READY})
    assert (choice.name, choice.local, choice.selector) == ("b", "b", "pinned")


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({}, "a"),  # nothing loaded: the first target, cold
        ({"c": S.READY}, "c"),
        ({"b": S.STARTING, "c": S.READY}, "c"),  # ready beats starting
        ({"b": S.STARTING}, "b"),
        ({"a": S.STOPPING, "b": S.STOPPING}, "a"),
    ],
)
def test_warm_prefers_loaded_then_loading(config: Config, states: dict[str, State], expected: str) -> None:
    assert Selection().choose("warmest", config, states).local == expected


def test_spillover_fills_each_active_target_before_starting_the_next(config: Config) -> None:
    sel = Selection()
    states: dict[str, State] = {}
    picks = []
    for _ in range(3):
        choice = sel.choose("spill", config, states)
        picks.append(choice)
        states.setdefault(choice.local or "", S.STARTING)  # the pick is loading now
    # a cold: reserve it; a active with 1 < 2: a again; a full (2): the next cold target, b.
    assert [c.name for c in picks] == ["a", "a", "b"]
    assert sel.reservations("spill") == {"a": 2, "b": 1}
    fourth = sel.choose("spill", config, states)  # both active: the least busy, b
    assert fourth.name == "b"
    fifth = sel.choose("spill", config, states)  # a and b full at 2: the peer, cold
    assert fifth.peer == PeerModel("far", "x")
    for choice in (*picks, fourth, fifth):
        choice.release()
        choice.release()  # idempotent
    assert sel.reservations("spill") == {}


def test_spillover_skips_stopping_targets_and_says_when_none_is_left() -> None:
    config = parse_config(BASE.replace("[a, b, far/x]", "[a, b]"))
    sel = Selection()
    assert sel.choose("spill", config, {"a": S.STOPPING}).name == "b"
    with pytest.raises(NoTarget) as err:
        sel.choose("spill", config, {"a": S.STOPPING, "b": S.STOPPING})
    assert err.value.status == 503 and "no available spillover targets" in err.value.message


def test_profile_pins_apply_before_aliases_and_selectors(config: Config) -> None:
    sel = Selection()
    assert sel.choose("alpha", config, {}).local == "a"
    sel.active = "coding"
    assert sel.wants_choice("alpha", config) and not sel.wants_choice("b", config)
    assert sel.choose("alpha", config, {}).local == "c"  # the pin, not the alias
    assert sel.choose("cloud", config, {}).peer == PeerModel("far", "x")
    auto = sel.choose("auto", config, {"b": S.READY})  # a pin to a selector
    assert (auto.local, auto.selector) == ("b", "warmest")
    with pytest.raises(ModelNotFound, match="no model id could be identified"):
        sel.choose("gone", config, {})  # a disabled name
    sel.active = "removed-by-a-reload"
    assert sel.choose("alpha", config, {}).local == "a"


# ---- through HTTP, real children ----------------------------------------------------------------


def served(extra: str) -> Config:
    return fake_config(
        {"a": "", "b": ""},
        extra=extra,
        a="aliases: [alpha]\ncapabilities: {in: [text, image], out: [text], tools: true, context: 4096}",
    )


async def models_of(client: Any) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in (await (await client.get("/v1/models")).json())["data"]}


async def test_profile_routes_switch_pins_at_run_time(aiohttp_client: ClientFactory) -> None:
    extra = "profiles:\n  swap-ab: {description: d, pins: {alpha: b, fast: a}}\n  other: {pins: {x: b}}"
    client = await client_for(aiohttp_client, served(extra))
    listed = await (await client.get("/api/profiles")).json()
    assert listed == {
        "active": None,
        "profiles": [
            {"id": "other", "description": "", "pins": {"x": "b"}},
            {"id": "swap-ab", "description": "d", "pins": {"alpha": "b", "fast": "a"}},
        ],
    }
    assert (await chat(client, "alpha"))["model"] == "a"
    events = await client.get("/api/events")
    resp = await client.put("/api/profiles/active", json={"name": "swap-ab"})
    assert resp.status == 200 and await resp.json() == {"active": "swap-ab"}
    # The front door's fast path would take "alpha" as a's alias: the pin goes first.
    assert (await chat(client, "alpha"))["model"] == "b"
    assert (await chat(client, "fast"))["model"] == "a"
    records = await models_of(client)
    assert records["fast"]["meta"]["llamaswap"] == {"type": "profile"}
    assert "alpha" not in records  # a pin that is already a name is not listed twice
    frames = []
    async for line in events.content:
        if line.startswith(b"data: "):
            envelope = json.loads(line[6:])
            frames.append((envelope["type"], json.loads(envelope["data"])))
            if frames[-1] == ("profileChanged", {"active": "swap-ab"}):
                break
    assert ("profileChanged", {"active": None}) in frames  # on connect
    events.close()
    assert (await client.put("/api/profiles/active", json={"name": None})).status == 200
    assert (await chat(client, "alpha"))["model"] == "a"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{", 400, "invalid profile request"),
        (b"{}", 400, "profile name is required"),
        (b'{"name": 3}', 400, "must be a string"),
        (b'{"name": "nope"}', 404, 'profile "nope" not found'),
    ],
)
async def test_bad_profile_switches(
    aiohttp_client: ClientFactory, body: bytes, status: int, message: str
) -> None:
    client = await client_for(aiohttp_client, served("profiles: {p: {pins: {x: a}}}"))
    resp = await client.put("/api/profiles/active", data=body)
    assert resp.status == status and message in (await resp.json())["error"]["message"]


async def test_a_warm_selector_follows_the_loaded_model(aiohttp_client: ClientFactory) -> None:
    extra = "selectors:\n  any: {strategy: warm, targets: [a, b], name: Any, metadata: {purpose: chat}}"
    client = await client_for(aiohttp_client, served(extra))
    assert (await chat(client, "any"))["model"] == "a"  # nothing loaded: the first, started cold
    await chat(client, "b")  # the default group swaps a out for b
    assert runloop(client).snapshot()["a"].status.state is State.STOPPED
    assert (await chat(client, "any"))["model"] == "b"
    records = await models_of(client)
    assert records["any"]["name"] == "Any" and records["any"]["status"] == {"value": "loaded"}
    assert records["any"]["meta"]["llamaswap"] == {
        "purpose": "chat",
        "type": "selector",
        "strategy": "warm",
        "targets": ["a", "b"],
    }
    a = records["a"]  # capabilities, as llama-swap renders them
    assert a["architecture"] == {
        "input_modalities": ["text", "image"],
        "output_modalities": ["text"],
        "modality": "text+image->text",
    }
    assert a["capabilities"] == {"vision": True, "function_calling": True}
    assert a["supported_parameters"] == ["tools", "tool_choice"]
    assert a["context_length"] == 4096 and a["meta"]["n_ctx"] == 4096
    # The activity log says which selector chose (llama-swap's metadata.selector).
    rows = (await (await client.get("/api/metrics/activity?sort=id&order=asc")).json())["data"]
    assert [(r["model"], r.get("metadata")) for r in rows] == [
        ("a", {"selector": "any"}),
        ("b", None),
        ("b", {"selector": "any"}),
    ]
