"""The key tables: which keys each level accepts, which it ignores with a warning, and the
values a few keys may take; the decoded document the stages pass along.

Owns: nothing mutable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from swapper.config.spec import Tree
from swapper.config.timeouts import Timeouts

# --- key tables -----------------------------------------------------------------------------------

_LogLevel = Literal["debug", "info", "warn", "error"]
_LogTarget = Literal["proxy", "upstream", "both", "none"]
_LogFormat = Literal["console", "json"]
_LoadingMode = Literal["reasoning", "comments"]
_Router = Literal["group", "matrix", "memory"]
_Device = Literal["gpu", "cpu", "auto"]

_LOG_LEVELS = ("debug", "info", "warn", "error")
_LOG_TARGETS = ("proxy", "upstream", "both", "none")
_LOG_FORMATS = ("console", "json")
_LOADING_MODES = ("reasoning", "comments")
_ROUTERS = ("group", "matrix", "memory")
_DEVICES = ("auto", "gpu", "cpu")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


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
