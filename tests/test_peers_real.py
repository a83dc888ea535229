"""A peer end to end: the real ``openai`` client talks to a front swapper whose only models are a
back swapper's (real llama-server children), by full name and through a
selector, streaming included.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import yaml

from tests.realstack import SwapperProcess, demo_missing, derived_config, running_swapper

pytestmark = pytest.mark.skipif(demo_missing() is not None, reason=str(demo_missing()))


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SwapperProcess, SwapperProcess]]:
    tmp = tmp_path_factory.mktemp("peers")
    back_cfg = derived_config(tmp / "back.yaml")  # the key itself is tested in test_peers.py
    with running_swapper(back_cfg, tmp / "back.log") as back:
        front_cfg = tmp / "front.yaml"
        front_cfg.write_text(
            yaml.safe_dump(
                {
                    "peers": {
                        "box": {"proxy": back.url, "apiKey": "sk-back", "models": ["chat-a", "chat-b"]}
                    },
                    "selectors": {"chat": {"strategy": "pin", "targets": ["box/chat-b"]}},
                }
            )
        )
        with running_swapper(front_cfg, tmp / "front.log") as front:
            yield back, front


@pytest.fixture
def front(stacks: tuple[SwapperProcess, SwapperProcess]) -> Iterator[SwapperProcess]:
    """The front swapper; the back one is left with nothing loaded after the test."""
    back, front = stacks
    yield front
    back.unload()
    assert back.server_children() == [], back.log_tail()


@pytest.fixture
def oai(front: SwapperProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_a_peer_model_by_its_full_name_streams(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="box/chat-a", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, stream=True
    )
    deltas = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(deltas) > 1 and "".join(deltas).strip()


def test_a_selector_over_a_peer_and_the_model_list(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None
    ids = sorted(m.id for m in oai.models.list())
    assert ids == ["box/chat-a", "box/chat-b", "chat"]
