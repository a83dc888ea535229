#!/usr/bin/env python3
"""Swap benchmark: prints figures, asserts nothing.

1. Swap overhead: time to first byte of a request to a cold model (another one loaded) through
   swapper, minus the child's own spawn→healthy time measured directly, median of --rounds.
2. Collation: K models × N interleaved requests (A B C A B C ...) sent concurrently through
   swapper, against the same workload served FIFO one at a time (the no-collation baseline):
   number of swaps, makespan, and p50/p99/max wait.

Upstreams are tests/upstreams/fake_server.py with a configurable load time (--load-delay), or
real llama-servers with --llama (needs `python -m swapper.demo setup`).

    .venv/bin/python scripts/bench_swaps.py --rounds 20 --models 3 --requests 12 --load-delay 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "upstreams" / "fake_server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_cmd(args: argparse.Namespace, name: str, port: int) -> str:
    if args.llama:
        return (
            f"{ROOT}/.demo/bin/llama-server --host 127.0.0.1 --port {port} -t 1 -c 256 -n 8 "
            f"--no-warmup -m {ROOT}/.demo/models/chat-{'ab'[hash(name) % 2]}.gguf"
        )
    flags = f"--model-name {name} --load-delay {args.load_delay} --print-ready"
    return f"{sys.executable} {FAKE} --port {port} {flags}"


def write_config(args: argparse.Namespace, names: list[str]) -> Path:
    lines = ["healthCheckTimeout: 60", "models:"]
    for name in names:
        port = free_port()
        lines += [
            f"  {name}:",
            f"    cmd: {model_cmd(args, name, port)}",
            f"    proxy: http://127.0.0.1:{port}",
            f"    concurrencyLimit: {args.requests + 5}",
        ]
    fd, path = tempfile.mkstemp(suffix=".yaml")
    os.write(fd, "\n".join(lines).encode())
    os.close(fd)
    return Path(path)


@contextlib.asynccontextmanager
async def swapper(config: Path) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
        [
            sys.executable,
            "-m",
            "swapper",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("swapper did not start")
            await asyncio.sleep(0.02)
    try:
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


async def chat(s: aiohttp.ClientSession, url: str, model: str) -> float:
    """Seconds to the first response byte."""
    began = time.perf_counter()
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        await r.content.readany()
        ttfb = time.perf_counter() - began
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{model}: HTTP {r.status}: {await r.text()}")
    return ttfb


async def direct_spawn_to_healthy(args: argparse.Namespace) -> float:
    port = free_port()
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *model_cmd(args, "direct", port).split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            return time.perf_counter() - began
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.002)
    finally:
        proc.terminate()
        await proc.wait()


async def bench_swap_overhead(args: argparse.Namespace) -> None:
    direct = [await direct_spawn_to_healthy(args) for _ in range(args.rounds)]
    config = write_config(args, ["a", "b"])
    async with swapper(config) as (url, pid), aiohttp.ClientSession() as s:
        await chat(s, url, "a")
        swaps = [await chat(s, url, "b" if i % 2 == 0 else "a") for i in range(args.rounds)]
        rss = psutil.Process(pid).memory_info().rss / 2**20
    config.unlink()
    d, w = statistics.median(direct), statistics.median(swaps)
    print(f"swap overhead ({args.rounds} rounds, {'llama-server' if args.llama else 'fake'} upstream)")
    print(f"  child spawn->healthy, direct     median {d * 1000:8.1f} ms")
    print(f"  cold first byte through swapper  median {w * 1000:8.1f} ms  (stop old + start new)")
    print(f"  overhead                         median {(w - d) * 1000:8.1f} ms")
    print(f"  swapper RSS after the run        {rss:8.1f} MiB")


async def run_workload(url: str, order: list[str], concurrent: bool) -> tuple[float, list[float]]:
    """Every request is due at t=0; its wait is the time from then to its first byte."""
    async with aiohttp.ClientSession() as s:
        began = time.perf_counter()

        async def timed(model: str) -> float:
            await chat(s, url, model)
            return time.perf_counter() - began

        if concurrent:
            waits = await asyncio.gather(*(timed(m) for m in order))
        else:
            waits = [await timed(m) for m in order]
        return time.perf_counter() - began, list(waits)


def describe(name: str, makespan: float, waits: list[float], swaps: int) -> None:
    q = statistics.quantiles(waits, n=100, method="inclusive")
    print(
        f"  {name:<22} swaps {swaps:3d}  makespan {makespan:7.2f} s  wait p50 {q[49]:6.2f} s"
        f"  p99 {q[98]:6.2f} s  max {max(waits):6.2f} s"
    )


async def bench_collation(args: argparse.Namespace) -> None:
    names = [chr(ord("a") + i) for i in range(args.models)]
    order = [names[i % len(names)] for i in range(args.requests)]
    print(f"collation: {args.models} models x {args.requests} interleaved requests, load {args.load_delay}s")
    for label, concurrent in (("swapper (concurrent)", True), ("FIFO one-by-one", False)):
        config = write_config(args, names)
        async with swapper(config) as (url, _):
            makespan, waits = await run_workload(url, order, concurrent)
            async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
                text = await r.text() if r.status == 200 else ""
        config.unlink()
        swaps = count_starts(text) if text else -1
        if swaps < 0:  # no metrics endpoint: count model changes instead
            swaps = (
                len(names)
                if concurrent
                else sum(1 for i, m in enumerate(order) if i == 0 or order[i - 1] != m)
            )
        describe(label, makespan, waits, swaps)


def count_starts(metrics: str) -> int:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("swapper_model_starts_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total) if total else -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--load-delay", type=float, default=0.5)
    p.add_argument("--llama", action="store_true", help="real llama-servers from .demo/")
    p.add_argument("--skip-collation", action="store_true")
    args = p.parse_args()
    asyncio.run(bench_swap_overhead(args))
    if not args.skip_collation:
        asyncio.run(bench_collation(args))


if __name__ == "__main__":
    main()
