#!/usr/bin/env python3
"""Swap benchmark: prints figures, asserts nothing.

1. Swaps, side by side in one run (``--rounds`` swaps each, alternating two models, the order of
   the targets rotating every round): the time to the first byte of a request to the model that
   is not loaded (cold TTFT) and of the next one (warm TTFT), through

   * swapper (this checkout; each ``--baseline DIR`` adds another checkout as a column);
   * llama.cpp's own router mode with ``--llama`` (``llama-server --models-dir --models-max 1``,
     the same binary and model arguments; ``--no-router`` leaves it out);
   * direct: the same servers stopped and started by hand (SIGTERM, reaped; spawned, its output
     read up to its readiness line, then ``/health`` probed), which is the child's own stop +
     start, then the same request.

   "Overhead" is a proxy's cold TTFT minus the direct stop + start of the same round; "over the
   floor" also subtracts the direct first answer (the request itself on a fresh child). swapper's
   phases (``swapper_swap_phase_seconds``, read from /metrics after every swap) are printed as
   per-phase medians.
2. Collation: K models x N interleaved requests (A B C A B C ...) sent concurrently through
   swapper, against the same workload served FIFO one at a time (the no-collation baseline):
   number of swaps, makespan, and p50/p99/max wait.

Upstreams are tests/upstreams/fake_server.py with a configurable load time (--load-delay), or
real llama-servers with --llama (needs `python -m swapper.demo setup`): two tiny models, each
server started with ``-t 1 -c CTX -np PARALLEL --no-warmup`` (``--ctx``, ``--parallel``).

    .venv/bin/python scripts/bench_swaps.py --llama --rounds 30 --skip-collation
    .venv/bin/python scripts/bench_swaps.py --rounds 20 --models 3 --requests 12 --load-delay 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from swapper.core.phases import PHASES as SWAP_PHASES

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "upstreams" / "fake_server.py"
LLAMA = ROOT / ".demo" / "bin" / "llama-server"
MODELS = ROOT / ".demo" / "models"
HOST = "127.0.0.1"
PHASES = (*SWAP_PHASES, "total")  # swapper/core/phases.py, and the whole swap
READY = re.compile(rb"listening on|server is listening")  # llama-server's, the fake's
CHAT = b'{"model":"%s","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---- a blocking HTTP/1.1 client: one connection per request, the same for every target ----


def http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, float, bytes]:
    """(status, seconds from connecting to the first response byte, body) of one request."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    began = time.perf_counter()
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head.encode() + b"\r\n" + body)
        data = sock.recv(65536)
        ttfb = time.perf_counter() - began
        chunks = [data]
        while data:
            data = sock.recv(65536)
            chunks.append(data)
    raw = b"".join(chunks)
    head_end = raw.find(b"\r\n\r\n")
    if not raw.startswith(b"HTTP/1.") or head_end < 0:
        raise RuntimeError(f"bad response from port {port}: {raw[:200]!r}")
    payload = raw[head_end + 4 :]
    if b"\r\ntransfer-encoding: chunked" in raw[:head_end].lower():
        payload = dechunk(payload)
    return int(raw[9:12]), ttfb, payload


def dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";")[0], 16)
        if not size:
            return b"".join(out)
        out.append(data[eol + 2 : eol + 2 + size])
        pos = eol + 4 + size


def chat(port: int, model: str) -> float:
    """Seconds to the first response byte of a small chat request (it must answer 200)."""
    status, ttfb, body = http(port, "POST", "/v1/chat/completions", CHAT % model.encode())
    if status != 200:
        raise RuntimeError(f"{model} on port {port}: HTTP {status}: {body[:300]!r}")
    return ttfb


def wait_healthy(port: int, proc: subprocess.Popen[bytes] | None = None, within: float = 60.0) -> None:
    deadline = time.perf_counter() + within
    while True:
        with contextlib.suppress(OSError):
            if http(port, "GET", "/health")[0] == 200:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"nothing healthy on port {port}")
        time.sleep(0.0005)


# ---- targets ----


def server_argv(args: argparse.Namespace, model: str, port: int) -> list[str]:
    if args.llama:
        return [
            str(LLAMA), "--host", HOST, "--port", str(port), *llama_flags(args),
            "-m", str(model_file(model)), "--alias", model,
        ]  # fmt: skip
    flags = ["--model-name", model, "--load-delay", str(args.load_delay), "--print-ready"]
    return [sys.executable, str(FAKE), "--port", str(port), *flags]


def model_file(model: str) -> Path:
    """The GGUF of a model: chat-a and chat-b are themselves, the collation's a, b, c ... alternate."""
    if model in ("chat-a", "chat-b"):
        return MODELS / f"{model}.gguf"
    return MODELS / f"chat-{'ab'[ord(model[-1]) % 2]}.gguf"


def llama_flags(args: argparse.Namespace) -> list[str]:
    return ["-t", "1", "-c", str(args.ctx), "-np", str(args.parallel), "--no-warmup"]


@contextlib.contextmanager
def started(argv: list[str], port: int, what: str, cwd: Path = ROOT) -> Iterator[psutil.Process]:
    """Runs ``argv`` (in its own session) while the block runs, from when ``port`` is healthy;
    then SIGTERMs its process group (SIGKILL after 30 s)."""
    proc = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        try:
            wait_healthy(port, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{what} did not start: {exc}") from None
        yield psutil.Process(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left in its group


def swapper_config(args: argparse.Namespace, names: list[str]) -> str:
    lines = ["healthCheckTimeout: 60", "models:"]
    for name in names:
        port = free_port()
        lines += [
            f"  {name}:",
            f"    cmd: {' '.join(server_argv(args, name, port))}",
            f"    proxy: http://{HOST}:{port}",
            f"    concurrencyLimit: {args.requests + 5}",
        ]
    return "\n".join(lines) + "\n"


def swapper_argv(config: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "swapper",
        "--config",
        config,
        "--listen",
        f"{HOST}:{port}",
        "--log-level",
        "warn",
    ]


@contextlib.contextmanager
def swapper_at(root: Path, config: str) -> Iterator[tuple[int, psutil.Process]]:
    """``python -m swapper`` run from ``root`` (another checkout's package wins over the venv's)."""
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
        with started(argv, port, f"swapper in {root}", cwd=root) as proc:
            yield port, proc
    finally:
        os.unlink(path)


@contextlib.contextmanager
def llama_router(args: argparse.Namespace, names: list[str]) -> Iterator[tuple[int, psutil.Process]]:
    """llama.cpp's router mode: the same models (named by their file stems), one at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            (Path(tmp) / f"{name}.gguf").symlink_to(model_file(name))
        port = free_port()
        argv = [str(LLAMA), "--models-dir", tmp, "--models-max", "1", "--host", HOST, "--port", str(port)]
        with started(
            [*argv, *llama_flags(args)], port, "llama.cpp's router"
        ) as proc:  # flags go to its children
            yield port, proc


class Direct:
    """The same servers without a proxy: each swap stops one by hand and starts the other, the
    way a supervisor at the physical limit would: SIGTERM and reap; spawn, read its output up to
    its readiness line, then probe ``/health`` until it answers 200 (once, for llama-server)."""

    def __init__(self, args: argparse.Namespace, names: list[str]) -> None:
        self._args = args
        self.ports = {name: free_port() for name in names}
        self._proc: subprocess.Popen[bytes] | None = None

    def swap_to(self, model: str) -> tuple[float, float]:
        """Seconds to stop the running server and to start ``model``'s."""
        stop = 0.0
        if self._proc is not None:
            began = time.perf_counter()
            self._proc.send_signal(signal.SIGTERM)
            self._proc.wait()
            stop = time.perf_counter() - began
            assert self._proc.stdout is not None
            self._proc.stdout.close()
        began = time.perf_counter()
        port = self.ports[model]
        argv = server_argv(self._args, model, port)
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if READY.search(line):
                break
        else:
            raise RuntimeError(f"{argv[0]} exited before its readiness line")
        wait_healthy(port, self._proc)
        return stop, time.perf_counter() - began

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of every thread of ``proc`` so far, to the nanosecond (psutil's is in 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def phase_sums(port: int) -> dict[str, float]:
    """swapper's ``swapper_swap_phase_seconds_sum`` by phase, over every model."""
    status, _, body = http(port, "GET", "/metrics")
    sums: dict[str, float] = {}
    if status != 200:
        return sums
    for m in re.finditer(rb"^swapper_swap_phase_seconds_sum\{([^}]*)\} (\S+)$", body, re.MULTILINE):
        phase = re.search(rb'phase="([^"]+)"', m.group(1))
        if phase is not None:
            key = phase.group(1).decode()
            sums[key] = sums.get(key, 0.0) + float(m.group(2))
    return sums


# ---- the swap benchmark ----


@dataclass
class Column:
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    over: list[float] = field(default_factory=list)  # cold - direct (stop + start), same round
    over_floor: list[float] = field(default_factory=list)  # ... - direct first answer too
    cpu: list[float] = field(default_factory=list)  # the proxy process's CPU seconds over a cold request
    phases: dict[str, list[float]] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def bench_swaps(args: argparse.Namespace) -> None:
    names = ["chat-a", "chat-b"] if args.llama else ["a", "b"]
    cols: dict[str, Column] = {}
    ports: dict[str, int] = {}
    procs: dict[str, psutil.Process] = {}
    stops: list[float] = []
    starts: list[float] = []
    firsts: list[float] = []
    direct = Direct(args, names)
    with contextlib.ExitStack() as stack:
        ports["swapper"], procs["swapper"] = stack.enter_context(
            swapper_at(ROOT, swapper_config(args, names))
        )
        for base in map(Path, args.baseline or ()):
            label = base.resolve().name
            ports[label], procs[label] = stack.enter_context(
                swapper_at(base.resolve(), swapper_config(args, names))
            )
        if args.llama and args.router:
            ports["router"], procs["router"] = stack.enter_context(llama_router(args, names))
        stack.callback(direct.close)
        for target, port in ports.items():
            try:
                chat(port, names[0])  # loads the first model, untimed
            except OSError as exc:
                raise RuntimeError(f"{target} on port {port}: {exc}") from None
            cols[target] = Column()
        direct.swap_to(names[0])
        chat(direct.ports[names[0]], names[0])
        targets = [*ports, "direct"]
        for i in range(args.rounds):
            model = names[(i + 1) % 2]
            shift = i % len(targets)
            stop = start = first = 0.0
            cold: dict[str, float] = {}
            for target in targets[shift:] + targets[:shift]:
                time.sleep(0.05)  # let the previous target's exits and logs settle
                if target == "direct":
                    stop, start = direct.swap_to(model)
                    first = chat(direct.ports[model], model)
                    chat(direct.ports[model], model)
                    continue
                port = ports[target]
                before = phase_sums(port)
                cpu = cpu_seconds(procs[target])
                cold[target] = chat(port, model)
                cols[target].cpu.append(cpu_seconds(procs[target]) - cpu)
                cols[target].warm.append(chat(port, model))
                after = phase_sums(port)
                for phase, total in after.items():
                    cols[target].phases.setdefault(phase, []).append(total - before.get(phase, 0.0))
            stops.append(stop)
            starts.append(start)
            firsts.append(first)
            for target, seconds in cold.items():
                cols[target].cold.append(seconds)
                cols[target].over.append(seconds - stop - start)
                cols[target].over_floor.append(seconds - stop - start - first)
        rss = procs["swapper"].memory_info().rss / 2**20
    report(args, cols, stops, starts, firsts, rss)


def report(
    args: argparse.Namespace,
    cols: dict[str, Column],
    stops: list[float],
    starts: list[float],
    firsts: list[float],
    rss: float,
) -> None:
    upstream = f"llama-server -c {args.ctx} -np {args.parallel} -t 1" if args.llama else "fake upstream"
    print(f"swaps: {args.rounds} rounds, {upstream}, max_tokens 4, alternating two models; ms")
    names = list(cols)
    print(f"  {'':<34}" + "".join(f"{n:>10}" for n in names) + f"{'direct':>10}")

    def row(label: str, values: list[float], direct: float | None = None) -> None:
        cells = "".join(f"{v * 1000:10.1f}" for v in values)
        tail = f"{direct * 1000:10.1f}" if direct is not None else ""
        print(f"  {label:<34}{cells}{tail}")

    med = statistics.median
    floor = [s + t + f for s, t, f in zip(stops, starts, firsts, strict=True)]
    row("cold TTFT p50", [med(cols[n].cold) for n in names], med(floor))
    row("cold TTFT p90", [pct(cols[n].cold, 0.9) for n in names], pct(floor, 0.9))
    row("warm TTFT p50", [med(cols[n].warm) for n in names])
    row("overhead over stop+start p50", [med(cols[n].over) for n in names])
    row("overhead over stop+start p90", [pct(cols[n].over, 0.9) for n in names])
    row("overhead over the floor p50", [med(cols[n].over_floor) for n in names])
    row("proxy CPU per cold request p50", [med(cols[n].cpu) for n in names])
    print(
        f"  direct: stop {med(stops) * 1000:.1f}, start (spawn to readiness line and /health 200)"
        f" {med(starts) * 1000:.1f},"
        f" first answer {med(firsts) * 1000:.1f} (medians; the floor is their sum)"
    )
    with_phases = [n for n in names if cols[n].phases]
    if with_phases:
        print("  swapper's phases, medians (swapper_swap_phase_seconds):")
        print(f"  {'':<34}" + "".join(f"{n:>10}" for n in with_phases))
        for phase in PHASES:
            values = [cols[n].phases.get(phase, []) for n in with_phases]
            if any(values):
                row(f"  {phase}", [med(v) if v else float("nan") for v in values])
    print(f"  swapper RSS after the run {rss:.1f} MiB")


# ---- collation (asyncio: its requests are concurrent) ----


def write_config(args: argparse.Namespace, names: list[str]) -> Path:
    fd, path = tempfile.mkstemp(suffix=".yaml")
    os.write(fd, swapper_config(args, names).encode())
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
            f"{HOST}:{port}",
            "--log-level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}"
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


async def post_chat(s: aiohttp.ClientSession, url: str, model: str) -> None:
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{model}: HTTP {r.status}: {await r.text()}")


async def run_workload(url: str, order: list[str], concurrent: bool) -> tuple[float, list[float]]:
    """Every request is due at t=0; its wait is the time from then to its first byte."""
    async with aiohttp.ClientSession() as s:
        began = time.perf_counter()

        async def timed(model: str) -> float:
            await post_chat(s, url, model)
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
    p.add_argument("--ctx", type=int, default=16384, help="llama-server --ctx-size")
    p.add_argument("--parallel", type=int, default=64, help="llama-server --parallel")
    p.add_argument(
        "--router",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="llama.cpp's router mode as a column with --llama (default: on)",
    )
    p.add_argument(
        "--baseline",
        metavar="DIR",
        action="append",
        help="another checkout of swapper to run as a column, named after its folder (repeatable)",
    )
    p.add_argument("--skip-collation", action="store_true")
    p.add_argument("--skip-swaps", action="store_true")
    args = p.parse_args()
    if args.llama and not LLAMA.exists():
        sys.exit(f"{LLAMA} is missing: run `python -m swapper.demo setup` (scripts/bootstrap.sh does)")
    if not args.skip_swaps:
        bench_swaps(args)
    if not args.skip_collation:
        asyncio.run(bench_collation(args))


if __name__ == "__main__":
    main()
