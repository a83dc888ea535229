"""What one ``GET /metrics`` costs swapper in CPU, with three children running.

    .venv/bin/python scripts/scrape_cost.py [--scrapes 200] [--rounds 3] [--port 19200] [--base DIR]

Starts ``python -m swapper`` with three fake-upstream models (``tests/upstreams/fake_server.py``)
in one non-exclusive group, preloaded, waits until all three are ready, then scrapes ``/metrics``
``--scrapes`` times one after the other and reads swapper's own CPU time (user + system, its
threads included, its children not) before and after. The figure is CPU per scrape; the CPU the
same process spends idle over the same wall time (the run loop's tick, the children's output) is
measured just after and taken off. A scrape also asks each ready child for its own ``/metrics``,
so the script times the memory part alone too: ``Metrics.sample`` (the process trees, NVML) of
the three children, ``--samples`` times, in a separate interpreter with the same checkout.

``--base DIR``: another checkout (``git worktree add /tmp/base main``) measured in the same
rounds, alternating with this one, so both see the same machine load; the ratio is the figure to
quote. Both run with this virtualenv's Python, each with its own checkout first on ``sys.path``
(the fake upstream is this checkout's).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "upstreams" / "fake_server.py"
MODELS = ("a", "b", "c")


def config_text(port: int) -> str:
    lines = [f"startPort: {port + 10}", "healthCheckTimeout: 30", "models:"]
    for i, mid in enumerate(MODELS, start=1):
        lines += [
            f"  {mid}:",
            f"    cmd: {sys.executable} {FAKE} --port {port + i} --model-name {mid}",
            f"    proxy: http://127.0.0.1:{port + i}",
        ]
    lines += [
        "groups:",
        "  all:",
        "    swap: false",
        "    exclusive: false",
        f"    members: [{', '.join(MODELS)}]",
        "hooks:",
        "  on_startup:",
        f"    preload: [{', '.join(MODELS)}]",
    ]
    return "\n".join(lines) + "\n"


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        body: bytes = resp.read()
        return body


def cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


SAMPLE_ONLY = """
import asyncio, sys, time
from swapper.core.states import ModelSnapshot, ModelStatus, State
from swapper.observe import metrics
pids, n = [int(p) for p in sys.argv[1].split(",")], int(sys.argv[2])
try:  # a checkout with one sampler per process hands it in; an older one opens its own
    from swapper.memory.gpu import SystemSampler
    m = metrics.Metrics([], SystemSampler())
except TypeError:
    m = metrics.Metrics([])
snap = {str(p): ModelSnapshot(ModelStatus(State.READY, 0, 0, None), p, 0.0) for p in pids}
async def main():
    await m.sample(snap)  # the first opens what later ones reuse
    began = time.process_time()
    for _ in range(n):
        await m.sample(snap)
    print((time.process_time() - began) / n)
asyncio.run(main())
"""


def sample_cost(checkout: Path, pids: list[int], samples: int) -> float:
    """CPU seconds of one ``Metrics.sample`` of ``pids``' trees, with ``checkout``'s code."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    argv = [sys.executable, "-c", SAMPLE_ONLY, ",".join(map(str, pids)), str(samples)]
    return float(subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout)


def measure(checkout: Path, port: int, scrapes: int, samples: int, directory: Path) -> tuple[float, float]:
    """Seconds of swapper CPU per scrape (idle CPU over the same time taken off), and per
    ``Metrics.sample`` of the same three children."""
    cfg = directory / "three.yaml"
    cfg.write_text(config_text(port), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(checkout), "SWAPPER_CACHE": str(directory)}
    argv = [sys.executable, "-m", "swapper", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"]
    server = subprocess.Popen(
        argv, env=env, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        proc = psutil.Process(server.pid)
        deadline = time.monotonic() + 60
        while True:
            if time.monotonic() > deadline:
                raise SystemExit(f"{checkout}: the three models were not ready in time")
            try:
                if get(base + "/running").count(b'"ready"') == len(MODELS):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        get(base + "/metrics")  # the first scrape imports and opens what later ones reuse
        began, spent = time.monotonic(), cpu(proc)
        for _ in range(scrapes):
            get(base + "/metrics")
        wall, busy = time.monotonic() - began, cpu(proc) - spent
        idle_from = cpu(proc)
        time.sleep(wall)
        idle = cpu(proc) - idle_from
        children = [c.pid for c in proc.children()]
        return max(0.0, busy - idle) / scrapes, sample_cost(checkout, children, samples)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--port", type=int, default=19200, help="swapper's port; children take the next three"
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--base", type=Path, help="another checkout, measured in the same rounds")
    args = parser.parse_args()
    checkouts = {"this": ROOT}
    if args.base is not None:
        checkouts["base"] = args.base.resolve()
    scrape: dict[str, list[float]] = {name: [] for name in checkouts}
    sample: dict[str, list[float]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, checkout in checkouts.items():
                per_scrape, per_sample = measure(checkout, args.port, args.scrapes, args.samples, Path(tmp))
                scrape[name].append(per_scrape)
                sample[name].append(per_sample)
    for what, results in (("/metrics scrape", scrape), ("Metrics.sample", sample)):
        for name, values in results.items():
            cells = ", ".join(f"{v * 1e6:.0f}" for v in values)
            print(f"{name:5} CPU per {what}: median {statistics.median(values) * 1e6:7.0f} µs  [{cells}]")
        if "base" in results:
            ratio = statistics.median(results["this"]) / statistics.median(results["base"])
            print(f"this / base ({what}): {ratio:.2f}")


if __name__ == "__main__":
    main()
