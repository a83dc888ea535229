"""Macros: ``macros:`` at the top and per model, ``${name}`` expansion, leftovers.

Owns: nothing mutable.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from swapper.config.keys import (
    _MACRO_NAME_RE,
    _MACRO_REF_RE,
    _NONE,
    _RESERVED_MACROS,
    Macros,
)
from swapper.config.schema import ConfigError
from swapper.config.values import (
    _as_mapping,
    _join,
    _key_text,
    _kind,
    _scalar_text,
)

# --- stage 3: macros ------------------------------------------------------------------------------


def _parse_macros(raw: object, path: str) -> Macros:
    """An ordered macro list; declaration order matters for macro-in-macro references."""
    macros: Macros = []
    for key, value in _as_mapping(raw, path).items():
        name = _key_text(key, path)
        macro_path = f"{path}.{name}"
        if len(name) >= 64 or not _MACRO_NAME_RE.match(name):
            raise ConfigError(
                f"{macro_path}: invalid macro name (letters, digits, '_' and '-', fewer than 64 characters)"
            )
        if name in _RESERVED_MACROS:
            raise ConfigError(f"{macro_path}: '{name}' is a reserved macro name")
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(f"{macro_path}: value must be a string, number or bool, got {_kind(value)}")
        if isinstance(value, str) and "${" + name + "}" in value:
            raise ConfigError(f"{macro_path}: must not reference itself")
        macros.append((name, value))
    return macros


def _check_macro_order(macros: Macros, path: str, check: Collection[str]) -> None:
    """Rejects references in the ``check`` macros to macros not declared before them.

    Substitution runs last-declared first, so such a reference could never be filled in; saying
    so at the macro is clearer than an unknown-macro error at some field that uses it.
    """
    declared: set[str] = set(_RESERVED_MACROS)
    for name, value in macros:
        if name in check and isinstance(value, str):
            for ref in _MACRO_REF_RE.findall(value):
                if ref not in declared:
                    raise ConfigError(
                        f"{path}.{name}: unknown macro '${{{ref}}}' "
                        "(a macro may only use macros declared before it)"
                    )
        declared.add(name)


def _model_macros(model_id: str, raw: object, global_macros: Macros, path: str) -> Macros:
    own = _parse_macros(raw, f"{path}.macros")
    merged: Macros = [("MODEL_ID", model_id), *global_macros]
    index = {name: i for i, (name, _) in enumerate(merged)}
    for name, value in own:
        if name in index:
            merged[index[name]] = (name, value)
        else:
            index[name] = len(merged)
            merged.append((name, value))
    _check_macro_order(merged, f"{path}.macros", {name for name, _ in own})
    return merged


def _expand_str(text: str, macros: Macros) -> Any:
    """Applies macros last-declared first; a value that is exactly ``${name}`` takes its type."""
    value: Any = text
    for name, macro in reversed(macros):
        if not isinstance(value, str) or "${" not in value:
            break
        token = "${" + name + "}"
        if value == token:
            value = macro
        elif token in value:
            value = value.replace(token, _scalar_text(macro))
    return value


def _expand(value: Any, macros: Macros) -> Any:
    if isinstance(value, str):
        return _expand_str(value, macros)
    if isinstance(value, dict):
        return {key: _expand(item, macros) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, macros) for item in value]
    return value


def _check_leftovers(value: Any, path: str, allowed: Collection[str] = _NONE) -> None:
    if isinstance(value, str):
        for match in _MACRO_REF_RE.finditer(value):
            if match.group(1) in allowed:
                continue
            hint = (
                " (${PORT} is only assigned to models whose cmd uses it)" if match.group(1) == "PORT" else ""
            )
            raise ConfigError(f"{path}: unknown macro '{match.group(0)}'{hint}")
    elif isinstance(value, dict):
        for key, item in value.items():
            key_path = _join(path, _key_text(key, path))
            if path.endswith(".setParamsByID"):  # the only keys that macros expand
                _check_leftovers(key, key_path)
            _check_leftovers(item, key_path, allowed)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_leftovers(item, f"{path}[{i}]", allowed)
