"""The reaper (swapper/runtime/reaper.py): when its pipe closes, as it does when swapper dies, it kills
every process carrying swapper's owner mark, and only those, then exits. The end-to-end case
(swapper SIGKILLed, a child's own fork killed) is in test_faults.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import swapper
from swapper.runtime.orphans import OWNER_ENV, owner_mark
from swapper.runtime.reaper import Reaper

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def gone(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def test_the_reaper_kills_marked_processes_when_its_pipe_closes() -> None:
    # Marks of live owners (this process, and the plain sleeper), so that no other swapper's
    # start-up sweep running on the machine meanwhile takes these processes for orphans.
    plain = subprocess.Popen(SLEEPER)
    mark = owner_mark()
    marked = subprocess.Popen(SLEEPER, env={**os.environ, OWNER_ENV: mark})
    other_mark = f"{plain.pid}:{psutil.Process(plain.pid).create_time():.3f}"
    other = subprocess.Popen(SLEEPER, env={**os.environ, OWNER_ENV: other_mark})
    reaper = Reaper.start(mark)
    try:
        assert reaper.alive()
        assert psutil.Process(reaper.pid).environ().get(OWNER_ENV) is None  # it never kills itself
        assert not gone(marked)  # it idles while the pipe is open
        reaper.stop()  # closes the pipe, as swapper's death would; returns once the reaper exited
        assert not reaper.alive()
        assert marked.wait(timeout=5) == -9
        assert not gone(other) and not gone(plain)
    finally:
        for proc in (marked, other, plain):
            proc.kill()
            proc.wait()


def test_the_reaper_is_this_installations_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``python -m`` imports from the working directory first: a swapper started next to another
    # copy of the package (a checkout, with the wheel installed) must still run its own reaper.
    decoy = tmp_path / "swapper"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    marker = tmp_path / "decoy-ran"
    (decoy / "runtime").mkdir()
    (decoy / "runtime" / "__init__.py").write_text("")
    (decoy / "runtime" / "reaper.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    reaper = Reaper.start(f"{os.getpid()}:test-{time.monotonic_ns()}")
    try:
        assert Path(psutil.Process(reaper.pid).cwd()) == Path(swapper.__file__).resolve().parent.parent
        assert reaper.alive()  # the real one idles on its pipe; the decoy would have exited
    finally:
        reaper.stop()
    assert not marker.exists()
