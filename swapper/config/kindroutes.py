"""Kind routes: a request path that names its model by itself (top-level ``routes:``).

Why: a GPU broker's callers post to ``/v1/tts``, ``/v1/stt``, ``/v1/llm`` or ``/v1/image`` and name
no model; the path says which consumer serves them. A route maps a path to a model, and optionally
to the path and method the request goes upstream with::

    routes:
      /v1/tts: {model: kokoro, path: /v1/audio/speech}
      /v1/llm: qwen                      # shorthand: the model only, same path upstream
      /audio/: {model: kokoro, prefix: true}

With ``prefix: true`` every path under the route's goes to the model with the rest of the path
appended to ``path`` (default: the route's own path), so ``GET /audio/x.wav`` reaches the TTS
service's ``/audio/x.wav``.

Owns: nothing mutable. ``parse_routes`` decodes the config section (``config.parse_config`` calls
it); ``KindRoutes.match`` is the per-request lookup (a dict hit for exact routes, then the prefixes
longest first). Serving is ``routes.handle_kind_route``: the same ``Exchange`` flow as any model
request, so the same scheduler, planners, limits, queue and metrics.

A route takes precedence over swapper's own inference routes (``/v1/audio/speech`` may be a kind
route); swapper's admin paths cannot be routed away (a config error).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["KindRoute", "KindRoutes", "parse_routes"]

# Paths swapper answers itself: a route there would hide them.
_RESERVED_EXACT: Final = frozenset(
    {
        "/",
        "/health",
        "/healthz",
        "/running",
        "/unload",
        "/metrics",
        "/v1/status",
        "/v1/models",
        "/models",
        "/logs",
    }
)
_RESERVED_PREFIXES: Final = ("/api/", "/ui/", "/upstream/", "/logs/")
# Unreserved URL characters only, so a route's raw and decoded spellings are the same.
_PATH_RE: Final = re.compile(r"^/[A-Za-z0-9._~/-]*$")
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_KEYS: Final = frozenset({"model", "path", "method", "prefix"})


@dataclass(frozen=True, slots=True)
class KindRoute:
    path: str  # as configured (a prefix route's ends without "/": "/audio")
    model: str  # model id (an alias resolved)
    upstream: str | None = None  # path upstream; None: the request's own
    method: str | None = None  # method upstream; None: the request's own
    prefix: bool = False

    def target(self, raw_path: str, query: str) -> str:
        """The path and query the request on ``raw_path`` (as the client spelled it) goes upstream on."""
        if self.prefix:
            rest = raw_path[len(self.path) :]  # "" or "/...": the route path is plain ASCII
            base = (self.upstream or self.path).rstrip("/")
            path = base + rest if rest else (self.upstream or self.path)
        else:
            path = self.upstream or raw_path
        return f"{path}?{query}" if query else path


@dataclass(frozen=True, slots=True)
class KindRoutes:
    """Every configured route, for ``match``; false when there is none."""

    exact: Mapping[str, KindRoute] = field(default_factory=dict)
    prefixes: tuple[KindRoute, ...] = ()  # longest path first

    def __bool__(self) -> bool:
        return bool(self.exact) or bool(self.prefixes)

    def __len__(self) -> int:
        return len(self.exact) + len(self.prefixes)

    def all(self) -> tuple[KindRoute, ...]:
        return (*self.exact.values(), *self.prefixes)

    def match(self, path: str) -> KindRoute | None:
        """The route serving the (decoded) request ``path``, if any: an exact route, else the
        longest prefix route at a segment boundary."""
        route = self.exact.get(path)
        if route is not None:
            return route
        for route in self.prefixes:
            if path == route.path or path.startswith(route.path + "/"):
                return route
        return None


class RouteError(ValueError):
    """A bad ``routes`` entry; the config loader turns it into a ``ConfigError``."""


def parse_routes(raw: object, resolve: Callable[[str], str | None]) -> KindRoutes:
    """Decodes the top-level ``routes`` mapping; ``resolve`` maps a model id or alias to its id.
    Raises ``RouteError`` naming the entry at fault."""
    if raw is None:
        return KindRoutes()
    if not isinstance(raw, dict):
        raise RouteError(f"routes: must be a mapping of path -> model, got {type(raw).__name__}")
    exact: dict[str, KindRoute] = {}
    prefixes: dict[str, KindRoute] = {}
    for key, value in raw.items():
        path = str(key)
        where = f"routes.{path}"
        spec = _spec(value, where)
        route = _route(path, spec, where, resolve)
        table = prefixes if route.prefix else exact
        if route.path in table:
            raise RouteError(f"{where}: the path {route.path} is routed twice")
        table[route.path] = route
    ordered = tuple(sorted(prefixes.values(), key=lambda r: len(r.path), reverse=True))
    return KindRoutes(exact, ordered)


def _spec(value: object, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"model": value}
    if not isinstance(value, dict):
        raise RouteError(f"{where}: must be a model id or a mapping with 'model', got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in _KEYS)
    if unknown:
        raise RouteError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_KEYS))})")
    return dict(value)


def _route(path: str, spec: Mapping[str, Any], where: str, resolve: Callable[[str], str | None]) -> KindRoute:
    prefix = spec.get("prefix", False)
    if not isinstance(prefix, bool):
        raise RouteError(f"{where}.prefix: must be true or false")
    _check_path(path, where)
    if prefix:
        path = path.rstrip("/") or "/"
        if path == "/":
            raise RouteError(f"{where}: a prefix route cannot take every path")
    _check_reserved(path, where, prefix)
    name = spec.get("model")
    if not isinstance(name, str) or not name.strip():
        raise RouteError(f"{where}.model: is required (a model id or alias)")
    model = resolve(name.strip())
    if model is None:
        raise RouteError(f"{where}.model: unknown model '{name}'")
    upstream = spec.get("path")
    if upstream is not None:
        if not isinstance(upstream, str):
            raise RouteError(f"{where}.path: must be a path starting with '/'")
        _check_path(upstream, f"{where}.path")
    method = spec.get("method")
    if method is not None:
        if not isinstance(method, str) or method.upper() not in _METHODS:
            raise RouteError(f"{where}.method: must be one of {', '.join(sorted(_METHODS))}, got {method!r}")
        method = method.upper()
    return KindRoute(path, model, upstream, method, prefix)


def _check_path(path: str, where: str) -> None:
    if not _PATH_RE.match(path) or "//" in path:
        raise RouteError(
            f"{where}: must be a path starting with '/' of letters, digits and . _ ~ - / only, got '{path}'"
        )


def _check_reserved(path: str, where: str, prefix: bool) -> None:
    probe = path.rstrip("/") or "/"
    hidden = probe in _RESERVED_EXACT or any((probe + "/").startswith(p) for p in _RESERVED_PREFIXES)
    if not hidden and prefix:  # a prefix route must not cover one of them either
        hidden = any(p.startswith(probe + "/") for p in (*_RESERVED_EXACT, *_RESERVED_PREFIXES))
    if hidden:
        raise RouteError(f"{where}: {path} is or covers one of swapper's own paths; route another path")
