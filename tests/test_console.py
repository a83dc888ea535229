"""Console output never blocks serving: a stalled or closed stderr costs dropped lines, not requests.

``swapper.observe.console.Console`` against a real pipe that nobody reads, then one that is read again,
then one whose reader closed; and a real ``python -m swapper`` process whose stderr pipe nobody
drains while a child floods its output (``logToStdout: both``). Before: swapper sat in the pipe
write on its event loop, and every request timed out; once the reader left, every batch of child
output logged a ``BrokenPipeError`` traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapper.observe.console import Console
from tests.test_swapping import FAKE, free_port

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def stderr_to_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """sys.stderr is the write end of a fresh pipe; yields (read fd, write fd)."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        yield read_fd, write_fd
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            stream.close()
        with contextlib.suppress(OSError):
            os.close(read_fd)


def read_available(fd: int, until: bytes, within: float = 5.0) -> bytes:
    os.set_blocking(fd, False)
    got = b""
    deadline = time.monotonic() + within
    while until not in got:
        assert time.monotonic() < deadline, got[-300:]
        try:
            got += os.read(fd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
    return got


def test_a_stalled_reader_costs_dropped_lines_never_a_blocked_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(limit=64 * 1024)
    with stderr_to_pipe(monkeypatch) as (read_fd, _):
        line = "x" * 99 + "\n"
        began = time.monotonic()
        for _ in range(20_000):  # 2 MB: far more than the pipe (64 KiB) and the queue hold
            console.write(line)
        assert time.monotonic() - began < 2.0  # never waited on the pipe
        assert console.dropped > 0
        dropped = console.dropped
        console.write("after the stall\n")
        # The reader comes back: what was queued, then one line saying what was lost.
        got = read_available(read_fd, b"after the stall\n")
        said = re.findall(rb"swapper: (\d+) log lines dropped", got)
        assert said and sum(map(int, said)) == dropped  # every loss said, none twice
        # The reader leaves: console output ends quietly, and writing stays cheap.
        os.close(read_fd)
        for _ in range(100):
            console.write(line)
        console.flush()
        assert console.closed


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


def _chat(url: str, timeout: float) -> int:
    body = json.dumps({"model": "a", "messages": [], "max_tokens": 4}).encode()
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
        return int(resp.status)


def test_swapper_serves_on_while_nobody_reads_its_stderr(tmp_path: Path) -> None:
    port, child_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        "logToStdout: both\nlogLevel: debug\nmodels:\n  a:\n"
        f"    cmd: {sys.executable} {FAKE} --port {child_port} --model-name a --flood\n"
        f"    proxy: http://127.0.0.1:{child_port}\n"
    )
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "swapper", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # never read until the end: it fills within milliseconds
    )
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                if _get(url + "/health", 1)[0] == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "swapper never answered"
            time.sleep(0.05)
        for _ in range(10):
            assert _chat(url, timeout=10) == 200
        metrics = _get(url + "/metrics", 10)[1].decode()
        dropped = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("swapper_log_lines_dropped_total")
        )
        assert dropped > 0
        # The reader comes back for a while: swapper says what was lost.
        seen = bytearray()

        def drain() -> None:
            assert proc.stderr is not None
            while b"log lines dropped" not in seen and (chunk := proc.stderr.read1(1 << 16)):
                seen.extend(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        reader.join(10)
        assert b"log lines dropped" in seen
        # Then it leaves: swapper goes on serving, its /logs too.
        proc.stderr.close()
        for _ in range(5):
            assert _chat(url, timeout=10) == 200
        assert b"[a]" in _get(url + "/logs", 10)[1]
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
