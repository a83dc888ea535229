"""The reaper: a small process that outlives a SIGKILLed swapper just long enough to end what it
started. ``python -m swapper.runtime.reaper MARK``, started by ``Reaper.start()``.

Why: a child must not outlive swapper, however swapper ends, and neither must what it forked (a
wrapper script's server, a forked helper), which PR_SET_PDEATHSIG would not reach (the kernel
does not pass it on across fork): it would live on, holding a port or VRAM, until the next
swapper's start-up sweep (``orphans.sweep_orphans``). The reaper's stdin is a pipe whose only
writer is swapper, so it reads EOF exactly when swapper's process ends, however it ends; it then
SIGKILLs every process carrying swapper's owner mark (``orphans.OWNER_ENV``, which every child
and everything it forks inherits) and exits. While it runs, children need no parent-death
signal at all (``process.rely_on_reaper``).

Owns: nothing in swapper. ``Reaper`` (in swapper) owns the reaper process and the pipe's write
end: ``stop()`` closes it at the end of a normal shutdown, when every child is already gone, so
the reaper finds nothing to kill and exits.

The reaper runs in its own session, so a signal to swapper's process group (Ctrl-C, ``kill -- -PGID``)
does not take it down with swapper. It carries no owner mark itself, so it never kills itself.
If it dies first (the OOM killer, say), the start-up sweep remains the fallback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Nothing heavy at module level: the reaper process imports this module and then idles for
# swapper's whole life.

__all__ = ["Reaper"]

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding this swapper package


class Reaper:
    """Swapper's handle on its reaper process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    @classmethod
    def start(cls, mark: str) -> Reaper:
        """Starts the reaper for the swapper whose owner mark is ``mark`` (this process)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "swapper.runtime.reaper", mark],
            stdin=subprocess.PIPE,  # non-inheritable on our side: no child can hold it open
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            # ``-m`` imports from the working directory first: run where this swapper package
            # lives, so the reaper is this installation's, never another ./swapper that happens
            # to be where swapper was started (a checkout next to an installed wheel).
            cwd=_PACKAGE_ROOT,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the reaper after a normal shutdown (every child already stopped)."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            import structlog

            structlog.get_logger("swapper.runtime.reaper").warning("the reaper did not exit; killing it")
            self._proc.kill()
            self._proc.wait()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m swapper.runtime.reaper OWNER_MARK", file=sys.stderr)
        return 2
    try:
        while sys.stdin.buffer.read(65536):
            pass  # swapper writes nothing; this returns at EOF, when its end closes
    except KeyboardInterrupt:
        pass
    from swapper.runtime.orphans import kill_marked  # only now: psutil and structlog are not small

    kill_marked(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
