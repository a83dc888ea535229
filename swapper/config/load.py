"""Loading a config: ``load_config``/``parse_config`` and the stages before decoding
(``${env.X}`` substitution, YAML with llama-swap's rules), then the top-level defaults.

Owns: nothing mutable. Error messages start with the key path, which the tests pin.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import yaml

from swapper.config import timeouts as _timeouts
from swapper.config.fleet import parse_fleet
from swapper.config.keys import (
    _ENV_RE,
    _LOADING_MODES,
    _LOG_FORMATS,
    _LOG_LEVELS,
    _LOG_TARGETS,
    _NONE,
    _TOP_KEYS,
    _TOP_UNSUPPORTED,
    _Defaults,
    _Document,
    _LoadingMode,
    _LogFormat,
    _LogLevel,
    _LogTarget,
)
from swapper.config.kindroutes import RouteError, parse_routes
from swapper.config.listen import AddressError, parse_address
from swapper.config.macros import (
    _check_leftovers,
    _check_macro_order,
    _expand,
    _parse_macros,
)
from swapper.config.models import _link_aliases, _parse_models
from swapper.config.routing import _parse_routing
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
from swapper.config.values import (
    _as_int,
    _as_list,
    _as_number,
    _as_str,
    _as_text,
    _capture_buffer,
    _choice,
    _decode_timeouts,
    _kind,
    _known,
    _non_negative_int,
    _opt_bool,
    _opt_size,
    _positive_int,
    _positive_number,
    _resolve,
    _seconds,
)


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


# --- top-level defaults ---------------------------------------------------------------------------


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
