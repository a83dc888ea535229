"""Which model a request is for: the name its body or query gives (``modelid``), resolved against
the config (ids, aliases, ``defaultModel``, the single model, the only loaded one) and, when the
name asks for it, the run loop's ``selection`` (profile pins, selectors, peer models).

Owns: nothing mutable. A ``Target`` may hold a selector's reservation (its ``Choice``): whoever
resolved it calls ``release`` in ``finally``.

One resolution for every receiver: the front door takes ``local_model`` (a name the selection
must resolve goes to aiohttp's path, which can hold a reservation across awaits and forward to a
peer), aiohttp's handler ``resolve``; both read the name with ``modelid`` and map it with
``choose_model``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from swapper.config.schema import Config, Filters
from swapper.core.errors import ModelNotFound, ModelRequired, SwapperError
from swapper.core.selection import Choice
from swapper.core.states import State
from swapper.http import modelid, shaping
from swapper.runtime.runloop import RunLoop

__all__ = ["Target", "choose_model", "listed_ids", "local_model", "query_fields", "resolve"]

NO_FILTERS = Filters()


@dataclass(slots=True)
class Target:
    """A resolved request: its local model (``""`` for a peer's: see ``choice.peer``), the model
    and stream flag its body names, and the body (renamed for a pin or a selector's target)."""

    model: str
    wanted: modelid.RequestModel
    body: bytes
    choice: Choice | None = None

    def release(self) -> None:
        if self.choice is not None:
            self.choice.release()


def local_model(runloop: RunLoop, config: Config, wanted: modelid.RequestModel) -> str:
    """The local model ``wanted`` names (the front door's resolution: no ``Target`` to build);
    raises ``SwapperError`` for an unknown name, and for any name the selection must resolve."""
    name = wanted.model
    if name and runloop.selection.wants_choice(name, config):
        raise SwapperError("a pin, selector or peer model")  # aiohttp's path resolves it
    return choose_model(name, config, runloop)


def resolve(
    runloop: RunLoop,
    config: Config,
    method: str,
    content_type: str | None,
    body: bytes,
    query: Mapping[str, str],
) -> Target:
    """The request's target; raises ``SwapperError`` (``BadRequest`` for a body that cannot be
    read, 404 for an unknown name, 503 for a selector with no target)."""
    wanted = modelid.extract(method, content_type, body, query)
    name = wanted.model
    if not name or not runloop.selection.wants_choice(name, config):
        return Target(choose_model(name, config, runloop), wanted, body)
    states = {m: snap.status.state for m, snap in runloop.snapshot().items()}
    choice = runloop.selection.choose(name, config, states)
    try:
        if choice.peer is not None:
            return Target("", wanted, body, choice)
        if choice.name != name:  # the client's name for it is a pin or a selector
            body = shaping.rewrite_body(
                content_type, body, model_name=choice.name, filters=NO_FILTERS, requested=name
            )
            wanted = modelid.extract(method, content_type, body, query)
        assert choice.local is not None  # choose gives a local model or a peer's
        return Target(choice.local, wanted, body, choice)
    except BaseException:
        choice.release()
        raise


def choose_model(name: str | None, config: Config, runloop: RunLoop) -> str:
    """Maps the requested name (id or alias) to a model id, or picks one for a bare request.

    Clients written for a single llama-server often send no model at all: those go to
    ``defaultModel``, else to the only configured model, else to the only loaded one. They also
    send names llama-server ignores (``gpt-3.5-turbo``): an unknown name goes to the only
    configured model, or to ``defaultModel`` with ``routeUnknownModels``; otherwise it is a 404
    that lists the ids there are.
    """
    if name:
        model = config.resolve(name)
        if model is not None:
            return model
        if len(config.models) == 1:
            return next(iter(config.models))
        if config.route_unknown_models and config.default_model is not None:
            return config.default_model
        raise ModelNotFound(f"model '{name}' not found; models: {', '.join(listed_ids(config))}")
    if config.default_model is not None:
        return config.default_model
    if len(config.models) == 1:
        return next(iter(config.models))
    loaded = [
        m for m, snap in runloop.snapshot().items() if snap.status.state in (State.READY, State.STARTING)
    ]
    if len(loaded) == 1:
        return loaded[0]
    raise ModelRequired("no model in the request: send a 'model' field (or ?model=), or set defaultModel")


def listed_ids(config: Config) -> list[str]:
    """The ids ``/v1/models`` lists, sorted (what a 404 for an unknown name offers instead)."""
    return sorted(mid for mid, cfg in config.models.items() if not cfg.unlisted)


def query_fields(query: str) -> dict[str, str]:
    """The query's fields, the first value of each (as aiohttp's ``request.query.get`` gives)."""
    fields: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        fields.setdefault(name, value)
    return fields
