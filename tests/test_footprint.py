"""Footprint estimates from a model's command and its GGUF header."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import pytest

from swapper.memory.footprint import (
    DEFAULT_CTX,
    FLAT_KV_MARGIN,
    UNKNOWN_ESTIMATE,
    ctx_size,
    estimate,
    model_path,
    read_gguf_shape,
)
from tests.fakes import model

Value = int | str | list[int] | list[str]


def gguf_bytes(kv: dict[str, Value], *, version: int = 3, padding: int = 0) -> bytes:
    """A GGUF file with ``kv`` as metadata and no tensors (what the header reader looks at)."""
    out = [b"GGUF", struct.pack("<IQQ", version, 0, len(kv))]

    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    for key, value in kv.items():
        out.append(string(key))
        if isinstance(value, str):
            out.append(struct.pack("<I", 8) + string(value))
        elif isinstance(value, int):
            out.append(struct.pack("<II", 4, value))
        elif value and isinstance(value[0], str):
            out.append(struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(str(v)) for v in value))
        else:
            out.append(
                struct.pack("<IIQ", 9, 4, len(value)) + b"".join(struct.pack("<I", int(v)) for v in value)
            )
    return b"".join(out) + b"\0" * padding


LLAMA: dict[str, Value] = {
    "general.architecture": "llama",
    "general.name": "tiny",
    "llama.context_length": 2048,
    "llama.embedding_length": 64,
    "llama.block_count": 2,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "tokenizer.ggml.tokens": ["<unk>"] * 10000,  # never walked: the reader stops at tokenizer keys
}


def llama_cmd(path: Path, *extra: str) -> tuple[str, ...]:
    return ("llama-server", "--port", "5800", "-m", str(path), *extra)


def write(tmp_path: Path, kv: dict[str, Value], **kw: int) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_bytes(kv, **kw))
    return path


def test_gguf_estimate_is_file_plus_kv_cache(tmp_path: Path) -> None:
    path = write(tmp_path, LLAMA, padding=1000)
    size = path.stat().st_size
    est = estimate(replace(model("m"), cmd=llama_cmd(path, "-c", "1024")))
    # 1024 tokens x 2 layers x 2 KV heads x (16 + 16) x 2 bytes (f16)
    assert est.source == "gguf" and est.bytes == size + 1024 * 2 * 2 * 32 * 2
    assert "ctx 1024" in est.detail
    q8 = estimate(replace(model("m"), cmd=llama_cmd(path, "--ctx-size=1024", "-ctk", "q8_0", "-ctv", "q8_0")))
    assert q8.bytes == size + int(1024 * 2 * 2 * 32 * 34 / 32)


def test_context_defaults_and_zero_means_trained(tmp_path: Path) -> None:
    path = write(tmp_path, LLAMA)
    size = path.stat().st_size
    per_token = 2 * 2 * 32 * 2
    assert estimate(replace(model("m"), cmd=llama_cmd(path))).bytes == size + DEFAULT_CTX * per_token
    assert estimate(replace(model("m"), cmd=llama_cmd(path, "-c", "0"))).bytes == size + 2048 * per_token


def test_explicit_key_and_value_lengths_and_per_layer_kv_heads(tmp_path: Path) -> None:
    kv = {k: v for k, v in LLAMA.items() if not k.startswith("tokenizer.")}
    kv["llama.attention.head_count_kv"] = [1, 3]
    kv["llama.attention.key_length"] = 8
    kv["llama.attention.value_length"] = 4
    shape = read_gguf_shape(str(write(tmp_path, kv)))
    assert shape is not None and shape.kv_heads == (1, 3) and (shape.key_length, shape.value_length) == (8, 4)


@pytest.mark.parametrize(
    "content",
    [b"not a gguf at all", gguf_bytes({"general.architecture": "llama"}), gguf_bytes(LLAMA, version=1)],
)
def test_unreadable_header_falls_back_to_a_flat_margin(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(content + b"\0" * 5000)
    size = path.stat().st_size
    est = estimate(replace(model("m"), cmd=llama_cmd(path)))
    assert est.source == "file" and est.bytes == size + int(size * FLAT_KV_MARGIN)


def test_no_model_file_is_a_guess(tmp_path: Path) -> None:
    assert estimate(model("m")).source == "guess"
    missing = estimate(replace(model("m"), cmd=llama_cmd(tmp_path / "nope.gguf")))
    assert missing.source == "guess" and missing.bytes == UNKNOWN_ESTIMATE and "nope.gguf" in missing.detail


def test_the_config_override_wins(tmp_path: Path) -> None:
    path = write(tmp_path, LLAMA)
    est = estimate(replace(model("m", memory_estimate=12345), cmd=llama_cmd(path)))
    assert (est.bytes, est.source) == (12345, "override")


def test_cpu_only_commands_are_recognised(tmp_path: Path) -> None:
    assert estimate(replace(model("m"), cmd=("llama-server", "-ngl", "0"))).cpu_only
    assert estimate(replace(model("m"), cmd=("llama-server", "--device", "none"))).cpu_only
    assert not estimate(replace(model("m"), cmd=("llama-server", "-ngl", "99"))).cpu_only


def test_option_parsing() -> None:
    assert model_path(["x", "--model", "~/a.gguf"]) == str(Path.home() / "a.gguf")
    assert model_path(["x", "-m=b.gguf"]) == "b.gguf"
    assert model_path(["python", "-m", "vllm.entrypoints", "--model", "org/m"]) == "org/m"  # last wins
    assert model_path(["x", "--model-name", "fake"]) is None
    assert ctx_size(["x", "-c", "8192"]) == 8192 and ctx_size(["x", "-c", "big"]) is None
