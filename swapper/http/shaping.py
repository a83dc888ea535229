"""Per-model request rewriting before a body goes upstream: ``useModelName`` and the filters.

Owns: nothing mutable. ``rewrite_body()`` is a pure, synchronous function of its arguments.

Must not touch: headers (the caller sets ``Content-Length`` from the returned bytes), routing (the
configured model id keeps deciding where a request goes; only the upstream sees the rewritten
name).

Concurrency: none; no I/O, no shared state.

Semantics follow llama-swap's ``filters`` (``stripParams``, ``setParams``):

1. JSON bodies, in order: ``useModelName`` sets ``model``; ``stripParams`` deletes keys but never
   ``model``; ``setParams`` sets top-level keys (whole values replace, no deep merge; ``model`` is
   ignored); then ``setParamsByID[requested]`` the same way, so it wins over ``setParams``.
2. multipart/form-data bodies: only ``useModelName``. The ``model`` field's value is replaced in
   place and every other byte (boundary, other parts, file data) is kept; llama-swap re-encodes
   the whole form instead, which would copy a large upload. If the form has no ``model`` field,
   one is appended before the closing delimiter.
3. Anything else is forwarded as is.

The common case (no ``useModelName``, no filters) returns the very same ``bytes`` object without
looking at it; a JSON body is re-serialised only when a rule actually changed it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from swapper.config.schema import Filters
from swapper.core.errors import BadRequest
from swapper.http.modelid import body_kind, multipart_boundary, scan_multipart

__all__ = ["rewrite_body"]

_MODEL = "model"
_MODEL_FIELD = frozenset({b"model"})


def rewrite_body(
    content_type: str | None,
    body: bytes,
    *,
    model_name: str | None,
    filters: Filters,
    requested: str,
    is_json: bool = False,
) -> bytes:
    """Return the body to send upstream: ``body`` itself when no rule changes it.

    ``model_name`` is the model's ``useModelName`` (``None`` for none); ``requested`` is the name
    the client asked for (id or alias), the key into ``setParamsByID``. ``is_json``: modelid read
    the body as JSON (``RequestModel.is_json``), so JSON sent under another content type is
    rewritten as JSON too. Raises ``BadRequest`` for a body that cannot be read.
    """
    by_id = filters.set_params_by_id.get(requested)
    if model_name is None and not filters.strip_params and not filters.set_params and not by_id:
        return body
    if not body:
        return body
    kind = body_kind(content_type, body)
    if kind == "json" or is_json:  # is_json: also JSON sent under another content type
        return _rewrite_json(body, model_name, filters, by_id)
    if kind == "multipart" and model_name is not None:
        assert content_type is not None
        return _rewrite_multipart_model(content_type, body, model_name)
    return body


def _rewrite_json(
    body: bytes,
    model_name: str | None,
    filters: Filters,
    by_id: Mapping[str, Any] | None,
) -> bytes:
    # Parsed again, by the standard library, whatever modelid read: orjson reads an integer over
    # 64 bits as a float, which is fine for finding the model but would change the number here.
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from None
    if not isinstance(payload, dict):
        # modelid rejects these before we get here; forward rather than guess.
        return body
    changed = False
    if model_name is not None and payload.get(_MODEL) != model_name:
        payload[_MODEL] = model_name
        changed = True
    for key in filters.strip_params:
        if key != _MODEL and key in payload:
            del payload[key]
            changed = True
    for params in (filters.set_params, by_id or {}):
        for key, value in params.items():
            if key != _MODEL:
                payload[key] = value
                changed = True
    if not changed:
        return body
    return _dumps(payload)


def _dumps(payload: dict[str, Any]) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        # A lone surrogate from a "\ud800" escape cannot be UTF-8; \u-escaping round-trips it.
        return json.dumps(payload, separators=(",", ":")).encode()


def _rewrite_multipart_model(content_type: str, body: bytes, model_name: str) -> bytes:
    boundary = multipart_boundary(content_type)
    scan = scan_multipart(body, boundary, _MODEL_FIELD)
    value = model_name.encode()
    # memoryview slices: a large upload is copied once, by the final join.
    view = memoryview(body)
    if not scan.fields:
        nl = scan.newline
        part = b"".join(
            (b"--", boundary, nl, b'Content-Disposition: form-data; name="model"', nl, nl, value, nl)
        )
        return b"".join((view[: scan.close_at], part, view[scan.close_at :]))
    if all(view[start:end] == value for _, start, end in scan.fields):
        return body
    pieces: list[bytes | memoryview] = []
    pos = 0
    for _, start, end in scan.fields:
        pieces += (view[pos:start], value)
        pos = end
    pieces.append(view[pos:])
    return b"".join(pieces)
