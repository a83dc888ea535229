"""children.Child against real processes: the fake upstream, small scripts, a SIGKILLed parent.

No test sleeps to wait for a state: each awaits the child's own events or polls a condition
with a deadline (``wait_until``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from swapper.config.schema import ModelConfig
from swapper.core.errors import ModelLoadFailed
from swapper.observe.logs import LogHub
from swapper.runtime import children, process
from swapper.runtime.children import Child, OnLines, exit_reason

MakeModel = Callable[..., ModelConfig]
WaitUntil = Callable[..., Awaitable[None]]


class Lines:
    """A child's output: kept in a real log hub's ring (as the run loop's are), and recorded a line
    at a time with its stream, so a test can await a line matching a pattern. ``also`` sees each
    read's lines as they come."""

    def __init__(self, also: OnLines | None = None) -> None:
        self.seen: list[tuple[str, str]] = []
        self._changed = asyncio.Event()
        self._output = LogHub().output("test")
        self._also = also

    def __call__(self, stream: str, lines: list[str]) -> None:
        self.seen.extend((stream, line) for line in lines)
        self._output(stream, lines)
        if self._also is not None:
            self._also(stream, lines)
        self._changed.set()

    def last(self, n: int) -> list[str]:
        return self._output.last(n)

    def find(self, pattern: str) -> re.Match[str] | None:
        for _, line in self.seen:
            if m := re.search(pattern, line):
                return m
        return None

    async def wait_for(self, pattern: str, within: float = 5.0) -> re.Match[str]:
        async with asyncio.timeout(within):
            while (m := self.find(pattern)) is None:
                self._changed.clear()
                await self._changed.wait()
        return m


@asynccontextmanager
async def running(model: ModelConfig, lines: Lines, **kwargs: Any) -> AsyncIterator[Child]:
    child = Child(model, output=lines, **kwargs)
    await child.spawn()
    try:
        yield child
    finally:
        await child.stop(grace=2.0)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_output_lines_reach_on_line_and_exit_is_reported(fake_model: MakeModel) -> None:
    lines = Lines()
    exits: list[int] = []
    model = fake_model("alpha", "--print-ready")
    async with running(model, lines, on_exit=exits.append) as child:
        assert child.pid is not None and not child.exited() and child.returncode is None
        await lines.wait_for(r"server is listening on http://127\.0\.0\.1:\d+")
        assert any(s == "stdout" and "loading model alpha" in line for s, line in lines.seen)
        assert child.ready_lines_seen == 1
        assert any("loading model alpha" in line for line in child.last_lines(5))
    assert child.exited() and child.returncode in (0, -signal.SIGTERM)
    assert exits == [child.returncode]
    assert child.stop_requested


async def test_lines_are_split_cleaned_and_bounded(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "sys.stdout.write('progress 10%\\rprogress 20%\\r\\n')\n"
        "sys.stdout.write('x' * 20000 + '\\n\\n')\n"
        "sys.stderr.write('to stderr\\n')\n"
        "sys.stdout.write('caf\\xe9 ' + chr(0xff) + '\\n')\n"
        "sys.stdout.write('no newline at end')\n"
    )
    model = ModelConfig(
        id="script", cmd=(sys.executable, "-c", script), cmd_text="", proxy="", check_endpoint=None
    )
    lines = Lines()
    child = Child(model, output=lines)
    await child.spawn()
    assert await child.wait_exited() == 0
    stdout = [line for stream, line in lines.seen if stream == "stdout"]
    assert stdout[0] == "progress 20%"
    pieces = stdout[1:-2]
    assert all(set(piece) == {"x"} and len(piece) <= 8192 for piece in pieces)
    assert sum(map(len, pieces)) == 20000
    assert stdout[-2:] == ["café ÿ", "no newline at end"]
    assert ("stderr", "to stderr") in lines.seen


async def test_failing_on_line_callback_does_not_stop_reading(fake_model: MakeModel) -> None:
    class Explodes(Lines):
        exploded = False

        def __call__(self, stream: str, lines: list[str]) -> None:
            if not self.exploded:
                self.exploded = True
                raise RuntimeError("consumer bug")
            super().__call__(stream, lines)

    lines = Explodes()
    child = Child(fake_model("alpha", "--exit-after", "0.2"), output=lines)
    await child.spawn()
    assert await child.wait_exited() == 2
    assert lines.exploded  # the first read's lines were lost with it, and reading went on
    assert any("fake crash" in line for line in child.last_lines())


async def test_stop_sends_sigterm_to_the_group(fake_model: MakeModel) -> None:
    lines = Lines()
    child = Child(fake_model("alpha"), output=lines)
    await child.spawn()
    await lines.wait_for("accepting connections")  # its SIGTERM handler is installed by now
    t0 = time.monotonic()
    rc = await child.stop(grace=10.0)
    assert rc in (0, -signal.SIGTERM)
    assert time.monotonic() - t0 < 2.0
    assert lines.find("SIGTERM received")
    assert child.stop_requested and child.exited() and child.returncode == rc


async def test_sigterm_ignored_escalates_to_sigkill_after_grace(fake_model: MakeModel) -> None:
    lines = Lines()
    child = Child(fake_model("stubborn", "--ignore-sigterm"), output=lines)
    await child.spawn()
    await lines.wait_for("accepting connections")  # SIGTERM is ignored from here on
    t0 = time.monotonic()
    rc = await child.stop(grace=0.5)
    elapsed = time.monotonic() - t0
    assert rc == -signal.SIGKILL
    assert 0.49 <= elapsed < 3.0  # uvloop's clock has millisecond steps: ~1 ms early at worst
    assert exit_reason(rc) == "was killed by SIGKILL"


async def test_stop_kills_a_forked_grandchild(fake_model: MakeModel, wait_until: WaitUntil) -> None:
    lines = Lines()
    child = Child(fake_model("forker", "--fork-grandchild"), output=lines)
    await child.spawn()
    grandchild = int((await lines.wait_for(r"GRANDCHILD (\d+)"))[1])
    assert not gone(grandchild)
    assert os.getpgid(grandchild) == child.pid
    rc = await child.stop(grace=5.0)
    # The grandchild ignores SIGTERM; only the SIGKILL to the group after the leader's exit ends
    # it, and stop() did not have to wait out the grace for that.
    assert rc in (0, -signal.SIGTERM)
    await wait_until(lambda: gone(grandchild), what="the grandchild to die")


def test_groups_and_grandchildren_under_uvloop(fake_model: MakeModel, wait_until: WaitUntil) -> None:
    """The CLI runs on uvloop, whose subprocess_exec has no process_group: the group still forms."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        lines = Lines()
        child = Child(fake_model("forker", "--fork-grandchild"), output=lines)
        await child.spawn()
        grandchild = int((await lines.wait_for(r"GRANDCHILD (\d+)"))[1])
        assert child.pid is not None
        assert os.getpgid(child.pid) == child.pid == os.getpgid(grandchild)
        assert await child.stop(grace=5.0) in (0, -signal.SIGTERM)
        await wait_until(lambda: gone(grandchild), what="the grandchild to die")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_crashed_leader_takes_its_group_with_it(fake_model: MakeModel, wait_until: WaitUntil) -> None:
    lines = Lines()
    child = Child(fake_model("forker", "--fork-grandchild", "--exit-after", "0.3"), output=lines)
    await child.spawn()
    grandchild = int((await lines.wait_for(r"GRANDCHILD (\d+)"))[1])
    # The grandchild holds the pipes open, yet the exit is reported promptly with all output.
    assert await asyncio.wait_for(child.wait_exited(), 5.0) == 2
    assert "fake crash" in child.last_lines(1)[0]
    await wait_until(lambda: gone(grandchild), what="the grandchild to die")
    assert await child.stop(grace=1.0) == 2  # stop after exit: no-op, same code


async def test_cmd_stop_replaces_pid_and_is_used_instead_of_sigterm(fake_model: MakeModel) -> None:
    lines = Lines()
    child = Child(fake_model("alpha", cmd_stop=("kill", "-INT", "${PID}")), output=lines)
    await child.spawn()
    await lines.wait_for("accepting connections")
    assert await child.stop(grace=5.0) == 0
    assert lines.find("SIGINT received")
    assert not lines.find("SIGTERM")


async def test_cmd_stop_that_does_nothing_is_followed_by_sigkill(fake_model: MakeModel) -> None:
    lines = Lines()
    model = fake_model("alpha", cmd_stop=(sys.executable, "-c", "print('stopping ${PID}')"))
    child = Child(model, output=lines)
    await child.spawn()
    await lines.wait_for("accepting connections")
    assert await child.stop(grace=0.3) == -signal.SIGKILL
    assert ("cmd_stop", f"stopping {child.pid}") in lines.seen


async def test_unrunnable_cmd_stop_falls_back_to_sigterm(fake_model: MakeModel) -> None:
    lines = Lines()
    child = Child(fake_model("alpha", cmd_stop=("/nonexistent/stop-it", "${PID}")), output=lines)
    await child.spawn()
    await lines.wait_for("accepting connections")
    assert await child.stop(grace=5.0) in (0, -signal.SIGTERM)
    assert lines.find("SIGTERM received")


async def test_missing_binary_raises_model_load_failed() -> None:
    model = ModelConfig(
        id="ghost", cmd=("/nonexistent/llama-server", "-m", "x"), cmd_text="", proxy="", check_endpoint=None
    )
    child = Child(model, output=Lines())
    with pytest.raises(ModelLoadFailed, match=r"'ghost'.*/nonexistent/llama-server.*no such file"):
        await child.spawn()
    assert child.pid is None and not child.exited()


async def test_non_executable_binary_raises_model_load_failed(tmp_path: Path) -> None:
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\n")
    model = ModelConfig(id="noexec", cmd=(str(script),), cmd_text="", proxy="", check_endpoint=None)
    with pytest.raises(ModelLoadFailed, match="permission denied"):
        await Child(model, output=Lines()).spawn()


async def test_a_command_is_looked_up_on_the_path_and_a_directory_is_not_run(tmp_path: Path) -> None:
    lines = Lines()
    echo = ModelConfig(
        id="echo", cmd=("sh", "-c", "echo on the path"), cmd_text="", proxy="", check_endpoint=None
    )
    child = Child(echo, output=lines)
    await child.spawn()
    assert await child.wait_exited() == 0
    assert lines.seen == [("stdout", "on the path")]
    folder = ModelConfig(id="dir", cmd=(str(tmp_path),), cmd_text="", proxy="", check_endpoint=None)
    with pytest.raises(ModelLoadFailed, match="permission denied"):
        await Child(folder, output=Lines()).spawn()


async def test_model_env_is_added_to_the_environment(tmp_path: Path) -> None:
    script = "import os; print(os.environ['SWAPPER_X'], 'PATH' in os.environ)"
    model = ModelConfig(
        id="env",
        cmd=(sys.executable, "-c", script),
        cmd_text="",
        proxy="",
        check_endpoint=None,
        env=(("SWAPPER_X", "42"),),
    )
    lines = Lines()
    child = Child(model, output=lines)
    await child.spawn()
    assert await child.wait_exited() == 0
    assert lines.seen == [("stdout", "42 True")]


async def test_concurrent_and_repeated_stops_share_one_outcome(fake_model: MakeModel) -> None:
    lines = Lines()
    child = Child(fake_model("alpha"), output=lines)
    await child.spawn()
    await lines.wait_for("accepting connections")
    results = await asyncio.gather(child.stop(1.0), child.stop(5.0), child.stop(0.0))
    assert len(set(results)) == 1
    assert await child.stop(1.0) == results[0]
    assert len([1 for _, line in lines.seen if "SIGTERM received" in line]) == 1


async def test_cancelled_stop_kills_at_once(fake_model: MakeModel) -> None:
    lines = Lines()
    child = Child(fake_model("stubborn", "--ignore-sigterm"), output=lines)
    await child.spawn()
    await lines.wait_for("accepting connections")
    stopping = asyncio.ensure_future(child.stop(grace=60.0))
    await asyncio.sleep(0)  # let stop() start
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert await asyncio.wait_for(child.wait_exited(), 5.0) == -signal.SIGKILL


PARENT_SCRIPT = """
import asyncio, os, sys
from swapper.runtime import process
from swapper.runtime.children import Child
from swapper.config.schema import ModelConfig
from swapper.observe.logs import LogHub

if os.environ.get("NO_SETPRIV"):
    process.pdeathsig_wrapper = lambda: ()  # the pre-exec hook's fallback

async def main():
    model = ModelConfig(id="orphan", cmd=tuple(sys.argv[1:]), cmd_text="", proxy="", check_endpoint=None)
    child = Child(model, output=LogHub().output("orphan"))
    await child.spawn()
    print(child.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize("wrapper", ["setpriv", "pre-exec hook"])
async def test_child_dies_when_swapper_is_sigkilled(
    fake_server_cmd: Callable[..., list[str]],
    free_port: Callable[[], int],
    wait_until: WaitUntil,
    wrapper: str,
) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    if wrapper == "setpriv" and not process.pdeathsig_wrapper():
        pytest.skip("no setpriv with --pdeathsig here")
    env = {**os.environ, **({"NO_SETPRIV": "1"} if wrapper != "setpriv" else {})}
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PARENT_SCRIPT,
        *fake_server_cmd(free_port()),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        child_pid = int(await asyncio.wait_for(parent.stdout.readline(), 10.0))  # type: ignore[union-attr]
        assert not gone(child_pid)
    finally:
        parent.kill()
        await parent.communicate()
    assert parent.returncode == -signal.SIGKILL
    await wait_until(lambda: gone(child_pid), what="the orphaned child to die")


# --- the fake upstream itself (every real-process test relies on it) ------------------------


async def test_fake_server_endpoints(fake_model: MakeModel, wait_until: WaitUntil) -> None:
    from swapper.runtime.health import wait_healthy

    lines = Lines()
    model = fake_model("alpha", "--tokens", "3")
    async with running(model, lines) as child, aiohttp.ClientSession(model.proxy) as http:
        await wait_healthy(http, child, f"{model.proxy}/health", 10.0)

        async with http.post("/v1/chat/completions", json={"max_tokens": 2}) as r:
            body = await r.json()
        assert body["model"] == "alpha"
        assert body["choices"][0]["message"]["content"] == "alpha#0 alpha#1 "

        async with http.post("/v1/chat/completions", json={"stream": True}) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            events = (await r.read()).decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == [
            "alpha#0 ",
            "alpha#1 ",
            "alpha#2 ",
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        async def chunked() -> Any:
            yield b"he"
            yield b"llo"

        async with http.put("/any/path?b=2&a=1", data=chunked(), headers={"X-Test": "1"}) as r:
            echo = await r.json()
        assert (echo["method"], echo["path"], echo["query"]) == ("PUT", "/any/path", "b=2&a=1")
        assert base64.b64decode(echo["body_b64"]) == b"hello"
        assert echo["headers"]["X-Test"] == "1" and echo["pid"] == child.pid

        form = aiohttp.FormData()
        form.add_field("model", "whisper")
        form.add_field("file", b"\0" * 3000, filename="a.wav", content_type="audio/wav")
        async with http.post("/v1/audio/transcriptions", data=form) as r:
            assert await r.json() == {
                "text": "alpha heard 3000 bytes",
                "model": "whisper",
                "file_bytes": 3000,
            }

        async with http.get("/props") as r:
            assert (await r.json())["model_name"] == "alpha"
        async with http.post("/sdapi/v1/txt2img", json={"prompt": "x"}) as r:
            assert base64.b64decode((await r.json())["images"][0]).startswith(b"\x89PNG")


async def test_fake_server_crash_after_bytes(fake_model: MakeModel) -> None:
    lines = Lines()
    model = fake_model("alpha", "--crash-after-bytes", "300")
    child = Child(model, output=lines)
    await child.spawn()
    async with aiohttp.ClientSession(model.proxy) as http:
        from swapper.runtime.health import wait_healthy

        await wait_healthy(http, child, f"{model.proxy}/health", 10.0)
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post("/v1/chat/completions", json={"stream": True}) as r:
                async for data in r.content.iter_any():
                    received += data
    assert len(received) == 300
    assert await child.wait_exited() == 3


def test_exit_reason() -> None:
    assert exit_reason(0) == "exited with code 0"
    assert exit_reason(-signal.SIGTERM) == "was killed by SIGTERM"
    assert exit_reason(-99) == "was killed by signal 99"


def test_env_override_wins(fake_model: MakeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPPER_Y", "outer")
    model = replace(fake_model("alpha"), env=(("SWAPPER_Y", "inner"),))
    assert Child(model, output=Lines()).env()["SWAPPER_Y"] == "inner"


def script_model(script: str) -> ModelConfig:
    return ModelConfig(
        id="script", cmd=(sys.executable, "-c", script), cmd_text="", proxy="", check_endpoint=None
    )


async def test_batched_output_arrives_whole_in_order_and_in_few_reads() -> None:
    # 100 lines, one every 5 ms: read eagerly, nearly every line would be its own read.
    script = "import sys, time\nfor i in range(100):\n    print(f'line {i}', flush=True); time.sleep(0.005)\n"
    reads: list[list[str]] = []  # the lines of one read come in one call
    child = Child(script_model(script), output=Lines(lambda _s, lines: reads.append(lines)))
    await child.spawn()
    child.batch_output(0.05)
    assert await child.wait_exited() == 0
    assert [line for lines in reads for line in lines] == [f"line {i}" for i in range(100)]
    assert len(reads) <= 25, len(reads)  # ~0.5 s of output, read every 50 ms


async def test_a_chatty_child_never_blocks_on_a_resting_pipe() -> None:
    # 8 MB as fast as the child can write: a pipe resting the full batch time after each read
    # (64 KiB at most) would block it for an hour; rests shrink with the rate it fills at.
    script = "import sys\nline = 'x' * 99 + '\\n'\nfor _ in range(80_000):\n    sys.stdout.write(line)\n"
    got = collections.Counter[str]()
    child = Child(script_model(script), output=Lines(lambda _s, lines: got.update(lines)))
    await child.spawn()
    child.batch_output(3600.0)
    async with asyncio.timeout(60):
        assert await child.wait_exited() == 0
    assert got == {"x" * 99: 80_000}


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_crash_of_a_batching_child_is_seen_at_once(monkeypatch: pytest.MonkeyPatch, loop_name: str) -> None:
    # SIGKILLed while its pipe rests: the exit must wake the pipe, whose end completes the exit.
    # Left paused, the pipe would only close at DRAIN_TIMEOUT (an hour here; 1 s in production,
    # a second in which a dead model looks alive). uvloop, which the CLI runs on, is where a
    # pipe could be left paused: its process transport says it is closing once the process exits.
    monkeypatch.setattr(children, "DRAIN_TIMEOUT", 3600.0)
    monkeypatch.setattr(children, "_PIPE_QUARTER", 1 << 62)  # every read rests the full hour
    script = "import os, time\nos.write(1, b'up\\n')\ntime.sleep(60)\n"

    async def scenario() -> None:
        lines = Lines()
        exited = asyncio.get_running_loop().create_future()
        child = Child(script_model(script), output=lines, on_exit=exited.set_result)
        await child.spawn()
        child.batch_output(3600.0)
        await lines.wait_for("up")  # read, so the pipe now rests
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            assert await exited == -signal.SIGKILL

    factory = pytest.importorskip("uvloop").new_event_loop if loop_name == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())


async def test_a_stop_reads_batched_output_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The child's last words come on SIGTERM, while its pipe rests after reading "first": only a
    # stop (or the exit it causes) that wakes the pipe sees them, and the pipe's close, without
    # waiting out the rest.
    # One write per line: a line split over two reads would wait out the rest in between.
    script = (
        "import os, signal, sys, time\n"
        "def bye(*_):\n    os.write(1, b'second\\n')\n    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "os.write(1, b'first\\n')\n"
        "time.sleep(60)\n"
    )
    lines = Lines()
    child = Child(script_model(script), output=lines)
    await child.spawn()
    # Before the first read: the pipe rests for an hour after it, however slowly it filled.
    monkeypatch.setattr(children, "_PIPE_QUARTER", 1 << 62)
    child.batch_output(3600.0)
    await lines.wait_for("first")
    began = time.monotonic()
    await child.stop(grace=10.0)
    await lines.wait_for("second", within=10.0)
    assert child.exited()
    assert time.monotonic() - began < 30, "the stop waited for the resting pipe"
