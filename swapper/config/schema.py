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

import os
import re
import shlex
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import yaml

from swapper.config import capabilities
from swapper.config import timeouts as _timeouts
from swapper.config.dsl import CompiledMatrix, DslError, MatrixConfig, compile_matrix
from swapper.config.fleet import Fleet, parse_fleet
from swapper.config.kindroutes import KindRoutes, RouteError, parse_routes
from swapper.config.listen import AddressError, parse_address
from swapper.config.placement import parse_devices
from swapper.config.services import SERVICE_KEYS, ServiceError, ServiceSpec, parse_service
from swapper.config.timeouts import Timeouts

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
    memory_device: Literal["gpu", "cpu", "auto"] = "auto"
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
    use: Literal["group", "matrix", "memory"] = "group"
    # Ends with the implicit "(default)" group holding every model in no other group, if any is.
    groups: tuple[GroupConfig, ...] = ()
    matrix: MatrixConfig | None = None
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # ``matrix`` compiled against the models, once per load (the matrix planner's input).
    compiled: CompiledMatrix | None = None


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
    route_unknown_models: bool = False  # requests naming an unknown model go to default_model
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queued: int = DEFAULT_MAX_QUEUED  # global cap on queued requests -> 503
    request_header_timeout: float = DEFAULT_REQUEST_HEADER_TIMEOUT  # seconds a request head may take
    global_ttl: float = 0.0
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()  # corsOrigins: () echoes any Origin, ("*",) answers *, else a list
    include_aliases_in_list: bool = False
    send_loading_state: bool = False
    loading_state_mode: Literal["reasoning", "comments"] = "reasoning"
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

    def resolve(self, name: str) -> str | None:
        """Returns the model id that ``name`` (an id or alias) names, or None."""
        if name in self.models:
            return name
        return self.aliases.get(name)


def load_config(path: str) -> Config:
    """Reads, expands and validates the YAML file at ``path``; raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not valid UTF-8: {exc}") from None
    return parse_config(text, source=path)


def _compile_matrix(routing: RoutingConfig, models: Mapping[str, ModelConfig]) -> RoutingConfig:
    """Compiles the swap matrix now, once: a DSL error is a config error at load, not a crash later."""
    if routing.matrix is None:
        return routing
    try:
        return replace(routing, compiled=compile_matrix(routing.matrix, models))
    except DslError as exc:
        raise ConfigError(f"routing.router.settings.matrix: {exc}") from None


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Same as load_config for YAML text (used by tests and reload)."""
    return parse_tree(read_tree(text, source), source=source)


def read_tree(text: str, source: str) -> Any:
    """Steps 1 and 2: ``${env.NAME}`` filled in, then YAML parsed (``sources`` merges trees)."""
    return _load_yaml(_substitute_env(text, source), source)


def parse_tree(raw: Any, *, source: str = "<config>") -> Config:
    """Steps 3 to 5 on a parsed YAML tree (one file's, or several files' merged)."""
    doc = _read_document(raw, source)
    defaults = _parse_defaults(doc.top, doc.warnings)
    models, aliases = _link_aliases(_parse_models(doc, defaults), doc.warnings)
    routing, priorities = _parse_routing(doc, models, aliases)
    routing = _compile_matrix(routing, models)
    models = {
        mid: replace(m, priority=priorities[mid]) if mid in priorities else m for mid, m in models.items()
    }
    top = doc.top
    default_model = _parse_default_model(top.get("defaultModel"), models, aliases)
    preload = _parse_preload(top, models, aliases, doc.warnings)
    try:
        routes = parse_routes(top.get("routes"), lambda name: _resolve(name, models, aliases))
    except RouteError as exc:
        raise ConfigError(str(exc)) from None
    fleet = parse_fleet(top, models, aliases, routing, doc.warnings)
    if not models:
        doc.warnings.append(
            "models: none defined; only peers are served" if fleet.peers else "models: none defined"
        )
    return Config(
        models=models,
        aliases=aliases,
        routing=routing,
        health_check_timeout=defaults.health_check_timeout,
        log_level=_parse_log_level(top.get("logLevel"), doc.warnings),
        log_to_stdout=cast(_LogTarget, _choice(top.get("logToStdout"), "logToStdout", _LOG_TARGETS)),
        log_format=cast(_LogFormat, _choice(top.get("logFormat"), "logFormat", _LOG_FORMATS)),
        start_port=defaults.start_port,
        default_model=default_model,
        route_unknown_models=_parse_route_unknown(top, default_model),
        max_body_bytes=_opt_size(top.get("maxBodyBytes"), "maxBodyBytes") or DEFAULT_MAX_BODY_BYTES,
        max_queued=_positive_int(top.get("maxQueued"), "maxQueued", DEFAULT_MAX_QUEUED),
        request_header_timeout=_positive_number(
            top.get("requestHeaderTimeout"), "requestHeaderTimeout", DEFAULT_REQUEST_HEADER_TIMEOUT
        ),
        global_ttl=defaults.global_ttl,
        api_keys=_parse_api_keys(top.get("apiKeys")),
        cors_origins=_parse_cors_origins(top.get("corsOrigins")),
        include_aliases_in_list=_opt_bool(top.get("includeAliasesInList"), "includeAliasesInList", False),
        send_loading_state=defaults.send_loading_state,
        loading_state_mode=cast(
            _LoadingMode,
            _choice(top.get("loadingStateMode"), "loadingStateMode", _LOADING_MODES),
        ),
        preload=preload,
        upstream_ignore_paths=_parse_ignore_paths(top, doc.warnings),
        activity_records=_non_negative_int(
            top.get("metricsMaxInMemory"), "metricsMaxInMemory", DEFAULT_ACTIVITY_RECORDS
        ),
        capture_bytes=_capture_buffer(top.get("captureBuffer")),
        routes=routes,
        metrics_listen=_parse_metrics_listen(top.get("metricsListen")),
        fleet=fleet,
        timeouts=defaults.timeouts,
        shutdown_timeout=_seconds(top.get("shutdownTimeout"), "shutdownTimeout", DEFAULT_SHUTDOWN_TIMEOUT),
        warnings=tuple(doc.warnings),
    )


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


_TOP_KEYS = _words(
    """
    healthCheckTimeout logLevel logToStdout startPort macros models globalTTL unloadTimeout
    apiKeys includeAliasesInList sendLoadingState hooks upstream routing groups matrix
    peers profiles selectors
    """
) | _words(  # ours
    "defaultModel maxBodyBytes maxQueued maxWait concurrencyLimit logFormat loadingStateMode "
    "requestHeaderTimeout metricsMaxInMemory captureBuffer routes metricsListen routeUnknownModels "
    "corsOrigins timeouts shutdownTimeout"
)
_TOP_UNSUPPORTED = _words(
    """
    logTimeFormat logRequests store ui performance
    """
)
_MODEL_KEYS = (
    _words(
        """
    cmd cmdStop proxy checkEndpoint env aliases useModelName unlisted name description metadata
    macros ttl unloadTimeout concurrencyLimit maxWait sendLoadingState filters memory memoryEstimate
    capabilities
    """
    )
    | SERVICE_KEYS
    | _words("timeouts")
)
# healthCheckTimeout exists per model in llama-swap's struct but is overwritten by the global one.
_MODEL_UNSUPPORTED = frozenset({"compat", "healthCheckTimeout"})
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

    top: dict[str, Any]
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


# --- stage 1: environment, in the raw text --------------------------------------------------------


def _substitute_env(text: str, source: str) -> str:
    """Replaces ``${env.NAME}`` outside YAML comments; unset or multi-line values are errors."""
    if "${env." not in text:
        return text
    out: list[str] = []
    block_parent: int | None = None  # indent of the line that opened a ``|``/``>`` block scalar
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        body = line.rstrip("\r\n")
        stripped = body.lstrip(" \t")
        indent = len(body) - len(stripped)
        if block_parent is not None and stripped and indent <= block_parent:
            block_parent = None
        if stripped.startswith("#") or "${env." not in body:
            new = body
        elif block_parent is not None:
            # Block scalar content: '#' and quotes are literal text there, not YAML syntax.
            new = _fill_env(body, [], source, lineno)
        else:
            spans, comment_at = _scan_line(body)
            new = _fill_env(body[:comment_at], spans, source, lineno) + body[comment_at:]
        if block_parent is None and not stripped.startswith("#"):
            code = body[: _scan_line(body)[1]].rstrip()
            if re.search(r"(?:^|\s)[|>][-+0-9]*$", code):
                block_parent = indent
        out.append(new + line[len(body) :])
    return "".join(out)


def _scan_line(line: str) -> tuple[list[tuple[int, int, str]], int]:
    """Returns the quoted spans of one YAML line and where its trailing comment starts."""
    spans: list[tuple[int, int, str]] = []
    i = 0
    while i < len(line):
        ch = line[i]
        if ch in "'\"" and line[:i].rstrip()[-1:] in ("", ":", "-", "[", "{", ",", "?"):
            end = _quote_end(line, i)
            spans.append((i, end, ch))
            i = end
            continue
        if ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return spans, i
        i += 1
    return spans, len(line)


def _quote_end(line: str, start: int) -> int:
    quote = line[start]
    i = start + 1
    while i < len(line):
        if quote == '"' and line[i] == "\\":
            i += 2
            continue
        if line[i] == quote:
            if quote == "'" and line[i + 1 : i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return len(line)


def _fill_env(code: str, spans: list[tuple[int, int, str]], source: str, lineno: int) -> str:
    def value_for(match: re.Match[str]) -> str:
        name = match.group(1)
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"{source}:{lineno}: environment variable '{name}' is not set")
        if any(c in value for c in "\n\r\0"):
            raise ConfigError(
                f"{source}:{lineno}: environment variable '{name}' contains a newline or NUL, "
                "which cannot be substituted into the config"
            )
        quote = next((q for start, end, q in spans if start < match.start() < end), "")
        if quote == '"':
            return value.replace("\\", "\\\\").replace('"', '\\"')
        if quote == "'":
            return value.replace("'", "''")
        return value

    return _ENV_RE.sub(value_for, code)


# --- stage 2: YAML --------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys and resolves only true/false as booleans.

    YAML 1.1 would turn a model called ``no`` or ``on`` into a bool; llama-swap's decoder uses
    YAML 1.2 rules, and silently losing a duplicate ``models`` key hides real mistakes.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # safe: _YamlLoader derives from SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def _read_document(raw: Any, source: str) -> _Document:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, not {_kind(raw)}")
    warnings: list[str] = []
    top = _known(raw, "", _TOP_KEYS, _TOP_UNSUPPORTED, warnings)
    macros = _parse_macros(top.get("macros"), "macros")
    _check_macro_order(macros, "macros", {name for name, _ in macros})
    for key, value in top.items():
        if key not in ("models", "macros"):
            top[key] = _expand(value, macros)
            _check_leftovers(top[key], key)
    return _Document(top, macros, warnings)


# --- shared coercion helpers ----------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _scalar_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _key_text(key: object, path: str) -> str:
    """A mapping key as text; YAML lets ``1:`` or ``true:`` be keys, llama-swap reads them as strings."""
    if isinstance(key, str | int | float | bool):
        return _scalar_text(key)
    raise ConfigError(f"{path}: keys must be strings, got {_kind(key)}")


def _known(
    raw: object, path: str, known: Collection[str], unsupported: Collection[str], warnings: list[str]
) -> dict[str, Any]:
    """The known keys of a mapping section (None = empty); one warning per other key."""
    out: dict[str, Any] = {}
    for key, value in _as_mapping(raw, path or "config").items():
        name = _key_text(key, path or "config")
        key_path = _join(path, name)
        if name in known:
            out[name] = value
        elif name in unsupported:
            warnings.append(f"{key_path}: not supported by swapper; ignored")
        else:
            warnings.append(f"{key_path}: unknown key; ignored")
    return out


def _as_mapping(value: object, path: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a mapping, got {_kind(value)}")
    return value


def _as_list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list, got {_kind(value)}")
    return value


def _as_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string, got {_kind(value)}")
    return value


def _as_text(value: object, path: str) -> str:
    """A string, or a number written where a string was meant (``name: 7``); None is ''."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{path}: must be a string, got {_kind(value)}")


def _opt_bool(value: object, path: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    # An inlined macro yields text, and llama-swap's typed decode accepts YAML 1.1 spellings.
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.strip().lower() in ("true", "yes", "on")
    raise ConfigError(f"{path}: must be true or false, got {_kind(value)}")


def _as_number(value: object, path: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{path}: must be a number, got {_kind(value)}")


def _as_int(value: object, path: str) -> int:
    number = _as_number(value, path)
    if not number.is_integer():
        raise ConfigError(f"{path}: must be a whole number, got {value!r}")
    return int(number)


def _positive_int(value: object, path: str, default: int) -> int:
    if value is None:
        return default
    number = _as_int(value, path)
    if number <= 0:
        raise ConfigError(f"{path}: must be greater than 0, got {number}")
    return number


def _non_negative_int(value: object, path: str, default: int) -> int:
    if value is None:
        return default
    number = _as_int(value, path)
    if number < 0:
        raise ConfigError(f"{path}: must not be negative, got {number}")
    return number


def _capture_buffer(value: object) -> int:
    """``captureBuffer``: MB as a number (llama-swap's unit), or a size string; 0 = off."""
    if isinstance(value, str) and not value.strip().replace(".", "", 1).isdigit():
        return _as_size(value, "captureBuffer", minimum=0)
    megabytes = _non_negative_int(value, "captureBuffer", 0)
    return megabytes * 1024 * 1024


def _positive_number(value: object, path: str, default: float) -> float:
    if value is None:
        return default
    number = _as_number(value, path)
    if not number > 0:
        raise ConfigError(f"{path}: must be greater than 0, got {value!r}")
    return number


def _as_size(value: object, path: str, minimum: int = 1) -> int:
    """Bytes from an integer or a size string like ``512MiB``, ``2GB`` or ``8G``."""
    size: int | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        size = int(value)
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = _SIZE_UNITS.get(match.group(2).lower())
        if unit is not None:
            size = int(Decimal(match.group(1)) * unit)
    if size is None:
        raise ConfigError(f"{path}: must be a byte count or a size like '512MiB' or '2GB', got {value!r}")
    if size < minimum:
        raise ConfigError(f"{path}: must be at least {minimum} bytes, got {size}")
    return size


def _opt_size(value: object, path: str) -> int | None:
    return None if value is None else _as_size(value, path)


def _choice(value: object, path: str, options: tuple[str, ...], what: str = "value") -> str:
    """One of ``options`` (case-insensitive); an absent value means the first option."""
    if value is None:
        return options[0]
    text = _as_text(value, path).strip().lower()
    if text not in options:
        raise ConfigError(f"{path}: unknown {what} '{value}' (valid: {', '.join(options)})")
    return text


# --- stage 3: macros ------------------------------------------------------------------------------


def _parse_macros(raw: object, path: str) -> Macros:
    """An ordered macro list; declaration order matters for macro-in-macro references."""
    macros: Macros = []
    for key, value in _as_mapping(raw, path).items():
        name = _key_text(key, path)
        macro_path = f"{path}.{name}"
        if len(name) >= 64 or not _MACRO_NAME_RE.match(name):
            raise ConfigError(
                f"{macro_path}: invalid macro name (letters, digits, '_' and '-', fewer than 64 characters)"
            )
        if name in _RESERVED_MACROS:
            raise ConfigError(f"{macro_path}: '{name}' is a reserved macro name")
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"{macro_path}: value must be a string, number or bool, got {_kind(value)}")
        if isinstance(value, str) and "${" + name + "}" in value:
            raise ConfigError(f"{macro_path}: must not reference itself")
        macros.append((name, value))
    return macros


def _check_macro_order(macros: Macros, path: str, check: Collection[str]) -> None:
    """Rejects references in the ``check`` macros to macros not declared before them.

    Substitution runs last-declared first, so such a reference could never be filled in; saying
    so at the macro is clearer than an unknown-macro error at some field that uses it.
    """
    declared: set[str] = set(_RESERVED_MACROS)
    for name, value in macros:
        if name in check and isinstance(value, str):
            for ref in _MACRO_REF_RE.findall(value):
                if ref not in declared:
                    raise ConfigError(
                        f"{path}.{name}: unknown macro '${{{ref}}}' "
                        "(a macro may only use macros declared before it)"
                    )
        declared.add(name)


def _model_macros(model_id: str, raw: object, global_macros: Macros, path: str) -> Macros:
    own = _parse_macros(raw, f"{path}.macros")
    merged: Macros = [("MODEL_ID", model_id), *global_macros]
    index = {name: i for i, (name, _) in enumerate(merged)}
    for name, value in own:
        if name in index:
            merged[index[name]] = (name, value)
        else:
            index[name] = len(merged)
            merged.append((name, value))
    _check_macro_order(merged, f"{path}.macros", {name for name, _ in own})
    return merged


def _expand_str(text: str, macros: Macros) -> Any:
    """Applies macros last-declared first; a value that is exactly ``${name}`` takes its type."""
    value: Any = text
    for name, macro in reversed(macros):
        if not isinstance(value, str) or "${" not in value:
            break
        token = "${" + name + "}"
        if value == token:
            value = macro
        elif token in value:
            value = value.replace(token, _scalar_text(macro))
    return value


def _expand(value: Any, macros: Macros) -> Any:
    if isinstance(value, str):
        return _expand_str(value, macros)
    if isinstance(value, dict):
        return {key: _expand(item, macros) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, macros) for item in value]
    return value


def _check_leftovers(value: Any, path: str, allowed: Collection[str] = _NONE) -> None:
    if isinstance(value, str):
        for match in _MACRO_REF_RE.finditer(value):
            if match.group(1) in allowed:
                continue
            hint = (
                " (${PORT} is only assigned to models whose cmd uses it)" if match.group(1) == "PORT" else ""
            )
            raise ConfigError(f"{path}: unknown macro '{match.group(0)}'{hint}")
    elif isinstance(value, dict):
        for key, item in value.items():
            key_path = _join(path, _key_text(key, path))
            if path.endswith(".setParamsByID"):  # the only keys that macros expand
                _check_leftovers(key, key_path)
            _check_leftovers(item, key_path, allowed)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_leftovers(item, f"{path}[{i}]", allowed)


# --- top-level defaults ---------------------------------------------------------------------------


def _seconds(value: object, path: str, default: float, *, minimum: float = 0.0) -> float:
    if value is None:
        return default
    seconds = _as_number(value, path)
    if seconds < minimum:
        raise ConfigError(f"{path}: must be at least {minimum:g}, got {seconds:g}")
    return seconds


def _decode_timeouts(raw: object, path: str, base: Timeouts, warnings: list[str]) -> Timeouts:
    try:
        return _timeouts.decode(raw, path, base, warnings)
    except _timeouts.TimeoutsError as exc:
        raise ConfigError(str(exc)) from None


def _parse_defaults(top: Mapping[str, Any], warnings: list[str]) -> _Defaults:
    health = DEFAULT_HEALTH_CHECK_TIMEOUT
    if top.get("healthCheckTimeout") is not None:
        health = _as_number(top["healthCheckTimeout"], "healthCheckTimeout")
    start_port = _as_int(top.get("startPort", DEFAULT_START_PORT), "startPort")
    if not 1 <= start_port <= 65535:
        raise ConfigError(f"startPort: must be between 1 and 65535, got {start_port}")
    unload = _seconds(top.get("unloadTimeout"), "unloadTimeout", DEFAULT_UNLOAD_TIMEOUT)
    concurrency = _as_int(top.get("concurrencyLimit", 0), "concurrencyLimit")
    if concurrency < 0:
        raise ConfigError(f"concurrencyLimit: must not be negative, got {concurrency}")
    max_wait = _seconds(top.get("maxWait"), "maxWait", DEFAULT_MAX_WAIT)
    if max_wait <= 0:
        raise ConfigError("maxWait: must be greater than 0")
    if health < MIN_HEALTH_CHECK_TIMEOUT:
        warnings.append(
            f"healthCheckTimeout: {health:g} is below the minimum of {MIN_HEALTH_CHECK_TIMEOUT:g}; "
            f"using {MIN_HEALTH_CHECK_TIMEOUT:g} (as llama-swap does; timeouts.loadStall fails a "
            "stalled load sooner)"
        )
    return _Defaults(
        health_check_timeout=max(health, MIN_HEALTH_CHECK_TIMEOUT),
        start_port=start_port,
        global_ttl=_seconds(top.get("globalTTL"), "globalTTL", 0.0),
        unload_timeout=unload or DEFAULT_UNLOAD_TIMEOUT,
        # Unset: admit what maxQueued allows and let the child queue, as a llama-server alone
        # would (started with --parallel N it serves N and queues the rest, never refuses).
        concurrency_limit=concurrency or _positive_int(top.get("maxQueued"), "maxQueued", DEFAULT_MAX_QUEUED),
        max_wait=max_wait,
        send_loading_state=_opt_bool(top.get("sendLoadingState"), "sendLoadingState", False),
        timeouts=_decode_timeouts(top.get("timeouts"), "timeouts", _timeouts.DEFAULT, warnings),
    )


def _parse_metrics_listen(value: object) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_address(_as_text(value, "metricsListen"))
    except AddressError as exc:
        raise ConfigError(f"metricsListen: {exc}") from None


def _parse_log_level(value: object, warnings: list[str]) -> _LogLevel:
    if value is None:
        return "info"
    level = _as_text(value, "logLevel").strip().lower()
    if level not in _LOG_LEVELS:
        # llama-swap treats an unknown level as info rather than refusing to start.
        warnings.append(f"logLevel: unknown level '{value}'; using info")
        return "info"
    return cast(_LogLevel, level)


def _parse_api_keys(raw: object) -> tuple[str, ...]:
    keys: list[str] = []
    for i, item in enumerate(_as_list(raw, "apiKeys")):
        # The key itself never goes into a message: messages end up in logs.
        key = _as_text(item, f"apiKeys[{i}]")
        if not key:
            raise ConfigError(f"apiKeys[{i}]: must not be empty")
        if any(c.isspace() for c in key):
            raise ConfigError(f"apiKeys[{i}]: must not contain spaces")
        keys.append(key)
    return tuple(keys)


def _parse_ignore_paths(top: Mapping[str, Any], warnings: list[str]) -> tuple[str, ...]:
    upstream = _known(top.get("upstream"), "upstream", {"ignorePaths"}, _NONE, warnings)
    path = "upstream.ignorePaths"
    patterns = [
        _as_str(item, f"{path}[{i}]") for i, item in enumerate(_as_list(upstream.get("ignorePaths"), path))
    ]
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{path}[{i}]: invalid regular expression: {exc}") from None
    return tuple(patterns) or DEFAULT_UPSTREAM_IGNORE_PATHS


def _resolve(name: str, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]) -> str | None:
    return name if name in models else aliases.get(name)


def _parse_cors_origins(value: object) -> tuple[str, ...]:
    """Unset: echo any Origin (llama-server's default); ``"*"``; or the origins that are echoed."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(o, str) and o.strip() for o in items):
        raise ConfigError('corsOrigins: must be "*" or a list of origins such as "http://localhost:3000"')
    origins = tuple(o.strip().rstrip("/") for o in items)
    if "*" in origins and len(origins) > 1:
        raise ConfigError('corsOrigins: "*" must be alone')
    return origins


def _parse_route_unknown(top: Mapping[str, Any], default_model: str | None) -> bool:
    route = _opt_bool(top.get("routeUnknownModels"), "routeUnknownModels", False)
    if route and default_model is None:
        raise ConfigError("routeUnknownModels: needs defaultModel (the model unknown names go to)")
    return route


def _parse_default_model(
    raw: object, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]
) -> str | None:
    if raw is None:
        return None
    name = _as_text(raw, "defaultModel").strip()
    model = _resolve(name, models, aliases)
    if model is None:
        raise ConfigError(f"defaultModel: unknown model '{name}'")
    return model


def _parse_preload(
    top: Mapping[str, Any], models: Mapping[str, ModelConfig], aliases: Mapping[str, str], warnings: list[str]
) -> tuple[str, ...]:
    hooks = _known(top.get("hooks"), "hooks", {"on_startup"}, _NONE, warnings)
    startup = _known(hooks.get("on_startup"), "hooks.on_startup", {"preload"}, _NONE, warnings)
    path = "hooks.on_startup.preload"
    preload: list[str] = []
    for i, item in enumerate(_as_list(startup.get("preload"), path)):
        name = _as_text(item, f"{path}[{i}]").strip()
        if not name:
            continue
        model = _resolve(name, models, aliases)
        if model is None:
            warnings.append(f"{path}: unknown model '{name}'; not preloaded")
        elif model not in preload:
            preload.append(model)
    return tuple(preload)


# --- models ---------------------------------------------------------------------------------------


def _parse_models(doc: _Document, defaults: _Defaults) -> dict[str, ModelConfig]:
    raw = _as_mapping(doc.top.get("models"), "models")  # may be empty, as in llama-swap (peers only)
    trees: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        model_id = _key_text(key, "models")
        if not model_id.strip():
            raise ConfigError("models: a model id must not be empty")
        trees[model_id] = _prepare_model(model_id, value, doc.macros, doc.warnings)
    ports = _assign_ports(trees, defaults.start_port)
    models: dict[str, ModelConfig] = {}
    for model_id, tree in trees.items():
        path = f"models.{model_id}"
        for key, value in tree.items():
            _check_leftovers(value, f"{path}.{key}", _PID_ONLY if key in ("cmdStop", "stop") else _NONE)
        models[model_id] = _decode_model(model_id, tree, ports.get(model_id), defaults, doc.warnings)
    return models


def _prepare_model(model_id: str, raw: object, global_macros: Macros, warnings: list[str]) -> dict[str, Any]:
    """The model's known keys with comment lines dropped and every macro but ${PORT} applied."""
    path = f"models.{model_id}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping, got {_kind(raw)}")
    tree = _known(raw, path, _MODEL_KEYS, _MODEL_UNSUPPORTED, warnings)
    if tree.get("cmd") is None and tree.get("proxy") is None:
        raise ConfigError(f"{path}.cmd: is required (or proxy alone, for a service swapper does not spawn)")
    for key in ("cmd", "cmdStop"):
        if tree.get(key) is not None:
            tree[key] = _strip_comment_lines(_as_str(tree[key], f"{path}.{key}"))
    if tree.get("proxy") is None:
        tree["proxy"] = _DEFAULT_PROXY
    macros = _model_macros(model_id, tree.pop("macros", None), global_macros, path)
    return _expand_model(tree, macros, path)


def _strip_comment_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))


def _expand_model(tree: dict[str, Any], macros: Macros, path: str) -> dict[str, Any]:
    out: dict[str, Any] = _expand(tree, macros)
    filters = out.get("filters")
    if isinstance(filters, dict) and isinstance(filters.get("setParamsByID"), dict):
        by_id_path = f"{path}.filters.setParamsByID"
        expanded: dict[str, Any] = {}
        for key, value in filters["setParamsByID"].items():
            name = _scalar_text(_expand_str(_key_text(key, by_id_path), macros))
            if name in expanded:
                raise ConfigError(f"{by_id_path}: two keys resolve to '{name}'")
            expanded[name] = value
        filters["setParamsByID"] = expanded
    return out


def _assign_ports(trees: dict[str, dict[str, Any]], start_port: int) -> dict[str, int]:
    """Gives ports in sorted id order, so adding a model never renumbers those sorted before it."""
    ports: dict[str, int] = {}
    next_port = start_port
    for model_id in sorted(trees):
        tree = trees[model_id]
        path = f"models.{model_id}"
        cmd = tree.get("cmd")
        # An empty or malformed cmd is the real mistake, not the proxy port it leaves unfilled.
        if cmd is not None:
            _parse_cmd(cmd, f"{path}.cmd")
        if isinstance(cmd, str) and "${PORT}" in cmd:
            if next_port > 65535:
                raise ConfigError(f"{path}.cmd: no port left for ${{PORT}} (startPort is too high)")
            ports[model_id] = next_port
            trees[model_id] = _expand_model(tree, [("PORT", next_port)], path)
            next_port += 1
        elif isinstance(tree.get("proxy"), str) and "${PORT}" in tree["proxy"]:
            raise ConfigError(
                f"{path}.proxy: proxy uses ${{PORT}} but cmd does not; ${{PORT}} is only assigned "
                "when cmd uses it, so set proxy to the address the command listens on"
            )
    return ports


def _decode_model(
    model_id: str, tree: Mapping[str, Any], port: int | None, defaults: _Defaults, warnings: list[str]
) -> ModelConfig:
    path = f"models.{model_id}"
    service = _parse_service(tree, path)
    argv, cmd_text = ((), "") if service is not None else _parse_cmd(tree["cmd"], f"{path}.cmd")
    estimate, device, gpus = _parse_model_memory(tree, path, warnings)
    use_model_name = _as_text(tree.get("useModelName"), f"{path}.useModelName").strip()
    return ModelConfig(
        id=model_id,
        cmd=argv,
        cmd_text=cmd_text,
        cmd_raw=tree.get("cmd") or "",
        proxy=_parse_proxy(tree["proxy"], f"{path}.proxy"),
        check_endpoint=_parse_check_endpoint(tree.get("checkEndpoint"), f"{path}.checkEndpoint", warnings),
        cmd_stop=_parse_cmd_stop(tree.get("cmdStop"), f"{path}.cmdStop"),
        env=_parse_env(tree.get("env"), f"{path}.env"),
        aliases=_parse_aliases(tree.get("aliases"), f"{path}.aliases", warnings),
        use_model_name=use_model_name or None,
        unlisted=_opt_bool(tree.get("unlisted"), f"{path}.unlisted", False),
        name=_as_text(tree.get("name"), f"{path}.name").strip(),
        description=_as_text(tree.get("description"), f"{path}.description").strip(),
        metadata=_parse_metadata(tree.get("metadata"), f"{path}.metadata", warnings),
        port=port,
        # A pinned service is never unloaded, by its TTL or anything else.
        ttl=0.0
        if service is not None and not service.swappable
        else _model_ttl(tree.get("ttl"), f"{path}.ttl", defaults.global_ttl),
        unload_timeout=_seconds(tree.get("unloadTimeout"), f"{path}.unloadTimeout", 0.0)
        or defaults.unload_timeout,
        health_check_timeout=defaults.health_check_timeout,
        concurrency_limit=_model_concurrency(tree.get("concurrencyLimit"), path, defaults),
        max_wait=_model_max_wait(tree.get("maxWait"), f"{path}.maxWait", defaults.max_wait),
        send_loading_state=_opt_bool(
            tree.get("sendLoadingState"), f"{path}.sendLoadingState", defaults.send_loading_state
        ),
        filters=_parse_filters(tree.get("filters"), f"{path}.filters", warnings),
        memory_estimate=estimate,
        memory_device=device,
        memory_gpus=gpus,
        service=service,
        capabilities=_parse_capabilities(tree.get("capabilities"), f"{path}.capabilities"),
        timeouts=_decode_timeouts(tree.get("timeouts"), f"{path}.timeouts", defaults.timeouts, warnings),
    )


def _parse_service(tree: Mapping[str, Any], path: str) -> ServiceSpec | None:
    """The model's service settings if it has no ``cmd`` (swapper does not spawn it), else None."""
    if tree.get("cmd") is not None:
        given = sorted(SERVICE_KEYS & tree.keys())
        if given:
            raise ConfigError(
                f"{path}.{given[0]}: only for a service without cmd (a child stops with cmdStop)"
            )
        return None
    try:
        return parse_service(tree, path)
    except ServiceError as exc:
        raise ConfigError(str(exc)) from None


def _parse_capabilities(value: object, path: str) -> capabilities.Capabilities:
    try:
        return capabilities.parse(value)
    except capabilities.CapabilityError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse_metadata(value: object, path: str, warnings: list[str]) -> Mapping[str, Any]:
    metadata = _as_mapping(value, path)
    keys = _macro_keys(metadata)
    if keys:
        warnings.append(f"{path}: macros are not expanded in keys ({', '.join(keys)}); kept as written")
    return metadata


def _macro_keys(value: Any) -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _MACRO_REF_RE.search(key):
                found.append(key)
            found += _macro_keys(item)
    elif isinstance(value, list):
        for item in value:
            found += _macro_keys(item)
    return found


def _one_line(text: str) -> str:
    lines = (line.strip() for line in text.splitlines())
    return " ".join(line for line in lines if line)


def _split_command(text: str, path: str) -> tuple[str, ...]:
    # A trailing backslash continues the line, as in a shell; shlex alone would keep the newline.
    joined = _CONTINUATION_RE.sub(" ", text)
    try:
        return tuple(shlex.split(joined))
    except ValueError as exc:
        raise ConfigError(f"{path}: cannot be split into arguments: {exc}") from None


def _parse_cmd(value: object, path: str) -> tuple[tuple[str, ...], str]:
    text = _as_str(value, path)
    argv = _split_command(text, path)
    if not argv:
        raise ConfigError(f"{path}: must not be empty")
    return argv, _one_line(_CONTINUATION_RE.sub(" ", text))


def _parse_cmd_stop(value: object, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    return _split_command(_as_str(value, path), path) or None


def _parse_proxy(value: object, path: str) -> str:
    proxy = _as_str(value, path).strip().rstrip("/")
    parts = urlsplit(proxy)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{path}: must be an http:// or https:// URL, got '{proxy}'")
    return proxy


def _parse_check_endpoint(value: object, path: str, warnings: list[str]) -> str | None:
    if value is None:
        return DEFAULT_CHECK_ENDPOINT
    endpoint = _as_str(value, path).strip()
    if endpoint.lower() == "none":
        return None
    parts = urlsplit(endpoint)
    if parts.scheme or parts.netloc:
        # llama-swap sends the probe through the model's proxy, which keeps only the URL's path.
        endpoint = parts.path + (f"?{parts.query}" if parts.query else "")
        warnings.append(f"{path}: a full URL; its path '{endpoint or '/'}' is probed on the model's proxy")
    if not endpoint.startswith("/"):
        endpoint = "/" + endpoint  # joined to the proxy with one slash, as llama-swap joins it
    return endpoint


def _parse_env(value: object, path: str) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(_as_list(value, path)):
        entry = _as_text(item, f"{path}[{i}]")
        name, sep, text = entry.partition("=")
        if not sep or not name.strip() or any(c.isspace() for c in name):
            raise ConfigError(f"{path}[{i}]: expected 'NAME=value', got '{entry}'")
        pairs.append((name, text))
    return tuple(pairs)


def _parse_aliases(value: object, path: str, warnings: list[str]) -> tuple[str, ...]:
    aliases: list[str] = []
    for i, item in enumerate(_as_list(value, path)):
        item_path = f"{path}[{i}]"
        if isinstance(item, dict):
            # Older llama-swap examples write aliases as {id, name, unlisted}; only id routes.
            entry = _known(item, item_path, {"id"}, {"name", "unlisted"}, warnings)
            item = entry.get("id")
        alias = _as_text(item, item_path).strip()
        if not alias:
            raise ConfigError(f"{item_path}: must not be empty")
        aliases.append(alias)
    return tuple(aliases)


def _model_ttl(value: object, path: str, global_ttl: float) -> float:
    if value is None:
        return global_ttl
    ttl = _as_number(value, path)
    if ttl == -1:
        return global_ttl
    if ttl < 0:
        raise ConfigError(
            f"{path}: must be -1 (use globalTTL), 0 (never unload) or a positive number of seconds"
        )
    return ttl


def _model_concurrency(value: object, path: str, defaults: _Defaults) -> int:
    limit = _as_int(value, f"{path}.concurrencyLimit") if value is not None else 0
    if limit < 0:
        raise ConfigError(f"{path}.concurrencyLimit: must not be negative, got {limit}")
    return limit or defaults.concurrency_limit


def _model_max_wait(value: object, path: str, default: float) -> float:
    max_wait = _seconds(value, path, default)
    if max_wait <= 0:
        raise ConfigError(f"{path}: must be greater than 0")
    return max_wait


def _parse_model_memory(
    tree: Mapping[str, Any], path: str, warnings: list[str]
) -> tuple[int | None, _Device, tuple[int, ...] | None]:
    memory = _known(tree.get("memory"), f"{path}.memory", {"estimate", "device", "devices"}, _NONE, warnings)
    if memory.get("estimate") is not None and tree.get("memoryEstimate") is not None:
        raise ConfigError(f"{path}.memoryEstimate: give either memoryEstimate or memory.estimate, not both")
    if memory.get("estimate") is not None:
        estimate = _opt_size(memory["estimate"], f"{path}.memory.estimate")
    else:
        estimate = _opt_size(tree.get("memoryEstimate"), f"{path}.memoryEstimate")
    device = _choice(memory.get("device"), f"{path}.memory.device", _DEVICES, "device")
    try:
        gpus = parse_devices(memory.get("devices"), f"{path}.memory.devices")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return estimate, cast(_Device, device), gpus


def _parse_filters(value: object, path: str, warnings: list[str]) -> Filters:
    keys = {"stripParams", "strip_params", "setParams", "setParamsByID"}
    spec = _known(value, path, keys, _NONE, warnings)
    strip_key = "stripParams" if spec.get("stripParams") is not None else "strip_params"
    by_id: dict[str, dict[Any, Any]] = {}
    for name, params in _as_mapping(spec.get("setParamsByID"), f"{path}.setParamsByID").items():
        by_id[name] = _without_model(params, f"{path}.setParamsByID.{name}")
    return Filters(
        strip_params=_parse_strip_params(spec.get(strip_key), f"{path}.{strip_key}"),
        set_params=_without_model(spec.get("setParams"), f"{path}.setParams"),
        set_params_by_id=by_id,
    )


def _parse_strip_params(value: object, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        parts = [_as_text(item, f"{path}[{i}]") for i, item in enumerate(value)]
    else:
        parts = _as_str(value, path).split(",")
    # The model field routes the request, so it can never be stripped.
    return tuple(sorted({p.strip() for p in parts if p.strip() and p.strip() != "model"}))


def _without_model(value: object, path: str) -> dict[Any, Any]:
    return {key: item for key, item in _as_mapping(value, path).items() if key != "model"}


def _link_aliases(
    models: dict[str, ModelConfig], warnings: list[str]
) -> tuple[dict[str, ModelConfig], dict[str, str]]:
    """Builds the alias table and adds each model's setParamsByID aliases to its own list."""
    owner: dict[str, str] = {}
    for model_id, model in models.items():
        path = f"models.{model_id}.aliases"
        for alias in model.aliases:
            if alias == model_id:
                warnings.append(f"{path}: '{alias}' is the model's own id; ignored")
            elif alias in models:
                raise ConfigError(f"{path}: alias '{alias}' is already the id of model '{alias}'")
            elif alias in owner:
                other = owner[alias]
                detail = "is listed twice" if other == model_id else f"already used by model '{other}'"
                raise ConfigError(f"{path}: alias '{alias}' {detail}")
            else:
                owner[alias] = model_id
    for model in models.values():
        _register_by_id_aliases(model, models, owner)
    linked = {
        model_id: replace(model, aliases=tuple(a for a, o in owner.items() if o == model_id))
        for model_id, model in models.items()
    }
    return linked, owner


def _register_by_id_aliases(
    model: ModelConfig, models: Mapping[str, ModelConfig], owner: dict[str, str]
) -> None:
    path = f"models.{model.id}.filters.setParamsByID"
    for name in model.filters.set_params_by_id:
        if name == model.id:
            continue
        if name in models:
            raise ConfigError(f"{path}: key '{name}' is the id of model '{name}'; it cannot become an alias")
        other = owner.setdefault(name, model.id)
        if other != model.id:
            raise ConfigError(f"{path}: alias '{name}' already used by model '{other}'")


# --- routing --------------------------------------------------------------------------------------


def _parse_routing(
    doc: _Document, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]
) -> tuple[RoutingConfig, dict[str, int]]:
    routing = _known(doc.top.get("routing"), "routing", {"router", "scheduler"}, _NONE, doc.warnings)
    use, sources = _router_sources(doc.top, routing, doc.warnings)
    groups_raw, groups_path = sources["groups"]
    matrix_raw, matrix_path = sources["matrix"]
    memory_raw, memory_path = sources["memory"]
    groups = _parse_groups(groups_raw, groups_path, models, aliases, doc.warnings)
    matrix = None
    if matrix_raw is not None and use != "matrix":
        # llama-swap never reads a matrix its router does not use; an invalid one is only news.
        try:
            matrix = _parse_matrix(matrix_raw, matrix_path, models, aliases, doc.warnings)
            _compile_matrix(RoutingConfig(matrix=matrix), models)
        except ConfigError as exc:
            doc.warnings.append(f"{exc} (not in use: routing.router.use is {use}; ignored)")
            matrix = None
    elif matrix_raw is not None:
        matrix = _parse_matrix(matrix_raw, matrix_path, models, aliases, doc.warnings)
    elif use == "matrix":
        raise ConfigError(f"{matrix_path}: is required when routing.router.use is matrix")
    memory = _parse_memory_settings(memory_raw, memory_path, doc.warnings)
    priorities = _parse_scheduler(routing.get("scheduler"), models, aliases, doc.warnings)
    return RoutingConfig(use=use, groups=groups, matrix=matrix, memory=memory), priorities


def _router_sources(
    top: Mapping[str, Any], routing: Mapping[str, Any], warnings: list[str]
) -> tuple[_Router, dict[str, tuple[Any, str]]]:
    """Which router is used and where its settings come from: routing.router or legacy keys."""
    legacy = [key for key in ("groups", "matrix") if top.get(key) is not None]
    if routing.get("router") is not None:
        if legacy:
            raise ConfigError(
                f"{legacy[0]}: the legacy top-level '{legacy[0]}' key cannot be combined with a "
                f"routing.router block; move it to routing.router.settings.{legacy[0]}"
            )
        router = _known(routing["router"], "routing.router", {"use", "settings"}, _NONE, warnings)
        use = _choice(router.get("use"), "routing.router.use", _ROUTERS, "router")
        base = "routing.router.settings"
        settings = _known(router.get("settings"), base, {"groups", "matrix", "memory"}, _NONE, warnings)
        return cast(_Router, use), {
            k: (settings.get(k), f"{base}.{k}") for k in ("groups", "matrix", "memory")
        }
    if len(legacy) == 2:
        raise ConfigError("matrix: cannot be combined with the top-level 'groups' key; use one or the other")
    sources = {"groups": (top.get("groups"), "groups"), "matrix": (top.get("matrix"), "matrix")}
    sources["memory"] = (None, "routing.router.settings.memory")
    return ("matrix" if legacy == ["matrix"] else "group"), sources


def _parse_groups(
    raw: object,
    path: str,
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    warnings: list[str],
) -> tuple[GroupConfig, ...]:
    owner: dict[str, str] = {}
    groups: list[GroupConfig] = []
    for key, value in _as_mapping(raw, path).items():
        name = _key_text(key, path)
        group_path = f"{path}.{name}"
        if name == DEFAULT_GROUP:
            raise ConfigError(f"{group_path}: the name '{DEFAULT_GROUP}' is reserved for ungrouped models")
        spec = _known(value, group_path, {"swap", "exclusive", "persistent", "members"}, _NONE, warnings)
        members = _group_members(
            spec.get("members"), f"{group_path}.members", name, owner, models, aliases, warnings
        )
        groups.append(
            GroupConfig(
                name=name,
                members=members,
                swap=_opt_bool(spec.get("swap"), f"{group_path}.swap", True),
                exclusive=_opt_bool(spec.get("exclusive"), f"{group_path}.exclusive", True),
                persistent=_opt_bool(spec.get("persistent"), f"{group_path}.persistent", False),
            )
        )
    ungrouped = tuple(model_id for model_id in models if model_id not in owner)
    if ungrouped:
        groups.append(GroupConfig(name=DEFAULT_GROUP, members=ungrouped, swap=True, exclusive=True))
    return tuple(groups)


def _group_members(
    raw: object,
    path: str,
    group: str,
    owner: dict[str, str],
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    warnings: list[str],
) -> tuple[str, ...]:
    if raw is None:
        raise ConfigError(f"{path}: is required")
    members: list[str] = []
    for i, item in enumerate(_as_list(raw, path)):
        model_id = _as_text(item, f"{path}[{i}]").strip()
        if model_id not in models:
            # llama-swap's loader takes any name here (a model commented out, its group left as
            # it was); only its router refuses it at start. Left out, said once.
            if model_id in aliases:
                warnings.append(f"{path}: '{model_id}' is an alias of '{aliases[model_id]}'; using the model")
                model_id = aliases[model_id]
            else:
                warnings.append(f"{path}: '{model_id}' is not a model id; left out of the group")
                continue
        if model_id in owner:
            other = owner[model_id]
            if other == group:
                raise ConfigError(f"{path}: model '{model_id}' is listed twice")
            raise ConfigError(f"{path}: model '{model_id}' is in both groups '{other}' and '{group}'")
        owner[model_id] = group
        members.append(model_id)
    return tuple(members)


def _parse_matrix(
    raw: object,
    path: str,
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    warnings: list[str],
) -> MatrixConfig:
    spec = _known(raw, path, {"vars", "evict_costs", "sets"}, _NONE, warnings)
    variables = _matrix_vars(spec.get("vars"), f"{path}.vars", models, aliases)
    return MatrixConfig(
        vars=variables,
        evict_costs=_matrix_costs(spec.get("evict_costs"), f"{path}.evict_costs", variables, models),
        sets=_matrix_sets(spec.get("sets"), f"{path}.sets"),
    )


def _matrix_vars(
    raw: object, path: str, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]
) -> dict[str, str]:
    variables: dict[str, str] = {}
    for key, value in _as_mapping(raw, path).items():
        name = _key_text(key, path)
        var_path = f"{path}.{name}"
        if not _VAR_NAME_RE.match(name):
            raise ConfigError(f"{var_path}: invalid var name (1-32 letters, digits, '.' or '-')")
        model_id = _as_text(value, var_path).strip()
        if model_id in aliases:
            raise ConfigError(
                f"{var_path}: '{model_id}' is an alias of '{aliases[model_id]}'; vars must name a model id"
            )
        if model_id not in models:
            raise ConfigError(f"{var_path}: unknown model '{model_id}'")
        variables[name] = model_id
    return variables


def _matrix_costs(
    raw: object, path: str, variables: Mapping[str, str], models: Mapping[str, ModelConfig]
) -> dict[str, int]:
    costs: dict[str, int] = {}
    for key, value in _as_mapping(raw, path).items():
        name = _key_text(key, path)
        cost_path = f"{path}.{name}"
        # A var shadows a model id of the same name, as in the set DSL.
        model_id = variables.get(name, name)
        if model_id not in models:
            raise ConfigError(f"{cost_path}: unknown var or model '{name}'")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{cost_path}: must be a positive integer, got {value!r}")
        if model_id in costs:
            raise ConfigError(f"{cost_path}: model '{model_id}' already has an eviction cost")
        costs[model_id] = value
    return costs


def _matrix_sets(raw: object, path: str) -> tuple[tuple[str, str], ...]:
    sets: list[tuple[str, str]] = []
    for key, value in _as_mapping(raw, path).items():
        name = _key_text(key, path)
        text = _as_str(value, f"{path}.{name}").strip()
        if not text:
            raise ConfigError(f"{path}.{name}: must not be empty")
        sets.append((name, text))
    if not sets:
        raise ConfigError(f"{path}: at least one set is required")
    return tuple(sets)


def _parse_memory_settings(raw: object, path: str, warnings: list[str]) -> MemoryConfig:
    keys = {"gpuBudget", "ramBudget", "reserve", "stateFile", "releaseTimeout", "gpus"}
    spec = _known(raw, path, keys, _NONE, warnings)
    defaults = MemoryConfig()
    reserve = spec.get("reserve")
    release_timeout = _seconds(spec.get("releaseTimeout"), f"{path}.releaseTimeout", defaults.release_timeout)
    if release_timeout <= 0:
        raise ConfigError(f"{path}.releaseTimeout: must be greater than 0")
    return MemoryConfig(
        gpu_budget=_opt_size(spec.get("gpuBudget"), f"{path}.gpuBudget"),
        ram_budget=_opt_size(spec.get("ramBudget"), f"{path}.ramBudget"),
        reserve=defaults.reserve if reserve is None else _as_size(reserve, f"{path}.reserve", minimum=0),
        state_file=_as_text(spec.get("stateFile"), f"{path}.stateFile").strip() or None,
        release_timeout=release_timeout,
        gpus=_parse_gpu_limits(spec.get("gpus"), f"{path}.gpus", warnings),
    )


def _parse_gpu_limits(raw: object, path: str, warnings: list[str]) -> dict[int, GpuLimits]:
    """``gpus: {0: {budget: 20GiB, reserve: 1GiB}, ...}``: per-GPU overrides of gpuBudget/reserve."""
    limits: dict[int, GpuLimits] = {}
    for key, value in _as_mapping(raw, path).items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ConfigError(f"{path}: keys must be GPU indices (0, 1, ...), got {key!r}")
        spec = _known(value, f"{path}.{key}", {"budget", "reserve"}, _NONE, warnings)
        reserve = spec.get("reserve")
        limits[key] = GpuLimits(
            budget=_opt_size(spec.get("budget"), f"{path}.{key}.budget"),
            reserve=None if reserve is None else _as_size(reserve, f"{path}.{key}.reserve", minimum=0),
        )
    return limits


def _parse_scheduler(
    raw: object, models: Mapping[str, ModelConfig], aliases: Mapping[str, str], warnings: list[str]
) -> dict[str, int]:
    """Model id -> priority from routing.scheduler.settings.fifo.priority (aliases resolved)."""
    path = "routing.scheduler"
    spec = _known(raw, path, {"use", "settings"}, _NONE, warnings)
    _choice(spec.get("use"), f"{path}.use", ("fifo",), "scheduler")
    settings = _known(spec.get("settings"), f"{path}.settings", {"fifo"}, _NONE, warnings)
    fifo = _known(settings.get("fifo"), f"{path}.settings.fifo", {"priority"}, _NONE, warnings)
    priority_path = f"{path}.settings.fifo.priority"
    priorities: dict[str, int] = {}
    for key, value in _as_mapping(fifo.get("priority"), priority_path).items():
        name = _key_text(key, priority_path)
        model_id = _resolve(name, models, aliases)
        if model_id is None:
            raise ConfigError(f"{priority_path}: unknown model '{name}'")
        priority = _as_int(value, f"{priority_path}.{name}")
        if priorities.get(model_id, priority) != priority:
            raise ConfigError(
                f"{priority_path}.{name}: model '{model_id}' already has priority {priorities[model_id]}"
            )
        priorities[model_id] = priority
    return priorities
