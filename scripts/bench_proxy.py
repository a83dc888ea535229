#!/usr/bin/env python3
"""Proxy benchmark: swapper against the same upstream reached directly. Prints a table, asserts nothing.

One run, rounds alternating the two targets (the order flips every round), medians over rounds:

* added latency: p50/p99 of a small non-streaming chat request at concurrency 1 and 32, through
  swapper minus direct (per round, then the median), and requests/s;
* streaming: chunks/s with 64 concurrent streams of ``--chunks`` events each, ratio to direct;
* swapper CPU per request and per streamed chunk (the swapper process's own user+system time
  over each proxied phase, divided by the work done), and per request the kernel's share of it
  (system time: syscalls and wake-ups, about the same for every proxy on a machine);
* for reference, the upstream's own CPU per request in the direct phases: on a VM a process that
  sleeps between requests pays a large fixed cost per wake-up at c=1, and a proxy is woken twice
  per request (by the client, then by the upstream);
* nginx as a reference proxy in the same rounds when an ``nginx`` binary is found (``--nginx``;
  Debian: ``apt-get install nginx-light``): one process, keep-alive to the upstream, no buffering.
  The performance targets were set from nginx's figures on a calm machine (+32 us, 16 us of CPU per
  request); on a VM whose wake-ups got dearer nginx pays that too, and this column shows by how much;
* with ``--baseline DIR``, another checkout of swapper (say a worktree of the previous commit) in
  the same rounds, on its own copy of the upstream: a before/after comparison in one run;
* with ``--recording-off``, this checkout again with its activity log off (``metricsMaxInMemory:
  0``), on its own copy of the upstream: what recording each request for the web UI costs;
* for the llama upstream, llama.cpp's own router mode (``llama-server --models-dir``, the same
  binary and model, its child started with the same flags) as a second reference (``--no-router``
  leaves it out). Its "vs direct" figures are against its own child, reached directly in the same
  rounds (a separate llama-server, whose speed differs from swapper's child's). It answers every
  request with ``Connection: close``, so its clients reconnect per request: the reconnect is
  outside its latency figures (timed from the write), inside its CPU and requests/s. Its CPU is
  the router process's own, not its child's;
* swapper RSS idle (after start-up and warm-up, and after the run) and with ``--queued``
  requests waiting on a model that takes 30 s to load (tests/upstreams/fake_server.py
  --load-delay 30), measured once they are all admitted; then the clients leave.

The upstream is swapper's own child (a real ``python -m swapper`` on a generated config): the
direct client talks to the port swapper started it on, once swapper has loaded it. Upstreams:
``fast`` is scripts/fast_upstream.py (tiny JSON answer; SSE events as fast as the loop turns),
``llama`` is ``.demo/bin/llama-server`` with ``.demo/models/chat-a.gguf`` (skipped if absent;
``python -m swapper.demo setup`` makes it).

The load generator runs in this process, swapper in its own: a minimal HTTP/1.1 client on asyncio
protocols (keep-alive connections, Content-Length and chunked bodies, SSE events counted by their
blank-line terminator), far cheaper per request than an aiohttp client, so that on a small machine
the generator takes as little CPU from swapper and the upstream as possible. The machine may be
shared: numbers are noisy, which is why rounds alternate and medians are reported.

    .venv/bin/python scripts/bench_proxy.py                 # both upstreams, 5 rounds
    .venv/bin/python scripts/bench_proxy.py --upstream fast --rounds 9 --skip-queue
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
FAST = ROOT / "scripts" / "fast_upstream.py"
FAKE = ROOT / "tests" / "upstreams" / "fake_server.py"
LLAMA = ROOT / ".demo" / "bin" / "llama-server"
LLAMA_MODEL = ROOT / ".demo" / "models" / "chat-a.gguf"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---- a cheap HTTP/1.1 client ----


@dataclass(slots=True)
class Reply:
    status: int = 0
    events: int = 0  # SSE events (blank-line terminated) in the body
    body_bytes: int = 0
    first_byte: float = 0.0  # perf_counter of the first response byte
    done: float = 0.0  # perf_counter of the last


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._reply: Reply | None = None
        self._future: asyncio.Future[Reply] | None = None
        self._head_done = False
        self._length = -1  # Content-Length left, or -1 when chunked
        self._chunk_left = -1  # bytes left in the current chunk (+2 for its CRLF); -1: at a size line
        self._last_nl = False
        self._close_after = False
        self._used = False  # has answered a request before the current one
        self.dead = False

    @property
    def stale(self) -> bool:
        """The current request failed on a reused connection before any response byte."""
        return self._used and self._reply is not None and not self._reply.first_byte

    @classmethod
    async def open(cls, port: int) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, HOST, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if not self.closed.done():
            self.closed.set_result(None)
        if self._future is not None and not self._future.done():
            self._future.set_exception(ConnectionError(f"connection lost mid-response: {exc!r}"))

    def request(self, data: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None and self._future is None
        self._reply = Reply()
        self._future = asyncio.get_running_loop().create_future()
        self._head_done = False
        self._buf.clear()
        self.transport.write(data)
        return self._future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        reply = self._reply
        if reply is None:
            return
        if not reply.first_byte:
            reply.first_byte = time.perf_counter()
        self._buf += data
        if not self._head_done and not self._parse_head():
            return
        if self._length >= 0:
            take = min(self._length, len(self._buf))
            self._count(self._buf[:take])
            self._length -= take
            del self._buf[:take]
            if self._length == 0:
                self._finish()
            return
        self._parse_chunks()

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buf[:end]).lower()
        del self._buf[: end + 4]
        assert self._reply is not None
        self._reply.status = int(head[9:12])
        self._head_done = True
        self._last_nl = False
        self._close_after = b"\r\nconnection: close" in head
        self._chunk_left = -1
        at = head.find(b"\r\ncontent-length:")
        if b"\r\ntransfer-encoding: chunked" in head:
            self._length = -1
        elif at >= 0:
            stop = head.find(b"\r\n", at + 2)
            self._length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if self._length == 0:
                self._finish()
        else:
            raise RuntimeError("response with neither Content-Length nor chunked framing")
        return True

    def _parse_chunks(self) -> None:
        buf = self._buf
        pos = 0
        while True:
            if self._chunk_left < 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                if size == 0:
                    if len(buf) - eol < 4:  # the final CRLF is not here yet (no trailers expected)
                        break
                    del buf[: eol + 4]
                    self._finish()
                    return
                pos = eol + 2
                self._chunk_left = size + 2
            take = min(self._chunk_left, len(buf) - pos)
            if take <= 0:
                break
            data_end = min(pos + take, pos + self._chunk_left - 2)
            if data_end > pos:
                self._count(buf[pos:data_end])
            pos += take
            self._chunk_left -= take
            if self._chunk_left == 0:
                self._chunk_left = -1
        del buf[:pos]

    def _count(self, data: bytearray | bytes) -> None:
        if not data:
            return
        assert self._reply is not None
        self._reply.body_bytes += len(data)
        self._reply.events += data.count(b"\n\n") + (self._last_nl and data[0] == 10)
        self._last_nl = data[-1] == 10 and not data.endswith(b"\n\n")

    def _finish(self) -> None:
        reply, fut = self._reply, self._future
        assert reply is not None and fut is not None
        reply.done = time.perf_counter()
        self._reply = self._future = None
        self._used = True
        if self._close_after:
            self.close()
        if not fut.done():
            fut.set_result(reply)


class Pool:
    """Keep-alive connections to one port, reopened when the server closed one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[Conn] = []

    async def call(self, data: bytes) -> tuple[float, Reply]:
        conn = self._idle.pop() if self._idle else None
        if conn is None or conn.dead:
            conn = await Conn.open(self.port)
        began = time.perf_counter()
        try:
            reply = await conn.request(data)
        except ConnectionError:
            if not conn.stale:
                raise
            # The server closed this idle keep-alive connection as we reused it (llama-server
            # does after a stream): nothing was answered, so try once on a fresh one, as a proxy would.
            conn = await Conn.open(self.port)
            began = time.perf_counter()
            reply = await conn.request(data)
        if not conn.dead:
            self._idle.append(conn)
        return began, reply

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def post(path: str, body: dict[str, object], host_port: int) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{host_port}\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


# ---- workloads ----


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)  # seconds
    seconds: float = 0.0
    requests: int = 0
    events: int = 0
    cpu: float = 0.0  # the proxy's CPU seconds over the phase (proxied only)
    kernel_cpu: float = 0.0  # the part of ``cpu`` spent in the kernel (system time)
    upstream_cpu: float = 0.0  # the upstream's CPU seconds over the phase

    def pct(self, q: int) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * q / 100))]


async def run_requests(port: int, data: bytes, total: int, concurrency: int) -> Phase:
    pool = Pool(port)
    phase = Phase()
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            began, reply = await pool.call(data)
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status} from port {port}")
            phase.latencies.append(reply.done - began)
            phase.events += reply.events

    # Warm the connections first so connection setup is not timed.
    await asyncio.gather(*(pool.call(data) for _ in range(concurrency)))
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.seconds = time.perf_counter() - began
    phase.requests = total
    pool.close()
    return phase


async def run_streams(port: int, data: bytes, streams: int, waves: int) -> Phase:
    pool = Pool(port)
    phase = Phase()
    await asyncio.gather(*(pool.call(data) for _ in range(streams)))  # warm connections
    began = time.perf_counter()
    for _ in range(waves):
        replies = await asyncio.gather(*(pool.call(data) for _ in range(streams)))
        for start, reply in replies:
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status} from port {port}")
            phase.latencies.append(reply.done - start)
            phase.events += reply.events
    phase.seconds = time.perf_counter() - began
    phase.requests = streams * waves
    pool.close()
    return phase


# ---- swapper as a subprocess ----


@dataclass
class Swapper:
    port: int
    proc: psutil.Process

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: user + system, and system alone (the kernel's share), one reading."""
        t = self.proc.cpu_times()
        return t.user + t.system, t.system

    def rss_mib(self) -> float:
        return self.proc.memory_info().rss / 2**20


@contextlib.asynccontextmanager
async def swapper(config: str, root: Path = ROOT) -> AsyncIterator[Swapper]:
    """Runs ``python -m swapper`` from ``root`` (another checkout's package wins over the venv's)."""
    fd, path = tempfile.mkstemp(suffix=".yaml")
    os.write(fd, config.encode())
    os.close(fd)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "swapper",
        "--config",
        path,
        "--listen",
        f"{HOST}:{port}",
        "--log-level",
        "warn",
    ]
    try:
        async with serving(argv, port, "swapper", grace=30, cwd=root, stdout=subprocess.DEVNULL) as sw:
            yield sw
    finally:
        os.unlink(path)


@contextlib.asynccontextmanager
async def serving(
    argv: list[str], port: int, what: str, *, grace: float, log: Path | None = None, **popen: Any
) -> AsyncIterator[Swapper]:
    """Runs ``argv`` while the block runs, from the moment ``GET /health`` on ``port`` answers 200
    (``log``, if given, is quoted when it never does); stops it after (SIGKILL after ``grace``)."""
    proc = subprocess.Popen(argv, **popen)  # noqa: ASYNC220 - started once, before any timing
    try:
        if not await wait_serving(proc, port, within=30):
            why = f": {log.read_text()}" if log and log.exists() else ""  # noqa: ASYNC240 - on a failed start
            raise RuntimeError(f"{what} did not start{why}")
        yield Swapper(port, psutil.Process(proc.pid))
    finally:
        stop(proc, grace)


async def wait_serving(proc: subprocess.Popen[bytes], port: int, within: float) -> bool:
    """Whether ``GET /health`` on ``port`` answered 200 before ``proc`` exited or time ran out."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(OSError):
            _, reply = await Pool(port).call(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            if reply.status == 200:
                return True
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


NGINX_CONF = """\
daemon off;
master_process off;  # one process, so its CPU is the whole cost
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream up {{ server {host}:{up_port}; keepalive 256; }}
  server {{
    listen {host}:{port};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      # llama-server closes a keep-alive connection after a stream: retry a POST that met a
      # closed one (as swapper does) instead of answering 502.
      proxy_next_upstream error timeout non_idempotent;
    }}
  }}
}}
"""


@contextlib.asynccontextmanager
async def nginx(binary: str, up_port: int) -> AsyncIterator[Swapper]:
    """nginx proxying to ``up_port``, as a reference (a ``Swapper`` only in shape: port and process)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, host=HOST, up_port=up_port, port=port))
        log = Path(tmp) / "error.log"
        argv = [binary, "-p", tmp, "-c", str(conf), "-e", str(log)]
        async with serving(argv, port, "nginx", grace=10, log=log) as proxy:
            yield proxy


# A proxy whose upstream is not swapper's child is compared with its own upstream reached directly
# (in the same rounds, not shown as a column): llama.cpp's router starts its own llama-server.
DIRECT_OF = {"router": "router's child", "baseline": "baseline's child", "rec-off": "rec-off's child"}


def child_port(proc: psutil.Process) -> int:
    """The ``--port`` of ``proc``'s only child (how llama.cpp's router starts a model)."""
    (child,) = proc.children()
    argv = child.cmdline()
    return int(argv[argv.index("--port") + 1])


@contextlib.asynccontextmanager
async def llama_router(args: argparse.Namespace) -> AsyncIterator[Swapper]:
    """llama.cpp's router mode serving ``LLAMA_MODEL`` (as its file stem), one model at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / LLAMA_MODEL.name).symlink_to(LLAMA_MODEL)
        port = free_port()
        argv = [str(LLAMA), "--models-dir", tmp, "--models-max", "1", "--host", HOST, "--port", str(port)]
        argv += ["-t", "1", "-c", str(args.llama_ctx), "--no-warmup"]  # passed on to its child
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        pgid = None
        try:
            async with serving(
                argv, port, "llama.cpp's router", grace=10, start_new_session=True, **quiet
            ) as router:
                pgid = router.proc.pid
                yield router
        finally:
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, 9)  # its child too, should it outlive it


def fast_config(up_port: int, slow_port: int, args: argparse.Namespace) -> str:
    return f"""\
healthCheckTimeout: 60
maxQueued: {args.queued + 100}
models:
  fast:
    cmd: {sys.executable} {FAST} --port {up_port} --chunks {args.chunks}
    proxy: http://{HOST}:{up_port}
    concurrencyLimit: 256
  slow:
    cmd: {sys.executable} {FAKE} --port {slow_port} --load-delay 30
    proxy: http://{HOST}:{slow_port}
    concurrencyLimit: {args.queued + 100}
"""


def llama_config(up_port: int, args: argparse.Namespace) -> str:
    return f"""\
healthCheckTimeout: 60
models:
  llama:
    cmd: {LLAMA} --host {HOST} --port {up_port} -m {LLAMA_MODEL} -t 1 -c {args.llama_ctx} --no-warmup
    proxy: http://{HOST}:{up_port}
    concurrencyLimit: 256
"""


# ---- the benchmark ----


@dataclass
class Results:
    """metric -> target -> one value per round."""

    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, metric: str, target: str, value: float) -> None:
        self.rows.setdefault(metric, {}).setdefault(target, []).append(value)

    def last(self, metric: str, target: str) -> float:
        return self.rows[metric][target][-1]

    def med(self, metric: str, target: str) -> float:
        values = self.rows.get(metric, {}).get(target, [])
        return statistics.median(values) if values else float("nan")

    def compare(self, metric: str, target: str, *, ratio: bool) -> None:
        """Records this round's target-vs-direct figure (difference or ratio) for ``metric``,
        against the target's own upstream reached directly (``DIRECT_OF``)."""
        d, s = self.last(metric, DIRECT_OF.get(target, "direct")), self.last(metric, target)
        self.add(metric + (" ratio" if ratio else " added"), target, s / d if ratio else s - d)


async def bench_upstream(name: str, args: argparse.Namespace) -> None:
    up_port, slow_port = free_port(), free_port()
    model = "fast" if name == "fast" else "llama"
    config = fast_config(up_port, slow_port, args) if name == "fast" else llama_config(up_port, args)
    small_body: dict[str, object] = {
        "model": model,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }
    stream_body = {**small_body, "max_tokens": args.chunks, "stream": True}
    res = Results()
    async with contextlib.AsyncExitStack() as stack:
        sw = await stack.enter_async_context(swapper(config))
        proxies = {"swapper": sw}
        await run_requests(sw.port, post("/v1/chat/completions", small_body, sw.port), 50, 1)  # loads it
        # Variants with a child of their own, on the same config, in the same rounds: another
        # checkout of swapper (an A/B in one run), and this one with its activity log off.
        variants = []
        if args.baseline:
            variants.append(("baseline", args.baseline, ""))
        if args.recording_off:
            variants.append(("rec-off", ROOT, "metricsMaxInMemory: 0\n"))
        variant_ports = {}
        for target, root, extra in variants:
            port = variant_ports[target] = free_port()
            config_v = fast_config(port, free_port(), args) if name == "fast" else llama_config(port, args)
            v = proxies[target] = await stack.enter_async_context(swapper(extra + config_v, root))
            await run_requests(v.port, post("/v1/chat/completions", small_body, v.port), 50, 1)
        if args.nginx:
            proxies["nginx"] = await stack.enter_async_context(nginx(args.nginx, up_port))
        names = {"router": LLAMA_MODEL.stem}  # the model's name where it is not ``model``

        def post_as(target: str, body: dict[str, object], port: int) -> bytes:
            return post("/v1/chat/completions", {**body, "model": names.get(target, model)}, port)

        if name == "llama" and args.router:
            proxies["router"] = await stack.enter_async_context(llama_router(args))
            # Its first request loads its child: not timed, like swapper's.
            port = proxies["router"].port
            await run_requests(port, post_as("router", small_body, port), 5, 1)
        ports = {"direct": up_port} | {t: p.port for t, p in proxies.items()}
        for target, port in variant_ports.items():
            ports[DIRECT_OF[target]] = port
        if "router" in proxies:
            names[DIRECT_OF["router"]] = names["router"]
            ports[DIRECT_OF["router"]] = child_port(proxies["router"].proc)
        small = {t: post_as(t, small_body, p) for t, p in ports.items()}
        stream = {t: post_as(t, stream_body, p) for t, p in ports.items()}
        await asyncio.sleep(0.5)
        rss_idle = sw.rss_mib()

        upstream = next(p for p in sw.proc.children(recursive=True) if str(up_port) in " ".join(p.cmdline()))

        def upstream_cpu() -> float:
            t = upstream.cpu_times()
            return t.user + t.system

        async def timed(target: str, run: Awaitable[Phase]) -> Phase:
            proxy = proxies.get(target)
            (cpu, kernel), up_cpu = proxy.cpu() if proxy else (0.0, 0.0), upstream_cpu()
            phase = await run
            if proxy:
                cpu_end, kernel_end = proxy.cpu()
                phase.cpu, phase.kernel_cpu = cpu_end - cpu, kernel_end - kernel
            phase.upstream_cpu = upstream_cpu() - up_cpu
            return phase

        targets = list(ports)
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else targets[::-1]
            for conc, n in ((1, args.requests), (32, args.requests * 3)):
                for t in order:
                    ph = await timed(t, run_requests(ports[t], small[t], n, conc))
                    res.add(f"c{conc} p50", t, ph.pct(50) * 1e6)
                    res.add(f"c{conc} p99", t, ph.pct(99) * 1e6)
                    res.add(f"c{conc} rps", t, ph.requests / ph.seconds)
                    res.add(f"c{conc} cpu/req", t, ph.cpu / ph.requests * 1e6)
                    res.add(f"c{conc} kernel cpu/req", t, ph.kernel_cpu / ph.requests * 1e6)
                    res.add(f"c{conc} upstream cpu/req", t, ph.upstream_cpu / ph.requests * 1e6)
                for t in proxies:
                    res.compare(f"c{conc} p50", t, ratio=False)
                    res.compare(f"c{conc} p99", t, ratio=False)
                    res.compare(f"c{conc} rps", t, ratio=True)
            for t in order:
                ph = await timed(t, run_streams(ports[t], stream[t], args.streams, args.waves))
                res.add("chunks/s", t, ph.events / ph.seconds)
                res.add("events/stream", t, ph.events / ph.requests)
                res.add("cpu/chunk", t, ph.cpu / max(ph.events, 1) * 1e6)
            for t in proxies:
                res.compare("chunks/s", t, ratio=True)
            print(f"  {name}: round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        await asyncio.sleep(0.5)
        rss_after = sw.rss_mib()
        queued = None
        if name == "fast" and not args.skip_queue:
            queued = await bench_queue(sw, args)
    report(name, args, res, rss_idle, rss_after, queued)


async def bench_queue(sw: Swapper, args: argparse.Namespace) -> tuple[float, float, float]:
    """RSS with ``args.queued`` requests waiting on a 30 s load; then they all leave."""
    data = post(
        "/v1/chat/completions", {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}, sw.port
    )
    conns: list[Conn] = []
    for i in range(args.queued):
        conns.append(await Conn.open(sw.port))
        if i % 100 == 99:
            await asyncio.sleep(0.01)
    futures = [c.request(data) for c in conns]
    for _ in range(400):
        await asyncio.sleep(0.05)
        waiting = await queued_on(sw, "slow")
        if waiting >= args.queued:
            break
    else:
        raise RuntimeError(f"only {waiting} of {args.queued} requests were admitted")
    rss_queued = sw.rss_mib()
    for c in conns:
        c.close()
    for f in futures:
        f.cancel()
    await asyncio.gather(*futures, return_exceptions=True)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if await queued_on(sw, "slow") == 0:
            break
    unload = post("/api/models/unload", {}, sw.port)
    await Pool(sw.port).call(unload)
    await asyncio.sleep(0.5)
    return float(args.queued), rss_queued, sw.rss_mib()


async def queued_on(sw: Swapper, model: str) -> int:
    reader, writer = await asyncio.open_connection(HOST, sw.port)
    writer.write(f"GET /running HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    body = raw.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in raw.split(b"\r\n\r\n", 1)[0].lower():
        body = dechunk(body)
    for entry in json.loads(body)["running"]:
        if entry["model"] == model:
            return int(entry["queued"])
    return 0


def dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def report(
    name: str,
    args: argparse.Namespace,
    res: Results,
    rss_idle: float,
    rss_after: float,
    queued: tuple[float, float, float] | None,
) -> None:
    m = res.med
    fast = name == "fast"
    proxies = [
        t for t in ("swapper", "rec-off", "baseline", "nginx", "router") if t in res.rows.get("c1 p50", {})
    ]

    def row(
        label: str, direct: str = "", cells: dict[str, tuple[str, str]] | None = None, target: str = ""
    ) -> None:
        line = f"{direct:>10}" + "".join(f"{v:>10}{vs:>11}" for v, vs in (cells or {}).values())
        print(f"  {label:<38}{line}   {target}")

    def each(fmt: str, metric: str, versus: str = "", vfmt: str = "") -> dict[str, tuple[str, str]]:
        cells = {}
        for t in proxies:
            value = m(metric, t)
            vs = f"{m(versus, t):{vfmt}}" if versus else ""
            cells[t] = (f"{value:{fmt}}" if value == value else "", vs)  # NaN: not measured
        return cells

    def swapper_only(value: str) -> dict[str, tuple[str, str]]:
        return {t: (value if t == "swapper" else "", "") for t in proxies}

    print()
    print(
        f"{name} upstream: {args.rounds} rounds alternating targets, medians over rounds; "
        f"{args.requests} requests at c=1, {args.requests * 3} at c=32, "
        f"{args.streams} streams x {args.chunks} chunks x {args.waves} waves per round"
    )
    row("", "direct", {t: (t, "vs direct") for t in proxies}, "target")
    for c in (1, 32):
        for q in ("p50", "p99"):
            goal = "added <= 200 us" if (c, q, fast) == (1, "p50", True) else ""
            row(
                f"latency c={c} {q} (us)",
                f"{m(f'c{c} {q}', 'direct'):.0f}",
                each(".0f", f"c{c} {q}", f"c{c} {q} added", "+.0f"),
                goal,
            )
        row(
            f"requests/s c={c}",
            f"{m(f'c{c} rps', 'direct'):.0f}",
            each(".0f", f"c{c} rps", f"c{c} rps ratio", ".3f"),
        )
        row(f"proxy CPU/request c={c} (us)", "", each(".0f", f"c{c} cpu/req"), "<= 150 us")
        # The kernel's share (system time: the syscalls and the wake-ups) is about the same for
        # every proxy; what differs between them is the rest, user time.
        row(f"  of which in the kernel c={c} (us)", "", each(".0f", f"c{c} kernel cpu/req"), "(reference)")
        # What one request costs the upstream itself: on a VM, a process woken per request pays
        # a large fixed cost per wake-up at c=1, which the proxy pays twice (client and upstream).
        up = m(f"c{c} upstream cpu/req", "direct")
        row(f"  upstream's own CPU/request c={c} (us)", f"{up:.0f}", swapper_only(""), "(reference)")
    row(
        f"chunks/s, {args.streams} streams",
        f"{m('chunks/s', 'direct'):.0f}",
        each(".0f", "chunks/s", "chunks/s ratio", ".3f"),
        ">= 0.95x" if fast else "",
    )
    row("SSE events per stream", f"{m('events/stream', 'direct'):.1f}", each(".1f", "events/stream"))
    row("proxy CPU/chunk (us)", "", each(".1f", "cpu/chunk"), "<= 10 us")
    row("swapper RSS idle (MiB)", "", swapper_only(f"{rss_idle:.1f}"), "<= 60 MB")
    row("swapper RSS after the run (MiB)", "", swapper_only(f"{rss_after:.1f}"))
    if queued is not None:
        n, rss_q, rss_left = queued
        row(f"swapper RSS, {n:.0f} queued (MiB)", "", swapper_only(f"{rss_q:.1f}"), "<= 120 MB")
        row("swapper RSS after they left (MiB)", "", swapper_only(f"{rss_left:.1f}"))
    for metric in ("c1 p50 added", "chunks/s ratio"):
        for t in proxies:
            values = res.rows.get(metric, {}).get(t, [])
            if values:
                print(f"  per round, {t} {metric}: {', '.join(f'{v:.3g}' for v in values)}")
    sys.stdout.flush()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--upstream", choices=["fast", "llama", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1000, help="requests per round at c=1 (3x at c=32)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=200, help="SSE events per stream")
    ap.add_argument("--waves", type=int, default=2, help="rounds of --streams concurrent streams per phase")
    ap.add_argument("--queued", type=int, default=1000)
    ap.add_argument("--skip-queue", action="store_true", help="skip the RSS-with-queued-requests phase")
    ap.add_argument("--llama-ctx", type=int, default=256)
    ap.add_argument(
        "--router",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="llama.cpp's router mode as a reference column for the llama upstream (default: on)",
    )
    ap.add_argument(
        "--nginx",
        default=shutil.which("nginx") or shutil.which("/usr/sbin/nginx") or "",
        help="nginx binary for the reference column ('' to leave it out); found on PATH by default",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another swapper checkout (a git worktree of an older commit, say) run in the same rounds "
        "as a 'baseline' column, with its own child; its 'vs direct' figures are against that child",
    )
    ap.add_argument(
        "--recording-off",
        action="store_true",
        help="also run this checkout with its activity log off (metricsMaxInMemory: 0) as a 'rec-off' "
        "column, with its own child: the web UI's recording cost, on and off in the same rounds",
    )
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.queued + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # swapper inherits it
    names = ["fast", "llama"] if args.upstream == "both" else [args.upstream]
    for name in names:
        if name == "llama" and not (LLAMA.exists() and LLAMA_MODEL.exists()):
            print(
                f"\nllama upstream skipped: {LLAMA} or {LLAMA_MODEL} missing (python -m swapper.demo setup)"
            )
            continue
        await bench_upstream(name, args)


if __name__ == "__main__":
    asyncio.run(main())
