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
from swapper.config.keys import _NONE, _STRATEGIES
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
from swapper.config.values import (
    _as_list,
    _as_mapping,
    _as_text,
    _choice,
    _key_text,
    _known,
    _opt_bool,
    _positive_int,
    _seconds,
)

_PEER_KEYS = frozenset({"proxy", "apiKey", "models", "filters", "timeouts", "concurrencyLimit"})
# Transport knobs llama-swap has that swapper's client sets for itself: accepted, nothing to do.
_TRANSPORT_KEYS = frozenset({"keepalive", "tlsHandshake", "expectContinue", "idleConn"})
_SELECTOR_KEYS = frozenset({"strategy", "targets", "settings", "name", "description", "unlisted", "metadata"})


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
    spec = _known(raw, path, _PEER_KEYS, _NONE, warnings)
    if spec.get("proxy") is None:
        raise ConfigError(f"{path}.proxy: is required")
    names = [
        _as_text(m, f"{path}.models[{i}]").strip() for i, m in enumerate(_as_list(spec.get("models"), path))
    ]
    if not names or not all(names):
        raise ConfigError(f"{path}.models: at least one model id is required (and none may be empty)")
    known = {"connect", "responseHeader"} | _TRANSPORT_KEYS
    timeouts = _known(spec.get("timeouts"), f"{path}.timeouts", known, _NONE, warnings)
    return PeerConfig(
        id=peer_id,
        proxy=_parse_proxy(spec["proxy"], f"{path}.proxy"),
        models=tuple(names),
        filters=_parse_filters(spec.get("filters"), f"{path}.filters", warnings),
        api_key=_as_text(spec.get("apiKey"), f"{path}.apiKey").strip(),
        connect_timeout=_seconds(
            timeouts.get("connect"), f"{path}.timeouts.connect", DEFAULT_PEER_CONNECT_TIMEOUT
        ),
        response_header_timeout=_seconds(
            timeouts.get("responseHeader"),
            f"{path}.timeouts.responseHeader",
            DEFAULT_PEER_RESPONSE_HEADER_TIMEOUT,
        ),
        concurrency_limit=_positive_int(
            spec.get("concurrencyLimit"), f"{path}.concurrencyLimit", DEFAULT_PEER_CONCURRENCY
        ),
    )


def _parse_selector(selector_id: str, raw: object, warnings: list[str]) -> SelectorConfig:
    path = f"selectors.{selector_id}"
    if not selector_id.strip():
        raise ConfigError("selectors: selector names cannot be empty")
    spec = _known(raw, path, _SELECTOR_KEYS, _NONE, warnings)
    strategy = spec.get("strategy")
    if strategy is None or strategy == "":
        raise ConfigError(f"{path}.strategy: is required (warm, pin or spillover)")
    strategy = _choice(strategy, f"{path}.strategy", _STRATEGIES, "strategy")
    targets = tuple(
        _as_text(t, f"{path}.targets[{i}]").strip() for i, t in enumerate(_as_list(spec.get("targets"), path))
    )
    if not targets:
        raise ConfigError(f"{path}.targets: must contain at least one entry")
    settings = _known(spec.get("settings"), f"{path}.settings", {"spillover"}, _NONE, warnings)
    spillover = settings.get("spillover", 1)
    if isinstance(spillover, bool) or not isinstance(spillover, int) or spillover < 1:
        raise ConfigError(f"{path}.settings.spillover: must be an integer >= 1")
    return SelectorConfig(
        id=selector_id,
        strategy=strategy,  # type: ignore[arg-type]  # _choice returned one of _STRATEGIES
        targets=targets,
        spillover=spillover,
        name=_as_text(spec.get("name"), f"{path}.name").strip(),
        description=_as_text(spec.get("description"), f"{path}.description").strip(),
        unlisted=_opt_bool(spec.get("unlisted"), f"{path}.unlisted", False),
        metadata=_as_mapping(spec.get("metadata"), f"{path}.metadata"),
    )


def _parse_profile(profile_id: str, raw: object, warnings: list[str]) -> ProfileConfig:
    path = f"profiles.{profile_id}"
    if not profile_id.strip():
        raise ConfigError("profiles: profile names cannot be empty")
    if isinstance(raw, list):  # llama-swap's old form: a list of models run together
        raise ConfigError(f"{path}: a list is the old form; write pins: {{requested name: target model}}")
    spec = _known(raw, path, {"description", "pins"}, _NONE, warnings)
    if isinstance(spec.get("pins"), list):
        raise ConfigError(f"{path}.pins: is a mapping now (requested name: target model), not a list")
    pins: dict[str, str] = {}
    for key, value in _as_mapping(spec.get("pins"), f"{path}.pins").items():
        name = _key_text(key, f"{path}.pins")
        if not name.strip():
            raise ConfigError(f"{path}.pins: pin names cannot be empty")
        pins[name] = _as_text(value, f"{path}.pins.{name}").strip()
    if not pins:
        raise ConfigError(f"{path}.pins: must contain at least one entry")
    return ProfileConfig(
        id=profile_id,
        pins=pins,
        description=_as_text(spec.get("description"), f"{path}.description").strip(),
    )


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
    group_of = {m: g for g in routing.groups for m in g.members}
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
