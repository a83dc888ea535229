"""llama-swap's command line runs swapper unchanged: its one-dash flags, ``-listen :PORT`` meaning
every interface, ``-config-dir`` with llama-swap's merge rules, TLS, and ``metricsListen``.

Real processes: ``python -m swapper`` started as a unit file or Docker command would start
llama-swap, the fake upstream as its model. The merge rules are tested directly too.
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from swapper.app.cli import parse_listen
from swapper.config import listen
from swapper.config.schema import ConfigError
from swapper.config.sources import ConfigSources
from tests.test_swapping import FAKE, free_port

WITHIN = 30.0


def fake_model(name: str, port: int) -> str:
    return (
        f"  {name}:\n"
        f"    cmd: {sys.executable} {FAKE} --port {port} --model-name {name}\n"
        f"    proxy: http://127.0.0.1:{port}\n"
    )


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "swapper", *argv], capture_output=True, text=True, timeout=60
    )


def poll(cond: Callable[[], Any], what: str, within: float = WITHIN) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            if value := cond():
                return value
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fetch(url: str, *, data: bytes | None = None, ctx: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if data else {}
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=WITHIN, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@contextmanager
def running(argv: list[str], base: str, log: Path, ctx: ssl.SSLContext | None = None) -> Iterator[None]:
    """``python -m swapper *argv``, up once ``base``/health answers; stopped with SIGTERM after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "swapper", *argv], stderr=out, stdout=out)
    try:
        poll(lambda: proc.poll() is not None or fetch(base + "/health", ctx=ctx)[0] == 200, "a listener")
        assert proc.poll() is None, log.read_text()
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WITHIN)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the listen address ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        (":8080", ("", 8080)),  # Go: every interface
        ("8080", ("127.0.0.1", 8080)),  # swapper's own short form stays loopback
        ("0.0.0.0:9", ("0.0.0.0", 9)),
        ("localhost:9", ("localhost", 9)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:8080", ("::", 8080)),
    ],
)
def test_listen_addresses_read_as_go_reads_them(text: str, address: tuple[str, int]) -> None:
    assert parse_listen(text) == address


@pytest.mark.parametrize("text", ["host:port", "::1:80", ":99999", ""])
def test_a_bad_listen_address_is_refused(text: str) -> None:
    with pytest.raises(Exception, match="invalid listen address"):
        parse_listen(text)


def test_loopback_is_what_only_this_machine_reaches() -> None:
    assert all(map(listen.is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(listen.is_loopback, ["", "0.0.0.0", "::", "192.168.1.2", "gpu-box"]))


def test_llama_swaps_command_line_serves_on_every_interface_and_warns_without_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("models:\n" + fake_model("a", free_port()))
    port = free_port()
    log = tmp_path / "swapper.log"
    base = f"http://127.0.0.1:{port}"
    with running(["-config", str(cfg), "-listen", f":{port}", "-watch-config"], base, log):
        status, body = fetch(base + "/v1/chat/completions", data=json.dumps({"model": "a"}).encode())
        assert status == 200, body
    text = log.read_text()
    assert text.count("anyone on the network can start models") == 1, text
    assert f"http://0.0.0.0:{port}" in text


def test_no_warning_on_loopback_or_with_api_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("apiKeys: [sk-1]\nmodels:\n" + fake_model("a", free_port()))
    port = free_port()
    log = tmp_path / "swapper.log"
    with running(["--config", str(cfg), "--listen", f":{port}"], f"http://127.0.0.1:{port}", log):
        pass
    assert "anyone on the network" not in log.read_text()


def test_version_flag_in_both_spellings() -> None:
    for flag in ("-version", "--version"):
        done = cli(flag)
        assert done.returncode == 0 and done.stdout.startswith("swapper "), done


def test_tls_serves_https_on_both_paths(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    cfg = tmp_path / "config.yaml"
    cfg.write_text("models:\n" + fake_model("a", free_port()))
    port = free_port()
    ctx = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{port}"
    argv = ["-config", str(cfg), "-listen", f"127.0.0.1:{port}", "-tls-cert-file", str(cert)]
    with running([*argv, "-tls-key-file", str(key)], base, tmp_path / "log", ctx):
        # The front door's fast path, then a route it hands to aiohttp, both over TLS.
        status, body = fetch(base + "/v1/chat/completions", data=b'{"model":"a"}', ctx=ctx)
        assert status == 200, body
        status, body = fetch(base + "/running", ctx=ctx)
        assert status == 200 and json.loads(body)["running"][0]["model"] == "a"
        with pytest.raises(OSError):  # a reset, or a refusal
            fetch(f"http://127.0.0.1:{port}/health")  # plain HTTP is not spoken there


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("models:\n" + fake_model("a", 1))
    done = subprocess.run(
        [sys.executable, "-m", "swapper", "-config", str(cfg), "-tls-cert-file", "x.pem"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "go together" in done.stderr


def test_metrics_listen_moves_metrics_off_the_main_listener(tmp_path: Path) -> None:
    mport, port = free_port(), free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"metricsListen: 127.0.0.1:{mport}\nmodels:\n" + fake_model("a", free_port()))
    base = f"http://127.0.0.1:{port}"
    with running(["-config", str(cfg), "-listen", f"127.0.0.1:{port}"], base, tmp_path / "log"):
        assert fetch(base + "/metrics")[0] == 404
        status, body = fetch(f"http://127.0.0.1:{mport}/metrics")
        assert status == 200 and b"swapper_" in body
        assert fetch(f"http://127.0.0.1:{mport}/v1/models")[0] == 404  # only /metrics there


def test_metrics_listen_must_be_an_address() -> None:
    from swapper.config.load import parse_config

    with pytest.raises(ConfigError, match="metricsListen: invalid listen address"):
        parse_config("metricsListen: nowhere\nmodels:\n  a: {cmd: x, proxy: 'http://127.0.0.1:1'}\n")


# ---- -config-dir ---------------------------------------------------------------------------------------


def model_yaml(name: str) -> str:
    return f"  {name}: {{cmd: 'srv {name}', proxy: 'http://127.0.0.1:9'}}\n"


def test_config_dir_merges_files_in_name_order_after_the_file(tmp_path: Path) -> None:
    main = tmp_path / "main.yaml"
    main.write_text("apiKeys: [k1]\nhooks: {on_startup: {preload: [a]}}\nmodels:\n" + model_yaml("a"))
    folder = tmp_path / "conf.d"
    folder.mkdir()
    (folder / "20-b.yaml").write_text("apiKeys: [k2]\nmodels:\n" + model_yaml("b"))
    c_yaml = "logLevel: ~\nhooks: {on_startup: {preload: [c]}}\nmodels:\n" + model_yaml("c")
    (folder / "10-c.yml").write_text(c_yaml)
    (folder / "00-empty.yaml").write_text("# nothing yet\n")
    (folder / "notes.txt").write_text("models: {x: 1}\n")  # not YAML by name: never read
    (folder / "sub").mkdir()
    (folder / "sub" / "d.yaml").write_text("models:\n" + model_yaml("d"))  # no recursion
    config = ConfigSources(main, folder).load()
    assert sorted(config.models) == ["a", "b", "c"]
    assert config.api_keys == ("k1", "k2")  # lists concatenate, file first
    assert config.preload == ("a", "c")


def test_config_dir_alone_works(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("models:\n" + model_yaml("a"))
    assert list(ConfigSources(None, tmp_path).load().models) == ["a"]


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("models:\n" + model_yaml("a"), "models:\n" + model_yaml("a"), "duplicate models 'a' found in"),
        ("peers: {p: {}}\n", "peers: {p: {}}\n", "duplicate peers 'p'"),
        ("logLevel: info\n", "logLevel: debug\n", "conflict at 'logLevel'"),
        ("startPort: 5800\n", "startPort: '5800'\n", "conflict at 'startPort'"),
        ("apiKeys: [a]\n", "apiKeys: {a: 1}\n", "conflict at 'apiKeys'"),
        (
            "routing: {router: {settings: {groups: {g: {members: [a]}}}}}\n",
            "routing: {router: {settings: {groups: {g: {members: [a]}}}}}\n",
            "duplicate groups 'g'",
        ),
    ],
)
def test_config_dir_merge_conflicts_are_errors(tmp_path: Path, first: str, second: str, message: str) -> None:
    (tmp_path / "1.yaml").write_text(first)
    (tmp_path / "2.yaml").write_text(second)
    with pytest.raises(ConfigError, match=message):
        ConfigSources(None, tmp_path).load()


def test_same_scalars_and_nulls_merge(tmp_path: Path) -> None:
    (tmp_path / "1.yaml").write_text("logLevel: debug\nglobalTTL: ~\nmodels:\n" + model_yaml("a"))
    (tmp_path / "2.yaml").write_text("logLevel: debug\nglobalTTL: 60\n")
    config = ConfigSources(None, tmp_path).load()
    assert config.log_level == "debug" and config.global_ttl == 60


def test_the_file_may_not_also_be_in_the_folder(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("models:\n" + model_yaml("a"))
    with pytest.raises(ConfigError, match="also in --config-dir"):
        ConfigSources(tmp_path / "a.yaml", tmp_path).load()


def test_a_new_file_in_the_folder_changes_the_digest(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("models:\n" + model_yaml("a"))
    sources = ConfigSources(None, tmp_path)
    before = sources.digest()
    (tmp_path / "b.yaml").write_text("models:\n" + model_yaml("b"))
    assert before is not None and sources.digest() not in (None, before)


def test_check_reads_a_config_dir(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("models:\n" + model_yaml("a"))
    (tmp_path / "b.yaml").write_text("models:\n" + model_yaml("b"))
    for argv in (["check", "-config-dir", str(tmp_path)], ["-t", "--config-dir", str(tmp_path)]):
        done = cli(*argv)
        assert done.returncode == 0, done.stderr
        assert "srv a" in done.stdout and "srv b" in done.stdout


def test_no_config_at_all_is_an_error() -> None:
    done = subprocess.run([sys.executable, "-m", "swapper"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "at least one of --config or --config-dir" in done.stderr


def test_sighup_reloads_a_config_dir_with_a_new_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf.d"
    folder.mkdir()
    (folder / "10-a.yaml").write_text("models:\n" + fake_model("a", free_port()))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "swapper.log"

    def ids() -> list[str]:
        return sorted(m["id"] for m in json.loads(fetch(base + "/v1/models")[1])["data"])

    argv = [sys.executable, "-m", "swapper", "-config-dir", str(folder), "-listen", f"127.0.0.1:{port}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    try:
        poll(lambda: proc.poll() is not None or ids() == ["a"], "the first file's model")
        assert proc.poll() is None, log.read_text()
        (folder / "20-b.yaml").write_text("models:\n" + fake_model("b", free_port()))
        proc.send_signal(signal.SIGHUP)
        poll(lambda: ids() == ["a", "b"], "the new file's model after SIGHUP")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WITHIN)
