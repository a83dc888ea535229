"""The top level's key table: each top-level key once, as a ``Key`` row (``swapper.config.spec``)
that names its decode and the field it fills; ``TOP`` is what the level knows, and what it warns of.

Owns: nothing mutable. The rows fall in four groups, decoded in this order (the order errors are
found in, which the tests pin): ``DEFAULTS`` (what every model inherits, decoded before the
models), ``STAGES`` (sections another module decodes: models, routing, peers...), ``LINKED`` (keys
that name models, decoded once the models are known) and ``SETTINGS`` (everything else).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from swapper.config import timeouts as _timeouts
from swapper.config.keys import _LOADING_MODES, _LOG_FORMATS, _LOG_LEVELS, _LOG_TARGETS, _Defaults
from swapper.config.kindroutes import KindRoutes, RouteError, parse_routes
from swapper.config.listen import AddressError, parse_address
from swapper.config.schema import (
    DEFAULT_ACTIVITY_RECORDS,
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_WAIT,
    DEFAULT_REQUEST_HEADER_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_START_PORT,
    DEFAULT_UNLOAD_TIMEOUT,
    DEFAULT_UPSTREAM_IGNORE_PATHS,
    MIN_HEALTH_CHECK_TIMEOUT,
    Config,
    ConfigError,
    ModelConfig,
)
from swapper.config.spec import Key, Section, Tree, check_record, stages
from swapper.config.values import (
    _as_int,
    _as_list,
    _as_number,
    _as_str,
    _as_text,
    _capture_buffer,
    _choice,
    _decode_timeouts,
    _non_negative_int,
    _opt_bool,
    _opt_size,
    _positive_int,
    _positive_number,
    _positive_seconds,
    _resolve,
    _seconds,
    _section,
)

__all__ = ["INHERITED", "TOP", "TopContext", "read_defaults", "read_linked", "read_settings"]


@dataclass(slots=True)
class TopContext:
    """What a top-level row's decode may use: the level's keys, the warnings, the models once
    decoded, and the rows decoded before it (``fields``)."""

    tree: Tree
    warnings: list[str]
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


# --- decodes --------------------------------------------------------------------------------------


def _health_check_timeout(value: object, path: str, ctx: TopContext) -> float:
    health = DEFAULT_HEALTH_CHECK_TIMEOUT if value is None else _as_number(value, path)
    if health < MIN_HEALTH_CHECK_TIMEOUT:
        ctx.warnings.append(
            f"healthCheckTimeout: {health:g} is below the minimum of {MIN_HEALTH_CHECK_TIMEOUT:g}; "
            f"using {MIN_HEALTH_CHECK_TIMEOUT:g} (as llama-swap does; timeouts.loadStall fails a "
            "stalled load sooner)"
        )
    return max(health, MIN_HEALTH_CHECK_TIMEOUT)


def _start_port(value: object, path: str, ctx: TopContext) -> int:
    start_port = _as_int(DEFAULT_START_PORT if value is None else value, path)
    if not 1 <= start_port <= 65535:
        raise ConfigError(f"{path}: must be between 1 and 65535, got {start_port}")
    return start_port


def _concurrency_limit(value: object, path: str, ctx: TopContext) -> int:
    concurrency = _as_int(0 if value is None else value, path)
    if concurrency < 0:
        raise ConfigError(f"{path}: must not be negative, got {concurrency}")
    # Unset: admit what maxQueued allows and let the child queue, as a llama-server alone
    # would (started with --parallel N it serves N and queues the rest, never refuses).
    return concurrency or _max_queued(ctx.tree.get("maxQueued"), "maxQueued", ctx)


def _max_queued(value: object, path: str, ctx: TopContext) -> int:
    return _positive_int(value, path, DEFAULT_MAX_QUEUED)


def _default_model(value: object, path: str, ctx: TopContext) -> str | None:
    if value is None:
        return None
    name = _as_text(value, path).strip()
    model = _resolve(name, ctx.models, ctx.aliases)
    if model is None:
        raise ConfigError(f"{path}: unknown model '{name}'")
    return model


def _preload(value: object, path: str, ctx: TopContext) -> tuple[str, ...]:
    hooks = _section(value, path, _HOOKS, ctx.warnings)
    startup = _section(hooks.get("on_startup"), f"{path}.on_startup", _ON_STARTUP, ctx.warnings)
    path = f"{path}.on_startup.preload"
    preload: list[str] = []
    for i, item in enumerate(_as_list(startup.get("preload"), path)):
        name = _as_text(item, f"{path}[{i}]").strip()
        if not name:
            continue
        model = _resolve(name, ctx.models, ctx.aliases)
        if model is None:
            ctx.warnings.append(f"{path}: unknown model '{name}'; not preloaded")
        elif model not in preload:
            preload.append(model)
    return tuple(preload)


def _routes(value: object, path: str, ctx: TopContext) -> KindRoutes:
    try:
        return parse_routes(value, lambda name: _resolve(name, ctx.models, ctx.aliases))
    except RouteError as exc:
        raise ConfigError(str(exc)) from None


def _log_level(value: object, path: str, ctx: TopContext) -> str:
    if value is None:
        return "info"
    level = _as_text(value, path).strip().lower()
    if level not in _LOG_LEVELS:
        # llama-swap treats an unknown level as info rather than refusing to start.
        ctx.warnings.append(f"{path}: unknown level '{value}'; using info")
        return "info"
    return level


def _route_unknown(value: object, path: str, ctx: TopContext) -> bool:
    route = _opt_bool(value, path, False)
    if route and ctx.fields["default_model"] is None:
        raise ConfigError(f"{path}: needs defaultModel (the model unknown names go to)")
    return route


def _api_keys(value: object, path: str, ctx: TopContext) -> tuple[str, ...]:
    keys: list[str] = []
    for i, item in enumerate(_as_list(value, path)):
        # The key itself never goes into a message: messages end up in logs.
        key = _as_text(item, f"{path}[{i}]")
        if not key:
            raise ConfigError(f"{path}[{i}]: must not be empty")
        if any(c.isspace() for c in key):
            raise ConfigError(f"{path}[{i}]: must not contain spaces")
        keys.append(key)
    return tuple(keys)


def _cors_origins(value: object, path: str, ctx: TopContext) -> tuple[str, ...]:
    """Unset: echo any Origin (llama-server's default); ``"*"``; or the origins that are echoed."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(o, str) and o.strip() for o in items):
        raise ConfigError(f'{path}: must be "*" or a list of origins such as "http://localhost:3000"')
    origins = tuple(o.strip().rstrip("/") for o in items)
    if "*" in origins and len(origins) > 1:
        raise ConfigError(f'{path}: "*" must be alone')
    return origins


def _ignore_paths(value: object, path: str, ctx: TopContext) -> tuple[str, ...]:
    upstream = _section(value, path, _UPSTREAM, ctx.warnings)
    path = f"{path}.ignorePaths"
    patterns = [
        _as_str(item, f"{path}[{i}]") for i, item in enumerate(_as_list(upstream.get("ignorePaths"), path))
    ]
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{path}[{i}]: invalid regular expression: {exc}") from None
    return tuple(patterns) or DEFAULT_UPSTREAM_IGNORE_PATHS


def _metrics_listen(value: object, path: str, ctx: TopContext) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_address(_as_text(value, path))
    except AddressError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _one_of(options: tuple[str, ...]) -> Any:
    return lambda value, path, ctx: _choice(value, path, options)


def _flag(default: bool) -> Any:
    return lambda value, path, ctx: _opt_bool(value, path, default)


def _secs(default: float) -> Any:
    return lambda value, path, ctx: _seconds(value, path, default)


# --- the table ------------------------------------------------------------------------------------

DEFAULTS: Section[TopContext] = Section(
    (
        Key("healthCheckTimeout", _health_check_timeout),
        Key("startPort", _start_port),
        Key(
            "unloadTimeout", lambda v, p, c: _seconds(v, p, DEFAULT_UNLOAD_TIMEOUT) or DEFAULT_UNLOAD_TIMEOUT
        ),
        Key("concurrencyLimit", _concurrency_limit),
        Key("maxWait", lambda v, p, c: _positive_seconds(v, p, DEFAULT_MAX_WAIT)),
        Key("globalTTL", _secs(0.0)),
        Key("sendLoadingState", _flag(False)),
        Key("timeouts", lambda v, p, c: _decode_timeouts(v, p, _timeouts.DEFAULT, c.warnings)),
    )
)
STAGES: Section[TopContext] = Section(
    stages("macros", "models", "routing", "groups", "matrix", "peers", "profiles", "selectors")
)
LINKED: Section[TopContext] = Section(
    (
        Key("defaultModel", _default_model),
        Key("hooks", _preload, ("preload",)),
        Key("routes", _routes),
    )
)
SETTINGS: Section[TopContext] = Section(
    (
        Key("logLevel", _log_level),
        Key("logToStdout", _one_of(_LOG_TARGETS)),
        Key("logFormat", _one_of(_LOG_FORMATS)),
        Key("routeUnknownModels", _route_unknown),
        Key("maxBodyBytes", lambda v, p, c: _opt_size(v, p) or DEFAULT_MAX_BODY_BYTES),
        Key("maxQueued", _max_queued),
        Key("requestHeaderTimeout", lambda v, p, c: _positive_number(v, p, DEFAULT_REQUEST_HEADER_TIMEOUT)),
        Key("apiKeys", _api_keys),
        Key("corsOrigins", _cors_origins),
        Key("includeAliasesInList", _flag(False)),
        Key("loadingStateMode", _one_of(_LOADING_MODES)),
        Key("upstream", _ignore_paths, ("upstream_ignore_paths",)),
        Key(
            "metricsMaxInMemory",
            lambda v, p, c: _non_negative_int(v, p, DEFAULT_ACTIVITY_RECORDS),
            ("activity_records",),
        ),
        Key("captureBuffer", lambda v, p, c: _capture_buffer(v), ("capture_bytes",)),
        Key("metricsListen", _metrics_listen),
        Key("shutdownTimeout", _secs(DEFAULT_SHUTDOWN_TIMEOUT)),
    )
)
# Levels below the top that hold only a key or two, read by the rows above.
_HOOKS: Section[None] = Section(stages("on_startup"))
_ON_STARTUP: Section[None] = Section(stages("preload"))
_UPSTREAM: Section[None] = Section(stages("ignorePaths"))
# llama-swap keys swapper accepts and ignores, with a warning.
_UNSUPPORTED = frozenset({"logTimeFormat", "logRequests", "store", "ui", "performance"})
TOP = DEFAULTS + STAGES + LINKED + SETTINGS + Section((), _UNSUPPORTED)

# The defaults models inherit that the Config record keeps too.
INHERITED = tuple(f.name for f in fields(_Defaults) if f.name in {g.name for g in fields(Config)})
check_record(_Defaults, [DEFAULTS])
check_record(Config, [LINKED, SETTINGS], ("models", "aliases", "routing", "fleet", "warnings", *INHERITED))


def read_defaults(ctx: TopContext) -> _Defaults:
    return _Defaults(**DEFAULTS.decode(ctx.tree, "", ctx))


def read_linked(ctx: TopContext) -> None:
    """Decodes the rows that name models (``ctx.models`` is set) into ``ctx.fields``."""
    LINKED.decode(ctx.tree, "", ctx, ctx.fields)


def read_settings(ctx: TopContext) -> dict[str, Any]:
    """Decodes the other rows; returns every Config field the table fills (linked ones too)."""
    return SETTINGS.decode(ctx.tree, "", ctx, ctx.fields)
