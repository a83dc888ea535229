"""Helpers shared by the operations tests (auth, CORS, upstream passthrough, TTL, preload)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from swapper.config.load import parse_config
from swapper.config.schema import Config
from swapper.runtime.runloop import RunLoop
from swapper.web.appkeys import RUNLOOP

FAKE = Path(__file__).parent / "upstreams" / "fake_server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ops_config(models: dict[str, str], extra: str = "", **per_model: str) -> Config:
    """Models run the fake server (``models`` maps id -> fake flags); ``per_model`` adds YAML lines.

    Per-model keys use the id with ``/`` and ``-`` spelled ``_`` (``author_model=...``).
    """
    lines = [f"startPort: {free_port()}", "healthCheckTimeout: 15", extra, "models:"]
    for mid, flags in models.items():
        port = free_port()
        lines += [
            f'  "{mid}":',
            f"    cmd: {sys.executable} -S {FAKE} --port {port} --model-name {mid} {flags}",
            f"    proxy: http://127.0.0.1:{port}",
        ]
        own = per_model.get(mid.replace("/", "_").replace("-", "_"), "")
        if "unloadTimeout" not in own:
            lines.append("    unloadTimeout: 2")
        lines += ["    " + line for line in own.splitlines()]
    return parse_config("\n".join(lines))


def runloop(client: TestClient[Any, Any]) -> RunLoop:
    loop: RunLoop = client.app[RUNLOOP]
    return loop


async def wait_until(cond: Callable[[], bool], within: float = 10.0, what: str = "condition") -> float:
    """Polls ``cond`` until true; returns the monotonic time it first held. Fails at the deadline."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {within}s"
        await asyncio.sleep(0.005)
    return time.monotonic()
