"""useModelName, filters and includeAliasesInList end to end, through the fake's echo endpoint.

Checklist 62, 63 and 69: what reaches the upstream, byte for byte, and what /v1/models lists.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import FormData
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from tests.ops_helpers import ops_config

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

SHAPED = """aliases: [fast]
useModelName: openai/x
filters:
  stripParams: "temperature, model"
  setParams:
    top_k: 5
    stop: ["a"]
  setParamsByID:
    fast:
      top_k: 9"""


async def echo_of(resp: Any) -> dict[str, Any]:
    assert resp.status == 200, await resp.text()
    echo: dict[str, Any] = await resp.json()
    return echo


async def test_json_body_is_shaped_for_the_upstream(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, m=SHAPED)))
    resp = await client.post(
        "/tokenize", json={"model": "m", "content": "hi", "temperature": 0.7, "top_k": 1}
    )
    echo = await echo_of(resp)
    assert echo["model_name"] == "m"  # routed by the configured id
    assert echo["path"] == "/tokenize"
    sent = json.loads(base64.b64decode(echo["body_b64"]))
    # useModelName, then stripParams (never "model"), then setParams.
    assert sent == {"model": "openai/x", "content": "hi", "top_k": 5, "stop": ["a"]}
    assert echo["headers"]["Content-Length"] == str(len(base64.b64decode(echo["body_b64"])))
    assert "Transfer-Encoding" not in echo["headers"]


async def test_set_params_by_id_follows_the_requested_alias(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""}, m=SHAPED)))
    echo = await echo_of(await client.post("/tokenize", json={"model": "fast", "content": "hi"}))
    sent = json.loads(base64.b64decode(echo["body_b64"]))
    assert sent == {"model": "openai/x", "content": "hi", "top_k": 9, "stop": ["a"]}


async def test_unshaped_model_body_is_byte_identical(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(make_app(ops_config({"m": ""})))
    payload = b'{"model":"m",  "temperature": 0.7, "x": "\\u00e9"}'
    resp = await client.post("/tokenize", data=payload, headers={"Content-Type": "application/json"})
    assert base64.b64decode((await echo_of(resp))["body_b64"]) == payload


async def test_multipart_use_model_name(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(
        make_app(ops_config({"whisper": ""}, whisper="useModelName: openai/whisper-1"))
    )
    form = FormData()
    form.add_field("model", "whisper")
    form.add_field("file", b"\x00RIFF" * 100, filename="a.wav", content_type="audio/wav")
    resp = await client.post("/v1/audio/transcriptions", data=form)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["model"] == "openai/whisper-1"  # the model field the upstream parsed
    assert body["file_bytes"] == 500  # the file part is untouched
    assert body["text"].startswith("whisper ")


async def test_models_list_with_and_without_aliases(aiohttp_client: ClientFactory) -> None:
    models = {"m": "", "hidden": ""}
    per = {"m": "aliases: [fast, quick]", "hidden": "unlisted: true"}
    plain = await aiohttp_client(make_app(ops_config(models, **per)))
    body = await (await plain.get("/v1/models")).json()
    assert [r["id"] for r in body["data"]] == ["m"]
    listed = await aiohttp_client(make_app(ops_config(models, "includeAliasesInList: true", **per)))
    body = await (await listed.get("/v1/models")).json()
    assert [r["id"] for r in body["data"]] == ["fast", "m", "quick"]  # sorted; unlisted omitted
    alias = next(r for r in body["data"] if r["id"] == "fast")
    assert alias["meta"]["swapper"] == {"type": "alias", "modelID": "m"}
    assert alias["status"] == {"value": "unloaded"}
