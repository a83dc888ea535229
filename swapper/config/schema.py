"""Loading and validating a llama-swap style ``models.yaml`` into frozen dataclasses.

Owns: nothing mutable after ``load_config`` returns. Reads the environment only while loading
(``${env.NAME}``); never touches processes or sockets.

Errors name the key path (``models.llama.cmd: ...``) and are raised as ``ConfigError``; the CLI
turns them into exit status 2. Keys we accept from llama-swap but do not implement are reported
once each in ``Config.warnings`` so a real llama-swap config still loads, never silently; a key
nobody knows (a typo) is reported the same way rather than rejected.

Pipeline, in the order llama-swap applies it (the order is observable, so it is kept):

1. ``${env.NAME}`` is replaced in the raw text, except on ``#`` comment lines and in trailing
   ``# comments``. Inside a double-quoted YAML string the value is escaped so it stays one string.
2. The text is parsed as YAML (safe loader, duplicate keys rejected, YAML 1.2 booleans so that a
   model called ``no`` stays a string).
3. Macros: global ``macros`` apply to every top-level key except ``models``; each model sees
   ``MODEL_ID``, the globals (a model macro of the same name replaces the global in place) and its
   own macros. Macros are applied last-declared first, so a macro may use only macros declared
   before it. A value that is exactly ``${name}`` takes the macro's type (numbers stay numbers).
   ``#`` lines in ``cmd``/``cmdStop`` are dropped first. Keys of ``filters.setParamsByID`` are
   expanded too; no other mapping key is.
4. ``${PORT}``: models in sorted id order, each whose expanded ``cmd`` uses ``${PORT}`` gets the
   next port from ``startPort``. Any ``${...}`` left afterwards is an error, except ``${PID}`` in
   ``cmdStop`` (filled in at stop time).
5. Typed decode with defaults, aliases (``setParamsByID`` keys other than the model's own id become
   aliases too and follow the explicit ones in ``ModelConfig.aliases``), routing (the implicit
   ``(default)`` group), scheduler priorities (aliases resolved to ids), preload.

Additions of our own, all optional (llama-swap has none of them):

* ``defaultModel``: model id or alias that requests naming no model go to.
* ``maxBodyBytes``: largest request body accepted (bytes or a size such as ``"64MiB"``).
* ``maxQueued``: how many requests may wait in the queue at once before new ones get 503.
* ``maxWait`` (top level and per model, seconds): how long a request that needs another model
  evicted may be held back by traffic to the running model before new work for it stops.
* ``concurrencyLimit`` at top level: the default for every model (llama-swap: per model only).
  Unset, a model admits up to ``maxQueued`` requests (llama-swap: 10) and its child queues them.
* ``routeUnknownModels``: requests naming an unknown model go to ``defaultModel``.
* ``corsOrigins``: ``"*"`` or a list of origins; unset, any ``Origin`` is echoed (llama-server's way).
* ``logFormat``: ``console`` or ``json``. ``loadingStateMode``: ``reasoning`` or ``comments``.
* ``requestHeaderTimeout``: seconds a client may take to send a request head, from its first byte.
* ``metricsListen``: ``host:port`` serving ``/metrics`` alone, which then leaves the main listener.
* ``metricsMaxInMemory`` (llama-swap's key) may be 0: no activity log at all. ``captureBuffer``
  (llama-swap's, in MB, or a size string) defaults to 0 (off) here, 5 MB there.
* ``routing.router.use: memory`` with ``settings.memory`` (``gpuBudget``, ``ramBudget``,
  ``reserve``, ``stateFile``, ``releaseTimeout``), and per model ``memory: {estimate, device}``
  (or ``memoryEstimate``). Sizes are byte counts or strings like ``"512MiB"``, ``"2GB"``, ``"8G"``
  (``K``/``M``/``G``/``T`` and ``KiB``... are powers of 1024, ``KB``/``MB``... of 1000).

Differences from llama-swap, on purpose: ``proxy`` defaults to ``http://127.0.0.1:${PORT}`` (no
IPv6 ``localhost`` surprise), an empty ``cmd`` or an unparsable ``cmdStop`` fails at load rather than
at start, and a forward macro reference fails even when the macro is unused. ``peers``,
``profiles`` and ``selectors`` are decoded by ``swapper/config/fleet.py``; multi-file configs
(``--config-dir``) are merged by ``swapper/config/sources.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from swapper.config import capabilities
from swapper.config import timeouts as _timeouts
from swapper.config.dsl import CompiledMatrix, MatrixConfig
from swapper.config.kindroutes import KindRoutes
from swapper.config.services import ServiceSpec
from swapper.config.timeouts import Timeouts

# Each set of choices is written once: the decode offers these Literals' values, in this order
# (the first is the default where a key may be left out).
LogLevel = Literal["debug", "info", "warn", "error"]
LogTarget = Literal["proxy", "upstream", "both", "none"]
LogFormat = Literal["console", "json"]
LoadingMode = Literal["reasoning", "comments"]
Router = Literal["group", "matrix", "memory"]
Device = Literal["auto", "gpu", "cpu"]
Strategy = Literal["warm", "pin", "spillover"]

DEFAULT_PEER_CONNECT_TIMEOUT = 30.0  # llama-swap's peer transport defaults
DEFAULT_PEER_RESPONSE_HEADER_TIMEOUT = 60.0
DEFAULT_PEER_CONCURRENCY = 100  # requests in flight to one peer at once; more get 429


@dataclass(frozen=True, slots=True)
class PeerConfig:
    id: str
    proxy: str  # base URL, no trailing slash; the request's path is appended
    models: tuple[str, ...]
    filters: Filters
    api_key: str = ""  # sent as Authorization: Bearer and x-api-key when set
    connect_timeout: float = DEFAULT_PEER_CONNECT_TIMEOUT  # 0: none
    response_header_timeout: float = DEFAULT_PEER_RESPONSE_HEADER_TIMEOUT  # 0: none
    concurrency_limit: int = DEFAULT_PEER_CONCURRENCY


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    id: str
    pins: Mapping[str, str]  # requested name -> target; "" disables the name
    description: str = ""


@dataclass(frozen=True, slots=True)
class SelectorConfig:
    id: str
    strategy: Strategy
    targets: tuple[str, ...]
    spillover: int = 1
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerModel:
    peer: str
    model: str

    @property
    def fqn(self) -> str:
        return f"{self.peer}/{self.model}"


@dataclass(frozen=True, slots=True)
class Fleet:
    peers: Mapping[str, PeerConfig] = field(default_factory=dict)
    profiles: Mapping[str, ProfileConfig] = field(default_factory=dict)
    selectors: Mapping[str, SelectorConfig] = field(default_factory=dict)

    def peer_model(self, name: str) -> PeerModel | None:
        """The peer model ``name`` names: an exact ``peer/model`` first, else a bare model id that
        exactly one peer lists (local ids and aliases are the caller's to try first)."""
        found = {PeerModel(p.id, m) for p in self.peers.values() for m in p.models if f"{p.id}/{m}" == name}
        if not found:
            found = {PeerModel(p.id, m) for p in self.peers.values() for m in p.models if m == name}
        return next(iter(found)) if len(found) == 1 else None

    def peer_models(self) -> list[PeerModel]:
        return [PeerModel(p.id, m) for p in self.peers.values() for m in dict.fromkeys(p.models)]


DEFAULT_START_PORT = 5800
DEFAULT_HEALTH_CHECK_TIMEOUT = 120.0
DEFAULT_UNLOAD_TIMEOUT = 10.0
DEFAULT_MAX_WAIT = 30.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_QUEUED = 1000
DEFAULT_REQUEST_HEADER_TIMEOUT = 20.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_ACTIVITY_RECORDS = 1000  # llama-swap's metricsMaxInMemory
DEFAULT_UPSTREAM_IGNORE_PATHS: tuple[str, ...] = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)
DEFAULT_GROUP = "(default)"
DEFAULT_CHECK_ENDPOINT = "/health"
MIN_HEALTH_CHECK_TIMEOUT = 15.0


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
    concurrency_limit: int = DEFAULT_MAX_QUEUED  # unset: what maxQueued allows (the child queues)
    max_wait: float = DEFAULT_MAX_WAIT  # starvation bound for requests that must evict others
    priority: int = 0  # routing.scheduler.settings.fifo.priority
    send_loading_state: bool = False
    filters: Filters = field(default_factory=Filters)
    # memory planner: bytes the model is expected to need before its first measured load
    memory_estimate: int | None = None
    memory_device: Device = "auto"
    memory_gpus: tuple[int, ...] | None = None  # memory.devices: the GPUs it lives on (placement)
    service: ServiceSpec | None = None  # proxy without cmd: a service swapper does not spawn
    capabilities: capabilities.Capabilities = field(default_factory=capabilities.Capabilities)
    cmd_raw: str = ""  # the expanded cmd as written (lines kept, comments dropped): /running's
    timeouts: Timeouts = _timeouts.DEFAULT  # the global ``timeouts:`` with this model's own keys

    @property
    def pinned(self) -> bool:
        """A service swapper may never stop (no ``stop`` command): never evicted or unloaded."""
        return self.service is not None and not self.service.swappable


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    members: tuple[str, ...]
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False


@dataclass(frozen=True, slots=True)
class GpuLimits:
    """``memory.gpus.<index>``: one GPU's own budget and reserve (None: the global ones)."""

    budget: int | None = None
    reserve: int | None = None


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """``routing.router.settings.memory``: budgets per device and a reserve kept free."""

    gpu_budget: int | None = None  # bytes; None = the device's total as NVML reports it
    ram_budget: int | None = None  # bytes; None = total system RAM
    reserve: int = 512 * 1024 * 1024  # bytes kept free on each device
    state_file: str | None = None  # where measured footprints persist across restarts
    release_timeout: float = 10.0  # bounded wait for memory to be released after a stop
    gpus: Mapping[int, GpuLimits] = field(default_factory=dict)  # per-GPU budget/reserve overrides

    def gpu_budget_of(self, index: int) -> int | None:
        limits = self.gpus.get(index)
        return self.gpu_budget if limits is None or limits.budget is None else limits.budget

    def reserve_of(self, index: int) -> int:
        limits = self.gpus.get(index)
        return self.reserve if limits is None or limits.reserve is None else limits.reserve


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    use: Router = "group"
    # Ends with the implicit "(default)" group holding every model in no other group, if any is.
    groups: tuple[GroupConfig, ...] = ()
    matrix: MatrixConfig | None = None
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # ``matrix`` compiled against the models, once per load (the matrix planner's input).
    compiled: CompiledMatrix | None = None

    def group_of(self) -> dict[str, GroupConfig]:
        """Each grouped model's group; the loader has put every member in exactly one."""
        return {member: group for group in self.groups for member in group.members}


@dataclass(frozen=True, slots=True)
class Config:
    models: Mapping[str, ModelConfig]
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> model id (incl. setParamsByID keys)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    health_check_timeout: float = DEFAULT_HEALTH_CHECK_TIMEOUT
    log_level: LogLevel = "info"
    log_to_stdout: LogTarget = "proxy"
    log_format: LogFormat = "console"
    start_port: int = DEFAULT_START_PORT
    default_model: str | None = None  # model id that requests without a model go to
    route_unknown_models: bool = False  # requests naming an unknown model go to default_model
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queued: int = DEFAULT_MAX_QUEUED  # global cap on queued requests -> 503
    request_header_timeout: float = DEFAULT_REQUEST_HEADER_TIMEOUT  # seconds a request head may take
    global_ttl: float = 0.0
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()  # corsOrigins: () echoes any Origin, ("*",) answers *, else a list
    include_aliases_in_list: bool = False
    send_loading_state: bool = False
    loading_state_mode: LoadingMode = "reasoning"
    preload: tuple[str, ...] = ()  # model ids (aliases resolved)
    upstream_ignore_paths: tuple[str, ...] = DEFAULT_UPSTREAM_IGNORE_PATHS
    activity_records: int = DEFAULT_ACTIVITY_RECORDS  # metricsMaxInMemory; 0: no activity log
    capture_bytes: int = 0  # captureBuffer; 0: no captures
    routes: KindRoutes = field(default_factory=KindRoutes)  # path -> model (swapper.config.kindroutes)
    metrics_listen: tuple[str, int] | None = None  # metricsListen: /metrics on its own listener
    fleet: Fleet = field(default_factory=Fleet)  # peers, profiles, selectors
    timeouts: Timeouts = _timeouts.DEFAULT  # the global ``timeouts:`` (each model has its own)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT  # seconds in-flight requests get at shutdown
    warnings: tuple[str, ...] = ()  # one line per unsupported key seen

    def pinned(self) -> list[str]:
        """The pinned services (``ModelConfig.pinned``), in config order: never evicted, and
        adopted or started with swapper."""
        return [m for m, cfg in self.models.items() if cfg.pinned]

    def resolve(self, name: str) -> str | None:
        """Returns the model id that ``name`` (an id or alias) names, or None."""
        if name in self.models:
            return name
        return self.aliases.get(name)
