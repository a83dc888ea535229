"""Loading a config: ``load_config``/``parse_config``, the stages before decoding (``${env.X}``
substitution, YAML with llama-swap's rules), then the decode in its order: the top level's
defaults, the models, routing, the keys that name models, the fleet, the other settings (each
level's keys are rows of its table: ``top``, ``models``, ``routing``, ``fleet``; see ``spec``).

Owns: nothing mutable. Error messages start with the key path, which the tests pin.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

import yaml

from swapper.config.fleet import parse_fleet
from swapper.config.keys import (
    _ENV_RE,
    _Document,
)
from swapper.config.macros import (
    _check_leftovers,
    _check_macro_order,
    _expand,
    _parse_macros,
)
from swapper.config.models import _link_aliases, _parse_models
from swapper.config.routing import _parse_routing
from swapper.config.schema import (
    Config,
    ConfigError,
)
from swapper.config.top import INHERITED, TOP, TopContext, read_defaults, read_linked, read_settings
from swapper.config.values import _kind, _section


def load_config(path: str) -> Config:
    """Reads, expands and validates the YAML file at ``path``; raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not valid UTF-8: {exc}") from None
    return parse_config(text, source=path)


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Same as load_config for YAML text (used by tests and reload)."""
    return parse_tree(read_tree(text, source), source=source)


def read_tree(text: str, source: str) -> Any:
    """Steps 1 and 2: ``${env.NAME}`` filled in, then YAML parsed (``sources`` merges trees)."""
    return _load_yaml(_substitute_env(text, source), source)


def parse_tree(raw: Any, *, source: str = "<config>") -> Config:
    """Steps 3 to 5 on a parsed YAML tree (one file's, or several files' merged)."""
    doc = _read_document(raw, source)
    top = TopContext(doc.top, doc.warnings)
    defaults = read_defaults(top)
    models, aliases = _link_aliases(_parse_models(doc, defaults), doc.warnings)
    routing, priorities = _parse_routing(doc, models, aliases)
    models = {
        mid: replace(m, priority=priorities[mid]) if mid in priorities else m for mid, m in models.items()
    }
    top.models, top.aliases = models, aliases
    read_linked(top)
    fleet = parse_fleet(doc.top, models, aliases, routing, doc.warnings)
    if not models:
        doc.warnings.append(
            "models: none defined; only peers are served" if fleet.peers else "models: none defined"
        )
    settings = read_settings(top)
    inherited = {name: getattr(defaults, name) for name in INHERITED}
    return Config(
        models=models,
        aliases=aliases,
        routing=routing,
        fleet=fleet,
        **inherited,
        **settings,
        warnings=tuple(doc.warnings),
    )


# --- stage 1: environment, in the raw text --------------------------------------------------------


def _substitute_env(text: str, source: str) -> str:
    """Replaces ``${env.NAME}`` outside YAML comments; unset or multi-line values are errors."""
    if "${env." not in text:
        return text
    out: list[str] = []
    block_parent: int | None = None  # indent of the line that opened a ``|``/``>`` block scalar
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        body = line.rstrip("\r\n")
        stripped = body.lstrip(" \t")
        indent = len(body) - len(stripped)
        if block_parent is not None and stripped and indent <= block_parent:
            block_parent = None
        if stripped.startswith("#") or "${env." not in body:
            new = body
        elif block_parent is not None:
            # Block scalar content: '#' and quotes are literal text there, not YAML syntax.
            new = _fill_env(body, [], source, lineno)
        else:
            spans, comment_at = _scan_line(body)
            new = _fill_env(body[:comment_at], spans, source, lineno) + body[comment_at:]
        if block_parent is None and not stripped.startswith("#"):
            code = body[: _scan_line(body)[1]].rstrip()
            if re.search(r"(?:^|\s)[|>][-+0-9]*$", code):
                block_parent = indent
        out.append(new + line[len(body) :])
    return "".join(out)


def _scan_line(line: str) -> tuple[list[tuple[int, int, str]], int]:
    """Returns the quoted spans of one YAML line and where its trailing comment starts."""
    spans: list[tuple[int, int, str]] = []
    i = 0
    while i < len(line):
        ch = line[i]
        if ch in "'\"" and line[:i].rstrip()[-1:] in ("", ":", "-", "[", "{", ",", "?"):
            end = _quote_end(line, i)
            spans.append((i, end, ch))
            i = end
            continue
        if ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return spans, i
        i += 1
    return spans, len(line)


def _quote_end(line: str, start: int) -> int:
    quote = line[start]
    i = start + 1
    while i < len(line):
        if quote == '"' and line[i] == "\\":
            i += 2
            continue
        if line[i] == quote:
            if quote == "'" and line[i + 1 : i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return len(line)


def _fill_env(code: str, spans: list[tuple[int, int, str]], source: str, lineno: int) -> str:
    def value_for(match: re.Match[str]) -> str:
        name = match.group(1)
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"{source}:{lineno}: environment variable '{name}' is not set")
        if any(c in value for c in "\n\r\0"):
            raise ConfigError(
                f"{source}:{lineno}: environment variable '{name}' contains a newline or NUL, "
                "which cannot be substituted into the config"
            )
        quote = next((q for start, end, q in spans if start < match.start() < end), "")
        if quote == '"':
            return value.replace("\\", "\\\\").replace('"', '\\"')
        if quote == "'":
            return value.replace("'", "''")
        return value

    return _ENV_RE.sub(value_for, code)


# --- stage 2: YAML --------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys and resolves only true/false as booleans.

    YAML 1.1 would turn a model called ``no`` or ``on`` into a bool; llama-swap's decoder uses
    YAML 1.2 rules, and silently losing a duplicate ``models`` key hides real mistakes.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # safe: _YamlLoader derives from SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def _read_document(raw: Any, source: str) -> _Document:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, not {_kind(raw)}")
    warnings: list[str] = []
    top = _section(raw, "", TOP, warnings)
    macros = _parse_macros(top.get("macros"), "macros")
    _check_macro_order(macros, "macros", {name for name, _ in macros})
    for key, value in top.items():
        if key not in ("models", "macros"):
            top[key] = _expand(value, macros)
            _check_leftovers(top[key], key)
    return _Document(top, macros, warnings)
