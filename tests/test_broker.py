"""docs/broker.md's config: it loads as written, and serves the broker's paths against fake upstreams.

The YAML block is read from the page itself, so the page cannot drift from what swapper accepts.
To serve it here, only what needs a real machine is replaced: the spawned consumers' commands run
the fake upstream, the Docker TTS service is a fake the test runs itself, and the systemd image
service's ``start``/``stop`` are ``tests/upstreams/service_ctl.py``. Routes, groups, priorities,
probes and the rest are the page's.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import FormData

from swapper.app.check import report
from swapper.config.load import parse_config
from swapper.core.states import State
from tests.test_services import Services, gone, wait_port
from tests.test_swapping import FAKE, ClientFactory, client_for, free_port, runloop, wait_until

PAGE = Path(__file__).parent.parent / "docs" / "broker.md"


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[Services]:
    svc = Services(tmp_path)
    try:
        yield svc
    finally:
        svc.close()


def broker_yaml() -> str:
    match = re.search(r"```yaml\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, "docs/broker.md has no yaml block"
    return match.group(1)


def test_the_page_config_loads_as_written() -> None:
    cfg = parse_config(broker_yaml(), source="docs/broker.md")
    assert cfg.warnings == ()
    assert set(cfg.models) == {"tts", "stt", "llm", "image"}
    assert cfg.models["tts"].pinned and cfg.models["image"].service is not None
    assert cfg.models["image"].service.swappable and not cfg.models["image"].pinned
    assert cfg.models["stt"].service is None and cfg.models["llm"].service is None
    assert {r.path: (r.model, r.upstream, r.prefix) for r in cfg.routes.all()} == {
        "/v1/tts": ("tts", "/v1/audio/speech", False),
        "/v1/stt": ("stt", "/v1/audio/transcriptions", False),
        "/v1/llm": ("llm", "/v1/chat/completions", False),
        "/v1/image": ("image", "/v1/images/generations", False),
        "/audio": ("tts", None, True),
    }
    assert {g.name: g.members for g in cfg.routing.groups} == {
        "heavy": ("llm", "image"),
        "speech": ("tts", "stt"),
    }
    assert [cfg.models[m].priority for m in ("tts", "stt", "llm", "image")] == [30, 20, 10, 0]
    assert cfg.models["image"].memory_gpus == (1,) and cfg.models["tts"].memory_gpus == (0,)
    text = report(cfg, "docs/broker.md")  # swapper check / -t
    assert "    service: not run by swapper, pinned (never stopped)\n" in text
    assert "    start: systemctl --user start image-server\n" in text
    assert "group: speech (swap: no, exclusive: no, persistent: yes); never evicted" in text


def on_fakes(text: str, fakes: Services) -> tuple[str, int]:
    """The page's config with its commands and ports replaced by fakes; and the TTS port."""
    doc: dict[str, Any] = yaml.safe_load(text)
    models = doc["models"]
    tts_port, image_port = free_port(), free_port()
    models["tts"]["proxy"] = f"http://127.0.0.1:{tts_port}"
    models["tts"]["probeInterval"] = 0.2
    for mid in ("stt", "llm"):
        models[mid]["cmd"] = f"{sys.executable} -S {FAKE} --port ${{PORT}} --model-name {mid}"
    start, stop, pid_file = fakes.ctl("image", image_port)
    models["image"].update(
        proxy=f"http://127.0.0.1:{image_port}", start=start, stop=stop, pidFile=str(pid_file)
    )
    models["image"]["unloadTimeout"] = 5
    return yaml.safe_dump(doc, sort_keys=False), tts_port


async def test_the_page_config_serves_the_broker(aiohttp_client: ClientFactory, fakes: Services) -> None:
    text, tts_port = on_fakes(broker_yaml(), fakes)
    tts = fakes.run(tts_port, "tts")
    await wait_port(tts_port)
    cfg = parse_config(f"startPort: {free_port()}\n" + text)
    client = await client_for(aiohttp_client, cfg)
    loop = runloop(client)
    await wait_until(lambda: loop.state("tts") is State.READY)  # the pinned service is adopted

    echo = await (await client.post("/v1/tts", json={"input": "hello", "voice": "af_sky"})).json()
    assert (echo["pid"], echo["path"]) == (tts.pid, "/v1/audio/speech")
    audio = await (await client.get("/audio/2024-01-01/hello.wav")).json()
    assert (audio["pid"], audio["path"]) == (tts.pid, "/audio/2024-01-01/hello.wav")
    form = FormData()
    form.add_field("file", b"RIFF" + bytes(64), filename="a.wav")
    stt = await client.post("/v1/stt", data=form)
    assert stt.status == 200 and "stt" in (await stt.json())["text"]
    llm = await client.post(
        "/v1/llm", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert llm.status == 200 and (await llm.json())["model"] == "llm"

    # Image generation and the LLM never share the GPUs; speech stays beside either.
    image = await client.post("/v1/image", json={"prompt": "a cat", "n": 1})
    assert image.status == 200, await image.text()
    assert (await image.json())["data"]
    first_image = int(fakes.pid_files[0].read_text())
    states = {m: s.status.state for m, s in loop.snapshot().items()}
    assert states == {"tts": State.READY, "stt": State.READY, "llm": State.STOPPED, "image": State.READY}
    assert (await client.post("/v1/llm", json={"messages": [], "max_tokens": 2})).status == 200
    assert loop.state("image") is State.STOPPED  # its stop command ran, and it went down
    await wait_until(lambda: gone(first_image))
    assert loop.state("tts") is State.READY and loop.state("stt") is State.READY

    status = await (await client.get("/v1/status")).json()
    entries = {m["id"]: m for m in status["models"]}
    assert entries["tts"]["service"]["pinned"] is True and entries["tts"]["service"]["healthy"] is True
    assert entries["image"]["service"]["pinned"] is False
    assert entries["stt"]["service"] is None
    assert [entries[m]["priority"] for m in ("tts", "stt", "llm", "image")] == [30, 20, 10, 0]
    coexist = {m: entries[m]["coexistsWith"] for m in entries}
    assert coexist == {
        "tts": ["image", "llm", "stt"],
        "stt": ["image", "llm", "tts"],
        "llm": ["stt", "tts"],
        "image": ["stt", "tts"],
    }
    assert entries["tts"]["requestsTotal"] == 2
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    routing = await (await client.get("/api/routing")).json()
    assert routing["use"] == "group"

    # The TTS container goes away: the broker's callers get 503 retryable at once.
    tts.kill()
    tts.wait()
    await wait_until(lambda: loop.state("tts") is State.STOPPED)
    down = await client.post("/v1/tts", json={"input": "x"})
    assert down.status == 503 and (await down.json())["error"]["retryable"] is True
