"""The key tables' vocabulary: a ``Key`` row per config key, a ``Section`` per level.

Owns: nothing mutable (a ``Tree`` is built and read during one load only).

Why: a key used to be written three times (the record's field, a table of known names and a
decode line) and the three could drift apart. Here a key is one row: its name, how its value is
decoded and the record field it fills. The same rows say which keys a level knows (the rest get
the "unknown key" warning), and ``Section.decode`` is the only way a row's value is read, so a key
cannot be decoded without being declared. ``check_record`` ties the rows to the record's fields
when the table is built (at import), so a row without a field, or a field without a row, fails
at once rather than at the first config that uses it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Key", "Section", "Tree", "check_record", "stage", "stages"]

C = TypeVar("C")
# (value, its key path, the level's context) -> the field's value; value is None when absent.
Decode = Callable[[Any, str, C], Any]


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def stage(value: object, path: str, ctx: object) -> None:
    """The decode of a key that another stage reads (``models``, ``routing``, a service's keys)."""
    return None


def stages(*names: str) -> tuple[Key[Any], ...]:
    """Rows for keys that another stage or row reads (their value fills no field of their own)."""
    return tuple(Key(name, stage) for name in names)


@dataclass(frozen=True, slots=True)
class Key(Generic[C]):
    """One config key. ``fields``: the record fields it fills (default: its name in snake_case;
    several when ``decode`` returns a tuple; none for a key another stage or row reads)."""

    name: str
    decode: Decode[C]
    fields: tuple[str, ...] | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        if self.decode is stage:
            return ()
        return self.fields if self.fields is not None else (_snake(self.name),)


class Tree(dict[str, Any]):
    """A level's known keys, as written. Reading a key its section does not declare is a bug, so
    it raises at once."""

    __slots__ = ("names",)

    def __init__(self, names: frozenset[str], items: Iterable[tuple[str, Any]] = ()) -> None:
        super().__init__(items)
        self.names = names

    def _declared(self, key: str) -> str:
        if key not in self.names:
            raise KeyError(f"config key {key!r} is read but not declared in its section's table")
        return key

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(self._declared(key), default)

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(self._declared(key))

    def pop(self, key: str, default: Any = None) -> Any:
        return super().pop(self._declared(key), default)


@dataclass(frozen=True, slots=True)
class Section(Generic[C]):
    """The keys of one level. ``unsupported``: llama-swap keys accepted with a "not supported"
    warning; ``ignored``: keys accepted without one and never read (knobs swapper sets itself)."""

    keys: tuple[Key[C], ...]
    unsupported: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(k.name for k in self.keys) | self.ignored

    def __add__(self, other: Section[C]) -> Section[C]:
        return Section(
            self.keys + other.keys, self.unsupported | other.unsupported, self.ignored | other.ignored
        )

    def tree(self, items: Iterable[tuple[str, Any]] = ()) -> Tree:
        return Tree(self.names, items)

    def decode(self, tree: Tree, path: str, ctx: C, out: dict[str, Any] | None = None) -> dict[str, Any]:
        """Field -> value for each row, in table order (the order errors are found in); rows
        decoded before are in ``out``, so a later row's decode may use them through ``ctx``."""
        out = {} if out is None else out
        for key in self.keys:
            targets = key.targets
            if not targets:
                continue
            value = key.decode(tree.get(key.name), f"{path}.{key.name}" if path else key.name, ctx)
            if len(targets) == 1:
                out[targets[0]] = value
            else:
                out.update(zip(targets, value, strict=True))
        return out


def check_record(record: type, sections: Collection[Section[Any]], derived: Collection[str] = ()) -> None:
    """Raises TypeError unless every field of ``record`` is filled by exactly one row of
    ``sections`` or is ``derived`` (set by the stage itself), and every row's field exists."""
    fields = {f.name for f in dataclasses.fields(record)}
    filled = [t for s in sections for k in s.keys for t in k.targets]
    twice = sorted({t for t in filled if filled.count(t) > 1})
    extra = sorted(set(filled) - fields)
    missing = sorted(fields - set(filled) - set(derived))
    if twice or extra or missing:
        raise TypeError(
            f"{record.__name__}: the key table disagrees with the record "
            f"(filled twice: {twice}, no such field: {extra}, no row: {missing})"
        )
