"""llama-swap's ``peers``, ``profiles`` and ``selectors``: decoding, validation, name resolution.

Owns: nothing mutable; frozen dataclasses built once per config load.

* A **peer** is another OpenAI-compatible server (another swapper, llama-swap, a hosted API) whose
  ``models`` are served through this one: ``<peer>/<model>`` always names one, a bare ``<model>``
  does when exactly one peer lists it and no local id or alias claims it.
* A **profile** is a table of pins (requested name -> target) switched at run time; at most one is
  active. An empty target disables the requested name while the profile is active.
* A **selector** is a virtual model id that picks one of its ``targets`` per request: ``pin``
  (always the first), ``warm`` (the first loaded, else the first loading, else the first) or
  ``spillover`` (fill each active target up to ``settings.spillover`` requests, then start the next
  cold one).

Rules follow llama-swap's ``internal/config/peer.go``, ``selectors.go`` and ``load.go``
(``validateProfiles``): fully qualified peer names are reserved (no model id, alias, selector or
pin may equal one), selector ids may not be model ids or aliases, selectors do not chain, ``warm``
targets must be local, and ``spillover`` targets must be able to run together (one group with
``swap: false``, or one matrix set that holds them all).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swapper.config.schema import ModelConfig, RoutingConfig
from swapper.config.keys import _STRATEGIES
from swapper.config.models import _parse_filters, _parse_proxy
from swapper.config.schema import (
    DEFAULT_PEER_CONCURRENCY,
    DEFAULT_PEER_CONNECT_TIMEOUT,
    DEFAULT_PEER_RESPONSE_HEADER_TIMEOUT,
    ConfigError,
    Fleet,
    PeerConfig,
    ProfileConfig,
    SelectorConfig,
)
from swapper.config.spec import Key, Section, check_record
from swapper.config.timeouts import TRANSPORT_KEYS
from swapper.config.values import (
    _as_list,
    _as_mapping,
    _as_text,
    _choice,
    _key_text,
    _opt_bool,
    _positive_int,
    _seconds,
    _section,
)


def parse_fleet(
    top: Mapping[str, Any],
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    routing: RoutingConfig,
    warnings: list[str],
) -> Fleet:
    """Decodes and validates ``peers``, ``selectors`` and ``profiles``; raises ConfigError."""

    peers = {}
    for key, value in _as_mapping(top.get("peers"), "peers").items():
        peer_id = _key_text(key, "peers")
        peers[peer_id] = _parse_peer(peer_id, value, warnings)
    fleet = Fleet(peers=peers)
    selectors = {}
    for key, value in _as_mapping(top.get("selectors"), "selectors").items():
        selector_id = _key_text(key, "selectors")
        selectors[selector_id] = _parse_selector(selector_id, value, warnings)
    profiles = {}
    for key, value in _as_mapping(top.get("profiles"), "profiles").items():
        profile_id = _key_text(key, "profiles")
        profiles[profile_id] = _parse_profile(profile_id, value, warnings)
    fleet = Fleet(peers=peers, selectors=selectors, profiles=profiles)
    _check_peer_names(fleet, models, aliases)
    for selector in selectors.values():
        _check_selector(selector, fleet, models, aliases, routing)
    for profile in profiles.values():
        _check_profile(profile, fleet, models, aliases)
    return fleet


def _parse_peer(peer_id: str, raw: object, warnings: list[str]) -> PeerConfig:
    path = f"peers.{peer_id}"
    if not peer_id.strip():
        raise ConfigError("peers: a peer id must not be empty")
    tree = _section(raw, path, PEER, warnings)
    return PeerConfig(id=peer_id, **PEER.decode(tree, path, warnings))


def _parse_selector(selector_id: str, raw: object, warnings: list[str]) -> SelectorConfig:
    path = f"selectors.{selector_id}"
    if not selector_id.strip():
        raise ConfigError("selectors: selector names cannot be empty")
    tree = _section(raw, path, SELECTOR, warnings)
    return SelectorConfig(id=selector_id, **SELECTOR.decode(tree, path, warnings))


def _parse_profile(profile_id: str, raw: object, warnings: list[str]) -> ProfileConfig:
    path = f"profiles.{profile_id}"
    if not profile_id.strip():
        raise ConfigError("profiles: profile names cannot be empty")
    if isinstance(raw, list):  # llama-swap's old form: a list of models run together
        raise ConfigError(f"{path}: a list is the old form; write pins: {{requested name: target model}}")
    tree = _section(raw, path, PROFILE, warnings)
    return ProfileConfig(id=profile_id, **PROFILE.decode(tree, path, warnings))


# --- the tables: peers, selectors, profiles -------------------------------------------------------


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0]


def _required_proxy(value: object, path: str, warnings: list[str]) -> str:
    if value is None:
        raise ConfigError(f"{path}: is required")
    return _parse_proxy(value, path)


def _peer_models(value: object, path: str, warnings: list[str]) -> tuple[str, ...]:
    names = [_as_text(m, f"{path}[{i}]").strip() for i, m in enumerate(_as_list(value, _parent(path)))]
    if not names or not all(names):
        raise ConfigError(f"{path}: at least one model id is required (and none may be empty)")
    return tuple(names)


PEER_TIMEOUTS: Section[None] = Section(
    (
        Key("connect", lambda v, p, c: _seconds(v, p, DEFAULT_PEER_CONNECT_TIMEOUT), ("connect_timeout",)),
        Key(
            "responseHeader",
            lambda v, p, c: _seconds(v, p, DEFAULT_PEER_RESPONSE_HEADER_TIMEOUT),
            ("response_header_timeout",),
        ),
    ),
    ignored=TRANSPORT_KEYS,
)


def _peer_timeouts(value: object, path: str, warnings: list[str]) -> tuple[float, float]:
    fields = PEER_TIMEOUTS.decode(_section(value, path, PEER_TIMEOUTS, warnings), path, None)
    return fields["connect_timeout"], fields["response_header_timeout"]


PEER: Section[list[str]] = Section(
    (
        Key("proxy", _required_proxy),
        Key("models", _peer_models),
        Key("timeouts", _peer_timeouts, ("connect_timeout", "response_header_timeout")),
        Key("filters", _parse_filters),
        Key("apiKey", lambda v, p, c: _as_text(v, p).strip()),
        Key("concurrencyLimit", lambda v, p, c: _positive_int(v, p, DEFAULT_PEER_CONCURRENCY)),
    )
)
check_record(PeerConfig, [PEER], ("id",))


def _strategy(value: object, path: str, warnings: list[str]) -> str:
    if value is None or value == "":
        raise ConfigError(f"{path}: is required (warm, pin or spillover)")
    return _choice(value, path, _STRATEGIES, "strategy")


def _targets(value: object, path: str, warnings: list[str]) -> tuple[str, ...]:
    targets = tuple(_as_text(t, f"{path}[{i}]").strip() for i, t in enumerate(_as_list(value, _parent(path))))
    if not targets:
        raise ConfigError(f"{path}: must contain at least one entry")
    return targets


def _spillover(value: object, path: str, warnings: list[str]) -> int:
    spillover = 1 if value is None else value
    if isinstance(spillover, bool) or not isinstance(spillover, int) or spillover < 1:
        raise ConfigError(f"{path}: must be an integer >= 1")
    return spillover


SELECTOR_SETTINGS: Section[list[str]] = Section((Key("spillover", _spillover),))


def _selector_settings(value: object, path: str, warnings: list[str]) -> int:
    tree = _section(value, path, SELECTOR_SETTINGS, warnings)
    return int(SELECTOR_SETTINGS.decode(tree, path, warnings)["spillover"])


SELECTOR: Section[list[str]] = Section(
    (
        Key("strategy", _strategy),
        Key("targets", _targets),
        Key("settings", _selector_settings, ("spillover",)),
        Key("name", lambda v, p, c: _as_text(v, p).strip()),
        Key("description", lambda v, p, c: _as_text(v, p).strip()),
        Key("unlisted", lambda v, p, c: _opt_bool(v, p, False)),
        Key("metadata", lambda v, p, c: _as_mapping(v, p)),
    )
)
check_record(SelectorConfig, [SELECTOR], ("id",))


def _pins(value: object, path: str, warnings: list[str]) -> dict[str, str]:
    if isinstance(value, list):
        raise ConfigError(f"{path}: is a mapping now (requested name: target model), not a list")
    pins: dict[str, str] = {}
    for key, target in _as_mapping(value, path).items():
        name = _key_text(key, path)
        if not name.strip():
            raise ConfigError(f"{path}: pin names cannot be empty")
        pins[name] = _as_text(target, f"{path}.{name}").strip()
    if not pins:
        raise ConfigError(f"{path}: must contain at least one entry")
    return pins


PROFILE: Section[list[str]] = Section(
    (
        Key("pins", _pins),
        Key("description", lambda v, p, c: _as_text(v, p).strip()),
    )
)
check_record(ProfileConfig, [PROFILE], ("id",))


def _local(name: str, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]) -> str | None:
    return name if name in models else aliases.get(name)


def _check_peer_names(fleet: Fleet, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]) -> None:
    owners: dict[str, str] = {}
    for pm in fleet.peer_models():
        other = owners.setdefault(pm.fqn, pm.peer)
        if other != pm.peer:
            raise ConfigError(f"peers.{pm.peer}: peer model name '{pm.fqn}' is ambiguous with peers.{other}")
    for fqn in sorted(owners):
        if fqn in models:
            raise ConfigError(f"models.{fqn}: the id conflicts with the fully qualified peer model name")
        if fqn in aliases:
            raise ConfigError(
                f"models.{aliases[fqn]}.aliases: '{fqn}' conflicts with the fully qualified peer model name"
            )
        if fqn in fleet.selectors:
            raise ConfigError(f"selectors.{fqn}: the id conflicts with the fully qualified peer model name")
        for profile in fleet.profiles.values():
            if fqn in profile.pins:
                raise ConfigError(
                    f"profiles.{profile.id}.pins.{fqn}: conflicts with a fully qualified peer model"
                )


def _check_selector(
    selector: SelectorConfig,
    fleet: Fleet,
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    routing: RoutingConfig,
) -> None:
    path = f"selectors.{selector.id}"
    if selector.id in models:
        raise ConfigError(f"{path}: the name conflicts with model id '{selector.id}'")
    if selector.id in aliases:
        raise ConfigError(f"{path}: the name conflicts with an alias of model '{aliases[selector.id]}'")
    resolved: list[str] = []
    local_targets: list[str] = []
    for i, target in enumerate(selector.targets):
        where = f"{path}.targets[{i}]"
        if target in fleet.selectors:
            raise ConfigError(f"{where}: references selector '{target}'; selectors do not chain")
        local = _local(target, models, aliases)
        peer = None if local is not None else fleet.peer_model(target)
        if local is None and peer is None:
            raise ConfigError(f"{where}: references unknown model '{target}'")
        if selector.strategy == "warm" and local is None:
            raise ConfigError(f"{where}: must be a local model for strategy warm")
        if local is not None:
            local_targets.append(local)
        resolved.append(local if local is not None else peer.fqn)  # type: ignore[union-attr]
    if selector.strategy != "spillover":
        return
    duplicate = next((r for i, r in enumerate(resolved) if r in resolved[:i]), None)
    if duplicate is not None:
        raise ConfigError(f"{path}.targets: '{duplicate}' is named twice")
    _check_coexistence(path, local_targets, routing, models)


def _check_coexistence(
    path: str, targets: list[str], routing: RoutingConfig, models: Mapping[str, ModelConfig]
) -> None:
    """Spillover sends traffic to several local targets at once: they must be able to run together."""

    if len(targets) <= 1 or routing.use == "memory":  # the memory planner decides by measured fit
        return
    if routing.use == "matrix":
        assert routing.compiled is not None  # compiled at load whenever use is matrix
        if not routing.compiled.can_contain_all(targets):
            raise ConfigError(f"{path}.targets: must all appear together in one expanded matrix set")
        return
    group_of = routing.group_of()
    group = group_of.get(targets[0])
    if group is None or group.swap:
        raise ConfigError(f"{path}.targets: spillover targets must share a group with swap: false")
    if any(group_of.get(t) is not group for t in targets[1:]):
        raise ConfigError(f"{path}.targets: spillover targets must share one routing group")


def _check_profile(
    profile: ProfileConfig, fleet: Fleet, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]
) -> None:
    for pin, target in profile.pins.items():
        if not target or target in fleet.selectors:
            continue
        if _local(target, models, aliases) is None and fleet.peer_model(target) is None:
            raise ConfigError(f"profiles.{profile.id}.pins.{pin}: references unknown model '{target}'")
