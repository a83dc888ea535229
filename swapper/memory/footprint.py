"""Estimating a model's memory footprint before it was ever loaded.

Owns: nothing mutable. ``estimate`` reads the file system (a ``stat`` and at most a few KiB of a
GGUF header), so it runs once per model when the memory planner is built, never inside a
decision. The measured footprint replaces the estimate after the model's first load
(``swapper.memory.monitor``); this only has to be good enough for that first one.

The estimate, in order of preference:

1. ``memory.estimate`` / ``memoryEstimate`` from the config, as given ("override").
2. The file after ``-m``/``--model`` in ``cmd`` plus its KV cache: n_ctx (``-c``/``--ctx-size``,
   llama-server's default when absent, the trained context for ``-c 0``) × layers × KV heads ×
   (key + value length) × bytes per element (``-ctk``/``-ctv``), read from the GGUF header when it
   is cheap to read ("gguf"); otherwise the file size plus a flat margin ("file").
3. Nothing to go on (no ``-m``, the file is missing, a vLLM hub id): a flat guess ("guess"); the
   planner never refuses a model on a guess.

The planner adds a per-device runtime overhead (CUDA context, compute buffers) to 2 and 3.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final, Literal

from swapper.config.placement import argv_option
from swapper.config.schema import ModelConfig

MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
UNKNOWN_ESTIMATE: Final = 1 * GIB
FLAT_KV_MARGIN: Final = 0.2  # of the model file, when the header does not say how big the KV cache is
DEFAULT_CTX: Final = 4096  # llama-server's default -c
HEADER_READ_LIMIT: Final = 4 * MIB  # give up on a header whose interesting keys are not in this prefix
MAX_STRING_ARRAY: Final = 4096  # a bigger string array (a vocabulary) is never worth walking

Source = Literal["override", "gguf", "file", "guess"]

# Bytes per KV element for llama.cpp's --cache-type-k/-v values (block size included).
_CACHE_TYPE_BYTES: Final = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}


@dataclass(frozen=True, slots=True)
class Estimate:
    bytes: int  # without the runtime overhead the planner adds per device (except "override")
    source: Source
    detail: str  # how it was reached, for logs and the status page
    cpu_only: bool = False  # the command keeps every layer off the GPU (-ngl 0, --device none)


@dataclass(frozen=True, slots=True)
class GgufShape:
    """What the KV cache size depends on, from a GGUF header."""

    context_length: int | None
    layers: int
    kv_heads: tuple[int, ...]  # per layer
    key_length: int
    value_length: int


def estimate(model: ModelConfig) -> Estimate:
    """The footprint to plan ``model``'s first load with; reads its model file's header."""
    argv = model.cmd
    cpu_only = _cpu_only(argv)
    if model.memory_estimate is not None:
        return Estimate(model.memory_estimate, "override", "memory.estimate in the config", cpu_only)
    path = model_path(argv)
    if path is None:
        return Estimate(UNKNOWN_ESTIMATE, "guess", "no -m/--model file in cmd", cpu_only)
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        return Estimate(UNKNOWN_ESTIMATE, "guess", f"cannot stat {path}: {exc.strerror or exc}", cpu_only)
    shape = read_gguf_shape(path)
    if shape is None:
        margin = int(size * FLAT_KV_MARGIN)
        detail = f"{path}: {_mib(size)} + {_mib(margin)} flat margin"
        return Estimate(size + margin, "file", detail, cpu_only)
    ctx = ctx_size(argv)
    if ctx is None:
        ctx = DEFAULT_CTX
    elif ctx == 0:
        ctx = shape.context_length or DEFAULT_CTX
    kv = kv_cache_bytes(shape, ctx, _cache_bytes(argv, "k"), _cache_bytes(argv, "v"))
    detail = f"{path}: {_mib(size)} + KV cache {_mib(kv)} (ctx {ctx}, {shape.layers} layers)"
    return Estimate(size + kv, "gguf", detail, cpu_only)


def kv_cache_bytes(shape: GgufShape, ctx: int, k_bytes: float, v_bytes: float) -> int:
    per_token = sum(h * (shape.key_length * k_bytes + shape.value_length * v_bytes) for h in shape.kv_heads)
    return int(ctx * per_token)


def model_path(argv: Sequence[str]) -> str | None:
    value = argv_option(argv, ("-m", "--model"))
    return None if not value else os.path.expanduser(value)


def ctx_size(argv: Sequence[str]) -> int | None:
    value = argv_option(argv, ("-c", "--ctx-size"))
    try:
        return None if value is None else max(0, int(value))
    except ValueError:
        return None


def _cache_bytes(argv: Sequence[str], which: Literal["k", "v"]) -> float:
    value = argv_option(argv, (f"-ct{which}", f"--cache-type-{which}"))
    return _CACHE_TYPE_BYTES.get((value or "f16").lower(), 2.0)


def _cpu_only(argv: Sequence[str]) -> bool:
    layers = argv_option(argv, ("-ngl", "--gpu-layers", "--n-gpu-layers"))
    device = argv_option(argv, ("-dev", "--device"))
    return layers == "0" or (device or "").lower() == "none"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n < GIB else f"{n / GIB:.2f} GiB"


# --- GGUF header ------------------------------------------------------------------------------------

_SCALARS: Final = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING: Final = 8
_ARRAY: Final = 9


class _Unreadable(Exception):
    pass


def read_gguf_shape(path: str) -> GgufShape | None:
    """The KV-relevant hyperparameters from a GGUF (v2/v3) header, or None if not cheap to read.

    Reads key/value pairs in order and stops at the tokenizer keys (llama.cpp writes the
    architecture's keys before them), so a large vocabulary is never walked.
    """
    try:
        with open(path, "rb") as fh:
            values = _read_kv(fh)
    except (OSError, _Unreadable, struct.error, UnicodeDecodeError):
        return None
    arch = values.get("general.architecture")
    if not isinstance(arch, str):
        return None
    return _shape(arch, values)


def _shape(arch: str, values: dict[str, object]) -> GgufShape | None:
    def int_of(key: str) -> int | None:
        value = values.get(f"{arch}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    layers, embed, heads = int_of("block_count"), int_of("embedding_length"), int_of("attention.head_count")
    if not layers or not embed or not heads:
        return None
    kv_raw = values.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_raw, list):
        kv_heads = tuple(int(h) for h in kv_raw[:layers])
    elif isinstance(kv_raw, int):
        kv_heads = (kv_raw,) * layers
    else:
        return None
    head_dim = embed // heads
    return GgufShape(
        context_length=int_of("context_length"),
        layers=layers,
        kv_heads=kv_heads,
        key_length=int_of("attention.key_length") or head_dim,
        value_length=int_of("attention.value_length") or head_dim,
    )


def _read_kv(fh: BinaryIO) -> dict[str, object]:
    magic, version = struct.unpack("<4sI", _read(fh, 8))
    if magic != b"GGUF" or version not in (2, 3):
        raise _Unreadable
    _tensors, count = struct.unpack("<QQ", _read(fh, 16))
    values: dict[str, object] = {}
    for _ in range(count):
        key = _read_string(fh)
        if key.startswith("tokenizer."):
            break
        (vtype,) = struct.unpack("<I", _read(fh, 4))
        values[key] = _read_value(fh, vtype)
        if fh.tell() > HEADER_READ_LIMIT:
            break
    return values


def _read_value(fh: BinaryIO, vtype: int) -> object:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _read_string(fh)
    if vtype != _ARRAY:
        raise _Unreadable
    itype, n = struct.unpack("<IQ", _read(fh, 12))
    if itype in _SCALARS:
        fmt = _SCALARS[itype]
        size = struct.calcsize(fmt)
        if n * size > HEADER_READ_LIMIT:
            raise _Unreadable
        return [v for (v,) in struct.iter_unpack(fmt, _read(fh, n * size))] if n else []
    if itype == _STRING and n <= MAX_STRING_ARRAY:
        return [_read_string(fh) for _ in range(n)]
    raise _Unreadable


def _read_string(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(fh, 8))
    if n > 1 << 20:
        raise _Unreadable
    return _read(fh, n).decode("utf-8")


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Unreadable
    return data
