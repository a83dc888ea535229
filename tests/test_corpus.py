"""A config corpus of our own covering every key of llama-swap's ``config.example.yaml``: it loads
(warning only for what swapper does not use), and ``swapper -config FILE -listen :PORT`` serves
its models, aliases, peers, selectors and profiles.

``EXAMPLE_KEYS`` lists the key paths of llama-swap's example (``*`` stands for a name the user
chooses: a model id, a macro, a group...). The load/warn/reject rules are in test_compat_rules.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from swapper.config.load import load_config
from tests.test_swapping import FAKE, free_port

CORPUS = Path(__file__).parent / "compat"
KEY = "sk-corpus"
WITHIN = 30.0

_EXAMPLE_TEXT = """
apiKeys captureBuffer globalTTL healthCheckTimeout hooks hooks.on_startup hooks.on_startup.preload
includeAliasesInList logLevel logTimeFormat logToStdout macros macros.* metricsMaxInMemory
models models.* models.*.aliases models.*.capabilities models.*.capabilities.context
models.*.capabilities.in models.*.capabilities.out models.*.capabilities.reranker
models.*.capabilities.tools models.*.checkEndpoint models.*.cmd models.*.cmdStop models.*.compat
models.*.compat.ignoreWebsockets models.*.concurrencyLimit models.*.description models.*.env
models.*.filters models.*.filters.setParams models.*.filters.setParams.*
models.*.filters.setParamsByID models.*.filters.setParamsByID.*
models.*.filters.setParamsByID.*.chat_template_kwargs
models.*.filters.setParamsByID.*.chat_template_kwargs.reasoning_effort models.*.filters.stripParams
models.*.macros models.*.macros.* models.*.metadata models.*.metadata.* models.*.name models.*.proxy
models.*.sendLoadingState models.*.timeouts models.*.timeouts.connect models.*.timeouts.idleConn
models.*.timeouts.keepalive models.*.timeouts.responseHeader models.*.timeouts.tlsHandshake
models.*.ttl models.*.unlisted models.*.unloadTimeout models.*.useModelName
peers peers.* peers.*.apiKey peers.*.filters peers.*.filters.setParams peers.*.filters.setParams.*
peers.*.filters.stripParams peers.*.models peers.*.proxy peers.*.timeouts peers.*.timeouts.connect
peers.*.timeouts.idleConn peers.*.timeouts.keepalive peers.*.timeouts.responseHeader
peers.*.timeouts.tlsHandshake performance performance.disabled performance.every
profiles profiles.* profiles.*.description profiles.*.pins profiles.*.pins.*
routing routing.router routing.router.settings routing.router.settings.groups
routing.router.settings.groups.* routing.router.settings.groups.*.exclusive
routing.router.settings.groups.*.members routing.router.settings.groups.*.persistent
routing.router.settings.groups.*.swap routing.router.settings.matrix
routing.router.settings.matrix.evict_costs routing.router.settings.matrix.evict_costs.*
routing.router.settings.matrix.sets routing.router.settings.matrix.sets.*
routing.router.settings.matrix.vars routing.router.settings.matrix.vars.* routing.router.use
routing.scheduler routing.scheduler.settings routing.scheduler.settings.fifo
routing.scheduler.settings.fifo.priority routing.scheduler.settings.fifo.priority.*
routing.scheduler.use selectors selectors.* selectors.*.description selectors.*.metadata
selectors.*.metadata.* selectors.*.name selectors.*.settings selectors.*.settings.spillover
selectors.*.strategy selectors.*.targets sendLoadingState startPort ui ui.activity
ui.activity.session_id unloadTimeout upstream upstream.ignorePaths
"""
EXAMPLE_KEYS = frozenset(_EXAMPLE_TEXT.split())

# Maps whose keys the user names: a path below one of them has "*" in that place.
_NAMED = {"models", "groups", "profiles", "selectors", "peers", "macros", "vars", "evict_costs", "sets"}
_NAMED |= {"setParams", "setParamsByID", "metadata", "pins", "priority"}
_LEAVES = {"metadata", "setParams", "macros", "pins", "vars", "evict_costs", "sets", "priority", "env"}


def key_paths(value: Any, path: str = "") -> set[str]:
    found: set[str] = set()
    last = path.rsplit(".", 1)[-1]
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{'*' if last in _NAMED else key}" if path else str(key)
            found.add(child)
            if last not in _LEAVES:
                found |= key_paths(item, child)
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, path)
    return found


def corpus_env(start_port: int = 20000, dead_port: int = 1) -> dict[str, str]:
    return {
        "SWAPPER_CORPUS_KEY": KEY,
        "SWAPPER_PY": sys.executable,
        "SWAPPER_FAKE": str(FAKE),
        "SWAPPER_START_PORT": str(start_port),
        "SWAPPER_DEAD_PORT": str(dead_port),
    }


def test_the_corpus_uses_every_key_of_llama_swaps_example() -> None:
    import yaml

    used: set[str] = set()
    for path in CORPUS.glob("*.yaml"):
        used |= key_paths(yaml.safe_load(path.read_text()))
    assert sorted(EXAMPLE_KEYS - used) == []


def test_the_corpus_loads_warning_only_for_what_swapper_does_not_use(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in corpus_env().items():
        monkeypatch.setenv(name, value)
    config = load_config(str(CORPUS / "llama-swap-keys.yaml"))
    assert config.warnings == (
        "logTimeFormat: not supported by swapper; ignored",
        "performance: not supported by swapper; ignored",
        "ui: not supported by swapper; ignored",
        "models.websocket-app.compat: not supported by swapper; ignored",
    )
    llama = config.models["llama"]
    assert llama.name == "Llama 8B" and llama.metadata == {"context": 4096, "family": "llama"}
    assert llama.aliases == ("gpt-4o-mini", "gpt-3.5-turbo", "llama-thinking")
    assert config.routing.use == "group" and config.routing.matrix is not None
    assert set(config.fleet.selectors) == {"coding-model", "pair", "hosted"}


def consecutive_free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now (the corpus's startPort)."""
    for _ in range(50):
        first = free_port()
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no run of free ports")


def call(base: str, path: str, body: Any = None, method: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    req = urllib.request.Request(base + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=WITHIN) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@contextmanager
def serving(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, **corpus_env(consecutive_free_ports(6), free_port())}
    argv = [sys.executable, "-m", "swapper", "-config", str(CORPUS / "llama-swap-keys.yaml")]
    log = tmp_path / "swapper.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*argv, "-listen", f":{port}"], env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WITHIN
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "swapper never listened"
            time.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WITHIN)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat(base: str, model: str) -> tuple[int, Any]:
    return call(
        base, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    )


def test_llama_swaps_command_line_serves_the_corpus(tmp_path: Path) -> None:
    with ExitStack() as stack:
        base = stack.enter_context(serving(tmp_path))
        status, listed = call(base, "/v1/models")
        assert status == 200
        kinds = {r["id"]: r["meta"]["llamaswap"]["type"] for r in listed["data"]}
        assert kinds == {
            "llama": "model",
            "gpt-4o-mini": "alias",
            "gpt-3.5-turbo": "alias",
            "llama-thinking": "alias",
            "websocket-app": "model",
            "model-a": "model",
            "model-b": "model",
            "forever-a": "model",
            "cloud/z-ai/glm-4.7": "peer",
            "cloud/deepseek/deepseek-v3.2": "peer",
            "coding-model": "selector",
            "pair": "selector",
            "hosted": "selector",
        }
        status, answer = chat(base, "gpt-4o-mini")  # an alias of llama
        assert status == 200 and answer["model"] == "llama"
        status, answer = chat(base, "coding-model")  # warm: llama is the loaded one
        assert status == 200 and answer["model"] == "llama"
        status, answer = chat(base, "pair")  # spillover over the side-by-side group
        assert status == 200 and answer["model"] == "model-a"
        status, answer = chat(base, "hosted")  # pinned to the peer, where nothing listens
        assert status == 502 and "peer proxy error" in answer["error"]["message"]
        assert call(base, "/api/profiles/active", {"name": "coding"}, "PUT") == (200, {"active": "coding"})
        status, answer = chat(base, "llm-plan")  # a pin of the active profile
        assert status == 200 and answer["model"] == "qwen"
        status, answer = chat(base, "image-gen")  # disabled by the profile
        assert status == 404
        status, running = call(base, "/running")
        # qwen's group is exclusive: it swapped llama out and stopped model-a; forever-a persists.
        assert {r["model"] for r in running["running"]} == {"qwen-unlisted", "forever-a"}


def test_check_lists_the_peers_selectors_and_profiles_never_a_key() -> None:
    env = {**os.environ, **corpus_env()}
    argv = [sys.executable, "-m", "swapper", "check", "-config", str(CORPUS / "llama-swap-keys.yaml")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = done.stdout
    assert "peers (1):\n  cloud: http://127.0.0.1:1, API key set\n" in report
    assert "    models: z-ai/glm-4.7, deepseek/deepseek-v3.2\n" in report
    assert "  pair: spillover (spillover 1) over model-a, model-b\n" in report
    assert "  coding-model: warm over qwen-unlisted, llama\n" in report
    assert "  coding: llm-code -> llama, llm-plan -> qwen-unlisted, image-gen -> (disabled)\n" in report
    assert "sk-cloud" not in report and KEY not in report
