"""Kind routes end to end: a swapper process on the shipped config plus broker-style ``routes:``,
real llama-server and whisper-server children, and the real ``openai`` client.

A prefix route gives each kind its own OpenAI base URL (``/v1/llm`` → ``/v1`` of the LLM), so an
unmodified client reaches the right model whatever ``model`` it sends; an exact route serves the
broker's ``/v1/stt`` upload. Skipped without the demo models (``python -m swapper.demo setup``).
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml

from tests.realstack import WAV, SwapperProcess, demo_missing, derived_config, running_swapper

MISSING = demo_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

ROUTES = {
    "/v1/llm/": {"model": "chat-a", "prefix": True, "path": "/v1"},
    "/v1/stt": {"model": "whisper", "path": "/v1/audio/transcriptions"},
}


@pytest.fixture(scope="module")
def swapper_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwapperProcess]:
    workdir = tmp_path_factory.mktemp("broker")
    config = derived_config(workdir / "models.yaml", unloadTimeout=2.0)
    data = yaml.safe_load(config.read_text())
    data["routes"] = ROUTES
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    with running_swapper(config, workdir / "swapper.log") as proc:
        yield proc


@pytest.fixture
def stack(swapper_proc: SwapperProcess) -> Iterator[SwapperProcess]:
    """The module's swapper, left with nothing loaded after the test."""
    yield swapper_proc
    swapper_proc.unload()
    assert swapper_proc.server_children() == [], swapper_proc.log_tail()


def test_an_openai_client_on_a_kind_base_url_streams_from_its_model(stack: SwapperProcess) -> None:
    prompt: Any = [{"role": "user", "content": "Say something."}]
    with openai.OpenAI(base_url=stack.url + "/v1/llm", api_key="unused", max_retries=0, timeout=60) as client:
        stream = client.chat.completions.create(
            model="whatever-the-client-says", messages=prompt, max_tokens=6, temperature=0, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    assert stack.states() == {"chat-a": "ready"}


def test_the_stt_route_transcribes_an_upload(stack: SwapperProcess) -> None:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="temperature_inc"\r\n\r\n0\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + WAV.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        stack.url + "/v1/stt",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.status == 200
        assert isinstance(json.loads(resp.read())["text"], str)
    assert "whisper" in stack.states()
