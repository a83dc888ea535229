"""A real swapper process in front of real llama-server/whisper-server children, for tests and benches.

Used by ``test_e2e_real.py``, ``test_readme.py`` and ``scripts/bench_real.py``. Everything here is
synchronous (subprocess, urllib, psutil) so that module-scoped fixtures and scripts can use it
without an event loop.

* ``demo_missing()``: why the real stack cannot run (``python -m swapper.demo setup`` not done),
  or None when it can. Use it in ``pytest.mark.skipif``.
* ``derived_config(dest, ...)``: the shipped ``models.yaml``, unchanged except ``startPort`` (a
  block of free ports, so a developer's own swapper on the default ports is never hit) and any
  top-level keys given; written to ``dest``. Its relative ``.demo/...`` paths need cwd = ROOT.
* ``SwapperProcess``: ``python -m swapper --config CFG --listen 127.0.0.1:PORT`` started in ROOT,
  ready once ``/health`` answers; small JSON helpers; ``stop()`` (SIGTERM, wait, then checks that
  every child it had is gone) and ``kill()`` (SIGKILL).
* ``LlamaServer``: one real llama-server run directly (no swapper), ready once ``/health`` answers
  200; ``stop()``. The compare tests put it beside a swapper running the same command.
* ``wait_for(predicate, within, what)``: polls until true, raises ``TimeoutError`` at the deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "models.yaml"
DEMO_DIR = ROOT / ".demo"
WAV = DEMO_DIR / "models" / "test.wav"
SERVER_NAMES = ("llama-server", "whisper-server")
READY_WITHIN = 30.0  # swapper's own start-up: a Python import, well under a second when idle
STOP_WITHIN = 30.0


def demo_missing() -> str | None:
    """Why the real upstreams cannot run here, or None when ``.demo`` is complete."""
    try:
        from swapper.demo.__main__ import resolve_paths
    except ImportError as exc:  # pragma: no cover - the demo package is part of swapper
        return f"swapper.demo cannot be imported: {exc}"
    info = resolve_paths(DEMO_DIR, whisper=True)
    missing = sorted(name for name, entry in info["entries"].items() if not entry["ready"])
    if missing:
        return (
            f"real upstreams not set up ({', '.join(missing)} missing under {DEMO_DIR}); "
            "run `.venv/bin/python -m swapper.demo setup` (scripts/bootstrap.sh does)"
        )
    return None


def wait_for(predicate: Callable[[], Any], within: float, what: str, interval: float = 0.01) -> Any:
    """Polls ``predicate`` until it returns something truthy (returned); ``TimeoutError`` otherwise."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int) -> int:
    """First port of ``n`` consecutive ports that were free a moment ago.

    Drawn below Linux's ephemeral range (32768+), so an outgoing connection will not take one of
    them between this check and the child's bind.
    """
    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        if all(_bindable(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports found")


def shipped_config() -> dict[str, Any]:
    data = yaml.safe_load(SHIPPED_CONFIG.read_text())
    assert isinstance(data, dict), f"{SHIPPED_CONFIG} is not a mapping"
    return data


def derived_config(dest: Path, **top_level: Any) -> Path:
    """Writes the shipped config with a free ``startPort`` block (and ``top_level`` keys) to ``dest``."""
    data = shipped_config()
    data["startPort"] = free_port_block(len(data.get("models") or {}) + 2)
    data.update(top_level)
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def _is_server(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(name in cmdline for name in SERVER_NAMES)


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class HTTPFailure(AssertionError):
    def __init__(self, status: int, body: str, url: str) -> None:
        super().__init__(f"HTTP {status} from {url}: {body[:500]}")
        self.status = status
        self.body = body


class SwapperProcess:
    """One ``python -m swapper`` process on a free port, with its log in ``log_path``."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swapper", "--config", str(config), "--listen", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._seen_children: dict[int, psutil.Process] = {}
        try:
            wait_for(self._ready, READY_WITHIN, f"swapper to answer /health on {self.url}", 0.02)
        except BaseException:
            self.kill()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"swapper exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    # ---- HTTP helpers (stdlib only, no pooling: each call is one connection) ----

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 60.0
    ) -> tuple[int, bytes, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read(), dict(err.headers)

    def json(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        status, raw, _ = self.request(method, path, body, timeout)
        if status != 200:
            raise HTTPFailure(status, raw.decode(errors="replace"), self.url + path)
        return json.loads(raw)

    def running(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.json("GET", "/running")["running"]
        for entry in entries:
            self._remember(entry.get("pid"))
        return entries

    def states(self) -> dict[str, str]:
        return {r["model"]: r["state"] for r in self.running()}

    def unload(self, model: str | None = None, timeout: float = 60.0) -> None:
        path = "/unload" if model is None else f"/api/models/unload/{model}"
        status, raw, _ = self.request("GET" if model is None else "POST", path, timeout=timeout)
        if status != 200:
            raise HTTPFailure(status, raw.decode(errors="replace"), self.url + path)

    # ---- processes ----

    def _remember(self, pid: int | None) -> None:
        if pid and pid not in self._seen_children:
            with contextlib.suppress(psutil.Error):
                self._seen_children[pid] = psutil.Process(pid)

    def server_children(self) -> list[psutil.Process]:
        """Live llama-server/whisper-server descendants of this swapper."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = [k for k in kids if _is_server(k) and not gone(k.pid)]
        for k in found:
            self._seen_children.setdefault(k.pid, k)
        return found

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> int:
        """SIGTERM, wait for a clean exit, then make sure no child it ever had is still alive."""
        self.server_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_WITHIN)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"swapper did not exit {STOP_WITHIN}s after SIGTERM:\n{self.log_tail()}"
                ) from None
        self._log.close()
        alive = [p for p in self._seen_children.values() if self._alive(p)]
        if alive:
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            raise AssertionError(f"children outlived swapper's clean exit: {[p.pid for p in alive]}")
        return self.proc.returncode

    @staticmethod
    def _alive(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def kill(self) -> None:
        """SIGKILLs swapper itself (not its children: that is what PDEATHSIG is for) and reaps it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


class LlamaServer:
    """A real llama-server on a free port, run directly: ``argv`` without ``--host``/``--port``."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self._ready, READY_WITHIN, f"llama-server to answer /health on {self.url}", 0.01)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_WITHIN)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # llama-server, on SIGTERM, waits for its open connections to end
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def running_swapper(config: Path, log_path: Path) -> Iterator[SwapperProcess]:
    stack = SwapperProcess(config, log_path)
    try:
        yield stack
    finally:
        stack.stop()


def env_without_proxies() -> dict[str, str]:
    """The environment for clients run as subprocesses: no HTTP proxy may intercept 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env
