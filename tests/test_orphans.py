"""Children that outlived a SIGKILLed swapper and its reaper are reclaimed by the next swapper to
start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from swapper.runtime.orphans import OWNER_ENV, sweep_orphans
from tests.test_swapping import FAKE, free_port


def poll(cond: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def listening(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except OSError:
        return False


def grandchildren_of(pid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(OWNER_ENV, "").startswith(f"{pid}:"):
                out.append(proc)
        except psutil.Error:
            pass
    return out


def start(cfg: Path) -> tuple[subprocess.Popen[bytes], int]:
    listen = free_port()
    argv = [sys.executable, "-m", "swapper", "-c", str(cfg), "-l", f"127.0.0.1:{listen}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll(lambda: listening(listen), "swapper to listen")
    return proc, listen


def test_next_swapper_reclaims_grandchildren_of_a_killed_one(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "models.yaml"
    cfg.write_text(
        f"models:\n  a:\n    cmd: {sys.executable} -S {FAKE} --port {port} --fork-grandchild\n"
        f"    proxy: http://127.0.0.1:{port}\n"
    )
    first, listen = start(cfg)
    second = None
    try:
        body = json.dumps({"model": "a", "max_tokens": 2}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{listen}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=20).read()
        marked = grandchildren_of(first.pid)
        assert len(marked) == 2  # the server and the helper it forked
        # The reaper would end both the moment swapper dies; with it gone first (the OOM killer,
        # say), nothing does: the children of a CLI swapper rely on the reaper, not on a
        # parent-death signal.
        (reaper,) = [
            p for p in psutil.Process(first.pid).children() if "swapper.runtime.reaper" in p.cmdline()
        ]
        reaper.kill()
        poll(lambda: not reaper.is_running() or reaper.status() == psutil.STATUS_ZOMBIE, "the reaper to die")
        first.kill()
        first.wait()
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in marked)
        second, _ = start(cfg)
        poll(
            lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in marked),
            "the next swapper to reclaim the orphan",
        )
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()
        sweep_orphans()
