"""Running swapper as a service: the systemd unit, sd_notify readiness, the start-up line, and the
parent-death signal and reaper under the unit's hardening.

There is no systemd to run the unit here, so its parts are tested one by one:

* the unit file's settings against swapper's own constants and CLI, and ``systemd-analyze verify``
  when it is installed (`.ci/run` installs it, and runs it again on the installed wheel);
* readiness: a real ``python -m swapper`` with ``NOTIFY_SOCKET`` set sends READY=1 once its port
  accepts connections and STOPPING=1 on SIGTERM, and no child inherits the variable;
* the hardening: swapper run in a sandbox built as systemd builds it (its own mount namespace with
  the file system read-only, an empty private /tmp, no_new_privs, an abstract notify socket),
  then SIGKILLed; its model and the model's own fork must die. Needs root and mount namespaces;
  skipped where the container forbids them.
"""

from __future__ import annotations

import configparser
import inspect
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from swapper.app.cli import EXIT_CONFIG, build_parser
from swapper.app.lifecycle import SHUTDOWN_GRACE
from swapper.app.sdnotify import Notifier
from swapper.app.server import SHUTDOWN_BACKSTOP
from swapper.runtime.reaper import Reaper
from tests.realstack import ROOT
from tests.test_swapping import FAKE, free_port

UNIT = ROOT / "examples" / "swapper.service"
WITHIN = 20.0
CHAT = "/v1/chat/completions"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def poll(cond: Callable[[], Any], what: str, within: float = WITHIN) -> Any:
    """Polls a condition on other processes (nothing reports it) until a deadline."""
    deadline = time.monotonic() + within
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


# ---- the unit file ----------------------------------------------------------------------------------


def test_the_unit_stops_swapper_alone_and_waits_out_its_drain() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to swapper only: control-group (the default) would cut the requests it drains.
    assert service["KillMode"] == "mixed"
    # The front door's drain, then aiohttp's, then stopping the models, then the reaper's exit.
    reaper_wait = inspect.signature(Reaper.stop).parameters["timeout"].default
    longest_stop = 2 * SHUTDOWN_GRACE + SHUTDOWN_BACKSTOP + reaper_wait
    assert int(service["TimeoutStopSec"]) > longest_stop
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_the_units_hardening_leaves_gpus_and_jit_alone() -> None:
    service = unit()["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] in ("strict", "full", "yes")
    assert service["PrivateTmp"] == "yes"
    assert service.get("PrivateDevices", "no") == "no"  # would hide /dev/nvidia*, /dev/dri
    assert service.get("MemoryDenyWriteExecute", "no") == "no"  # GPU runtimes JIT-compile


def test_the_units_command_line_is_one_swapper_accepts() -> None:
    argv = shlex.split(unit()["Service"]["ExecStart"])
    assert Path(argv[0]).name == "swapper"
    args = build_parser().parse_args(argv[1:])
    assert args.config == "/etc/swapper/models.yaml" and not args.test_config


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    installed = Path(sys.executable).parent / "swapper"  # verify checks that ExecStart exists
    assert installed.exists()
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/swapper/bin/swapper", str(installed)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


# ---- readiness and the start-up line ----------------------------------------------------------------


@contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    """A datagram socket for sd_notify at ``address`` (a path, or ``@name`` for the abstract one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + address[1:] if address.startswith("@") else address)
        sock.settimeout(WITHIN)
        yield sock


def next_message(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=WITHIN) as resp:
        return resp.status, json.loads(resp.read())


def fake_config(path: Path, *flags: str, top: str = "") -> Path:
    port = free_port()
    path.write_text(
        f"{top}logFormat: json\nmodels:\n  a:\n"
        f"    cmd: {sys.executable} -S {FAKE} --port {port} --model-name a {' '.join(flags)}\n"
        f"    proxy: http://127.0.0.1:{port}\n"
    )
    return path


def test_ready_once_listening_stopping_on_sigterm_and_children_never_see_the_socket(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path / "models.yaml", top="apiKeys: [sk-1]\n")
    address = str(tmp_path / "notify.sock")
    listen = free_port()
    log_path = tmp_path / "swapper.log"
    argv = [sys.executable, "-m", "swapper", "--config", str(cfg), "--listen", f"127.0.0.1:{listen}"]
    with notify_socket(address) as sock, open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": address}, stderr=log)
        try:
            assert next_message(sock) == ["READY=1", f"STATUS=listening on http://127.0.0.1:{listen}"]
            socket.create_connection(("127.0.0.1", listen), timeout=1).close()  # up when it said so
            req = urllib.request.Request(
                f"http://127.0.0.1:{listen}{CHAT}",
                json.dumps({"model": "a", "max_tokens": 1}).encode(),
                {"Content-Type": "application/json", "Authorization": "Bearer sk-1"},
            )
            with urllib.request.urlopen(req, timeout=WITHIN) as resp:
                assert resp.status == 200
            children = psutil.Process(proc.pid).children()
            assert any("swapper.runtime.reaper" in " ".join(c.cmdline()) for c in children)
            assert any("fake_server.py" in " ".join(c.cmdline()) for c in children)
            for child in children:
                assert "NOTIFY_SOCKET" not in child.environ(), child.cmdline()
            proc.send_signal(signal.SIGTERM)
            assert next_message(sock)[0] == "STOPPING=1"
            assert proc.wait(timeout=WITHIN) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    started = [line for line in lines if line["event"] == "listening"]
    assert len(started) == 1
    assert started[0] | {"timestamp": None, "version": None} == {
        "event": "listening",
        "level": "info",
        "listen": [f"http://127.0.0.1:{listen}"],
        "config": str(cfg),
        "planner": "group",
        "models": 1,
        "auth": "on",
        "timestamp": None,
        "version": None,
    }


def test_notifier_without_a_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_environment().notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@swapper-test-nobody-listens")
    notifier = Notifier.from_environment()
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.notify("READY=1") is False  # nobody bound it: a warning, not a crash
    assert Notifier("vsock:2:999").notify("READY=1") is False


def test_notifier_reaches_an_abstract_socket() -> None:
    address = f"@swapper-test-{os.getpid()}-{time.monotonic_ns()}"
    with notify_socket(address) as sock:
        assert Notifier(address).notify("READY=1", "STATUS=up") is True
        assert next_message(sock) == ["READY=1", "STATUS=up"]


# ---- the hardening: parent-death signal and reaper in a systemd-like sandbox ------------------------

# Run by ``unshare --mount`` as root: builds what the unit asks systemd for, then execs swapper (so
# the pid the test holds is swapper's). Exits non-zero, before swapper runs, if the sandbox leaks.
SANDBOX = r"""
import os, subprocess, sys
config, listen, repo = sys.argv[1:4]
text = open(config).read()

def mount_of(path):
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path

# ProtectSystem=strict, for every mount swapper reads: its code, its python, the root.
for point in sorted({"/", mount_of(repo), mount_of(sys.prefix), mount_of(sys.base_prefix)}):
    subprocess.run(["mount", "-o", "remount,bind,ro", point], check=True)
# PrivateTmp: an empty /tmp of its own (the config is copied in, as if it were in /etc).
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/tmp"], check=True)
with open("/tmp/models.yaml", "w") as f:
    f.write(text)
for place in (repo, sys.prefix):
    try:
        open(os.path.join(place, ".sandbox-probe"), "w").close()
    except OSError:
        continue
    sys.exit(f"sandbox: {place} is writable")
# NoNewPrivileges=yes
os.execvp("setpriv", ["setpriv", "--no-new-privs", sys.executable, "-m", "swapper",
                      "--config", "/tmp/models.yaml", "--listen", listen])
"""


def _sandbox_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for mount namespaces"
    if any(os.path.realpath(p).startswith("/tmp/") for p in (ROOT, sys.prefix)):
        return "the checkout or its virtualenv is under /tmp, which PrivateTmp's own /tmp would hide"
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "needs util-linux's unshare and setpriv"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30)
    return None if probe.returncode == 0 else "mount namespaces are not permitted here"


def _fakes_below(pid: int) -> list[psutil.Process]:
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in procs:
        try:
            if "fake_server.py" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(_sandbox_missing() is not None, reason=_sandbox_missing() or "")
def test_sigkill_under_the_units_hardening_takes_the_model_and_its_fork(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path / "models.yaml", "--fork-grandchild")
    listen = free_port()
    address = f"@swapper-test-{os.getpid()}-{time.monotonic_ns()}"
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SANDBOX]
    argv += [str(cfg), f"127.0.0.1:{listen}", str(ROOT)]
    model_and_fork: list[psutil.Process] = []
    with notify_socket(address) as sock:
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "NOTIFY_SOCKET": address})

        def found_both() -> bool:
            model_and_fork[:] = _fakes_below(proc.pid)
            return len(model_and_fork) == 2

        try:
            assert next_message(sock)[0] == "READY=1"
            status, body = post(f"http://127.0.0.1:{listen}{CHAT}", {"model": "a", "max_tokens": 1})
            assert status == 200 and body["model"] == "a"
            poll(found_both, "the model and its fork")
            for child in model_and_fork:  # the sandbox is real: the model runs inside it
                assert "NoNewPrivs:\t1" in Path(f"/proc/{child.pid}/status").read_text()
                assert os.readlink(f"/proc/{child.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        finally:
            proc.kill()
            proc.wait()
    # The model by its parent-death signal, its fork by the reaper: both within moments.
    poll(lambda: all(_gone(p) for p in model_and_fork), "the model and its fork to die", within=10)
