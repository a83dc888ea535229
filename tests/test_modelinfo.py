"""A llama-server client's model list: llama-server's own fields for each model, learned from the
child once it is ready and remembered on disk for before its next load."""

from __future__ import annotations

import asyncio
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from swapper.app.server import make_app
from swapper.config.load import parse_config
from swapper.config.schema import Config
from swapper.memory.ledger import fingerprint
from swapper.observe.modelinfo import FILE_NAME, Learned, parse, read, write
from tests.ops_helpers import FAKE, free_port

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

LLAMA_ANSWER = {
    "models": [{"name": "x.gguf", "model": "x.gguf", "capabilities": ["completion"]}],
    "object": "list",
    "data": [{"id": "x.gguf", "aliases": [], "tags": ["t"], "meta": {"n_ctx_train": 2048}}],
}


def test_only_llama_servers_answer_is_learned() -> None:
    learned = parse(LLAMA_ANSWER, "abc")
    assert learned is not None and learned.record["meta"] == {"n_ctx_train": 2048}
    assert learned.entry is not None and learned.entry["capabilities"] == ["completion"]
    assert parse({"object": "list", "data": [{"id": "m", "object": "model"}]}, "abc") is None  # no meta
    assert parse({"data": []}, "abc") is None
    assert parse(["x"], "abc") is None


def test_the_file_round_trips_and_a_damaged_one_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "sub" / FILE_NAME
    learned = {"m": Learned("abc", LLAMA_ANSWER["data"][0], LLAMA_ANSWER["models"][0])}
    write(path, learned)
    assert read(path) == learned
    path.write_text("{not json")
    assert read(path) == {}
    assert read(tmp_path / "absent.json") == {}


def llama_config(tmp_path: Path, ctx: int = 512) -> Config:
    """One model run by a program named llama-server: the fake, answering in llama-server's shape."""
    program = tmp_path / "llama-server"
    program.write_text(f'#!/bin/sh\nexec {sys.executable} -S {FAKE} --llama-meta "$@"\n')
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    port = free_port()
    return parse_config(
        f"""
        models:
          m:
            cmd: {program} --port {port} --model-name m --tokens {ctx}
            proxy: http://127.0.0.1:{port}
            aliases: [gpt-4o]
            name: Tiny
        """
    )


def record_of(body: dict[str, Any]) -> dict[str, Any]:
    [record] = [r for r in body["data"] if r["id"] == "m"]
    return record


async def test_llama_servers_fields_are_listed_and_remembered(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWAPPER_CACHE", str(tmp_path / "cache"))
    client = await aiohttp_client(make_app(llama_config(tmp_path)))
    body = await (await client.get("/v1/models")).json()
    record = record_of(body)
    assert "n_ctx_train" not in record["meta"] and record["aliases"] == ["gpt-4o"] and record["tags"] == []
    assert body["models"][0]["name"] == "m" and body["models"][0]["details"]["format"] == "gguf"

    resp = await client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 1})
    assert resp.status == 200

    async def learned() -> dict[str, Any]:
        return record_of(await (await client.get("/models")).json())

    deadline = time.monotonic() + 10
    while "n_ctx_train" not in (record := await learned())["meta"]:  # learned once the child is ready
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.01)
    meta = record["meta"]
    assert (meta["n_ctx_train"], meta["n_ctx"], meta["n_params"], meta["size"]) == (2048, 512, 1000, 604000)
    assert meta["swapper"]["aliases"] == ["gpt-4o"]  # swapper's own fields stay
    assert record["tags"] == ["tiny"] and record["status"] == {"value": "loaded"} and record["name"] == "Tiny"
    assert (await (await client.get("/v1/models")).json())["models"][0]["capabilities"] == ["completion"]
    while "m" not in read(tmp_path / "cache" / FILE_NAME):  # written in a thread just after
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_restarted_swapper_knows_them_before_the_first_load(
    aiohttp_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWAPPER_CACHE", str(tmp_path / "cache"))
    config = llama_config(tmp_path)
    write(tmp_path / "cache" / FILE_NAME, {"m": Learned(fingerprint(config.models["m"]), *_llama_facts())})
    client = await aiohttp_client(make_app(config))
    record = record_of(await (await client.get("/v1/models")).json())
    assert record["meta"]["n_ctx_train"] == 2048 and record["status"] == {"value": "unloaded"}
    # Another command (here another --tokens) is not described by what the old one said.
    other = await aiohttp_client(make_app(llama_config(tmp_path, ctx=1024)))
    assert "n_ctx_train" not in record_of(await (await other.get("/v1/models")).json())["meta"]


def _llama_facts() -> tuple[dict[str, Any], dict[str, Any]]:
    return LLAMA_ANSWER["data"][0], LLAMA_ANSWER["models"][0]  # type: ignore[index]
