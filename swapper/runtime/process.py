"""Spawning one OS process cheaply, reading its output pipes, and seeing its exit at once.

Owns: one spawned process (``Process``): its pid, the read ends of its stdout and stderr pipes,
and the pidfd (or, on kernels without one, the thread) that reaps it.

Why not ``loop.subprocess_exec``: it forks a full copy of swapper (uvloop's always does; asyncio's
does whenever a pre-exec hook is given, and setting PR_SET_PDEATHSIG needs one), which costs
~5-8 ms per spawn for a 60 MB process, a large part of a swap of a small model
(scripts/bench_swaps.py). ``subprocess.Popen`` without a hook uses vfork (~0.3 ms): the process
group is made with ``process_group=0``, and the parent-death signal, where one is needed (see
below), by util-linux's ``setpriv`` as an exec wrapper (the pre-exec hook remains the fallback
where there is no setpriv). The output is read
with ``add_reader`` on the pipes, no transports, and the exit is seen through a pidfd, which
works the same on asyncio's loop and on uvloop.

No orphans: the process leads its own process group, so signals reach anything it forks; when
the leader exits the rest of its group is SIGKILLed at once, so a forked helper cannot keep
holding VRAM, a port or our pipes. If swapper itself dies (even SIGKILLed), its reaper process
(``runtime/reaper.py``, started by the CLI) kills every process it started and everything they forked,
within ~0.1 s. Where there is no reaper (swapper used as a library, in tests), the process gets
PR_SET_PDEATHSIG=SIGKILL instead, through ``setpriv``: the kernel sends it when the *thread* that
spawned the process ends, so spawn on a thread that lives as long as swapper (the event loop's,
the main thread). The extra exec of ``setpriv`` costs ~1-3 ms a spawn, which is why the CLI,
which has the reaper, does without it (``rely_on_reaper``).

Concurrency contract: every method runs on the event-loop thread that spawned the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

log = logging.getLogger("swapper.runtime.children")

READ_SIZE: Final = 64 * 1024  # a Linux pipe's whole buffer
_SIGKILL: Final = int(signal.SIGKILL)
_PR_SET_PDEATHSIG: Final = 1

OnData = Callable[[int, bytes], None]  # (1 or 2, bytes read); b"" once that pipe is closed

_reaper = False  # see rely_on_reaper


def rely_on_reaper(running: bool = True) -> None:
    """Whether swapper's reaper process runs (it kills the children if swapper dies): while it
    does, spawns go without the parent-death signal."""
    global _reaper
    _reaper = running


def prepare() -> None:
    """Looks up the setpriv wrapper now, if spawns will need it, rather than at the first spawn."""
    if not _reaper:
        pdeathsig_wrapper()


@functools.cache
def pdeathsig_wrapper() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` when util-linux's setpriv has the option (2.33 and later),
    else ``()`` (the pre-exec hook is used instead). Looked up once (a ~2 ms run of setpriv)."""
    path = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if path is None:
        return ()
    try:
        help_text = subprocess.run([path, "--help"], capture_output=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return (path, "--pdeathsig", "KILL", "--") if b"--pdeathsig" in help_text else ()


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved once here, in the parent: the pre-exec hook runs in a just-forked child of a
# multi-threaded process, where it must not import, dlopen or take locks.
_prctl: Final = _load_prctl()


def _pre_exec(parent_pid: int) -> None:
    """Pre-exec hook, where setpriv is missing: lead a new process group, die with the parent."""
    os.setpgid(0, 0)
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent died before prctl took effect; the signal will never come


def _check_runnable(program: str, env: Mapping[str, str]) -> None:
    """Raises what exec would for ``program`` (FileNotFoundError, PermissionError): behind the
    setpriv wrapper, exec's own error would only show as the wrapper's exit code 127."""
    if os.sep in program:
        candidates = [program]
    else:
        candidates = [os.path.join(d, program) for d in env.get("PATH", os.defpath).split(os.pathsep)]
    denied = False
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return
            denied = True
        elif os.path.isdir(path):
            denied = True
    if denied:
        raise PermissionError(f"permission denied: {program!r}")
    raise FileNotFoundError(f"no such file: {program!r}")


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already
    except PermissionError:
        # Only if the id was recycled by someone else's group after ours emptied; not ours to kill.
        log.debug("no permission to signal process group %d", pgid)


class Process:
    """One spawned process. ``on_data`` gets each read of its stdout (1) and stderr (2), and
    ``b""`` once a pipe is closed.

    ``leader_exited`` resolves with the return code (negative -N: killed by signal N) as soon
    as the process is reaped; ``finished`` once both pipes are closed too (all output delivered),
    or ``drain_timeout`` seconds after the exit if something it forked escaped its group while
    holding them.
    """

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], on_data: OnData, *, drain_timeout: float
    ) -> None:
        """Spawns ``argv``; raises OSError (FileNotFoundError, PermissionError) if it cannot run."""
        self._loop = asyncio.get_running_loop()
        self._on_data = on_data
        self._drain_timeout = drain_timeout
        wrapper = () if _reaper else pdeathsig_wrapper()
        if wrapper:
            _check_runnable(argv[0], env)
        self._fds: dict[int, int] = {}  # 1, 2 -> our read end, while open
        ours, theirs = zip(os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC), strict=True)
        try:
            if wrapper or _reaper:
                self._popen = subprocess.Popen(
                    [*wrapper, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=theirs[0],
                    stderr=theirs[1],
                    env=env,
                    process_group=0,
                )
            else:  # forks a full copy of swapper (see the module docstring)
                self._popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=theirs[0],
                    stderr=theirs[1],
                    env=env,
                    preexec_fn=functools.partial(_pre_exec, os.getpid()),
                )
        except BaseException:
            for fd in (*ours, *theirs):
                os.close(fd)
            raise
        for fd in theirs:
            os.close(fd)
        self.pid = self._popen.pid
        self.returncode: int | None = None
        self.exited_at: float | None = None  # time.monotonic() when it was reaped
        self.leader_exited: asyncio.Future[int] = self._loop.create_future()
        self.finished: asyncio.Future[int] = self._loop.create_future()
        self._paused: set[int] = set()
        self._drain_timer: asyncio.TimerHandle | None = None
        self._pidfd: int | None = None
        for stream, fd in zip((1, 2), ours, strict=True):
            os.set_blocking(fd, False)
            self._fds[stream] = fd
            self._loop.add_reader(fd, self._read, stream)
        self._watch_exit()

    # ---- output ----

    def pause(self, stream: int) -> None:
        """Stops reading ``stream`` until ``resume``; the process may fill the pipe meanwhile."""
        if (fd := self._fds.get(stream)) is not None and stream not in self._paused:
            self._paused.add(stream)
            self._loop.remove_reader(fd)

    def resume(self, stream: int) -> None:
        if (fd := self._fds.get(stream)) is not None and stream in self._paused:
            self._paused.discard(stream)
            self._loop.add_reader(fd, self._read, stream)

    def _read(self, stream: int) -> None:
        fd = self._fds.get(stream)
        if fd is None:
            return
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._on_data(stream, data)
        else:
            self._close_pipe(stream)

    def _close_pipe(self, stream: int) -> None:
        fd = self._fds.pop(stream)
        if stream not in self._paused:
            self._loop.remove_reader(fd)
        self._paused.discard(stream)
        os.close(fd)
        try:
            self._on_data(stream, b"")
        finally:
            if not self._fds and self.leader_exited.done():
                self._finish()

    # ---- exit ----

    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3, other systems): a thread waits
            threading.Thread(target=self._wait_in_thread, name=f"wait-{self.pid}", daemon=True).start()
            return
        self._loop.add_reader(self._pidfd, self._reap)

    def poll(self) -> None:
        """Reaps the process now if it has exited and its pidfd was not read yet (a caller that
        must know at once, e.g. whether a refused connection means a crash)."""
        if self._pidfd is not None:
            self._reap()

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the code is lost
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return  # not yet (the pidfd said readable early): wait for the next wake-up
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._exited(os.waitstatus_to_exitcode(status))

    def _wait_in_thread(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 255 << 8
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            self._loop.call_soon_threadsafe(self._exited, os.waitstatus_to_exitcode(status))

    def _exited(self, returncode: int) -> None:
        self.exited_at = time.monotonic()
        self.returncode = self._popen.returncode = returncode  # Popen: nothing left to reap
        # Kill whatever the leader left behind in its group right away: a forked helper would
        # otherwise keep holding the port, memory and our pipes. The pgid is the leader's pid,
        # which the kernel does not recycle while any member of the group is alive.
        signal_group(self.pid, _SIGKILL)
        for stream in list(self._paused):
            self.resume(stream)  # its last words, and the pipes' end, without delay
        self.leader_exited.set_result(returncode)
        if not self._fds:
            self._finish()
        else:
            self._drain_timer = self._loop.call_later(self._drain_timeout, self._close_pipes)

    def _close_pipes(self) -> None:
        for stream in list(self._fds):
            self._close_pipe(stream)

    def _finish(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if not self.finished.done():
            assert self.returncode is not None
            self.finished.set_result(self.returncode)
