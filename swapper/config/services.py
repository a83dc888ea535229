"""The config of a service swapper does not spawn: a model with ``proxy`` and no ``cmd``.

Why: a broker's consumers often run under systemd or Docker; swapper must route to them, probe
them and account for their memory without owning their process. Such a model is *external*:

    models:
      kokoro:                                   # pinned: never stopped, never evicted
        proxy: http://127.0.0.1:8880
        checkEndpoint: /health
      comfy:                                    # swappable: planners may stop it
        proxy: http://127.0.0.1:8188
        start: systemctl --user start comfyui
        stop: systemctl --user stop comfyui
        pidFile: /run/user/1000/comfyui.pid     # else: the process listening on the proxy's port

Owns: nothing mutable; a leaf module (``config`` calls ``parse_service``). The runtime side is
``swapper.runtime.services``.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["DEFAULT_PROBE_INTERVAL", "SERVICE_KEYS", "ServiceError", "ServiceSpec", "parse_service"]

DEFAULT_PROBE_INTERVAL: Final = 5.0  # seconds between health probes of a ready service
SERVICE_KEYS: Final = frozenset({"start", "stop", "pidFile", "probeInterval"})


class ServiceError(ValueError):
    """A bad service entry; the config loader turns it into a ``ConfigError``."""


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    start: tuple[str, ...] | None = None  # argv run to bring it up (then its health is awaited)
    stop: tuple[str, ...] | None = None  # argv run to take it down; "${PID}" is its process
    pid_file: str | None = None  # where its pid is written; else the process listening on its port
    probe_interval: float = DEFAULT_PROBE_INTERVAL

    @property
    def swappable(self) -> bool:
        """Planners may stop it (it has a ``stop`` and a ``start``); else it is pinned."""
        return self.stop is not None


def parse_service(tree: Mapping[str, Any], path: str) -> ServiceSpec:
    """The service keys of the model at ``path`` (``tree``: its expanded config)."""
    start = _command(tree.get("start"), f"{path}.start")
    stop = _command(tree.get("stop"), f"{path}.stop")
    if stop is not None and start is None:
        raise ServiceError(f"{path}.stop: a service that swapper may stop needs a start command too")
    pid_file = tree.get("pidFile")
    if pid_file is not None and (not isinstance(pid_file, str) or not pid_file.strip()):
        raise ServiceError(f"{path}.pidFile: must be a file path")
    interval = tree.get("probeInterval", DEFAULT_PROBE_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ServiceError(f"{path}.probeInterval: must be a number of seconds greater than 0")
    return ServiceSpec(start, stop, pid_file.strip() if pid_file else None, float(interval))


def _command(value: object, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServiceError(f"{path}: must be a command line")
    text = " ".join(line for line in value.splitlines() if not line.strip().startswith("#"))
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise ServiceError(f"{path}: cannot be split into arguments: {exc}") from None
    if not argv:
        raise ServiceError(f"{path}: must not be empty")
    return argv
