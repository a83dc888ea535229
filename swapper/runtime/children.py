"""One OS process per model: spawn it, hear its output, notice its exit, stop it, always reap it.

Owns: the child process of one ``ModelConfig`` (a ``process.Process``: its process group and
pipes), and the counts of the lines and of the readiness lines it printed. Also the short-lived
``cmdStop`` process that ``stop()`` may run. Not its lines: they go to the ``Output`` the owner
supplies (the log hub's ring of the model, ``observe.logs.ChildOutput``), which keeps them and
gives back the last ones for a crash report.

May not touch: decisions about *when* to start or stop (the run loop makes them), other
children, health probing (``runtime/health.py``), and log formatting.

Concurrency contract: every method runs on the event-loop thread that called ``spawn()``.
Output is read by the loop itself (callbacks, no tasks), so a child can never block on a full
pipe while swapper is alive, whatever the consumer does; the ``Output`` is called synchronously,
inline, so it must be cheap (append to a ring buffer). ``stop()`` may be called any
number of times, concurrently, before or after the child exited.

No orphans: see ``process`` (own process group, the group SIGKILLed when the leader exits, and
the reaper or PR_SET_PDEATHSIG if swapper dies).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from swapper.config.schema import ModelConfig
from swapper.core.errors import ModelLoadFailed
from swapper.core.phases import StopMarks
from swapper.runtime.orphans import OWNER_ENV, owner_mark
from swapper.runtime.process import Process, signal_group

log = logging.getLogger("swapper.runtime.children")

# Lines after which a probe is worth trying at once: llama-server ("server is listening on ..."),
# whisper-server ("whisper server listening at ..."), uvicorn/vLLM. A false positive only costs a
# probe; llama-server also prints "HTTP server is listening" *before* it loads the model, which
# is why readiness lines are counted rather than latched (see ``wait_ready_line``).
READY_LINE: Final = re.compile(
    r"server is listening|listening (?:on|at)\b|HTTP server listening|uvicorn running on"
    r"|application startup complete",
    re.IGNORECASE,
)
# Words every READY_LINE alternative contains (lower case): a substring test rules out nearly every
# line far more cheaply than the case-blind regex (docs/performance.md).
_READY_WORDS: Final = ("listening", "running on", "startup complete")
MAX_LINE_BYTES: Final = 8192  # longer lines are split, so one runaway line cannot grow memory
# A resting pipe is read again before it is a quarter full at the rate it last filled (Linux pipes
# hold 64 KiB), and a rest shorter than _MIN_REST is not worth a timer.
_PIPE_QUARTER: Final = 16 * 1024
_MIN_REST: Final = 0.001
# After the leader exits and its group is SIGKILLed, the pipes close within milliseconds; this
# bound only matters if something escaped the group (setsid) while holding our pipes.
DRAIN_TIMEOUT: Final = 1.0

OnLines = Callable[[str, list[str]], None]  # (stream, the lines read at once)


class Output(Protocol):
    """Where a child's output goes, and where its last lines are read back (for crash reports)."""

    def __call__(self, stream: str, lines: list[str]) -> None:
        """Takes the lines of one read (``"stdout" | "stderr" | "cmd_stop"``), in order."""
        ...

    def last(self, n: int) -> list[str]:
        """The last ``n`` lines this child's output brought, oldest first."""
        ...


_OWNER: Final = owner_mark()
OnExit = Callable[[int], None]

_SIGKILL: Final = int(signal.SIGKILL)


def exit_reason(returncode: int) -> str:
    """Says how a process ended, in words: 'exited with code 1', 'was killed by SIGKILL'."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def _start(
    argv: Sequence[str], env: dict[str, str], on_lines: OnLines, on_ready: Callable[[], None]
) -> _Pipes:
    """Spawns ``argv``; raises OSError (or SubprocessError) if it cannot run at all."""
    pipes = _Pipes(asyncio.get_running_loop(), on_lines, on_ready)
    pipes.proc = Process(argv, env, pipes.data, drain_timeout=DRAIN_TIMEOUT)
    return pipes


def _is_ready_line(text: str) -> bool:
    low = text.lower()
    return any(word in low for word in _READY_WORDS) and READY_LINE.search(text) is not None


class _Pipes:
    """The output of one process (``proc``): splits it into lines, rests its pipes while
    batching, and reports readiness lines."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_lines: OnLines, on_ready: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._on_lines = on_lines
        self._on_ready = on_ready
        self._partial: dict[int, bytes] = {1: b"", 2: b""}
        self._batch = 0.0  # seconds to leave a pipe unread after each read (see batch_output)
        self._resting: set[int] = set()  # fds whose reading is paused until their timer fires
        self._read_at: dict[int, float] = {}  # loop time of each fd's last read, while batching
        self.count = 0  # lines read so far
        self.proc: Process  # set by _start once spawned, before any output can arrive

    def data(self, fd: int, data: bytes) -> None:
        """``Process``'s ``on_data``: a read of ``fd``, or ``b""`` once it is closed."""
        if not data:
            self._resting.discard(fd)
            if rest := self._partial.pop(fd, b""):
                self._emit("stdout" if fd == 1 else "stderr", rest.decode("utf-8", "replace"))
            return
        buf = self._partial[fd] + data if self._partial[fd] else data
        end = buf.rfind(b"\n")
        rest = buf[end + 1 :]
        if len(rest) > MAX_LINE_BYTES:  # a runaway line: taken as it is, so memory stays bounded
            rest, end = b"", len(buf)
        self._partial[fd] = rest
        if end >= 0:
            # One decode for every complete line (a newline never falls inside a UTF-8 sequence).
            self._emit("stdout" if fd == 1 else "stderr", buf[:end].decode("utf-8", "replace"))
        # Once the process exited its pipes are read to their end without rests.
        if self._batch and fd not in self._resting and not self.proc.leader_exited.done():
            self._rest(fd, len(data))

    def _rest(self, fd: int, got: int) -> None:
        """Pauses reading ``fd`` for as long as the pipe takes to fill a quarter at the rate it
        just filled (``batch_output``'s seconds at most), so a chatty child never blocks on it."""
        now = self._loop.time()
        elapsed = now - self._read_at.get(fd, now)
        self._read_at[fd] = now
        rest = self._batch if got * self._batch <= _PIPE_QUARTER * elapsed else _PIPE_QUARTER * elapsed / got
        if rest < _MIN_REST:
            return
        self._resting.add(fd)
        self.proc.pause(fd)
        self._loop.call_later(rest, self._wake_pipe, fd)

    def batch_output(self, seconds: float) -> None:
        """From now on, leave each pipe unread for up to ``seconds`` after every read.

        A llama-server writes each log line on its own (~9 per request), and a read per line
        costs a loop wake-up and a syscall: ~300 µs of swapper's CPU per request, more than
        proxying it. Resting the pipe lets lines pile up, so one read takes many. Only for a
        ready child: during a start, the readiness line must be seen at once. A child that
        logs fast gets shorter rests (``_rest``): its pipe (64 KiB) is read before it is a
        quarter full, so it never blocks on a write. ``0`` reads eagerly again, at once (a stop
        must see the pipes close without delay).
        """
        if seconds and not self._batch:
            now = self._loop.time()  # the first rest is measured from here (see _rest)
            self._read_at = {1: now, 2: now}
        self._batch = seconds
        if not seconds:
            for fd in list(self._resting):
                self._wake_pipe(fd)

    def _wake_pipe(self, fd: int) -> None:
        self._resting.discard(fd)
        self.proc.resume(fd)

    def _emit(self, stream: str, text: str) -> None:
        """Hands on the complete lines in ``text`` (without the last newline), all in one call:
        a ready llama-server's ~9 lines per request cost more, taken one by one, than proxying it."""
        texts = text.split("\n")
        if "\r" in text:
            # Progress bars redraw with \r; the last redraw is the current state.
            texts = [t.rstrip("\r").rsplit("\r", 1)[-1] for t in texts]
        if len(text) > MAX_LINE_BYTES and max(map(len, texts)) > MAX_LINE_BYTES:
            texts = [
                t[at : at + MAX_LINE_BYTES] for t in texts for at in range(0, max(len(t), 1), MAX_LINE_BYTES)
            ]
        lines = list(filter(None, texts))  # C-level, as is the rare blank line's check
        if any(map(str.isspace, lines)):
            lines = [t for t in lines if not t.isspace()]
        if not lines:
            return
        self.count += len(lines)
        if not self._batch:  # batching: ready already, nobody waits
            for line in lines:
                if _is_ready_line(line):
                    self._on_ready()
        try:
            self._on_lines(stream, lines)
        except Exception:
            # A failing consumer must not cost later lines (or readiness lines); the loop keeps
            # reading the pipe either way.
            log.exception("on_lines callback failed")


class Child:
    """The OS process of one model.

    Args:
        model: what to run (``cmd``, ``env``, ``cmd_stop``).
        output: called with ``("stdout" | "stderr" | "cmd_stop", lines)`` for the non-empty lines
            of output read at once, in order, decoded as UTF-8 with replacement, without their
            line endings; ``last_lines`` reads them back from it.
        on_exit: called once with the return code when the child has exited and all its output
            was delivered, before ``wait_exited()`` and ``stop()`` return, whether or not a stop
            was asked; ``stop_requested`` tells an expected exit from a crash.
    """

    __slots__ = (
        "_model",
        "_on_exit",
        "_output",
        "_pid",
        "_pipes",
        "_ready_count",
        "_ready_changed",
        "_signalled_at",
        "_stop",
        "first_ready_line_at",
    )

    def __init__(self, model: ModelConfig, *, output: Output, on_exit: OnExit | None = None) -> None:
        self._model = model
        self._output = output
        self._on_exit = on_exit
        self._pid: int | None = None
        self._pipes: _Pipes | None = None
        self._ready_count = 0
        self._ready_changed = asyncio.Event()
        self._stop: asyncio.Future[int] | None = None
        self._signalled_at: float | None = None
        self.first_ready_line_at: float | None = None  # time.monotonic() of the first READY_LINE

    def __repr__(self) -> str:
        state = "new" if self._pipes is None else "exited" if self.exited() else "running"
        return f"<Child {self._model.id!r} pid={self._pid} {state}>"

    @property
    def model(self) -> ModelConfig:
        return self._model

    @property
    def pid(self) -> int | None:
        """The process id (also its process-group id) once spawned."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        """None until ``exited()``; negative -N if a signal N killed it."""
        if self._pipes is None or not self._pipes.proc.finished.done():
            return None
        return self._pipes.proc.finished.result()

    @property
    def stop_requested(self) -> bool:
        return self._stop is not None

    @property
    def lines_seen(self) -> int:
        """How many output lines were read so far (stdout and stderr)."""
        return 0 if self._pipes is None else self._pipes.count

    @property
    def ready_lines_seen(self) -> int:
        """How many output lines so far matched ``READY_LINE``."""
        return self._ready_count

    def env(self) -> dict[str, str]:
        """The child's environment: swapper's own, overridden by the model's ``env``, plus the
        owner mark that lets a later swapper reclaim its descendants (see ``orphans``)."""
        return {**os.environ, **dict(self._model.env), OWNER_ENV: _OWNER}

    async def spawn(self) -> None:
        """Starts the process; raises ModelLoadFailed if it cannot be executed at all."""
        if self._pipes is not None:
            raise RuntimeError(f"{self!r} was already spawned")
        argv = self._model.cmd
        if not argv:
            raise ModelLoadFailed(f"model {self._model.id!r}: cmd is empty", retryable=False)
        try:
            pipes = _start(argv, self.env(), self._output, self._saw_ready_line)
        except FileNotFoundError:
            msg = f"model {self._model.id!r}: cannot run {argv[0]!r}: no such file"
            raise ModelLoadFailed(msg, retryable=False) from None
        except PermissionError:
            msg = f"model {self._model.id!r}: cannot run {argv[0]!r}: permission denied (not executable?)"
            raise ModelLoadFailed(msg, retryable=False) from None
        except (OSError, subprocess.SubprocessError) as exc:
            msg = f"model {self._model.id!r}: cannot run {argv[0]!r}: {exc}"
            raise ModelLoadFailed(msg, retryable=False) from None
        self._pipes = pipes
        self._pid = pipes.proc.pid
        pipes.proc.finished.add_done_callback(self._finished)
        log.info("model %r started: pid %d: %s", self._model.id, self._pid, self._model.cmd_text)

    def batch_output(self, seconds: float) -> None:
        """Reads this child's output in batches, at most every ``seconds`` (see ``_Pipes``); for a
        ready child, whose output nobody waits on."""
        if self._pipes is not None:
            self._pipes.batch_output(seconds)

    def _saw_ready_line(self) -> None:
        if not self._ready_count:
            self.first_ready_line_at = time.monotonic()
        self._ready_count += 1
        # Wake every current waiter, then start a fresh event for the next line.
        event, self._ready_changed = self._ready_changed, asyncio.Event()
        event.set()

    def _finished(self, fut: asyncio.Future[int]) -> None:
        self._ready_changed.set()  # wait_ready_line returns on the exit too
        rc = fut.result()
        log.info("model %r (pid %s) %s", self._model.id, self._pid, exit_reason(rc))
        if self._on_exit is not None:
            try:
                self._on_exit(rc)
            except Exception:
                log.exception("on_exit callback failed")

    def stop_marks(self) -> StopMarks:
        """When ``stop()`` signalled the child and when it was reaped (for a swap's timeline)."""
        return StopMarks(self._signalled_at, None if self._pipes is None else self._pipes.proc.exited_at)

    def exited(self) -> bool:
        """Whether the child has exited and all of its output was delivered."""
        return self._pipes is not None and self._pipes.proc.finished.done()

    def poll_exit(self) -> int | None:
        """The return code if the process has exited (reaping it now if its exit was not seen
        yet), else None; its output may still be draining."""
        if self._pipes is None:
            return None
        proc = self._pipes.proc
        proc.poll()
        return proc.returncode

    async def wait_exited(self) -> int:
        """Waits until the child has exited and its output is drained; returns its return code."""
        # shield: a cancelled waiter must not cancel the shared future other waiters use.
        return await asyncio.shield(self._spawned().proc.finished)

    async def wait_ready_line(self, after: int = 0) -> None:
        """Waits until more than ``after`` readiness lines were seen (see ``ready_lines_seen``),
        or the child has exited (``exited()``).

        Pass the count read *before* probing, so a line printed during the probe is not missed.
        """
        while self._ready_count <= after and not self.exited():
            await self._ready_changed.wait()

    def last_lines(self, n: int = 20) -> list[str]:
        """The last ``n`` output lines (stdout and stderr interleaved), oldest first."""
        if self._pipes is None or n <= 0:
            return []
        return self._output.last(n)

    def kill(self) -> None:
        """SIGKILLs the process group now, without waiting; ``wait_exited()`` still reaps."""
        if self._pid is not None and not self._spawned().proc.leader_exited.done():
            signal_group(self._pid, _SIGKILL)

    async def stop(self, grace: float) -> int:
        """Stops the child and returns its return code once it is reaped.

        Sends ``cmd_stop`` (with ``${PID}`` replaced) if the model has one, else SIGTERM to the
        process group; SIGKILLs the group if the child has not exited ``grace`` seconds later.
        Idempotent: later or concurrent calls share the first call's outcome. Cancelling a
        caller SIGKILLs the group at once (reaping still happens; nothing is left behind).
        """
        try:
            return await asyncio.shield(self.request_stop(grace))
        except asyncio.CancelledError:
            self.kill()
            raise

    def request_stop(self, grace: float) -> asyncio.Future[int]:
        """``stop()`` without waiting: the signal goes out now; the future resolves as ``stop()``
        returns. Idempotent like ``stop()``."""
        pipes = self._spawned()
        pipes.batch_output(0)  # see the pipes close as soon as the child is gone
        if self._stop is None:
            proc = pipes.proc
            stopper = None if proc.leader_exited.done() else self._signal_stop(proc)
            self._stop = asyncio.ensure_future(self._stopped(proc, stopper, grace))
        return self._stop

    def _signal_stop(self, proc: Process) -> Process | None:
        """Runs cmdStop, or SIGTERMs the group if there is none or it cannot run; returns cmdStop's
        process."""
        stopper = self._start_cmd_stop() if self._model.cmd_stop else None
        if stopper is None:
            signal_group(proc.pid, signal.SIGTERM)
        # A stopped (SIGSTOP, hung) process only sees its SIGTERM once it runs again: without
        # this, its stop would always wait out unloadTimeout (what kill(1) and systemd do too).
        signal_group(proc.pid, signal.SIGCONT)
        self._signalled_at = time.monotonic()
        return stopper

    async def _stopped(self, proc: Process, stopper: Process | None, grace: float) -> int:
        """Waits for the exit (and cmdStop's), SIGKILLing the group ``grace`` seconds after the
        signal; returns the return code once the output is drained."""
        if self._signalled_at is None:
            return await proc.finished  # it had exited before the stop
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(proc.leader_exited)
                if stopper is not None:
                    await asyncio.shield(stopper.leader_exited)
        except TimeoutError:
            if not proc.leader_exited.done():
                log.warning(
                    "model %r (pid %d) did not exit %.1fs after %s; sending SIGKILL to its process group"
                    " (raise unloadTimeout if it needs longer to shut down cleanly)",
                    self._model.id,
                    proc.pid,
                    grace,
                    "cmdStop" if stopper is not None else "SIGTERM",
                )
                signal_group(proc.pid, _SIGKILL)
        if stopper is not None:
            signal_group(stopper.pid, _SIGKILL)  # no-op if it finished
            await stopper.finished
        return await proc.finished

    def _start_cmd_stop(self) -> Process | None:
        """Starts cmdStop; None (after logging why) if it cannot run, so SIGTERM is used instead."""
        assert self._model.cmd_stop is not None
        argv = [arg.replace("${PID}", str(self._pid)) for arg in self._model.cmd_stop]

        def on_lines(_stream: str, lines: list[str]) -> None:
            self._output("cmd_stop", lines)

        try:
            return _start(argv, self.env(), on_lines, lambda: None).proc
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning(
                "model %r: cmdStop %r failed to start (%s); sending SIGTERM", self._model.id, argv, exc
            )
            return None

    def _spawned(self) -> _Pipes:
        if self._pipes is None:
            raise RuntimeError(f"{self!r} was never spawned")
        return self._pipes
