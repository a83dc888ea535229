"""The groups and matrix examples really serve, on real llama-servers, and plan as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from swapper.config.load import load_config
from tests.test_swapping import ClientFactory, chat, client_for, runloop

ROOT = Path(__file__).parent.parent
DEMO_READY = all(
    (ROOT / ".demo" / p).exists()
    for p in ("bin/llama-server", "models/chat-a.gguf", "models/chat-b.gguf", "models/embed.gguf")
)
pytestmark = pytest.mark.skipif(not DEMO_READY, reason="run `python -m swapper.demo setup` first")


def loaded(client: object) -> set[str]:
    return {m for m, s in runloop(client).snapshot().items() if s.pid is not None}  # type: ignore[arg-type]


async def embed(client: object) -> None:
    resp = await client.post("/v1/embeddings", json={"model": "embed", "input": "hi"})  # type: ignore[attr-defined]
    assert resp.status == 200, await resp.text()


async def test_groups_example_keeps_helpers_across_chat_swaps(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    client = await client_for(aiohttp_client, load_config("examples/groups.yaml"))
    await embed(client)
    await chat(client, "chat-a")
    assert loaded(client) == {"embed", "chat-a"}
    await chat(client, "chat-b")  # swaps within the chat group; the persistent group stays
    assert loaded(client) == {"embed", "chat-b"}


async def test_matrix_example_picks_the_cheapest_set(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    client = await client_for(aiohttp_client, load_config("examples/matrix.yaml"))
    await chat(client, "chat-b")
    await embed(client)
    assert loaded(client) == {"chat-b", "embed"}  # (a | b) & e allows both
    await chat(client, "chat-a")  # a & e is allowed: only chat-b goes
    assert loaded(client) == {"chat-a", "embed"}
