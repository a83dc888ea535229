"""The values a few keys may take (from the records' Literals), the patterns and the macro names
the stages share, and the decoded document they pass along. The key tables themselves are rows
next to their decodes (``spec``: ``top.TOP``, ``models.MODEL``, ...).

Owns: nothing mutable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from swapper.config.schema import Device, LoadingMode, LogFormat, LogLevel, LogTarget, Router, Strategy
from swapper.config.spec import Tree
from swapper.config.timeouts import Timeouts

_LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
_LOG_TARGETS: tuple[str, ...] = get_args(LogTarget)
_LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
_LOADING_MODES: tuple[str, ...] = get_args(LoadingMode)
_ROUTERS: tuple[str, ...] = get_args(Router)
_DEVICES: tuple[str, ...] = get_args(Device)
_STRATEGIES: tuple[str, ...] = get_args(Strategy)

_NONE: frozenset[str] = frozenset()

_PID_ONLY = frozenset({"PID"})
_RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID"})
_MACRO_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]+$")
_MACRO_REF_RE = re.compile(r"\$\{([^}]*)\}")
_ENV_RE = re.compile(r"\$\{env\.([a-zA-Z_][a-zA-Z0-9_]*)\}")
_CONTINUATION_RE = re.compile(r"[ \t]*\\[ \t]*\r?\n[ \t]*")
_VAR_NAME_RE = re.compile(r"^[a-zA-Z0-9.-]{1,32}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# K/M/G/T mean powers of 1024, as llama.cpp and docker read them; KB/MB/GB/TB powers of 1000.
_SIZE_UNITS = {"": 1, "b": 1} | {
    unit: base**power
    for power, letter in enumerate("kmgt", 1)
    for unit, base in ((letter, 1024), (letter + "ib", 1024), (letter + "b", 1000))
}
_DEFAULT_PROXY = "http://127.0.0.1:${PORT}"

Scalar = str | int | float | bool
Macros = list[tuple[str, Scalar]]


@dataclass(slots=True)
class _Document:
    """The parsed top level after global macros; ``warnings`` grows while decoding continues."""

    top: Tree
    macros: Macros
    warnings: list[str]


@dataclass(frozen=True, slots=True)
class _Defaults:
    """Top-level values that every model inherits unless it overrides them."""

    health_check_timeout: float
    start_port: int
    global_ttl: float
    unload_timeout: float
    concurrency_limit: int
    max_wait: float
    send_loading_state: bool
    timeouts: Timeouts
