"""Which model a requested name means right now: profiles, then selectors, then local ids and
aliases, then peer models (llama-swap's order).

Owns: the active profile (at most one; switched by ``PUT /api/profiles/active``) and each
spillover selector's reservations (requests in flight per target, and its round-robin counter).
Both live for the process: a reload keeps the active profile while the new config still defines
it, and reservations are released by the requests that took them.

``choose`` never awaits: it reads the config and the run loop's advisory states, reserves a
spillover target, and returns a ``Choice`` whose ``release`` (call it in ``finally``) gives the
reservation back. A request naming a local id or alias, with no active pin on that name, never
gets here from the front door's fast path (``wants_choice``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from swapper.config.schema import Config, PeerModel, ProfileConfig, SelectorConfig
from swapper.core.errors import ModelNotFound, SwapperError
from swapper.core.states import State

ACTIVE = (State.READY, State.STARTING)


class NoTarget(SwapperError):
    """A spillover selector whose every target is stopping."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, code="service_unavailable")


@dataclass(slots=True)
class Choice:
    name: str  # what the request names after pins and selectors (goes upstream as its model)
    local: str | None = None  # the local model id
    peer: PeerModel | None = None
    selector: str | None = None  # the selector that chose, if any
    release: Callable[[], None] = field(default=lambda: None)


class Selection:
    def __init__(self) -> None:
        self.active: str | None = None  # the active profile's id
        self._reserved: dict[str, dict[str, int]] = {}  # selector -> resolved target -> in flight
        self._turn: dict[str, int] = {}  # selector -> round-robin counter among ties

    def profile(self, config: Config) -> ProfileConfig | None:
        return config.fleet.profiles.get(self.active) if self.active is not None else None

    def wants_choice(self, name: str, config: Config) -> bool:
        """Whether a request for ``name`` must go through ``choose``: a profile pin, or a name no
        local id or alias claims that is a selector or a peer's model. Any other name is the
        local lookup's, with its fallbacks for names llama-server ignores (``http.target.choose_model``)."""
        profile = self.profile(config)
        if profile is not None and name in profile.pins:
            return True
        if config.resolve(name) is not None:
            return False
        return name in config.fleet.selectors or config.fleet.peer_model(name) is not None

    def choose(self, name: str, config: Config, states: Mapping[str, State]) -> Choice:
        """The target of a request for ``name``; raises ModelNotFound (404) or NoTarget (503)."""
        profile = self.profile(config)
        if profile is not None and name in profile.pins:
            name = profile.pins[name]
            if not name:
                raise ModelNotFound("no model id could be identified (the active profile disables it)")
        choice = Choice(name)
        selector = config.fleet.selectors.get(name)
        if selector is not None:
            choice = self._select(selector, config, states)
        target = choice.name
        choice.local = config.resolve(target)
        if choice.local is None:
            choice.peer = config.fleet.peer_model(target)
            if choice.peer is None:
                choice.release()
                raise ModelNotFound(f"model '{target}' not found")
        return choice

    # ---- selectors ----

    def _select(self, selector: SelectorConfig, config: Config, states: Mapping[str, State]) -> Choice:
        if selector.strategy == "pin":
            return Choice(selector.targets[0], selector=selector.id)
        if selector.strategy == "warm":
            for wanted in (State.READY, State.STARTING):
                for target in selector.targets:
                    if states.get(config.resolve(target) or "") is wanted:
                        return Choice(target, selector=selector.id)
            return Choice(selector.targets[0], selector=selector.id)
        return self._spill(selector, config, states)

    def _spill(self, selector: SelectorConfig, config: Config, states: Mapping[str, State]) -> Choice:
        """Fills each active target up to ``spillover`` requests before starting a cold one."""
        reserved = self._reserved.setdefault(selector.id, {})
        active: list[tuple[str, str]] = []  # (target as written, resolved id)
        cold: list[tuple[str, str]] = []
        for target in selector.targets:
            local = config.resolve(target)
            if local is None:
                peer = config.fleet.peer_model(target)
                key = peer.fqn if peer is not None else target
                (active if reserved.get(key, 0) else cold).append((target, key))
                continue
            state = states.get(local, State.STOPPED)
            if state is State.STOPPING:
                continue
            (active if state in ACTIVE or reserved.get(local, 0) else cold).append((target, local))
        if not active and not cold:
            raise NoTarget(f'selector "{selector.id}" has no available spillover targets')
        if active and (min(reserved.get(k, 0) for _, k in active) < selector.spillover or not cold):
            least = min(reserved.get(k, 0) for _, k in active)
            tied = [t for t in active if reserved.get(t[1], 0) == least]
            turn = self._turn.get(selector.id, 0)
            self._turn[selector.id] = turn + 1
            target, key = tied[turn % len(tied)]
        else:
            target, key = cold[0]
        reserved[key] = reserved.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                reserved[key] -= 1

        return Choice(target, selector=selector.id, release=release)

    def reservations(self, selector_id: str) -> dict[str, int]:
        """In-flight requests per target of a spillover selector (a copy, for status and tests)."""
        return {k: v for k, v in self._reserved.get(selector_id, {}).items() if v}
