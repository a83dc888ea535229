"""Deterministic tiny random-weight models and a test WAV, generated in well under a second each.

Owns: the files in the model cache (``<cache>/models``, see :func:`swapper.demo.models_dir`) and
their ``<file>.meta.json`` markers. Nothing is downloaded: every byte comes from numpy's seeded
PCG64 generator, so a given spec always produces the same bytes.

Artifacts (:data:`ARTIFACTS`):

* ``chat-a.gguf``, ``chat-b.gguf``: llama-architecture chat models (2 layers, embedding 64, vocab
  512, F32, ChatML template) that differ in seed and ``general.name`` (``tiny-chat-a`` /
  ``tiny-chat-b``). The output head gives zero logits to control, unknown and byte tokens, so EOS
  is never sampled: output is ASCII garbage and always runs to ``max_tokens``.
* ``embed.gguf``: the same shape with ``llama.pooling_type = mean`` for ``/v1/embeddings``.
* ``whisper-tiny.bin``: a whisper.cpp legacy-ggml model in the tiny.en layout with n_state 64
  (~8.6 MB); transcripts are garbage.
* ``test.wav``: 2 s of 16 kHz mono 16-bit PCM (a 440 Hz tone plus noise).

A file is regenerated only when it is missing, when its marker names another spec or generator
version, or when its SHA-256 no longer matches the marker. Files are written to a temporary name
and renamed into place, so a crash never leaves a half-written model behind a valid marker.

``gguf`` and ``numpy`` (the ``[demo]`` extra) are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import string
import struct
import time
import wave
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swapper.demo import models_dir

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Bump when a change to this module changes the bytes written for an unchanged spec.
GENERATOR_VERSION = 1

SPIECE = "\u2581"  # SentencePiece word-boundary marker

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS_TEXT = (
    "the and to of a in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most people my "
    "over know water than call first who may down side been now find hello world test model llama "
    "server proxy swap"
)
WORDS = _WORDS_TEXT.split()


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """A llama-architecture GGUF; ``embedding`` sets ``llama.pooling_type = mean``."""

    name: str
    seed: int
    embedding: bool = False
    vocab: int = 512
    embd: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    ff: int = 128
    ctx: int = 2048


@dataclass(frozen=True, slots=True)
class WhisperSpec:
    """A whisper.cpp legacy-ggml model in the tiny.en layout, with a smaller ``state``."""

    seed: int
    state: int = 64
    heads: int = 2
    layers: int = 4


@dataclass(frozen=True, slots=True)
class WavSpec:
    """A 16 kHz mono 16-bit WAV: a sine tone plus a little noise."""

    seed: int
    seconds: float = 2.0
    freq: float = 440.0


Spec = LlamaSpec | WhisperSpec | WavSpec


@dataclass(frozen=True, slots=True)
class Artifact:
    name: str  # key in ARTIFACTS, e.g. "chat-a"
    filename: str  # file name in the cache and in .demo/models
    spec: Spec


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        Artifact("chat-a", "chat-a.gguf", LlamaSpec(name="tiny-chat-a", seed=1)),
        Artifact("chat-b", "chat-b.gguf", LlamaSpec(name="tiny-chat-b", seed=2)),
        Artifact("embed", "embed.gguf", LlamaSpec(name="tiny-embed", seed=3, embedding=True)),
        Artifact("whisper", "whisper-tiny.bin", WhisperSpec(seed=4)),
        Artifact("wav", "test.wav", WavSpec(seed=5)),
    )
}
WHISPER_ARTIFACTS = ("whisper", "wav")


@dataclass(frozen=True, slots=True)
class ModelFile:
    """The outcome of :func:`ensure_models` for one artifact."""

    artifact: Artifact
    path: Path
    generated: bool  # False: an up-to-date cached file was reused
    seconds: float


# ---------------------------------------------------------------------------------------------
# llama GGUF


def build_vocab(target_size: int) -> tuple[list[str], list[float], list[int]]:
    """Return ``(tokens, scores, types)`` of an SPM ("llama") vocab with byte fallback.

    ``<unk>``, ``<s>``, ``</s>``, 256 byte tokens, the ChatML control tokens, then printable
    pieces (and every prefix of them, so SPM merges can reach the longer ones) up to
    ``target_size`` tokens.
    """
    import gguf

    tt = gguf.TokenType
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    seen: set[str] = set()

    def add(tok: str, score: float, ttype: int) -> None:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
            scores.append(score)
            types.append(int(ttype))

    add("<unk>", 0.0, tt.UNKNOWN)
    add("<s>", 0.0, tt.CONTROL)
    add("</s>", 0.0, tt.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, tt.BYTE)
    add("<|im_start|>", 0.0, tt.CONTROL)
    add("<|im_end|>", 0.0, tt.CONTROL)

    pieces = [SPIECE]
    pieces += [c for c in string.printable if c.isprintable() and c != " "]
    pieces += [SPIECE + c for c in string.ascii_letters + string.digits]
    pieces += [SPIECE + w for w in WORDS] + WORDS
    for piece in pieces:
        for i in range(1, len(piece) + 1):
            if len(tokens) >= target_size:
                return tokens, scores, types
            # SPM merges the highest-scoring pair first: longer pieces score higher.
            add(piece[:i], -1000.0 + 10.0 * i - 0.001 * len(tokens), tt.NORMAL)
    return tokens, scores, types


def write_llama_gguf(path: Path, spec: LlamaSpec) -> None:
    """Write a random-weight llama GGUF for ``spec`` to ``path`` (byte-identical per spec)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    tokens, scores, types = build_vocab(spec.vocab)
    n_vocab = len(tokens)
    head_dim = spec.embd // spec.heads
    if head_dim * spec.heads != spec.embd:
        raise ValueError(f"embd {spec.embd} is not divisible by heads {spec.heads}")
    n_embd_kv = head_dim * spec.kv_heads

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(spec.name)
    w.add_description("random-weight test model generated by swapper.demo.tinymodels; output is garbage")
    w.add_file_type(0)  # ALL_F32
    w.add_vocab_size(n_vocab)
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.embd)
    w.add_block_count(spec.layers)
    w.add_feed_forward_length(spec.ff)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if spec.embedding:
        w.add_pooling_type(gguf.PoolingType.MEAN)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHATML_TEMPLATE)

    def mat(rows: int, cols: int) -> npt.NDArray[np.float32]:
        # numpy shape (rows, cols) is GGUF ne {cols, rows}; llama.cpp computes x @ W^T
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm() -> npt.NDArray[np.float32]:
        return np.ones((spec.embd,), dtype=np.float32)

    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, spec.embd)).astype(np.float32))
    for i in range(spec.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm())
        w.add_tensor(p + "attn_q.weight", mat(spec.embd, spec.embd))
        w.add_tensor(p + "attn_k.weight", mat(n_embd_kv, spec.embd))
        w.add_tensor(p + "attn_v.weight", mat(n_embd_kv, spec.embd))
        w.add_tensor(p + "attn_output.weight", mat(spec.embd, spec.embd))
        w.add_tensor(p + "ffn_norm.weight", norm())
        w.add_tensor(p + "ffn_gate.weight", mat(spec.ff, spec.embd))
        w.add_tensor(p + "ffn_up.weight", mat(spec.ff, spec.embd))
        w.add_tensor(p + "ffn_down.weight", mat(spec.embd, spec.ff))
    w.add_tensor("output_norm.weight", norm())

    # Output head: large logits for normal pieces, zero rows for everything else (EOS included),
    # so generation never stops early and never emits raw bytes.
    out = (rng.standard_normal((n_vocab, spec.embd)) * 3.0).astype(np.float32)
    normal = int(gguf.TokenType.NORMAL)
    for tid, ttype in enumerate(types):
        if ttype != normal:
            out[tid, :] = 0.0
    w.add_tensor("output.weight", out)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------
# whisper ggml model and WAV


def write_whisper_model(path: Path, spec: WhisperSpec) -> None:
    """Write a whisper.cpp legacy-ggml model (magic ``ggml``, 11 int32 hparams, mel filters,
    vocab, tensors) in the tiny.en layout with ``n_state = spec.state``."""
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    n_vocab, n_audio_ctx, n_text_ctx, n_mels = 51864, 1500, 448, 80  # English-only layout
    s_, h_, l_ = spec.state, spec.heads, spec.layers
    chunks: list[bytes] = [
        struct.pack("<I", 0x67676D6C),
        # ftype 1: F16 matrices; biases, norms and positional embeddings stay F32
        struct.pack("<11i", n_vocab, n_audio_ctx, s_, h_, l_, n_text_ctx, s_, h_, l_, n_mels, 1),
    ]

    # mel filter bank: n_mels triangles over the 201 bins of a 400-point FFT
    n_fft = 201
    k = np.arange(n_fft, dtype=np.float64)
    centers = np.linspace(1, n_fft - 2, n_mels + 2)
    lo, mid, hi = centers[:-2, None], centers[1:-1, None], centers[2:, None]
    rise = (k - lo) / np.maximum(mid - lo, 1e-6)
    fall = (hi - k) / np.maximum(hi - mid, 1e-6)
    filt = np.where((k >= lo) & (k <= mid), rise, np.where((k > mid) & (k <= hi), fall, 0.0))
    chunks.append(struct.pack("<ii", n_mels, n_fft))
    chunks.append((filt * 0.01).astype(np.float32).tobytes())

    # vocab: the 50256 text tokens, ASCII only so any transcript is valid UTF-8; whisper.cpp
    # names the special and timestamp tokens (ids >= 50256) itself.
    n_text_tokens = 50256
    chunks.append(struct.pack("<i", n_text_tokens))
    for i in range(n_text_tokens):
        tok = (" " + WORDS[i % len(WORDS)]).encode() if i >= 256 else bytes([32 + (i % 95)])
        chunks.append(struct.pack("<I", len(tok)) + tok)

    def tensor(
        name: str, ne: tuple[int, ...], f16: bool, scale: float = 0.0, const: float | None = None
    ) -> None:
        shape = tuple(reversed(ne))  # numpy row-major == ggml ne0 fastest
        if const is not None:
            a = np.full(shape, const, dtype=np.float32)
        else:
            a = (rng.standard_normal(shape) * scale).astype(np.float32)
        data = a.astype(np.float16).tobytes() if f16 else a.tobytes()
        nb = name.encode()
        chunks.append(struct.pack("<iii", len(ne), len(nb), 1 if f16 else 0))
        chunks.append(struct.pack(f"<{len(ne)}i", *ne))
        chunks.append(nb)
        chunks.append(data)

    def ln(prefix: str) -> None:
        tensor(prefix + ".weight", (s_,), False, const=1.0)
        tensor(prefix + ".bias", (s_,), False, const=0.0)

    def attn(prefix: str) -> None:
        sc = 1.0 / math.sqrt(s_)
        tensor(prefix + ".query.weight", (s_, s_), True, sc)
        tensor(prefix + ".query.bias", (s_,), False, const=0.0)
        tensor(prefix + ".key.weight", (s_, s_), True, sc)
        tensor(prefix + ".value.weight", (s_, s_), True, sc)
        tensor(prefix + ".value.bias", (s_,), False, const=0.0)
        tensor(prefix + ".out.weight", (s_, s_), True, sc)
        tensor(prefix + ".out.bias", (s_,), False, const=0.0)

    def mlp(prefix: str) -> None:
        ln(prefix + ".mlp_ln")
        tensor(prefix + ".mlp.0.weight", (s_, 4 * s_), True, 1.0 / math.sqrt(s_))
        tensor(prefix + ".mlp.0.bias", (4 * s_,), False, const=0.0)
        tensor(prefix + ".mlp.2.weight", (4 * s_, s_), True, 1.0 / math.sqrt(4 * s_))
        tensor(prefix + ".mlp.2.bias", (s_,), False, const=0.0)

    tensor("encoder.positional_embedding", (s_, n_audio_ctx), False, 0.02)
    tensor("encoder.conv1.weight", (3, n_mels, s_), True, 1.0 / math.sqrt(3 * n_mels))
    tensor("encoder.conv1.bias", (1, s_), False, const=0.0)
    tensor("encoder.conv2.weight", (3, s_, s_), True, 1.0 / math.sqrt(3 * s_))
    tensor("encoder.conv2.bias", (1, s_), False, const=0.0)
    ln("encoder.ln_post")
    for i in range(l_):
        p = f"encoder.blocks.{i}"
        mlp(p)
        ln(p + ".attn_ln")
        attn(p + ".attn")
    tensor("decoder.positional_embedding", (s_, n_text_ctx), False, 0.02)
    tensor("decoder.token_embedding.weight", (s_, n_vocab), True, 1.0)
    ln("decoder.ln")
    for i in range(l_):
        p = f"decoder.blocks.{i}"
        for pre in ("", "cross_"):
            ln(f"{p}.{pre}attn_ln")
            attn(f"{p}.{pre}attn")
        mlp(p)

    with open(path, "wb") as f:
        f.write(b"".join(chunks))


def write_wav(path: Path, spec: WavSpec) -> None:
    """Write ``spec.seconds`` of 16 kHz mono 16-bit PCM: a sine tone plus a little noise."""
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    rate = 16000
    t = np.arange(round(rate * spec.seconds)) / rate
    sig = 0.3 * np.sin(2 * np.pi * spec.freq * t) + 0.05 * rng.standard_normal(t.shape)
    pcm = (np.clip(sig, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(pcm.tobytes())


def write_artifact(path: Path, spec: Spec) -> None:
    """Write the file described by ``spec`` to ``path`` (no cache, no marker)."""
    match spec:
        case LlamaSpec():
            write_llama_gguf(path, spec)
        case WhisperSpec():
            write_whisper_model(path, spec)
        case WavSpec():
            write_wav(path, spec)


# ---------------------------------------------------------------------------------------------
# cache


def spec_record(spec: Spec) -> dict[str, Any]:
    """What a marker stores to say which spec (and generator version) produced a file."""
    return {"generator": GENERATOR_VERSION, "kind": type(spec).__name__, **dataclasses.asdict(spec)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def is_current(path: Path, spec: Spec) -> bool:
    """True when ``path`` exists and its marker names ``spec`` and the file's current hash."""
    try:
        meta = json.loads(marker_path(path).read_text())
        if meta.get("spec") != spec_record(spec) or meta.get("size") != path.stat().st_size:
            return False
        return bool(meta.get("sha256") == sha256_file(path))
    except (OSError, ValueError):
        return False


def generate(path: Path, spec: Spec) -> None:
    """Write ``spec`` to ``path`` atomically, then its marker (``<path>.meta.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_artifact(tmp, spec)
        meta = {"spec": spec_record(spec), "sha256": sha256_file(tmp), "size": tmp.stat().st_size}
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    mtmp = marker_path(tmp)
    mtmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(mtmp, marker_path(path))


def ensure_models(
    names: Iterable[str] | None = None,
    directory: Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[ModelFile], None] | None = None,
) -> dict[str, ModelFile]:
    """Make sure the named artifacts (default: all of :data:`ARTIFACTS`) exist in ``directory``
    (default: the model cache), generating those that are missing or stale."""
    directory = directory if directory is not None else models_dir()
    result: dict[str, ModelFile] = {}
    for name in names if names is not None else ARTIFACTS:
        artifact = ARTIFACTS[name]
        path = directory / artifact.filename
        t0 = time.perf_counter()
        fresh = force or not is_current(path, artifact.spec)
        if fresh:
            generate(path, artifact.spec)
        mf = ModelFile(artifact, path, fresh, time.perf_counter() - t0)
        result[name] = mf
        if progress is not None:
            progress(mf)
    return result
