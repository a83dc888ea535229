#!/usr/bin/env python3
"""Real-server benchmark on the shipped models.yaml: prints figures, asserts nothing.

1. Spawn -> ready of chat-b's real llama-server (the exact argv of the shipped config), started
   directly and polled on /health every millisecond: the floor any swapper can reach.
2. Swap A->B through swapper: with chat-a loaded, the latency of a 1-token chat-b request, minus
   the latency of the same request once chat-b is warm. That difference is what the swap costs
   (stop chat-a, start chat-b, notice it is ready); compared with (1) it gives swapper's overhead.
3. First-token latency of a streamed chat completion (max_tokens 4): time from sending the
   request to the first SSE event that carries content, through swapper (model loaded) and
   directly to a llama-server started with the same argv. Requests alternate between the two so
   that machine noise hits both alike. Every request opens its own connection (llama-server
   closes the connection after each stream anyway).

Needs ``python -m swapper.demo setup``. Run from anywhere:

    .venv/bin/python scripts/bench_real.py --rounds 20 --ttft 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swapper.config.load import load_config  # noqa: E402
from tests.realstack import ROOT as REPO  # noqa: E402
from tests.realstack import (  # noqa: E402
    SwapperProcess,
    demo_missing,
    derived_config,
    free_port,
)

PROMPT = [{"role": "user", "content": "hi"}]


def argv_on_port(argv: tuple[str, ...], port: int) -> list[str]:
    out = list(argv)
    out[out.index("--port") + 1] = str(port)
    return out


async def wait_healthy(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"child exited with {proc.returncode}")
        try:
            async with session.get(url + "/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.001)


async def spawn(argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def direct_spawn_to_ready(argv: tuple[str, ...], session: aiohttp.ClientSession) -> float:
    port = free_port()
    began = time.perf_counter()
    proc = await spawn(argv_on_port(argv, port))
    try:
        await wait_healthy(session, f"http://127.0.0.1:{port}", proc)
        return time.perf_counter() - began
    finally:
        proc.terminate()
        await proc.wait()


async def chat_latency(session: aiohttp.ClientSession, url: str, model: str) -> float:
    body = {"model": model, "messages": PROMPT, "max_tokens": 1}
    began = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{model}: HTTP {r.status}: {data[:300]!r}")
    return time.perf_counter() - began


async def first_token(session: aiohttp.ClientSession, url: str, model: str) -> tuple[float, float]:
    """(first byte, first content token) seconds of a streamed chat completion."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 4, "stream": True}
    began = time.perf_counter()
    ttfb = ttft = 0.0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not ttfb:
                ttfb = time.perf_counter() - began
            if not ttft and line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - began
    return ttfb, ttft


def ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else values * 9
    med = statistics.median(values) * 1000
    return f"median {med:7.2f} ms  (p10 {q[0] * 1000:6.2f}, p90 {q[8] * 1000:6.2f})"


async def main(args: argparse.Namespace) -> None:
    missing = demo_missing()
    if missing:
        sys.exit(missing)
    work = Path(tempfile.mkdtemp(prefix="bench_real."))
    config_path = derived_config(work / "models.yaml")
    config = load_config(str(config_path))
    argv_b = config.models["chat-b"].cmd
    argv_a = config.models["chat-a"].cmd
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        # 1. direct spawn -> ready
        await direct_spawn_to_ready(argv_b, session)  # warm the page cache
        direct = [await direct_spawn_to_ready(argv_b, session) for _ in range(args.rounds)]

        stack = SwapperProcess(config_path, work / "swapper.log")
        try:
            # 2. swap A -> B
            swap, warm = [], []
            await chat_latency(session, stack.url, "chat-a")
            for _ in range(args.rounds):
                await chat_latency(session, stack.url, "chat-a")  # chat-a loaded and warm
                swap.append(await chat_latency(session, stack.url, "chat-b"))
                warm.append(await chat_latency(session, stack.url, "chat-b"))

            # 3. first token, through swapper vs direct
            await chat_latency(session, stack.url, "chat-a")
            port = free_port()
            proc = await spawn(argv_on_port(argv_a, port))
            direct_url = f"http://127.0.0.1:{port}"
            try:
                await wait_healthy(session, direct_url, proc)
                for _ in range(3):  # warm both paths
                    await first_token(session, stack.url, "chat-a")
                    await first_token(session, direct_url, "chat-a")
                via, raw = [], []
                for _ in range(args.ttft):
                    via.append(await first_token(session, stack.url, "chat-a"))
                    raw.append(await first_token(session, direct_url, "chat-a"))
            finally:
                proc.terminate()
                await proc.wait()
        finally:
            stack.unload()
            stack.stop()

    cost = [s - w for s, w in zip(swap, warm, strict=True)]
    print(f"real llama-server, shipped models.yaml argv, {args.rounds} rounds")
    print(f"  1. direct spawn -> /health 200            {ms(direct)}")
    print(f"  2. chat-b request with chat-a loaded      {ms(swap)}")
    print(f"     same request, chat-b warm              {ms(warm)}")
    print(f"     swap cost (difference, per round)      {ms(cost)}")
    print(
        f"     swapper overhead over direct spawn     "
        f"{(statistics.median(cost) - statistics.median(direct)) * 1000:7.2f} ms (median - median)"
    )
    print(f"  3. streamed chat, max_tokens 4, {args.ttft} requests each")
    print(f"     first token via swapper                {ms([t for _, t in via])}")
    print(f"     first token direct                     {ms([t for _, t in raw])}")
    print(
        f"     added by swapper                       "
        f"{(statistics.median([t for _, t in via]) - statistics.median([t for _, t in raw])) * 1000:7.2f} ms"
        " (median - median)"
    )
    print(f"     first byte via swapper                 {ms([b for b, _ in via])}")
    print(f"     first byte direct                      {ms([b for b, _ in raw])}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20, help="swap and spawn rounds")
    p.add_argument("--ttft", type=int, default=50, help="streamed requests per path")
    asyncio.run(main(p.parse_args()))
