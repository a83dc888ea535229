"""Shared fixtures for swapper's tests.

Real upstream processes:
  fake_server_cmd(port, *flags) -> list[str]
      argv that runs ``tests/upstreams/fake_server.py --port PORT *flags`` with this interpreter
      (see that file's docstring for flags and endpoints).
  free_port() -> int
      a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close).
  fake_model(model_id="fake", *flags, port=None, **overrides) -> ModelConfig
      a ModelConfig whose cmd runs the fake server as ``--model-name model_id`` on ``port`` (a
      free one by default), proxy ``http://127.0.0.1:PORT``, check_endpoint "/health"; any other
      ModelConfig field can be overridden (cmd_stop=..., health_check_timeout=...).
  wait_until(predicate, within=5.0, what="condition") -> Awaitable[None]
      polls a sync predicate every few ms until it is true; fails the test at the deadline.
      For conditions no event reports (another process's death); prefer awaiting events.

In-process servers: ``aiohttp_client(app)`` (pytest-aiohttp's fixture, wrapped here) serves an app
built by ``swapper.app.server.make_app`` through ``swapper.app.site.FrontSite``, as ``swapper`` itself
does, so in-process tests cover the front door's fast path and its hand-offs to aiohttp. Other
apps (test upstreams) are served by aiohttp's own test server.

Leak check (autouse, every test): a test fails at teardown if a process it started, directly or
not (grandchildren and orphans too), whose command line mentions fake_server.py, llama-server or
whisper-server is still alive once the test and its fixtures have finished; the leftovers are
then SIGKILLed so later tests start clean. "Started by this test" means: carries this test's
``SWAPPER_TEST_TAG`` environment value (the fixture sets it in os.environ for the test's
duration, so every child and grandchild inherits it), or is a descendant of the test process
that was not there before the test. Other pytest runs on the same machine are left alone.
Cost: one scan of /proc before and after each test (~2 ms).

Event loop: uvloop, the loop ``swapper`` itself runs on, unless ``SWAPPER_TEST_LOOP=asyncio``
asks for asyncio's own (the CLI's fallback without uvloop). The two differ in ways swapper meets
(uvloop's process transport reports closing as soon as the process exits), so CI runs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web

from swapper.config.schema import ModelConfig
from swapper.web.appkeys import CONFIG
from tests.frontserver import FrontTestServer

FAKE_SERVER = Path(__file__).parent / "upstreams" / "fake_server.py"
TAG_ENV = "SWAPPER_TEST_TAG"
WATCHED = (b"fake_server.py", b"llama-server", b"whisper-server")
EXIT_GRACE = 2.0  # a SIGKILLed process may take a moment to be gone; only then is it a leak


def _fake_server_cmd(port: int, *flags: str) -> list[str]:
    # -S: the fake imports only the stdlib, and skipping site-packages saves start-up time.
    return [sys.executable, "-S", str(FAKE_SERVER), "--port", str(port), *flags]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def fake_server_cmd() -> Callable[..., list[str]]:
    return _fake_server_cmd


@pytest.fixture
def free_port() -> Callable[[], int]:
    return _free_port


@pytest.fixture
def fake_model() -> Callable[..., ModelConfig]:
    def make(model_id: str = "fake", *flags: str, port: int | None = None, **overrides: Any) -> ModelConfig:
        port = port or _free_port()
        cmd = _fake_server_cmd(port, "--model-name", model_id, *flags)
        model = ModelConfig(
            id=model_id,
            cmd=tuple(cmd),
            cmd_text=shlex.join(cmd),
            proxy=f"http://127.0.0.1:{port}",
            check_endpoint="/health",
            port=port,
        )
        return replace(model, **overrides)

    return make


async def _wait_until(predicate: Callable[[], bool], within: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[None]]:
    return _wait_until


# --- leak check ------------------------------------------------------------------------------


def _watched_pids() -> set[int]:
    """Pids whose command line mentions a watched program (cheap: one read per process)."""
    if not sys.platform.startswith("linux"):
        return {
            p.pid for p in psutil.process_iter(["cmdline"]) if _watched(" ".join(p.info["cmdline"] or []))
        }
    pids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if any(w in cmdline for w in WATCHED):
                pids.add(int(name))
    return pids


def _watched(cmdline: str) -> bool:
    return any(w.decode() in cmdline for w in WATCHED)


def _identity(pid: int) -> tuple[int, float] | None:
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive_and_ours(pid: int, tag: str, before: set[tuple[int, float]]) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if (pid, proc.create_time()) in before or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        try:
            if proc.environ().get(TAG_ENV) == tag:
                return proc
        except psutil.AccessDenied:
            pass
        me = os.getpid()
        if any(parent.pid == me for parent in proc.parents()):
            return proc
    except psutil.Error:
        pass
    return None


def _leftovers(tag: str, before: set[tuple[int, float]]) -> list[psutil.Process]:
    return [p for pid in _watched_pids() if (p := _alive_and_ours(pid, tag, before)) is not None]


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {shlex.join(proc.cmdline())}"
    except psutil.Error:
        return f"pid {proc.pid}"


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    before = {ident for pid in _watched_pids() if (ident := _identity(pid)) is not None}
    tag = uuid.uuid4().hex
    previous = os.environ.get(TAG_ENV)
    os.environ[TAG_ENV] = tag
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TAG_ENV, None)
        else:
            os.environ[TAG_ENV] = previous
    leaked = _leftovers(tag, before)
    deadline = time.monotonic() + EXIT_GRACE
    while leaked and time.monotonic() < deadline:
        time.sleep(0.01)
        leaked = [p for p in leaked if _alive_and_ours(p.pid, tag, before) is not None]
    if not leaked:
        return
    described = [_describe(p) for p in leaked]
    for p in leaked:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leaked, timeout=EXIT_GRACE)
    pytest.fail("test left processes running (now killed):\n  " + "\n  ".join(described), pytrace=False)


@pytest.fixture
def aiohttp_client(aiohttp_client: Any) -> Callable[..., Awaitable[Any]]:
    """pytest-aiohttp's ``aiohttp_client``; a swapper app (``make_app``) goes through FrontSite."""

    async def go(param: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(param, web.Application) and CONFIG in param:
            param = FrontTestServer(param)
        return await aiohttp_client(param, *args, **kwargs)

    return go


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """The loop the tests run on: uvloop, as ``swapper.app.cli.run`` does when it is installed, unless
    ``SWAPPER_TEST_LOOP=asyncio`` asks for asyncio's own (the CLI's fallback; CI runs both)."""
    if os.environ.get("SWAPPER_TEST_LOOP", "uvloop") != "asyncio":
        with contextlib.suppress(ImportError):
            import uvloop

            return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()
