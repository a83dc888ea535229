"""Coercion helpers shared by every decoding stage: a value's kind, numbers, sizes, choices,
each raising ``ConfigError`` with the key path.

Owns: nothing mutable.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from swapper.config import timeouts as _timeouts
from swapper.config.keys import (
    _SIZE_RE,
    _SIZE_UNITS,
    Scalar,
)
from swapper.config.schema import ConfigError, ModelConfig
from swapper.config.spec import Section, Tree
from swapper.config.timeouts import Timeouts

# --- shared coercion helpers ----------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _scalar_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _key_text(key: object, path: str) -> str:
    """A mapping key as text; YAML lets ``1:`` or ``true:`` be keys, llama-swap reads them as strings."""
    if isinstance(key, str | int | float | bool):
        return _scalar_text(key)
    raise ConfigError(f"{path}: keys must be strings, got {_kind(key)}")


def _known(
    raw: object, path: str, known: Collection[str], unsupported: Collection[str], warnings: list[str]
) -> dict[str, Any]:
    """The known keys of a mapping section (None = empty); one warning per other key."""
    out: dict[str, Any] = {}
    for key, value in _as_mapping(raw, path or "config").items():
        name = _key_text(key, path or "config")
        key_path = _join(path, name)
        if name in known:
            out[name] = value
        elif name in unsupported:
            warnings.append(f"{key_path}: not supported by swapper; ignored")
        else:
            warnings.append(f"{key_path}: unknown key; ignored")
    return out


def _section(raw: object, path: str, section: Section[Any], warnings: list[str]) -> Tree:
    """``section``'s keys of a mapping (None = empty), as a Tree; one warning per other key."""
    return section.tree(_known(raw, path, section.names, section.unsupported, warnings).items())


def _as_mapping(value: object, path: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: must be a mapping, got {_kind(value)}")
    return value


def _as_list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list, got {_kind(value)}")
    return value


def _as_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string, got {_kind(value)}")
    return value


def _as_text(value: object, path: str) -> str:
    """A string, or a number written where a string was meant (``name: 7``); None is ''."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{path}: must be a string, got {_kind(value)}")


def _opt_bool(value: object, path: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    # An inlined macro yields text, and llama-swap's typed decode accepts YAML 1.1 spellings.
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.strip().lower() in ("true", "yes", "on")
    raise ConfigError(f"{path}: must be true or false, got {_kind(value)}")


def _as_number(value: object, path: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{path}: must be a number, got {_kind(value)}")


def _as_int(value: object, path: str) -> int:
    number = _as_number(value, path)
    if not number.is_integer():
        raise ConfigError(f"{path}: must be a whole number, got {value!r}")
    return int(number)


def _positive_int(value: object, path: str, default: int) -> int:
    if value is None:
        return default
    number = _as_int(value, path)
    if number <= 0:
        raise ConfigError(f"{path}: must be greater than 0, got {number}")
    return number


def _non_negative_int(value: object, path: str, default: int) -> int:
    if value is None:
        return default
    number = _as_int(value, path)
    if number < 0:
        raise ConfigError(f"{path}: must not be negative, got {number}")
    return number


def _capture_buffer(value: object) -> int:
    """``captureBuffer``: MB as a number (llama-swap's unit), or a size string; 0 = off."""
    if isinstance(value, str) and not value.strip().replace(".", "", 1).isdigit():
        return _as_size(value, "captureBuffer", minimum=0)
    megabytes = _non_negative_int(value, "captureBuffer", 0)
    return megabytes * 1024 * 1024


def _positive_number(value: object, path: str, default: float) -> float:
    if value is None:
        return default
    number = _as_number(value, path)
    if not number > 0:
        raise ConfigError(f"{path}: must be greater than 0, got {value!r}")
    return number


def _as_size(value: object, path: str, minimum: int = 1) -> int:
    """Bytes from an integer or a size string like ``512MiB``, ``2GB`` or ``8G``."""
    size: int | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        size = int(value)
    elif isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = _SIZE_UNITS.get(match.group(2).lower())
        if unit is not None:
            size = int(Decimal(match.group(1)) * unit)
    if size is None:
        raise ConfigError(f"{path}: must be a byte count or a size like '512MiB' or '2GB', got {value!r}")
    if size < minimum:
        raise ConfigError(f"{path}: must be at least {minimum} bytes, got {size}")
    return size


def _opt_size(value: object, path: str) -> int | None:
    return None if value is None else _as_size(value, path)


def _choice(value: object, path: str, options: tuple[str, ...], what: str = "value") -> str:
    """One of ``options`` (case-insensitive); an absent value means the first option."""
    if value is None:
        return options[0]
    text = _as_text(value, path).strip().lower()
    if text not in options:
        raise ConfigError(f"{path}: unknown {what} '{value}' (valid: {', '.join(options)})")
    return text


def _seconds(value: object, path: str, default: float, *, minimum: float = 0.0) -> float:
    if value is None:
        return default
    seconds = _as_number(value, path)
    if seconds < minimum:
        raise ConfigError(f"{path}: must be at least {minimum:g}, got {seconds:g}")
    return seconds


def _positive_seconds(value: object, path: str, default: float) -> float:
    seconds = _seconds(value, path, default)
    if seconds <= 0:
        raise ConfigError(f"{path}: must be greater than 0")
    return seconds


def _decode_timeouts(raw: object, path: str, base: Timeouts, warnings: list[str]) -> Timeouts:
    try:
        return _timeouts.decode(raw, path, base, warnings)
    except _timeouts.TimeoutsError as exc:
        raise ConfigError(str(exc)) from None


def _resolve(name: str, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]) -> str | None:
    return name if name in models else aliases.get(name)
