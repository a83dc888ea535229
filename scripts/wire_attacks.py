#!/usr/bin/env python3
"""Attacks on swapper's wire, as a hostile client would make them; prints swapper's RSS under each.

swapper runs as a real process (``python -m swapper``) with the fast upstream
(scripts/fast_upstream.py) loaded, and each attack runs against it in turn:

* ``flood-health``, ``flood-models``, ``flood-chat``: one connection pipelines ``GET /health``,
  ``GET /v1/models`` or a small chat request over and over and never reads an answer, until
  ``--flood-mib`` MiB were sent or swapper stopped taking them (no byte accepted for 2 s);
* ``slowloris``: ``--slow-conns`` connections each send a request head one byte every 100 ms,
  for twice ``requestHeaderTimeout`` (set to 2 s here); how many swapper closed is counted;
* ``endless-line``: one connection sends a header line that never ends, ``--flood-mib`` MiB of it.

For each: the bytes swapper accepted, its RSS before and after (and its peak during), and how the
connection ended. With ``--baseline DIR`` the same attacks run against another checkout (an older
commit's worktree, say) too, one after the other. Nothing is asserted.

    .venv/bin/python scripts/wire_attacks.py
    .venv/bin/python scripts/wire_attacks.py --baseline ../before --flood-mib 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import FAST, HOST, ROOT, Swapper, free_port, swapper

HEADER_TIMEOUT = 2.0
ENDLESS_LINE = b"GET /health HTTP/1.1\r\nX-A: " + b"a" * 60_000
CHAT = json.dumps({"model": "fast", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})


def config(port: int) -> str:
    return f"""\
requestHeaderTimeout: {HEADER_TIMEOUT}
models:
  fast:
    cmd: {sys.executable} {FAST} --port {port}
    proxy: http://{HOST}:{port}
"""


async def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing: keep the kernel's share small
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    return sock


class Peak:
    """Samples swapper's RSS every 50 ms while an attack runs."""

    def __init__(self, sw: Swapper) -> None:
        self.sw = sw
        self.peak = 0.0

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.sw.rss_mib())
            await asyncio.sleep(0.05)


async def send_until_refused(port: int, pattern: bytes, limit: int) -> tuple[int, str]:
    """Sends ``pattern`` repeatedly without reading; the bytes sent (whole batches) and how it
    ended."""
    sock = await connect(port)
    loop = asyncio.get_running_loop()
    batch = pattern * max(1, 65536 // len(pattern))
    sent = 0
    try:
        while sent < limit:
            try:
                async with asyncio.timeout(2.0):
                    await loop.sock_sendall(sock, batch)
                sent += len(batch)
            except TimeoutError:
                return sent, "swapper stopped reading"
            except OSError as exc:
                return sent, f"closed by swapper ({exc.strerror or exc})"
        return sent, "limit reached: swapper kept reading"
    finally:
        sock.close()


async def slowloris(port: int, conns: int) -> tuple[int, str]:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    socks = [await connect(port) for _ in range(conns)]
    loop = asyncio.get_running_loop()
    closed: set[int] = set()
    sent = 0
    deadline = time.monotonic() + 2 * HEADER_TIMEOUT
    try:
        for byte in head:
            if time.monotonic() > deadline:
                break
            for i, sock in enumerate(socks):
                if i in closed:
                    continue
                try:
                    sock.send(bytes([byte]))
                    sent += 1
                except OSError:
                    closed.add(i)
            await asyncio.sleep(0.1)
        for i, sock in enumerate(socks):  # an answer (the 408) or the end counts as closed
            with contextlib.suppress(OSError):
                if i not in closed and await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.2) is not None:
                    closed.add(i)
    except TimeoutError:
        pass
    finally:
        for sock in socks:
            sock.close()
    return sent, f"{len(closed)} of {conns} closed by swapper within {2 * HEADER_TIMEOUT:.0f} s"


async def attack_all(root: Path, args: argparse.Namespace, label: str) -> None:
    limit = args.flood_mib * 2**20
    attacks: dict[str, Callable[[int], Awaitable[tuple[int, str]]]] = {
        "flood-health": lambda p: send_until_refused(p, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", limit),
        "flood-models": lambda p: send_until_refused(p, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", limit),
        "flood-chat": lambda p: send_until_refused(
            p,
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(CHAT)}\r\n\r\n{CHAT}".encode(),
            limit,
        ),
        "slowloris": lambda p: slowloris(p, args.slow_conns),
        "endless-line": lambda p: send_until_refused(p, ENDLESS_LINE, limit),
    }
    print(f"\n{label} ({root})")
    print(f"  {'attack':<14}{'sent MiB':>10}{'RSS before':>12}{'peak':>8}{'after':>8}   how it ended")
    for name, attack in attacks.items():
        async with swapper(config(free_port()), root) as sw:
            reader, writer = await asyncio.open_connection(HOST, sw.port)
            body = CHAT.encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            await reader.read()  # loads the model
            writer.close()
            await asyncio.sleep(0.5)
            before = sw.rss_mib()
            peak = Peak(sw)
            sampler = asyncio.ensure_future(peak.run())
            try:
                sent, how = await attack(sw.port)
            finally:
                sampler.cancel()
            await asyncio.sleep(1.0)
            after = sw.rss_mib()
            peak_mib = max(peak.peak, after)
            print(f"  {name:<14}{sent / 2**20:>10.1f}{before:>12.1f}{peak_mib:>8.1f}{after:>8.1f}   {how}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--flood-mib", type=int, default=40, help="MiB a flood sends at most")
    ap.add_argument("--slow-conns", type=int, default=200)
    ap.add_argument("--baseline", type=Path, default=None, help="another swapper checkout to attack too")
    args = ap.parse_args()
    await attack_all(ROOT, args, "swapper")
    if args.baseline:
        await attack_all(args.baseline, args, "baseline")


if __name__ == "__main__":
    asyncio.run(main())
