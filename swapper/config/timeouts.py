"""The ``timeouts:`` config section, global and per model: how long swapper waits on a child.

Owns: nothing mutable. Decoding only; ``config`` calls ``decode`` for the top level (the
defaults) and for each model (which overrides them key by key).

llama-swap's keys, with its semantics (seconds; 0 = none):
  * ``connect`` (30): a connection to the child that is not made in time is a 504;
  * ``responseHeader`` (0): a child that sends no response head in time is a 504.
llama-swap's other transport keys (``keepalive``, ``tlsHandshake``, ``expectContinue``,
``idleConn``) are accepted and ignored: swapper's own pool keeps local connections briefly.

swapper's own:
  * ``request`` (0): a deadline for the whole request from its arrival (queue and load
    included): 504 if nothing was sent yet, else a stream ends with an error event;
  * ``hung`` (30): a ready child with requests in flight that sends no byte for this long is
    probed on its health endpoint; one that does not answer is hung (``hang``);
  * ``loadStall`` (60): a loading child that prints nothing and does not answer its health
    probe for this long has stalled, and its load fails early (``loading``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

__all__ = ["DEFAULT", "TRANSPORT_KEYS", "Timeouts", "TimeoutsError", "decode"]


class TimeoutsError(ValueError):
    """A bad value; ``config`` turns it into a ``ConfigError``."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; 0 means no limit."""

    connect: float = 30.0
    response_header: float = 0.0
    request: float = 0.0
    hung: float = 30.0
    load_stall: float = 60.0


DEFAULT: Final = Timeouts()

# YAML key -> field.
_KEYS: Final = {
    "connect": "connect",
    "responseHeader": "response_header",
    "request": "request",
    "hung": "hung",
    "loadStall": "load_stall",
}
# llama-swap's other transport knobs: swapper's client sets its own (peers accept them too).
TRANSPORT_KEYS: Final = frozenset({"keepalive", "tlsHandshake", "expectContinue", "idleConn"})


def decode(raw: object, path: str, base: Timeouts, warnings: list[str]) -> Timeouts:
    """``base`` with the keys of the mapping ``raw`` (None: none) replaced. Raises
    ``TimeoutsError`` for a value that is not a number of seconds >= 0; an unknown key is a
    warning."""
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise TimeoutsError(f"{path}: must be a mapping of seconds, got {type(raw).__name__}")
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key)
        if name in TRANSPORT_KEYS:
            continue
        field = _KEYS.get(name)
        if field is None:
            warnings.append(f"{path}.{name}: unknown key; ignored")
            continue
        changes[field] = _seconds(value, f"{path}.{name}")
    return replace(base, **changes) if changes else base


def _seconds(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TimeoutsError(f"{path}: must be a number of seconds, got {value!r}")
    if value < 0:
        raise TimeoutsError(f"{path}: must be at least 0, got {value:g}")
    return float(value)
