"""Scale-out on loopback, as docs/scale-out.md sets it up: three ``swapper`` processes, two "GPU
boxes" each serving model ``m`` (the fake upstream, named after its box) behind its own API key,
and a front whose ``spillover`` selector ``m`` spreads requests over the two boxes as peers.

With ``spillover: 1``, a request that arrives while box1 is busy goes to box2; once both are
idle, box1 (the first target) takes the next one again.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.test_swapping import FAKE, free_port

WITHIN = 30.0


@contextmanager
def swapper(config: Path, port: int, log: Path) -> Iterator[str]:
    """``python -m swapper -config FILE -listen 127.0.0.1:PORT``, up once /health answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swapper", "-config", str(config), "-listen", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WITHIN
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"swapper on {port} never listened"
                time.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WITHIN)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def box_config(path: Path, box: str, key: str) -> Path:
    port = free_port()
    path.write_text(
        f"apiKeys: [{key}]\n"
        "models:\n"
        "  m:\n"
        f"    cmd: {sys.executable} {FAKE} --port {port} --model-name {box}\n"
        f"    proxy: http://127.0.0.1:{port}\n"
    )
    return path


def front_config(path: Path, boxes: dict[str, tuple[str, str]]) -> Path:
    lines = ["apiKeys: [front-key]", "peers:"]
    for box, (base, key) in boxes.items():
        lines += [f"  {box}:", f"    proxy: {base}", f"    apiKey: {key}", "    models: [m]"]
    lines += [
        "selectors:",
        "  m:",
        "    strategy: spillover",
        f"    targets: [{', '.join(f'{box}/m' for box in boxes)}]",
        "    settings: {spillover: 1}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def ask(session: aiohttp.ClientSession, front: str, delay: float = 0) -> str:
    headers = {"Authorization": "Bearer front-key"}
    if delay:
        headers["X-Fake-Delay"] = str(delay)  # the box's model answers this much later
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with session.post(front + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
    return str(answer["model"])  # the fake upstream answers with its --model-name: the box


async def in_flight(session: aiohttp.ClientSession, box: str, key: str) -> None:
    """Polls a box (another process: nothing reports to us) until its model has a request."""
    deadline = time.monotonic() + WITHIN
    while not await _busy(session, box, key):
        assert time.monotonic() < deadline, f"{box} never got the request"
        await asyncio.sleep(0.02)


async def _busy(session: aiohttp.ClientSession, box: str, key: str) -> bool:
    async with session.get(box + "/running", headers={"Authorization": f"Bearer {key}"}) as resp:
        running = (await resp.json())["running"]
    return bool(running and running[0]["inFlight"])


async def test_a_spillover_front_spreads_requests_over_two_boxes(tmp_path: Path) -> None:
    with ExitStack() as stack:
        boxes = {}
        for box in ("box1", "box2"):
            cfg = box_config(tmp_path / f"{box}.yaml", box, f"key-{box}")
            base = stack.enter_context(swapper(cfg, free_port(), tmp_path / f"{box}.log"))
            boxes[box] = (base, f"key-{box}")
        front_cfg = front_config(tmp_path / "front.yaml", boxes)
        front = stack.enter_context(swapper(front_cfg, free_port(), tmp_path / "front.log"))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WITHIN)) as session:
            assert await ask(session, front) == "box1"  # both idle: the first target
            # box1 busy with a slow request: the next one spills over to box2.
            slow = asyncio.ensure_future(ask(session, front, delay=3))
            await in_flight(session, *boxes["box1"])  # it reached box1: the front reserved box1
            assert await ask(session, front) == "box2"
            assert await slow == "box1"
            assert await ask(session, front) == "box1"  # idle again: back to the first
            async with session.get(front + "/v1/models", headers={"Authorization": "Bearer front-key"}) as r:
                ids = {rec["id"]: rec["meta"]["llamaswap"]["type"] for rec in (await r.json())["data"]}
            assert ids == {"box1/m": "peer", "box2/m": "peer", "m": "selector"}
