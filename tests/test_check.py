"""``swapper check`` (and ``swapper -t``): the real CLI, run as users run it, on configs written here.

A check loads the config exactly as a start does, starts nothing, prints each model's command,
port, aliases and placement and every warning, and exits 0; an invalid config exits 2 with the
message a start gives. Pure functions of ``swapper.app.check`` (the program lookup) are tested
directly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from swapper.app import check
from swapper.config.load import parse_config
from swapper.memory.ledger import fingerprint


def swapper(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swapper", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def busy_listen() -> Iterator[str]:
    """host:port of a listening socket: a start that gets past its config fails to bind there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def executable(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def test_check_prints_each_model_its_command_port_aliases_and_group(tmp_path: Path) -> None:
    server = executable(tmp_path / "server")
    cfg = write(
        tmp_path,
        f"""
startPort: 7000
apiKeys: [k1]
defaultModel: small
macros:
  srv: {server} --port ${{PORT}}
models:
  small:
    name: Small one
    cmd: ${{srv}} -m small.gguf
    aliases: [gpt-4o-mini, tiny]
    ttl: 300
  big:
    cmd: ${{srv}} -m big.gguf
    cmdStop: /bin/kill -TERM ${{PID}}
  remote:
    cmd: {server}
    proxy: http://127.0.0.1:7999
groups:
  chat:
    swap: true
    exclusive: false
    members: [small, big]
""",
    )
    done = swapper("check", "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == (
        f"config {cfg}: OK\n"
        "planner: group\n"
        "auth: on (1 API key)\n"
        "default model: small\n"
        "preload: (none)\n"
        "models (3):\n"
        "  small (Small one)\n"
        f"    cmd: {server} --port 7001 -m small.gguf\n"
        "    proxy: http://127.0.0.1:7001 (port 7001)\n"
        "    aliases: gpt-4o-mini, tiny\n"
        "    ttl: 300 s\n"
        "    group: chat (swap: yes, exclusive: no, persistent: no)\n"
        "  big\n"
        f"    cmd: {server} --port 7000 -m big.gguf\n"
        "    proxy: http://127.0.0.1:7000 (port 7000)\n"
        "    cmdStop: /bin/kill -TERM ${PID}\n"
        "    group: chat (swap: yes, exclusive: no, persistent: no)\n"
        "  remote\n"
        f"    cmd: {server}\n"
        "    proxy: http://127.0.0.1:7999\n"
        "    group: (default) (swap: yes, exclusive: yes, persistent: no)\n"
        "warnings: none\n"
    )


def test_t_is_the_same_check(tmp_path: Path) -> None:
    cfg = write(tmp_path, f"models:\n  a:\n    cmd: {sys.executable} --port ${{PORT}}\n")
    long_form = swapper("check", "-c", str(cfg))
    short_form = swapper("-t", "--config", str(cfg))
    assert long_form.returncode == short_form.returncode == 0
    assert short_form.stdout == long_form.stdout and "  a\n" in long_form.stdout


def test_check_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    server = executable(tmp_path / "server", f"#!/bin/sh\ntouch {marker}\n")
    cfg = write(
        tmp_path, f"hooks:\n  on_startup:\n    preload: [a]\nmodels:\n  a:\n    cmd: {server} ${{PORT}}\n"
    )
    done = swapper("check", "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    assert "preload: a\n" in done.stdout
    assert not marker.exists()  # not even the preloaded model


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models:\n  a:\n    cmd: ''\n", "models.a.cmd: must not be empty"),
        ("models:\n  a:\n    cmd: x ${nope} ${PORT}\n", "models.a.cmd"),
        ("models: {}\npeers: {p: {proxy: 'http://127.0.0.1:1'}}\n", "peers.p.models"),
        ("models: [\n", "models.yaml"),
    ],
)
def test_an_invalid_config_exits_2_with_the_message_a_start_gives(
    tmp_path: Path, text: str, message: str, busy_listen: str
) -> None:
    cfg = write(tmp_path, text)
    checked = swapper("check", "--config", str(cfg))
    tested = swapper("-t", "--config", str(cfg))
    started = swapper("--config", str(cfg), "--listen", busy_listen)
    assert checked.returncode == tested.returncode == started.returncode == 2
    assert checked.stderr.startswith("swapper: config error: ") and message in checked.stderr
    assert checked.stderr == tested.stderr == started.stderr
    assert checked.stdout == ""


def test_a_missing_config_file_exits_2_like_a_start(tmp_path: Path, busy_listen: str) -> None:
    missing = str(tmp_path / "nope.yaml")
    checked = swapper("check", "--config", missing)
    started = swapper("--config", missing, "--listen", busy_listen)
    assert checked.returncode == started.returncode == 2
    assert checked.stderr == started.stderr and missing in checked.stderr


def test_check_needs_a_config() -> None:
    done = swapper("check")
    assert done.returncode == 2 and "--config" in done.stderr


def test_warnings_name_the_key_or_the_model(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    executable(tmp_path / "bin" / "own-server")
    not_exec = tmp_path / "not-executable"
    not_exec.write_text("#!/bin/sh\n")
    cfg = write(
        tmp_path,
        f"""
healthCheckTimout: 30
performance:
  disabled: true
models:
  gone:
    cmd: {tmp_path}/missing/llama-server --port ${{PORT}}
  relative:
    cmd: bin/llama-server --port ${{PORT}}
  bare:
    cmd: no-such-server-anywhere --port ${{PORT}}
  noexec:
    cmd: {not_exec} --port ${{PORT}}
  stop:
    cmd: {sys.executable} --port ${{PORT}}
    cmdStop: no-such-stopper ${{PID}}
  own-path:
    cmd: own-server --port ${{PORT}}
    env: ["PATH={tmp_path / "bin"}"]
  fine:
    cmd: bin/own-server --port ${{PORT}}
""",
    )
    done = swapper("check", "--config", str(cfg), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = done.stdout.split("warnings (")[1].splitlines()[1:]
    assert warnings == [
        "  healthCheckTimout: unknown key; ignored",
        "  performance: not supported by swapper; ignored",
        f"  models.gone.cmd: program '{tmp_path}/missing/llama-server' not found",
        f"  models.relative.cmd: program 'bin/llama-server' not found (relative to {tmp_path})",
        "  models.bare.cmd: program 'no-such-server-anywhere' not found on PATH",
        f"  models.noexec.cmd: program '{not_exec}' is not executable",
        "  models.stop.cmdStop: program 'no-such-stopper' not found on PATH",
    ]
    assert done.stdout.split("\n")[-2] == warnings[-1]  # the warnings end the report


def test_a_start_prints_the_same_warnings(tmp_path: Path, busy_listen: str) -> None:
    cfg = write(tmp_path, "unknownKey: 1\nmodels:\n  a:\n    cmd: no-such-server-anywhere ${PORT}\n")
    checked = swapper("check", "--config", str(cfg))
    listed = [line.strip() for line in checked.stdout.split("warnings (2):\n")[1].splitlines()]
    # The start prints every warning, then fails to bind a port that is taken.
    started = swapper("--config", str(cfg), "--listen", busy_listen)
    assert started.returncode != 0
    printed = [line.removeprefix("swapper: warning: ") for line in started.stderr.splitlines()]
    assert printed[: len(listed)] == listed


def test_matrix_placement_lists_the_sets_naming_each_model(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        f"""
models:
  a:
    cmd: {sys.executable} ${{PORT}}
  b:
    cmd: {sys.executable} ${{PORT}}
  c:
    cmd: {sys.executable} ${{PORT}}
routing:
  router:
    use: matrix
    settings:
      matrix:
        evict_costs: {{b: 5}}
        sets:
          pair: "a & b"
          solo: "a"
""",
    )
    done = swapper("check", "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    assert "planner: matrix\n" in done.stdout
    placements = [line.strip() for line in done.stdout.splitlines() if "matrix sets:" in line]
    assert placements == [
        "matrix sets: pair, solo; evict cost 1",
        "matrix sets: pair; evict cost 5",
        "matrix sets: (none: runs alone); evict cost 1",
    ]


def test_memory_placement_says_device_footprint_and_its_source(tmp_path: Path) -> None:
    state = tmp_path / "footprints.json"
    text = f"""
routing:
  router:
    use: memory
    settings:
      memory: {{ramBudget: 8GiB, stateFile: {state}}}
models:
  told:
    cmd: {sys.executable} ${{PORT}}
    memory: {{estimate: 64MiB, device: cpu}}
  seen:
    cmd: {sys.executable} -m seen.gguf ${{PORT}} -ngl 0
  guessed:
    cmd: {sys.executable} ${{PORT}} -ngl 0
"""
    config = parse_config(text)
    measured = {"device": "ram", "bytes": 300 * 2**20, "cmd": fingerprint(config.models["seen"]), "at": 1.0}
    state.write_text(json.dumps({"version": 1, "models": {"seen": measured}}))
    done = swapper("check", "--config", str(write(tmp_path, text)))
    assert done.returncode == 0, done.stderr
    memory = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("memory:")]
    assert memory == [
        "memory: ram, footprint 64.0 MiB (override: memory.estimate in the config)",
        "memory: ram, footprint 300.0 MiB (measured)",
        "memory: ram, footprint 1.06 GiB (guess: no -m/--model file in cmd)",
    ]
    planner = next(line for line in done.stdout.splitlines() if line.startswith("planner:"))
    assert planner.startswith("planner: memory (")


def test_program_lookup_follows_the_childs_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executable(tmp_path / "srv")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert check._program_problem("srv", {}) is None
    assert check._program_problem("srv", {"PATH": "/nonexistent"}) == "not found on PATH"
    monkeypatch.chdir(tmp_path)
    assert check._program_problem("./srv", {}) is None
    assert check._program_problem(str(tmp_path), {}) == "is not executable"  # a directory


def test_the_plain_server_form_still_needs_a_config(busy_listen: str) -> None:
    done = swapper("--listen", busy_listen)
    assert done.returncode == 2 and "--config" in done.stderr
