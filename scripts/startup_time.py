"""How long swapper takes to start: exec → listening, and its imports.

    .venv/bin/python scripts/startup_time.py [--runs 15] [--base DIR]

Starts ``python -m swapper --config CFG --listen 127.0.0.1:PORT`` with a one-model config (no child
is started: models load on demand) and times from just before the exec to the first accepted TCP
connection, then SIGTERMs it. Prints the median and quartiles, and the median ``import
swapper.app.cli`` time (``python -X importtime``'s cumulative figure for it), and two floors timed in
the same rounds: a bare interpreter, and one that imports ``aiohttp.web`` and nothing else.

``--base DIR``: another checkout (``git worktree add /tmp/base main``) timed in the same rounds,
alternating run by run with this one, so both see the same machine load; the ratio is the figure
to quote. Both run with this virtualenv's Python, each with its own checkout first on
``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_file(directory: Path) -> Path:
    path = directory / "one-model.yaml"
    path.write_text("models:\n  m:\n    cmd: llama-server --port ${PORT} -m never-loaded.gguf\n")
    return path


def env_for(root: Path) -> dict[str, str]:
    # Bytecode is cached, as in an installed wheel (pip compiles it): without it every start
    # compiles swapper's modules again, which is not what a user's start costs.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(root)}


def exec_to_listening(root: Path, config: Path) -> tuple[float, float]:
    """(wall seconds from exec to the first accepted connection, CPU seconds the process used in
    all: start, idle and a SIGTERM shutdown; less sensitive than wall time to a busy machine)."""
    port = free_port()
    argv = [sys.executable, "-m", "swapper", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    began = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=root, env=env_for(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    took = None
    try:
        deadline = began + 30
        while took is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    took = time.perf_counter() - began
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"swapper in {root} exited with {proc.returncode} before listening")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"swapper in {root} not listening after 30 s")
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0  # reaped here, with its resource use
    assert took is not None
    return took, usage.ru_utime + usage.ru_stime


def bare_import(module: str) -> float:
    """Wall seconds of ``python -c "import MODULE"`` (the floor any server on it starts from)."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=env_for(ROOT))
    return time.perf_counter() - began


def import_time(root: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import swapper.app.cli"],
        cwd=root,
        env=env_for(root),
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    for line in out.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 3 and fields[2] == "swapper.app.cli":
            return int(fields[1]) / 1e6
    raise RuntimeError("swapper.app.cli not in -X importtime's output")


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    median = statistics.median(values) * 1000
    return f"median {median:6.0f} ms  (quartiles {q[0] * 1000:.0f}-{q[2] * 1000:.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--base", type=Path, help="another checkout to time in the same rounds")
    args = parser.parse_args()
    roots = {"this": ROOT} | ({"base": args.base.resolve()} if args.base else {})
    starts: dict[str, list[float]] = {name: [] for name in roots}
    cpus: dict[str, list[float]] = {name: [] for name in roots}
    imports: dict[str, list[float]] = {name: [] for name in roots}
    floors: dict[str, list[float]] = {"pass": [], "aiohttp.web": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = config_file(Path(tmp))
        for root in roots.values():
            exec_to_listening(root, config)  # warm the page cache and write the bytecode
        for _ in range(args.runs):
            for name, root in roots.items():
                wall, cpu = exec_to_listening(root, config)
                starts[name].append(wall)
                cpus[name].append(cpu)
                imports[name].append(import_time(root))
            floors["pass"].append(bare_import("sys"))
            floors["aiohttp.web"].append(bare_import("aiohttp.web"))
    for name in roots:
        print(f"{name:5} exec → listening {summary(starts[name])}")
        print(f"{name:5} CPU, whole run     {summary(cpus[name])}")
        print(f"{name:5} import swapper.app.cli {summary(imports[name])}")
    print(f"floor python -c pass           {summary(floors['pass'])}")
    print(f"floor python -c 'import aiohttp.web' {summary(floors['aiohttp.web'])}")
    if args.base:
        ratio = statistics.median(starts["this"]) / statistics.median(starts["base"])
        cpu_ratio = statistics.median(cpus["this"]) / statistics.median(cpus["base"])
        print(f"this / base: exec → listening {ratio:.2f}, CPU {cpu_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
