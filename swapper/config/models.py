"""``models:``: each model's keys after macro expansion: command, proxy, ports, env,
aliases, TTL, concurrency, memory, filters.

Owns: nothing mutable; decoding only.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, cast
from urllib.parse import urlsplit

from swapper.config import capabilities
from swapper.config.keys import (
    _CONTINUATION_RE,
    _DEFAULT_PROXY,
    _DEVICES,
    _MACRO_REF_RE,
    _NONE,
    _PID_ONLY,
    Macros,
    _Defaults,
    _Document,
)
from swapper.config.macros import (
    _check_leftovers,
    _expand,
    _expand_str,
    _model_macros,
)
from swapper.config.placement import parse_devices
from swapper.config.schema import DEFAULT_CHECK_ENDPOINT, ConfigError, Device, Filters, ModelConfig
from swapper.config.services import SERVICE_KEYS, ServiceError, ServiceSpec, parse_service
from swapper.config.spec import Key, Section, Tree, check_record, stages
from swapper.config.values import (
    _as_int,
    _as_list,
    _as_mapping,
    _as_number,
    _as_str,
    _as_text,
    _choice,
    _decode_timeouts,
    _key_text,
    _kind,
    _opt_bool,
    _opt_size,
    _positive_seconds,
    _scalar_text,
    _seconds,
    _section,
)

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
    tree = _section(raw, path, MODEL, warnings)
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


@dataclass(slots=True)
class _ModelContext:
    """What a model row's decode may use besides its value."""

    path: str  # models.<id>
    tree: Tree
    defaults: _Defaults
    warnings: list[str]
    service: ServiceSpec | None  # set when the model has no cmd (swapper does not spawn it)


def _decode_model(
    model_id: str, tree: Mapping[str, Any], port: int | None, defaults: _Defaults, warnings: list[str]
) -> ModelConfig:
    path = f"models.{model_id}"
    known = MODEL.tree(tree.items())
    ctx = _ModelContext(path, known, defaults, warnings, _parse_service(known, path))
    decoded = MODEL.decode(known, path, ctx)
    return ModelConfig(
        id=model_id,
        port=port,
        health_check_timeout=defaults.health_check_timeout,
        service=ctx.service,
        **decoded,
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
            entry = _section(item, item_path, _ALIAS, warnings)
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
    limit = _as_int(value, path) if value is not None else 0
    if limit < 0:
        raise ConfigError(f"{path}: must not be negative, got {limit}")
    return limit or defaults.concurrency_limit


def _model_memory(
    value: object, path: str, ctx: _ModelContext
) -> tuple[int | None, Device, tuple[int, ...] | None]:
    """``memory: {estimate, device, devices}``, and the older ``memoryEstimate`` beside it."""
    memory = _section(value, path, _MODEL_MEMORY, ctx.warnings)
    legacy = ctx.tree.get("memoryEstimate")
    if memory.get("estimate") is not None and legacy is not None:
        raise ConfigError(
            f"{ctx.path}.memoryEstimate: give either memoryEstimate or memory.estimate, not both"
        )
    if memory.get("estimate") is not None:
        estimate = _opt_size(memory["estimate"], f"{path}.estimate")
    else:
        estimate = _opt_size(legacy, f"{ctx.path}.memoryEstimate")
    device = _choice(memory.get("device"), f"{path}.device", _DEVICES, "device")
    try:
        gpus = parse_devices(memory.get("devices"), f"{path}.devices")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return estimate, cast(Device, device), gpus


def _parse_filters(value: object, path: str, warnings: list[str]) -> Filters:
    tree = _section(value, path, FILTERS, warnings)
    return Filters(**FILTERS.decode(tree, path, tree))


def _strip_params(value: object, path: str, tree: Tree) -> tuple[str, ...]:
    if value is None:  # llama-swap's older spelling
        value, path = tree.get("strip_params"), f"{path.rsplit('.', 1)[0]}.strip_params"
    return _parse_strip_params(value, path)


def _set_params_by_id(value: object, path: str, tree: Tree) -> dict[str, dict[Any, Any]]:
    return {
        name: _without_model(params, f"{path}.{name}") for name, params in _as_mapping(value, path).items()
    }


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


# --- the table: each model key once ---------------------------------------------------------------


def _cmd(value: object, path: str, ctx: _ModelContext) -> tuple[tuple[str, ...], str, str]:
    """argv, the command as one line, and as written (a service has none)."""
    if ctx.service is not None:
        return (), "", ""
    argv, text = _parse_cmd(value, path)
    return argv, text, cast(str, value)


def _ttl(value: object, path: str, ctx: _ModelContext) -> float:
    # A pinned service is never unloaded, by its TTL or anything else.
    if ctx.service is not None and not ctx.service.swappable:
        return 0.0
    return _model_ttl(value, path, ctx.defaults.global_ttl)


def _text(value: object, path: str, ctx: _ModelContext) -> str:
    return _as_text(value, path).strip()


MODEL: Section[_ModelContext] = Section(
    (
        *stages(*sorted(SERVICE_KEYS)),  # a service's keys, read together by _parse_service
        *stages("macros"),  # applied before decoding (_prepare_model)
        Key("cmd", _cmd, ("cmd", "cmd_text", "cmd_raw")),
        Key("memory", _model_memory, ("memory_estimate", "memory_device", "memory_gpus")),
        *stages("memoryEstimate"),  # the older spelling of memory.estimate, read with memory
        Key("useModelName", lambda v, p, c: _text(v, p, c) or None),
        Key("proxy", lambda v, p, c: _parse_proxy(v, p)),
        Key("checkEndpoint", lambda v, p, c: _parse_check_endpoint(v, p, c.warnings)),
        Key("cmdStop", lambda v, p, c: _parse_cmd_stop(v, p)),
        Key("env", lambda v, p, c: _parse_env(v, p)),
        Key("aliases", lambda v, p, c: _parse_aliases(v, p, c.warnings)),
        Key("unlisted", lambda v, p, c: _opt_bool(v, p, False)),
        Key("name", _text),
        Key("description", _text),
        Key("metadata", lambda v, p, c: _parse_metadata(v, p, c.warnings)),
        Key("ttl", _ttl),
        Key("unloadTimeout", lambda v, p, c: _seconds(v, p, 0.0) or c.defaults.unload_timeout),
        Key("concurrencyLimit", lambda v, p, c: _model_concurrency(v, p, c.defaults)),
        Key("maxWait", lambda v, p, c: _positive_seconds(v, p, c.defaults.max_wait)),
        Key("sendLoadingState", lambda v, p, c: _opt_bool(v, p, c.defaults.send_loading_state)),
        Key("filters", lambda v, p, c: _parse_filters(v, p, c.warnings)),
        Key("capabilities", lambda v, p, c: _parse_capabilities(v, p)),
        Key("timeouts", lambda v, p, c: _decode_timeouts(v, p, c.defaults.timeouts, c.warnings)),
    ),
    # healthCheckTimeout exists per model in llama-swap's struct but is overwritten by the global one.
    unsupported=frozenset({"compat", "healthCheckTimeout"}),
)
check_record(ModelConfig, [MODEL], ("id", "port", "health_check_timeout", "priority", "service"))

FILTERS: Section[Tree] = Section(
    (
        Key("stripParams", _strip_params),
        *stages("strip_params"),  # llama-swap's older spelling, read by stripParams
        Key("setParams", lambda v, p, c: _without_model(v, p)),
        Key("setParamsByID", _set_params_by_id),
    )
)
check_record(Filters, [FILTERS])
_MODEL_MEMORY: Section[None] = Section(stages("estimate", "device", "devices"))  # read by _model_memory
_ALIAS: Section[None] = Section(stages("id"), unsupported=frozenset({"name", "unlisted"}))  # an older form
