"""``routing:`` (and llama-swap's ``groups``/``matrix``): groups, the swap matrix's vars,
costs and sets, memory settings, GPU limits, the scheduler's knobs.

Owns: nothing mutable; decoding only (the matrix is compiled here, once per load).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from swapper.config.dsl import CompiledMatrix, DslError, MatrixConfig, compile_matrix
from swapper.config.keys import (
    _ROUTERS,
    _VAR_NAME_RE,
    _Document,
)
from swapper.config.schema import (
    DEFAULT_GROUP,
    ConfigError,
    GpuLimits,
    GroupConfig,
    MemoryConfig,
    ModelConfig,
    Router,
    RoutingConfig,
)
from swapper.config.spec import Key, Section, check_record, stages
from swapper.config.values import (
    _as_int,
    _as_list,
    _as_mapping,
    _as_size,
    _as_str,
    _as_text,
    _choice,
    _key_text,
    _opt_bool,
    _opt_size,
    _positive_seconds,
    _resolve,
    _section,
)


def _compile(matrix: MatrixConfig, models: Mapping[str, ModelConfig]) -> CompiledMatrix:
    """Compiles the swap matrix now, once: a DSL error is a config error at load, not a crash later."""
    try:
        return compile_matrix(matrix, models)
    except DslError as exc:
        raise ConfigError(f"routing.router.settings.matrix: {exc}") from None


# --- routing --------------------------------------------------------------------------------------


def _parse_routing(
    doc: _Document, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]
) -> tuple[RoutingConfig, dict[str, int]]:
    routing = _section(doc.top.get("routing"), "routing", _ROUTING, doc.warnings)
    use, sources = _router_sources(doc.top, routing, doc.warnings)
    groups_raw, groups_path = sources["groups"]
    matrix_raw, matrix_path = sources["matrix"]
    memory_raw, memory_path = sources["memory"]
    groups = _parse_groups(groups_raw, groups_path, models, aliases, doc.warnings)
    matrix = compiled = None
    if matrix_raw is not None and use != "matrix":
        # llama-swap never reads a matrix its router does not use; an invalid one is only news.
        try:
            matrix = _parse_matrix(matrix_raw, matrix_path, models, aliases, doc.warnings)
            compiled = _compile(matrix, models)
        except ConfigError as exc:
            doc.warnings.append(f"{exc} (not in use: routing.router.use is {use}; ignored)")
            matrix = None
    elif matrix_raw is not None:
        matrix = _parse_matrix(matrix_raw, matrix_path, models, aliases, doc.warnings)
        compiled = _compile(matrix, models)
    elif use == "matrix":
        raise ConfigError(f"{matrix_path}: is required when routing.router.use is matrix")
    memory = _parse_memory_settings(memory_raw, memory_path, doc.warnings)
    priorities = _parse_scheduler(routing.get("scheduler"), models, aliases, doc.warnings)
    routing_config = RoutingConfig(use=use, groups=groups, matrix=matrix, memory=memory, compiled=compiled)
    return routing_config, priorities


def _router_sources(
    top: Mapping[str, Any], routing: Mapping[str, Any], warnings: list[str]
) -> tuple[Router, dict[str, tuple[Any, str]]]:
    """Which router is used and where its settings come from: routing.router or legacy keys."""
    legacy = [key for key in ("groups", "matrix") if top.get(key) is not None]
    if routing.get("router") is not None:
        if legacy:
            raise ConfigError(
                f"{legacy[0]}: the legacy top-level '{legacy[0]}' key cannot be combined with a "
                f"routing.router block; move it to routing.router.settings.{legacy[0]}"
            )
        router = _section(routing["router"], "routing.router", _ROUTER, warnings)
        use = _choice(router.get("use"), "routing.router.use", _ROUTERS, "router")
        base = "routing.router.settings"
        settings = _section(router.get("settings"), base, _ROUTER_SETTINGS, warnings)
        return cast(Router, use), {k: (settings.get(k), f"{base}.{k}") for k in _ROUTER_SETTINGS.names}
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
        ctx = _GroupContext(name, owner, models, aliases, warnings)
        fields = GROUP.decode(_section(value, group_path, GROUP, warnings), group_path, ctx)
        groups.append(GroupConfig(name=name, **fields))
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
    ctx = _MatrixContext(models, aliases)
    return MatrixConfig(**MATRIX.decode(_section(raw, path, MATRIX, warnings), path, ctx, ctx.fields))


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
    return MemoryConfig(**MEMORY.decode(_section(raw, path, MEMORY, warnings), path, warnings))


def _reserve(value: object, path: str, default: int | None) -> int | None:
    return default if value is None else _as_size(value, path, minimum=0)


def _parse_gpu_limits(raw: object, path: str, warnings: list[str]) -> dict[int, GpuLimits]:
    """``gpus: {0: {budget: 20GiB, reserve: 1GiB}, ...}``: per-GPU overrides of gpuBudget/reserve."""
    limits: dict[int, GpuLimits] = {}
    for key, value in _as_mapping(raw, path).items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ConfigError(f"{path}: keys must be GPU indices (0, 1, ...), got {key!r}")
        gpu_path = f"{path}.{key}"
        limits[key] = GpuLimits(**GPU.decode(_section(value, gpu_path, GPU, warnings), gpu_path, warnings))
    return limits


def _parse_scheduler(
    raw: object, models: Mapping[str, ModelConfig], aliases: Mapping[str, str], warnings: list[str]
) -> dict[str, int]:
    """Model id -> priority from routing.scheduler.settings.fifo.priority (aliases resolved)."""
    path = "routing.scheduler"
    spec = _section(raw, path, _SCHEDULER, warnings)
    _choice(spec.get("use"), f"{path}.use", ("fifo",), "scheduler")
    settings = _section(spec.get("settings"), f"{path}.settings", _SCHEDULER_SETTINGS, warnings)
    fifo = _section(settings.get("fifo"), f"{path}.settings.fifo", _FIFO, warnings)
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


# --- the tables -----------------------------------------------------------------------------------

# Levels that only hold other levels (their keys are read where they are decoded, above).
_ROUTING: Section[None] = Section(stages("router", "scheduler"))
_ROUTER: Section[None] = Section(stages("use", "settings"))
_ROUTER_SETTINGS: Section[None] = Section(stages("groups", "matrix", "memory"))
_SCHEDULER: Section[None] = Section(stages("use", "settings"))
_SCHEDULER_SETTINGS: Section[None] = Section(stages("fifo"))
_FIFO: Section[None] = Section(stages("priority"))


@dataclass(slots=True)
class _GroupContext:
    group: str
    owner: dict[str, str]  # model id -> the group it is in, across the groups decoded so far
    models: Mapping[str, ModelConfig]
    aliases: Mapping[str, str]
    warnings: list[str]


def _members(value: object, path: str, c: _GroupContext) -> tuple[str, ...]:
    return _group_members(value, path, c.group, c.owner, c.models, c.aliases, c.warnings)


_GROUP_DEFAULTS = GroupConfig("", ())
GROUP: Section[_GroupContext] = Section(
    (
        Key("members", _members),
        Key("swap", lambda v, p, c: _opt_bool(v, p, _GROUP_DEFAULTS.swap)),
        Key("exclusive", lambda v, p, c: _opt_bool(v, p, _GROUP_DEFAULTS.exclusive)),
        Key("persistent", lambda v, p, c: _opt_bool(v, p, _GROUP_DEFAULTS.persistent)),
    )
)
check_record(GroupConfig, [GROUP], ("name",))


@dataclass(slots=True)
class _MatrixContext:
    models: Mapping[str, ModelConfig]
    aliases: Mapping[str, str]
    fields: dict[str, Any] = field(default_factory=dict)  # the rows decoded so far


MATRIX: Section[_MatrixContext] = Section(
    (
        Key("vars", lambda v, p, c: _matrix_vars(v, p, c.models, c.aliases)),
        Key("evict_costs", lambda v, p, c: _matrix_costs(v, p, c.fields["vars"], c.models)),
        Key("sets", lambda v, p, c: _matrix_sets(v, p)),
    )
)
check_record(MatrixConfig, [MATRIX])

_MEMORY_DEFAULTS = MemoryConfig()
MEMORY: Section[list[str]] = Section(
    (
        Key("releaseTimeout", lambda v, p, c: _positive_seconds(v, p, _MEMORY_DEFAULTS.release_timeout)),
        Key("gpuBudget", lambda v, p, c: _opt_size(v, p)),
        Key("ramBudget", lambda v, p, c: _opt_size(v, p)),
        Key("reserve", lambda v, p, c: _reserve(v, p, _MEMORY_DEFAULTS.reserve)),
        Key("stateFile", lambda v, p, c: _as_text(v, p).strip() or None),
        Key("gpus", _parse_gpu_limits),
    )
)
check_record(MemoryConfig, [MEMORY])
GPU: Section[list[str]] = Section(
    (
        Key("budget", lambda v, p, c: _opt_size(v, p)),
        Key("reserve", lambda v, p, c: _reserve(v, p, None)),
    )
)
check_record(GpuLimits, [GPU])
