"""Reclaims children a previous, killed swapper left behind.

Owns: the ``SWAPPER_OWNER`` mark every child (and so every process it forks) inherits in its
environment, and the start-up sweep that kills marked processes whose swapper is gone.

Why: PR_SET_PDEATHSIG kills a child when swapper is SIGKILLed, but the kernel does not pass it
on across fork, so a grandchild (a wrapper script's server, a docker CLI's helper) can outlive
it holding a port or VRAM. The next swapper to start finds it by the mark and ends it. The mark
names the owner by pid *and* start time, so a reused pid never passes for a live owner.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil
import structlog

log = structlog.get_logger("swapper.orphans")

OWNER_ENV = "SWAPPER_OWNER"


def owner_mark() -> str:
    me = psutil.Process()
    return f"{me.pid}:{me.create_time():.3f}"


def _owner_alive(mark: str) -> bool:
    pid_text, _, started = mark.partition(":")
    try:
        owner = psutil.Process(int(pid_text))
        return f"{owner.create_time():.3f}" == started
    except (ValueError, psutil.Error):
        return False


def sweep_orphans() -> list[int]:
    """SIGKILLs processes marked by a swapper that no longer runs; returns their pids."""
    mine = owner_mark()
    killed = []
    for proc in psutil.process_iter(["pid"]):
        try:
            mark = proc.environ().get(OWNER_ENV)
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
        if not mark or mark == mine or _owner_alive(mark):
            continue
        with contextlib.suppress(psutil.Error, OSError):
            log.warning(
                "killing a child left by a swapper that died", pid=proc.pid, cmd=" ".join(proc.cmdline())
            )
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
    return killed
