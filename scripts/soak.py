#!/usr/bin/env python3
"""Soak: a few thousand mixed requests through a real swapper, then an audit for anything lost.

Runs ``python -m swapper`` on loopback in front of three fake upstreams
(``tests/upstreams/fake_server.py``; one model at a time, so the mix forces swaps), and sends
``--requests`` requests from ``--concurrency`` clients: plain and streaming chat completions,
completions, embeddings, ``/props?model=``, requests for an unknown model, and clients that give
up (before the answer, or after the first streamed chunk). Requests come in phases that favour
one model, so they collate and swap. Once, about halfway, the child serving requests is
SIGKILLed; at three quarters, one is SIGSTOPped (hung: swapper must detect it, end its requests
and kill it, ``timeouts.hung`` being 2 s here). Throughout, swapper echoes every child's output
to a stderr pipe that nobody reads (``logToStdout: both``) until the end: a stalled terminal.

It stops by itself (every request has a timeout, the whole run a deadline) and then checks:
  * lost requests: every request got a response (status + complete body, a stream ending in
    ``[DONE]``), an explicit error (a JSON error envelope), or was visibly cut (a stream that
    ended without ``[DONE]``, with a final error event: only expected for streams on the
    children that were killed or stopped). A timeout or a connection error is lost;
  * replays: no request reached two children, nor one child twice (each request carries an
    ``X-Soak-Id``, which the fake upstreams log as they read it);
  * leaked slots: once the clients are done, GET /running shows inFlight 0 and queued 0 for
    every model (polled with a deadline: the releases of abandoned requests are messages);
  * leaked processes: at most one child while idle, and none at all (no fake server carrying
    this run's tag) after swapper has shut down on SIGTERM;
  * swapper's RSS (and open file descriptors: at most ``FD_SLACK`` more at the end) at the
    start, the peak and the end.

    .venv/bin/python scripts/soak.py                      # ~2,000 requests
    .venv/bin/python scripts/soak.py --requests 200 --json

Exit status: 0 when nothing was lost or leaked, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "upstreams" / "fake_server.py"
MODELS = ("alpha", "beta", "gamma")
TAG_ENV = "SWAPPER_SOAK_TAG"
FD_SLACK = 32  # idle keep-alive connections (client and upstream) may outlive the run briefly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path) -> None:
    lines = [
        "healthCheckTimeout: 30",
        "concurrencyLimit: 1000",
        "logToStdout: both",  # into a pipe nobody reads (see soak())
        "timeouts: {hung: 2}",
        "models:",
    ]
    for i, name in enumerate(MODELS):
        port = free_port()
        # 10 kB of output a request: swapper echoes it to its stderr, which nobody reads (soak()).
        flags = f"--model-name {name} --tps 3000 --tokens 6 --load-delay {0.02 * i:.2f} --request-lines 100"
        lines += [
            f"  {name}:",
            f"    cmd: {sys.executable} -S {FAKE} --port {port} {flags}",
            f"    proxy: http://127.0.0.1:{port}",
            "    unloadTimeout: 3",
        ]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Tally:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    truncated_after_crash: int = 0
    crash: dict[str, Any] = field(default_factory=dict)
    hang: dict[str, Any] = field(default_factory=dict)

    def note(self, kind: str, outcome: str) -> None:
        self.by_kind[kind] += 1
        self.outcomes[outcome] += 1


class Soak:
    def __init__(self, args: argparse.Namespace, base: str, swapper: psutil.Process, tag: str) -> None:
        self.args = args
        self.tag = tag
        self.base = base
        self.swapper = swapper
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.next_index = 0
        self.crash_at = int(args.requests * 0.5)
        self.hang_at = int(args.requests * 0.75)
        self.crashed = asyncio.Event()
        self.rss_peak = 0
        self.rss_at: dict[str, float] = {}  # at 25/50/75 % of the requests sent: is it still growing?

    # ---- one request ----

    def plan(self, index: int) -> tuple[str, str]:
        """(kind, model) of request ``index``: phases of ~40 requests favour one model."""
        rng = self.rng
        phase_model = MODELS[(index // 40) % len(MODELS)]
        model = phase_model if rng.random() < 0.75 else rng.choice(MODELS)
        kind = rng.choices(
            [
                "chat",
                "stream",
                "completion",
                "embedding",
                "props",
                "unknown",
                "cancel_early",
                "cancel_stream",
            ],
            weights=[30, 30, 8, 6, 4, 2, 10, 10],
        )[0]
        return kind, model

    async def one(self, session: aiohttp.ClientSession, index: int) -> None:
        kind, model = self.plan(index)
        try:
            async with asyncio.timeout(self.args.request_timeout):
                outcome = await self.send(session, kind, model, {"X-Soak-Id": str(index)})
        except TimeoutError:
            outcome = "LOST:timeout"
        except aiohttp.ClientError as exc:
            outcome = f"LOST:{type(exc).__name__}"
        if outcome.startswith("LOST"):
            self.tally.lost.append(f"#{index} {kind} {model}: {outcome}")
        self.tally.note(kind, outcome)

    async def send(
        self, session: aiohttp.ClientSession, kind: str, model: str, headers: dict[str, str]
    ) -> str:
        rng = self.rng
        if kind == "props":
            async with session.get(f"{self.base}/props", params={"model": model}, headers=headers) as resp:
                return await self.answer(resp)
        if kind == "embedding":
            body: dict[str, Any] = {"model": model, "input": "soak"}
            async with session.post(f"{self.base}/v1/embeddings", json=body, headers=headers) as resp:
                return await self.answer(resp)
        if kind == "completion":
            body = {"model": model, "prompt": "soak", "max_tokens": rng.randint(1, 8)}
            async with session.post(f"{self.base}/v1/completions", json=body, headers=headers) as resp:
                return await self.answer(resp)
        if kind == "unknown":
            body = {"model": "no-such-model", "messages": []}
            async with session.post(f"{self.base}/v1/chat/completions", json=body, headers=headers) as resp:
                return await self.answer(resp)
        stream = kind in ("stream", "cancel_stream") or (kind == "cancel_early" and rng.random() < 0.5)
        body = {"model": model, "stream": stream, "max_tokens": rng.randint(2, 24), "messages": []}
        if kind == "cancel_early":
            # Give up after 0-30 ms: usually while queued or waiting on a load.
            try:
                async with asyncio.timeout(rng.uniform(0.0, 0.03)):
                    async with session.post(
                        f"{self.base}/v1/chat/completions", json=body, headers=headers
                    ) as resp:
                        return await self.answer(resp, stream=stream)
            except TimeoutError:
                return "cancelled"
        async with session.post(f"{self.base}/v1/chat/completions", json=body, headers=headers) as resp:
            if kind == "cancel_stream" and resp.status == 200:
                await resp.content.readline()
                resp.close()  # the client goes away mid-stream
                return "cancelled"
            return await self.answer(resp, stream=stream)

    async def answer(self, resp: aiohttp.ClientResponse, *, stream: bool = False) -> str:
        if resp.status != 200:
            try:
                err = (await resp.json(content_type=None))["error"]
                return f"error:{resp.status}:{err['code']}"
            except (ValueError, KeyError, TypeError, aiohttp.ClientError):
                return f"LOST:status {resp.status} without a JSON error"
        try:
            data = await resp.read()
        except aiohttp.ClientPayloadError:
            return self.cut()
        if stream:
            return "ok" if data.rstrip().endswith(b"data: [DONE]") else self.cut()
        try:
            json.loads(data)
        except ValueError:
            return "LOST:200 with a body that is not JSON"
        return "ok"

    def cut(self) -> str:
        """A stream that ended without [DONE]: visible to the client, but only fine after a fault."""
        if self.crashed.is_set():
            self.tally.truncated_after_crash += 1
            return "truncated"
        return "LOST:stream cut before any crash"

    # ---- the run ----

    async def worker(self, session: aiohttp.ClientSession) -> None:
        while self.next_index < self.args.requests:
            index = self.next_index
            self.next_index += 1
            if index == self.crash_at:
                await self.crash_a_child(session)
            if index == self.hang_at:
                await self.hang_a_child(session)
            if index and index % max(1, self.args.requests // 4) == 0:
                with contextlib.suppress(psutil.Error):
                    self.rss_at[f"{round(100 * index / self.args.requests)}%"] = mib(
                        self.swapper.memory_info().rss
                    )
            await self.one(session, index)

    async def crash_a_child(self, session: aiohttp.ClientSession) -> None:
        """SIGKILLs a ready child that is serving requests, until swapper counts one crash.

        /running is an advisory read: by the time the signal lands the child may have been stopped
        for a swap already (it exits 0 and nothing crashed), so this tries again, a few times,
        until swapper's unexpected-exit counter moves.
        """
        counter = "swapper_model_unexpected_exits_total"
        before = (await metric_sums(self.base, (counter,))).get(counter)
        tries: list[dict[str, Any]] = []
        self.tally.crash = {"tries": tries, "noticed": False}
        for _ in range(10):
            victim = await self.pick_victim(session)
            if victim is None:
                return
            tries.append({"model": victim["model"], "pid": victim["pid"], "inFlight": victim["inFlight"]})
            self.crashed.set()
            kill_if_ours(victim["pid"], self.tag)
            if before is None:
                return  # no /metrics: one try
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if (await metric_sums(self.base, (counter,))).get(counter, 0.0) > before:
                    self.tally.crash["noticed"] = True
                    return
                await asyncio.sleep(0.01)

    async def hang_a_child(self, session: aiohttp.ClientSession) -> None:
        """SIGSTOPs a ready child serving requests: swapper must find it hung (``timeouts.hung``),
        end its requests with an explicit error and kill it. Counted by swapper_hang_probes_total."""
        counter = "swapper_hang_probes_total"
        self.tally.hang = {"tries": [], "noticed": False}
        for _ in range(5):
            victim = await self.pick_victim(session)
            if victim is None:
                return
            self.tally.hang["tries"].append({"model": victim["model"], "pid": victim["pid"]})
            self.crashed.set()
            stop_if_ours(victim["pid"], self.tag)
            deadline = time.monotonic() + 10.0  # hung (2 s), a tick, the probe (2 s), the kill
            while time.monotonic() < deadline:
                if not pid_stopped(victim["pid"]):
                    break  # killed (or it was being stopped for a swap, and SIGCONT woke it)
                await asyncio.sleep(0.05)
            if (await metric_hung(self.base, counter)) > 0:
                self.tally.hang["noticed"] = True
                return

    async def pick_victim(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """A ready model with requests in flight (or, after 2 s, any ready one; None after 7 s)."""
        deadline = time.monotonic() + 2.0
        while True:
            async with session.get(f"{self.base}/running") as resp:
                up = [r for r in (await resp.json())["running"] if r["pid"] and r["state"] == "ready"]
            if any(r["inFlight"] for r in up) or (up and time.monotonic() > deadline):
                return max(up, key=lambda r: int(r["inFlight"]))
            if time.monotonic() > deadline + 5:
                return None
            await asyncio.sleep(0.005)  # the other workers keep the load going meanwhile

    async def sample_rss(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.rss_peak = max(self.rss_peak, self.swapper.memory_info().rss)
            await asyncio.sleep(0.2)  # a measurement cadence, not a wait for some state

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.args.concurrency)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sampler = asyncio.ensure_future(self.sample_rss())
            try:
                await asyncio.gather(*(self.worker(session) for _ in range(self.args.concurrency)))
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler


async def wait_running_drained(base: str, within: float) -> list[dict[str, Any]]:
    """Polls /running until no model has requests in flight or queued; returns the last answer."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{base}/running") as resp:
                running: list[dict[str, Any]] = (await resp.json())["running"]
            if all(r["inFlight"] == 0 and r["queued"] == 0 for r in running) or time.monotonic() > deadline:
                return running
            await asyncio.sleep(0.02)


async def metric_sums(base: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of some Prometheus series (every label set) from /metrics; {} if it is not there."""
    sums = dict.fromkeys(names, 0.0)
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as resp:
        if resp.status != 200:
            return {}
        for line in (await resp.text()).splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in sums:
                sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


async def wait_listening(base: str, proc: asyncio.subprocess.Process, within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/health") as resp:
                    if resp.status == 200:
                        return
            if proc.returncode is not None:
                raise SystemExit(f"swapper exited during start-up (rc {proc.returncode})")
            if time.monotonic() > deadline:
                raise SystemExit("swapper did not start listening")
            await asyncio.sleep(0.02)


async def metric_hung(base: str, counter: str) -> float:
    """swapper_hang_probes_total{result="hung"}, summed over models."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(counter + "{") and 'result="hung"' in line
    )


def stop_if_ours(pid: int, tag: str) -> None:
    """SIGSTOPs ``pid`` if it is still one of this run's children."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if proc.environ().get(TAG_ENV) == tag:
            proc.send_signal(signal.SIGSTOP)


def pid_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def replays(log: Path) -> list[str]:
    """Request ids that reached more than one child, or one child more than once."""
    seen: dict[str, list[str]] = collections.defaultdict(list)
    with contextlib.suppress(FileNotFoundError):
        for line in log.read_text().splitlines():
            pid, _, ident = line.partition(" ")
            seen[ident].append(pid)
    return [f"#{ident}: pids {pids}" for ident, pids in seen.items() if len(pids) > 1]


def kill_if_ours(pid: int, tag: str) -> None:
    """SIGKILLs ``pid`` if it is still one of this run's children (a pid read earlier may be reused)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if proc.environ().get(TAG_ENV) == tag:
            proc.send_signal(signal.SIGKILL)


def tagged_fakes(tag: str) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        if "fake_server.py" not in " ".join(proc.info["cmdline"] or []):
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TAG_ENV) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


def mib(n: int) -> float:
    return round(n / 2**20, 1)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="swapper-soak-") as tmp:
        cfg = Path(tmp) / "models.yaml"
        write_config(cfg)
        listen = free_port()
        base = f"http://127.0.0.1:{listen}"
        request_log = Path(tmp) / "requests.log"
        env = {**os.environ, TAG_ENV: tag, "FAKE_REQUEST_LOG": str(request_log)}
        argv = [sys.executable, "-m", "swapper", "-c", str(cfg), "-l", f"127.0.0.1:{listen}"]
        out = args.swapper_log or subprocess.DEVNULL
        # stderr: a pipe nobody reads until the run is over (a stalled terminal); swapper must
        # serve on regardless, dropping console lines.
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE, limit=1 << 16
        )
        try:
            await wait_listening(base, proc, 30)
            swapper = psutil.Process(proc.pid)
            start_rss, start_fds = swapper.memory_info().rss, swapper.num_fds()
            began = time.monotonic()
            run = Soak(args, base, swapper, tag)
            await asyncio.wait_for(run.run(), timeout=args.deadline)
            duration = time.monotonic() - began
            running = await wait_running_drained(base, within=10)
            leaked_slots = [r for r in running if r["inFlight"] or r["queued"]]
            children = [
                p.pid
                for p in swapper.children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE and "swapper.runtime.reaper" not in p.cmdline()
            ]  # model children only: swapper's reaper (swapper/runtime/reaper.py) idles beside them
            end_rss, end_fds = swapper.memory_info().rss, swapper.num_fds()
            starts = await metric_sums(
                base,
                (
                    "swapper_model_starts_total",
                    "swapper_model_unexpected_exits_total",
                    "swapper_log_lines_dropped_total",
                ),
            )
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            drained = asyncio.ensure_future(drain(proc.stderr, args.swapper_log))  # the reader is back
            try:
                rc = await asyncio.wait_for(proc.wait(), timeout=30)
            except TimeoutError:
                proc.kill()
                rc = await proc.wait()
        await drained
        replayed = replays(request_log)
        for _ in range(250):  # up to 5 s: killed orphans are reaped by PID 1 at its own pace
            if not (left := tagged_fakes(tag)):
                break
            await asyncio.sleep(0.02)
    tally = run.tally
    errors = {k: v for k, v in sorted(tally.outcomes.items()) if k.startswith("error:")}
    return {
        "requests": sum(tally.outcomes.values()),
        "duration_s": round(duration, 2),
        "requests_per_s": round(sum(tally.outcomes.values()) / duration, 1),
        "concurrency": args.concurrency,
        "ok": tally.outcomes["ok"],
        "cancelled_by_client": tally.outcomes["cancelled"],
        "errors_by_kind": errors,
        "truncated_streams_after_crash": tally.truncated_after_crash,
        "lost": len(tally.lost),
        "lost_detail": tally.lost[:20],
        "by_request_kind": dict(sorted(tally.by_kind.items())),
        "crash": tally.crash,
        "hang": tally.hang,
        "replayed": replayed,
        "log_lines_dropped": starts.get("swapper_log_lines_dropped_total"),
        "child_starts": starts.get("swapper_model_starts_total"),
        "unexpected_child_exits": starts.get("swapper_model_unexpected_exits_total"),
        "leaked_slots": leaked_slots,
        "children_when_idle": len(children),
        "processes_left_after_shutdown": left,
        "swapper_exit_code": rc,
        "rss_mib": {
            "start": mib(start_rss),
            **run.rss_at,
            "end": mib(end_rss),
            "peak": mib(max(run.rss_peak, end_rss)),
        },
        "open_fds": {"start": start_fds, "end": end_fds},
        "fd_leak": end_fds - start_fds > FD_SLACK,
    }


async def drain(stream: asyncio.StreamReader | None, log: Any) -> None:
    """Reads swapper's stderr to its end (into ``log``, if any)."""
    if stream is None:
        return
    while chunk := await stream.read(1 << 16):
        if log:
            log.write(chunk)


def passed(report: dict[str, Any]) -> bool:
    return (
        report["lost"] == 0
        and not report["leaked_slots"]
        and report["children_when_idle"] <= 1
        and not report["processes_left_after_shutdown"]
        and report["swapper_exit_code"] == 0
        and not report["replayed"]
        and not report["fd_leak"]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds before a request counts as lost"
    )
    p.add_argument("--deadline", type=float, default=600.0, help="bound on the whole run, seconds")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--swapper-log", help="write swapper's output (info level) to this file")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.swapper_log:
            args.swapper_log = stack.enter_context(open(args.swapper_log, "wb"))
        report = asyncio.run(soak(args))
    report["passed"] = passed(report)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:32} {value}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
