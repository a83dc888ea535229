"""The reaper (swapper/reaper.py): when its pipe closes, as it does when swapper dies, it kills
every process carrying swapper's owner mark, and only those, then exits. The end-to-end case
(swapper SIGKILLed, a child's own fork killed) is in test_faults.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from swapper.orphans import OWNER_ENV
from swapper.reaper import Reaper

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def gone(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def test_the_reaper_kills_marked_processes_when_its_pipe_closes() -> None:
    mark = f"{os.getpid()}:test-{time.monotonic_ns()}"  # a mark no real swapper has
    marked = subprocess.Popen(SLEEPER, env={**os.environ, OWNER_ENV: mark})
    other = subprocess.Popen(SLEEPER, env={**os.environ, OWNER_ENV: mark + "-other"})
    plain = subprocess.Popen(SLEEPER)
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
