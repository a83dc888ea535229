"""Builds swapper's sdist and wheel, installs the wheel into a fresh virtualenv outside the
repository, and runs it from there the way its users do; `.ci/run` runs this.

    .venv/bin/python scripts/wheel_smoke.py [--keep]

Checks, in order (the first failure exits 1 with what went wrong):

1. ``python -m build``: the sdist, then the wheel built from it. The wheel holds only ``swapper/``
   and its dist-info (nothing from tests/ or scripts/), and every file git tracks under
   ``swapper/`` except Markdown notes: a module or data file that ``pyproject.toml`` fails to
   declare is missing here, never in the editable install the tests use. The sdist carries the
   docs, the examples and the systemd unit.
2. A virtualenv under a temporary directory; ``pip install`` of the wheel; every command below
   runs with that directory as cwd, so nothing is imported from the checkout.
3. ``swapper --version`` names the wheel's version; ``swapper check`` passes on the shipped
   models.yaml (from the temporary directory its ``.demo`` programs are warnings; from the
   repository root, where they exist after scripts/bootstrap.sh, none); an invalid config exits 2.
4. A real start with a fake-upstream model (tests/upstreams/fake_server.py, run from the checkout
   by the virtualenv's python): READY=1 on an sd_notify socket once it listens, ``/health``, one
   proxied chat completion, ``/ui/`` when the wheel has a UI (``swapper/web/ui/``), the reaper running
   from the installed package, and on SIGTERM STOPPING=1, exit 0 and no child left.
5. A start whose model forks a grandchild, then SIGKILL: the child (parent-death signal) and the
   grandchild (the installed reaper) are gone within seconds.
6. ``systemd-analyze verify`` of examples/swapper.service with ExecStart pointing at the installed
   wheel: no error and no warning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKE_SERVER = ROOT / "tests" / "upstreams" / "fake_server.py"
UNIT = ROOT / "examples" / "swapper.service"
UNIT_BINARY = "/opt/swapper/bin/swapper"
SDIST_MUST_HAVE = ("models.yaml", "docs/deploy.md", "examples/swapper.service", "README.md")
WITHIN = 30.0


class SmokeFailure(Exception):
    pass


def step(what: str) -> None:
    print(f"wheel smoke: {what}", flush=True)


def expect(condition: object, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def run(argv: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)


def must(argv: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = run(argv, cwd, **kwargs)
    expect(done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def wait_for(predicate: Callable[[], Any], what: str, within: float = WITHIN) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        expect(time.monotonic() < deadline, f"timed out after {within:.0f} s waiting for {what}")
        time.sleep(0.02)


# --- 1. build and inspect ---------------------------------------------------------------------------


def build(out: Path) -> tuple[Path, Path]:
    step("python -m build (sdist, then the wheel from it)")
    must([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], ROOT)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    expect(len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {out}")
    return wheels[0], sdists[0]


def tracked_package_files() -> set[str]:
    """Files under swapper/ that the wheel must hold: git's list (else the tree), minus notes."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "swapper"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for p in (ROOT / "swapper").rglob("*") if p.is_file()]
        listed = [p for p in listed if "__pycache__" not in p]
    return {p for p in listed if not p.endswith(".md")}


def inspect_wheel(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next((n.split("/")[0] for n in names if n.endswith(".dist-info/entry_points.txt")), "")
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode() if dist_info else ""
    stray = [n for n in names if not (n.startswith("swapper/") or n.startswith(f"{dist_info}/"))]
    expect(not stray, f"the wheel holds files outside the package: {stray}")
    missing = sorted(tracked_package_files() - set(names))
    expect(not missing, f"the wheel lacks package files (declare them in pyproject.toml): {missing}")
    expect("swapper = swapper.app.cli:main" in entry_points, f"no swapper console script:\n{entry_points}")
    return names


def inspect_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    missing = [n for n in SDIST_MUST_HAVE if n not in names]
    expect(not missing, f"the sdist lacks {missing} (MANIFEST.in)")


def summarize(wheel: Path, names: list[str]) -> None:
    modules = [n for n in names if n.endswith(".py")]
    data = [n for n in names if n.startswith("swapper/") and not n.endswith(".py")]
    packages = sorted({n.rsplit("/", 1)[0] for n in modules})
    print(
        f"wheel smoke: {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB, {len(names)} files: "
        f"{len(modules)} modules in {', '.join(packages)}; data: {', '.join(data) or 'none'}",
        flush=True,
    )


# --- 2. install -------------------------------------------------------------------------------------


def install(wheel: Path, venv: Path) -> Path:
    step(f"installing {wheel.name} into a fresh virtualenv at {venv}")
    must([sys.executable, "-m", "venv", str(venv)], venv.parent)
    python = venv / "bin" / "python"
    must([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], venv.parent)
    return python


# --- 3. version and check ---------------------------------------------------------------------------


def check_commands(swapper: Path, python: Path, work: Path, version: str) -> str:
    step("swapper --version, swapper check, swapper -t")
    where = must([str(python), "-c", "import swapper; print(swapper.__file__)"], work).stdout.strip()
    expect(Path(where).is_relative_to(python.parent.parent), f"swapper imported from {where}")
    out = must([str(swapper), "--version"], work).stdout.strip()
    expect(out == f"swapper {version}", f"--version said {out!r}, the wheel is {version}")

    config = ROOT / "models.yaml"
    outside = must([str(swapper), "check", "--config", str(config)], work)
    expect(f"config {config}: OK" in outside.stdout, f"check said:\n{outside.stdout}")
    for model in ("chat-a", "chat-b", "embed", "whisper"):
        expect(f"  {model} (" in outside.stdout, f"check does not list {model}:\n{outside.stdout}")
    expect("not found (relative to" in outside.stdout, f"no missing-program warning:\n{outside.stdout}")
    inside = must([str(swapper), "-t", "--config", "models.yaml"], ROOT)
    if (ROOT / ".demo" / "bin").is_dir():
        expect("warnings: none" in inside.stdout, f"check from the repository root:\n{inside.stdout}")

    bad = work / "bad.yaml"
    bad.write_text("models:\n  a:\n    cmd: ''\n")
    failed = run([str(swapper), "check", "--config", str(bad)], work)
    expect(failed.returncode == 2, f"an invalid config exited {failed.returncode}:\n{failed.stderr}")
    expect("swapper: config error: models.a.cmd" in failed.stderr, f"check said:\n{failed.stderr}")
    return outside.stdout


# --- 4 and 5. real starts ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_config(path: Path, python: Path, *flags: str) -> Path:
    port = free_port()
    argv = f"{python} -S {FAKE_SERVER} --port {port} --model-name smoke {' '.join(flags)}"
    path.write_text(
        f"healthCheckTimeout: 30\nlogFormat: json\nmodels:\n  smoke:\n    cmd: {argv}\n"
        f"    proxy: http://127.0.0.1:{port}\n"
    )
    return path


@contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """An sd_notify socket in the abstract namespace, as systemd may hand out."""
    name = f"swapper-smoke-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WITHIN)
        yield "@" + name, sock


def received(sock: socket.socket, field: str) -> None:
    try:
        while True:
            message = sock.recv(4096).decode().split("\n")
            if field in message:
                return
    except TimeoutError:
        raise SmokeFailure(f"no {field} on the notify socket within {WITHIN:.0f} s") from None


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=WITHIN) as resp:
        return resp.status, resp.read()


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of ``pid`` (pid -> command line), from /proc."""
    kids: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            kids.setdefault(int(ppid), []).append(int(entry))
            cmdlines[int(entry)] = raw.replace(b"\0", b" ").decode(errors="replace")
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for kid in kids.get(todo.pop(), []):
            found[kid] = cmdlines[kid]
            todo.append(kid)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(swapper: Path, config: Path, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    argv = [str(swapper), "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        argv, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return proc, f"http://127.0.0.1:{port}"


def serve_and_stop(swapper: Path, python: Path, work: Path, with_ui: bool) -> None:
    step("a real start: sd_notify READY, /health, a proxied request, the reaper, SIGTERM")
    config = fake_config(work / "fake.yaml", python)
    with notify_socket() as (address, sock):
        proc, url = start(swapper, config, work, {**os.environ, "NOTIFY_SOCKET": address})
        try:
            received(sock, "READY=1")
            expect(http(url + "/health")[0] == 200, "/health did not answer 200")
            status, body = http(
                url + "/v1/chat/completions",
                {"model": "smoke", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            reply = json.loads(body)
            expect(status == 200 and "smoke#0" in body.decode(), f"proxied request: {status} {body[:300]!r}")
            expect(reply.get("model") == "smoke", f"proxied request: {reply}")
            if with_ui:
                expect(http(url + "/ui/")[0] == 200, "/ui/ did not answer 200")
            kids = descendants(proc.pid)
            reaper = [pid for pid, cmd in kids.items() if "-m swapper.runtime.reaper" in cmd]
            expect(len(reaper) == 1, f"no reaper among swapper's processes: {kids}")
            cwd = os.readlink(f"/proc/{reaper[0]}/cwd")
            expect(Path(cwd).is_relative_to(python.parent.parent), f"the reaper runs from {cwd}")
            proc.send_signal(signal.SIGTERM)
            received(sock, "STOPPING=1")
            _, stderr = proc.communicate(timeout=WITHIN)
            expect(proc.returncode == 0, f"swapper exited {proc.returncode} on SIGTERM:\n{stderr}")
            left = [pid for pid in kids if alive(pid)]
            expect(not left, f"left running after a stop: {left}")
            lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
            listening = [x for x in lines if x.get("event") == "listening"]
            expect(listening and listening[0]["listen"] == [url], f"no start-up line:\n{stderr}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def sigkill(swapper: Path, python: Path, work: Path) -> None:
    step("SIGKILL: the model dies with swapper, and the reaper ends what it forked")
    config = fake_config(work / "forks.yaml", python, "--fork-grandchild")
    proc, url = start(swapper, config, work, dict(os.environ))
    try:
        wait_for(lambda: _answers(url + "/health"), "swapper to listen")
        body = {"model": "smoke", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        expect(http(url + "/v1/chat/completions", body)[0] == 200, "proxied request failed")

        def model_and_grandchild() -> list[int]:
            found = [pid for pid, cmd in descendants(proc.pid).items() if "fake_server.py" in cmd]
            return found if len(found) == 2 else []

        fakes = wait_for(model_and_grandchild, "the model and its grandchild")
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not any(alive(pid) for pid in fakes), f"processes {fakes} to die", within=10)


def _answers(url: str) -> bool:
    try:
        return http(url)[0] == 200
    except OSError:
        return False


# --- 6. the unit ------------------------------------------------------------------------------------


def verify_unit(swapper: Path, work: Path) -> None:
    step("systemd-analyze verify examples/swapper.service")
    analyze = shutil.which("systemd-analyze")
    expect(analyze, "systemd-analyze is not installed (Debian: apt-get install systemd)")
    text = UNIT.read_text()
    expect(UNIT_BINARY in text, f"{UNIT} no longer runs {UNIT_BINARY}")
    unit = work / "units" / UNIT.name
    unit.parent.mkdir()
    unit.write_text(text.replace(UNIT_BINARY, str(swapper)))
    done = run([str(analyze), "verify", str(unit)], work)
    said = (done.stdout + done.stderr).strip()
    expect(done.returncode == 0 and not said, f"systemd-analyze verify (rc {done.returncode}):\n{said}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="swapper-wheel-"))
    try:
        wheel, sdist = build(tmp / "dist")
        names = inspect_wheel(wheel)
        inspect_sdist(sdist)
        summarize(wheel, names)
        python = install(wheel, tmp / "venv")
        swapper = tmp / "venv" / "bin" / "swapper"
        work = tmp / "work"
        work.mkdir()
        version = wheel.name.split("-")[1]
        report = check_commands(swapper, python, work, version)
        serve_and_stop(swapper, python, work, any(n.startswith("swapper/web/ui/") for n in names))
        sigkill(swapper, python, work)
        verify_unit(swapper, work)
    except SmokeFailure as exc:
        print(f"wheel smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"wheel smoke: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("wheel smoke: ok; `swapper check` on the shipped models.yaml, from outside the repository:")
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
