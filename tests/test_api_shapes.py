"""llama-swap's answer shapes where its clients read them: ``/running``'s ``cmd`` as the config
wrote it, ``/v1/models``'s ``meta.llamaswap``; swapper's own extra fields stay.

Real processes: swapper in-process behind the front door, the fake upstream as its child.
"""

from __future__ import annotations

import sys

from swapper.config.load import parse_config
from tests.test_swapping import FAKE, ClientFactory, chat, client_for, free_port


async def test_running_shows_the_cmd_as_written(aiohttp_client: ClientFactory) -> None:
    port = free_port()
    config = parse_config(
        f"""
macros:
  fake: {sys.executable} {FAKE}
models:
  m:
    cmd: |
      ${{fake}}
      # the port comes next
      --port {port} --model-name m
    proxy: http://127.0.0.1:{port}
    name: M
"""
    )
    client = await client_for(aiohttp_client, config)
    await chat(client, "m")
    running = (await (await client.get("/running")).json())["running"]
    entry = running[0]
    # Macros expanded and comment lines dropped, as llama-swap keeps it; lines as written.
    assert entry["cmd"] == f"{sys.executable} {FAKE}\n--port {port} --model-name m"
    assert {k: entry[k] for k in ("model", "state", "proxy", "ttl", "name", "description")} == {
        "model": "m",
        "state": "ready",
        "proxy": f"http://127.0.0.1:{port}",
        "ttl": 0,
        "name": "M",
        "description": "",
    }
    assert entry["pid"] and entry["inFlight"] == 0  # swapper's own fields


async def test_model_records_carry_llama_swaps_meta(aiohttp_client: ClientFactory) -> None:
    text = "models:\n  m:\n    cmd: srv ${PORT}\n    aliases: [mm]\n"
    text += "    metadata: {family: test, capabilities: x}\n"
    config = parse_config(text)
    client = await client_for(aiohttp_client, config)
    record = (await (await client.get("/v1/models")).json())["data"][0]
    meta = {"family": "test", "capabilities": "x", "type": "model", "aliases": ["mm"]}
    assert record["meta"] == {"llamaswap": meta, "swapper": meta}
    assert "context_length" not in record and "architecture" not in record  # no capabilities set
