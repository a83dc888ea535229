"""Reclaims children a previous, killed swapper left behind.

Owns: the ``SWAPPER_OWNER`` mark every child (and so every process it forks) inherits in its
environment, and the start-up sweep that kills marked processes whose swapper is gone.

Why: a child, or a process it forked (a wrapper script's server, a docker CLI's helper), can
outlive a SIGKILLed swapper holding a port or VRAM. The reaper (``swapper/runtime/reaper.py``) ends such
processes the moment swapper dies; if the reaper could not (it was killed too), the next swapper
to start finds them by the mark and ends them. The mark names the owner by pid *and* start time,
so a reused pid never passes for a live owner.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

import psutil
import structlog

log = structlog.get_logger("swapper.runtime.orphans")

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
    return _kill_where(lambda mark: mark != mine and not _owner_alive(mark))


def kill_marked(mark: str) -> list[int]:
    """SIGKILLs every process marked by the swapper ``mark`` names, whether or not that swapper
    still looks alive (a SIGKILLed one stays a zombie until its parent reaps it); returns them."""
    return _kill_where(lambda found: found == mark)


def _kill_where(wanted: Callable[[str], bool]) -> list[int]:
    killed = []
    for proc in psutil.process_iter(["pid"]):
        try:
            mark = proc.environ().get(OWNER_ENV)
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
        if not mark or not wanted(mark):
            continue
        with contextlib.suppress(psutil.Error, OSError):
            log.warning(
                "killing a child left by a swapper that died", pid=proc.pid, cmd=" ".join(proc.cmdline())
            )
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
    return killed
