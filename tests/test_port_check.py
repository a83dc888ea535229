"""A ${PORT} already taken by another process fails the load at once, before any spawn."""

from __future__ import annotations

import socket
import sys

from swapper.config.load import parse_config
from swapper.core.states import State
from tests.test_swapping import FAKE, ClientFactory, client_for, runloop


async def test_allocated_port_in_use_fails_fast_without_spawning(aiohttp_client: ClientFactory) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(16)
        port = squatter.getsockname()[1]
        cfg = parse_config(
            f"startPort: {port}\nmodels:\n  a:\n"
            f"    cmd: {sys.executable} {FAKE} --port ${{PORT}} --model-name a\n"
        )
        assert cfg.models["a"].port == port
        client = await client_for(aiohttp_client, cfg)
        resp = await client.post("/v1/chat/completions", json={"model": "a"})
        assert resp.status == 502
        message = (await resp.json())["error"]["message"]
        assert f"port {port} is already in use" in message
        assert runloop(client).state("a") is State.STOPPED
        assert runloop(client).snapshot()["a"].pid is None
