"""Where a config comes from: ``--config FILE``, ``--config-dir DIR`` (llama-swap's), or both.

Owns: nothing mutable. ``ConfigSources.load`` reads every source, merges them with llama-swap's
rules and hands the one tree to ``config.parse_tree``, so a merged config is validated exactly as
a single file is. ``digest`` is what ``--watch-config`` compares between polls.

Merge rules (llama-swap's ``-config-dir``): the file comes first, then every ``*.yml``/``*.yaml``
directly in the folder, by name. ``${env.NAME}`` is filled in per file, before YAML. Maps whose
keys name things (``models``, ``groups``, ``profiles``, ``selectors``, ``peers``, ``matrix`` and
their ``routing.router.settings`` twins) may not define one key in two files; other maps merge
key by key; lists concatenate (``apiKeys``, ``preload``); scalars must agree; null yields to a
value. An empty file is skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swapper.config.load import parse_tree, read_tree
from swapper.config.schema import Config, ConfigError
from swapper.config.values import _kind

IDENTITY_MAPS = frozenset(
    {
        "models",
        "groups",
        "profiles",
        "selectors",
        "peers",
        "matrix",
        "routing.router.settings.groups",
        "routing.router.settings.matrix",
    }
)


@dataclass(frozen=True, slots=True)
class ConfigSources:
    file: Path | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        if self.file is None and self.folder is None:
            raise ConfigError("at least one of --config or --config-dir is required")

    def describe(self) -> str:
        return " + ".join(str(p) for p in (self.file, self.folder) if p is not None)

    def paths(self) -> list[Path]:
        """Every file read, in merge order."""
        paths = [self.file] if self.file is not None else []
        if self.folder is not None:
            try:
                entries = sorted(self.folder.iterdir(), key=lambda p: p.name)
            except OSError as exc:
                raise ConfigError(f"--config-dir {self.folder}: {exc.strerror or exc}") from None
            found = [p for p in entries if p.suffix in (".yml", ".yaml") and p.is_file()]
            if self.file is not None and self.file.resolve() in {p.resolve() for p in found}:
                raise ConfigError(
                    f"--config {self.file} is also in --config-dir {self.folder}; remove it from one"
                )
            paths += found
        return paths

    def load(self) -> Config:
        """The merged config; ConfigError names the file and key at fault."""
        if self.folder is None:
            assert self.file is not None
            return parse_tree(_read(self.file), source=str(self.file))
        merged: dict[str, Any] | None = None
        for path in self.paths():
            tree = _read(path)
            if tree is None:
                continue  # an empty file (or only comments)
            if not isinstance(tree, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of settings, not {_kind(tree)}")
            if merged is None:
                merged = tree
            else:
                merge(merged, tree, "", str(path))
        return parse_tree(merged, source=self.describe())

    def digest(self) -> bytes | None:
        """A hash of every source's name and bytes, or None while one is unreadable (mid-save)."""
        h = hashlib.sha256()
        try:
            for path in self.paths():
                h.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
        except (OSError, ConfigError):
            return None
        return h.digest()


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not valid UTF-8: {exc}") from None
    return read_tree(text, str(path))


def merge(dst: dict[str, Any], src: dict[str, Any], path: str, source: str) -> None:
    """Merges ``src`` into ``dst`` in place with llama-swap's rules (module docstring)."""
    for key, value in src.items():
        child = f"{path}.{key}" if path else str(key)
        if key not in dst:
            dst[key] = value
        elif child in IDENTITY_MAPS:
            old = dst[key]
            if old is None:
                dst[key] = value
                continue
            if value is None:
                continue
            if not isinstance(old, dict) or not isinstance(value, dict):
                raise ConfigError(f"conflict at '{child}': expected a mapping, introduced by {source}")
            for name, entry in value.items():
                if name in old:
                    raise ConfigError(
                        f"duplicate {key} '{name}' found in {source} "
                        "(already defined in another config source)"
                    )
                old[name] = entry
        else:
            dst[key] = _merge_value(dst[key], value, child, source)


def _merge_value(old: Any, new: Any, path: str, source: str) -> Any:
    if old is None:
        return new
    if new is None:
        return old
    if isinstance(old, dict) and isinstance(new, dict):
        merge(old, new, path, source)
        return old
    if isinstance(old, list) and isinstance(new, list):
        return old + new
    if isinstance(old, dict | list) or isinstance(new, dict | list):
        raise ConfigError(f"conflict at '{path}': {source} sets a different kind of value ({_kind(new)})")
    if old == new and type(old) is type(new):
        return old
    raise ConfigError(f"conflict at '{path}': {source} sets a different value than a previous source")
