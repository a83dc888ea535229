"""Loading and validating a llama-swap style ``models.yaml`` into frozen dataclasses.

Owns: nothing mutable after ``load_config`` returns. Reads the environment only while loading
(``${env.NAME}``); never touches processes or sockets.

Errors name the key path (``models.llama.cmd: ...``) and are raised as ``ConfigError``; the CLI
turns them into exit status 2. Keys we accept from llama-swap but do not implement are reported
once each in ``Config.warnings`` so a real llama-swap config still loads, never silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_START_PORT = 5800
DEFAULT_HEALTH_CHECK_TIMEOUT = 120.0
DEFAULT_UNLOAD_TIMEOUT = 10.0
DEFAULT_CONCURRENCY_LIMIT = 10
DEFAULT_MAX_WAIT = 30.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_QUEUED = 1000


class ConfigError(ValueError):
    """An invalid config; the message starts with the offending key path."""


@dataclass(frozen=True, slots=True)
class Filters:
    strip_params: tuple[str, ...] = ()
    set_params: Mapping[str, Any] = field(default_factory=dict)
    # requested name (model id or alias) -> params applied after set_params
    set_params_by_id: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str
    cmd: tuple[str, ...]  # argv (shlex split, comment lines removed, macros expanded)
    cmd_text: str  # the expanded command as one string, for /running and logs
    proxy: str  # base URL, no trailing slash
    check_endpoint: str | None  # None when "none": ready as soon as spawned
    cmd_stop: tuple[str, ...] | None = None  # argv; "${PID}" left in place, substituted at stop
    env: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()
    use_model_name: str | None = None
    unlisted: bool = False
    name: str = ""
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    port: int | None = None  # the ${PORT} allocated to this model, if its cmd uses one
    ttl: float = 0.0  # seconds idle before unload; 0 = never
    unload_timeout: float = DEFAULT_UNLOAD_TIMEOUT  # grace before SIGKILL on unload/TTL
    health_check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    max_wait: float = DEFAULT_MAX_WAIT  # starvation bound for requests that must evict others
    priority: int = 0  # routing.scheduler.settings.fifo.priority
    send_loading_state: bool = False
    filters: Filters = field(default_factory=Filters)
    # memory planner: bytes the model is expected to need before its first measured load
    memory_estimate: int | None = None
    memory_device: Literal["gpu", "cpu", "auto"] = "auto"


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    members: tuple[str, ...]
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False


@dataclass(frozen=True, slots=True)
class MatrixConfig:
    vars: Mapping[str, str] = field(default_factory=dict)  # short name -> model id
    evict_costs: Mapping[str, int] = field(default_factory=dict)  # model id -> cost (vars resolved)
    sets: tuple[tuple[str, str], ...] = ()  # (set name, DSL text) in definition order


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """``routing.router.settings.memory``: budgets per device and a reserve kept free."""

    gpu_budget: int | None = None  # bytes; None = the device's total as NVML reports it
    ram_budget: int | None = None  # bytes; None = total system RAM
    reserve: int = 512 * 1024 * 1024  # bytes kept free on each device
    state_file: str | None = None  # where measured footprints persist across restarts
    release_timeout: float = 10.0  # bounded wait for memory to be released after a stop


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    use: Literal["group", "matrix", "memory"] = "group"
    # Always includes the implicit "(default)" group holding every model in no other group.
    groups: tuple[GroupConfig, ...] = ()
    matrix: MatrixConfig | None = None
    memory: MemoryConfig = field(default_factory=MemoryConfig)


@dataclass(frozen=True, slots=True)
class Config:
    models: Mapping[str, ModelConfig]
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> model id (incl. setParamsByID keys)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    health_check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT
    log_level: Literal["debug", "info", "warn", "error"] = "info"
    log_to_stdout: Literal["proxy", "upstream", "both", "none"] = "proxy"
    log_format: Literal["console", "json"] = "console"
    start_port: int = DEFAULT_START_PORT
    default_model: str | None = None  # model id that requests without a model go to
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queued: int = DEFAULT_MAX_QUEUED  # global cap on queued requests -> 503
    global_ttl: float = 0.0
    api_keys: tuple[str, ...] = ()
    include_aliases_in_list: bool = False
    send_loading_state: bool = False
    loading_state_mode: Literal["reasoning", "comments"] = "reasoning"
    preload: tuple[str, ...] = ()  # model ids (aliases resolved)
    upstream_ignore_paths: tuple[str, ...] = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)
    warnings: tuple[str, ...] = ()  # one line per unsupported key seen

    def resolve(self, name: str) -> str | None:
        """Returns the model id that ``name`` (an id or alias) names, or None."""
        if name in self.models:
            return name
        return self.aliases.get(name)


def load_config(path: str) -> Config:
    """Reads, expands and validates the YAML file at ``path``; raises ConfigError."""
    raise NotImplementedError


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Same as load_config for YAML text (used by tests and reload)."""
    raise NotImplementedError
