"""Operable failures, with real ``python -m swapper`` processes: a taken port is one line and
exit status 2 (it was a 21-line traceback and 1); ``shutdownTimeout`` bounds the drain at
shutdown, and a line names the requests it cut (the 30 s drain could not be configured, and
cut streams went unmentioned)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.test_swapping import FAKE, free_port

ROOT = Path(__file__).resolve().parent.parent


def swapper(config: Path, port: int, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "swapper", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def one_model(tmp_path: Path, extra: str = "") -> Path:
    child_port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"{extra}\nmodels:\n  a:\n"
        f"    cmd: {sys.executable} {FAKE} --port {child_port} --model-name a\n"
        f"    proxy: http://127.0.0.1:{child_port}\n"
    )
    return config


def test_a_taken_port_is_one_line_naming_its_holder_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = swapper(one_model(tmp_path), port, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    text = err.decode()
    assert "Traceback" not in text
    # One line (orphans of other swappers on this machine, if any, are reported before it).
    assert text.strip().splitlines()[-1] == (
        f"swapper: cannot listen on 127.0.0.1:{port}: address already in use (by pid {_me()})"
    )


def _me() -> str:
    import os

    import psutil

    return f"{os.getpid()}, {psutil.Process().name()}"


def test_shutdown_timeout_bounds_the_drain_and_names_what_it_cut(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "swapper.log"
    with open(log, "wb") as out:
        proc = swapper(one_model(tmp_path, "shutdownTimeout: 1"), port, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        answer: dict[str, Any] = {}

        def slow_request() -> None:
            body = json.dumps({"model": "a", "messages": []}).encode()
            req = urllib.request.Request(
                url + "/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json", "X-Fake-Delay": "60"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer["status"] = resp.status
            except urllib.error.HTTPError as exc:
                answer["status"], answer["body"] = exc.code, exc.read()

        client = threading.Thread(target=slow_request)
        client.start()
        deadline = time.monotonic() + 20
        while "a" not in _in_flight(url):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        took = time.monotonic() - began
        client.join(10)
        assert 1 <= took < 10  # shutdownTimeout (1 s), then the child's stop; not 30 s
        assert answer["status"] == 503 and b"model_unloaded" in answer["body"]
        text = log.read_text()
        assert "shutdownTimeout is up: cutting the requests still in flight" in text
        assert "POST /v1/chat/completions (a," in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _in_flight(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/v1/status", timeout=2) as resp:
            models = json.loads(resp.read())["models"]
    except OSError:
        return ""
    return "".join(m["id"] for m in models if m["inFlight"])
