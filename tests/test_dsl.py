"""The matrix DSL: parse trees, expansion, compile order, every error, and big expressions."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from swapper.config.dsl import And, CompiledMatrix, DslError, Ident, Or, Ref, compile_matrix, parse
from swapper.config.schema import MatrixConfig

MODELS = ("a", "b", "c", "d", "e", "gemma", "qwen", "mistral", "voxtral", "x.y_z-1", "模型", "org/m:q4")


def _compile(
    sets: Mapping[str, str] | list[tuple[str, str]],
    vars: Mapping[str, str] | None = None,
    costs: Mapping[str, int] | None = None,
    models: tuple[str, ...] = MODELS,
) -> CompiledMatrix:
    items = tuple(sets.items()) if isinstance(sets, Mapping) else tuple(sets)
    matrix = MatrixConfig(vars=vars or {}, evict_costs=costs or {}, sets=items)
    return compile_matrix(matrix, models)


def _expand(text: str, **kwargs: object) -> list[tuple[str, ...]]:
    return _compile({"s": text}, **kwargs).expand("s")  # type: ignore[arg-type]


# --- parse trees ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("a", Ident("a", 0)),
        ("  a  ", Ident("a", 2)),
        ("a | b & c", Or((Ident("a", 0), And((Ident("b", 4), Ident("c", 8)))))),
        ("a&b|c", Or((And((Ident("a", 0), Ident("b", 2))), Ident("c", 4)))),
        ("(a | b) & c", And((Or((Ident("a", 1), Ident("b", 5))), Ident("c", 10)))),
        ("a | b | c", Or((Ident("a", 0), Ident("b", 4), Ident("c", 8)))),
        ("+llms & v", And((Ref("llms", 0), Ident("v", 8)))),
        ("((a))", Ident("a", 2)),
        ("x.y_z-1", Ident("x.y_z-1", 0)),
        ("模型", Ident("模型", 0)),
    ],
)
def test_parse_tree(text: str, tree: object) -> None:
    assert parse(text) == tree


# --- expansion ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "combos"),
    [
        ("a", [("a",)]),
        ("a | b & c", [("a",), ("b", "c")]),
        ("(a | b) & (c | d)", [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]),
        ("a & a", [("a",)]),
        ("a | a", [("a",)]),
        ("(a | b) & (a | b)", [("a",), ("a", "b"), ("b",)]),
        ("c & (a | b) & d", [("a", "c", "d"), ("b", "c", "d")]),
        ("(a | (b | c)) & d", [("a", "d"), ("b", "d"), ("c", "d")]),
        ("x.y_z-1 & 模型", [("x.y_z-1", "模型")]),
    ],
)
def test_expand(text: str, combos: list[tuple[str, ...]]) -> None:
    assert _expand(text) == combos


def test_ref_inlining_nested() -> None:
    vars = {"g": "gemma", "q": "qwen", "m": "mistral", "v": "voxtral", "e": "e"}
    compiled = _compile({"llms": "g | q | m", "with_tts": "+llms & v", "mega": "+with_tts & e"}, vars)
    assert compiled.expand("mega") == [
        ("e", "gemma", "voxtral"),
        ("e", "qwen", "voxtral"),
        ("e", "mistral", "voxtral"),
    ]
    assert compiled.expand("with_tts") == [("gemma", "voxtral"), ("qwen", "voxtral"), ("mistral", "voxtral")]


def test_var_shadows_model_and_resolves_to_model_id() -> None:
    assert _expand("a & b", vars={"a": "c"}) == [("b", "c")]


def test_model_id_with_slash_needs_a_var() -> None:
    assert _expand("m & a", vars={"m": "org/m:q4"}) == [("a", "org/m:q4")]
    with pytest.raises(DslError, match="unexpected character '/' at position 3"):
        _expand("org/m:q4")


def test_compiled_order_puts_referenced_sets_first() -> None:
    compiled = _compile([("a", "+c & d"), ("b", "b"), ("c", "+e_set | a"), ("e_set", "e")])
    assert compiled.order == ("e_set", "c", "a", "b")


def test_shared_reference_compiles_once() -> None:
    compiled = _compile([("top", "+base & (+base | c)"), ("base", "a | b")])
    assert compiled.order == ("base", "top")
    assert compiled.expand("top") == [("a",), ("a", "b"), ("a", "c"), ("b",), ("b", "c")]


def test_can_contain_all() -> None:
    compiled = _compile({"s1": "(a | b) & c", "s2": "d & e"})
    assert compiled.can_contain_all(["b", "c"])
    assert compiled.can_contain_all(["d", "e"])
    assert not compiled.can_contain_all(["a", "b"])
    assert not compiled.can_contain_all(["c", "d"])
    assert compiled.can_contain_all([])


# --- errors: every message names the set and the position -----------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty expression at position 0"),
        ("   ", "empty expression at position 3"),
        ("()", "empty parentheses '()' at position 0"),
        ("a & ( )", "empty parentheses '()' at position 4"),
        ("(a", "missing closing parenthesis for '(' at position 0"),
        ("a & ((b | c)", "missing closing parenthesis for '(' at position 4"),
        ("a)", "unexpected token ')' at position 1"),
        ("(a b)", "unexpected token 'b' at position 3"),
        ("a b", "unexpected token 'b' at position 2"),
        ("a &", "unexpected end of expression at position 3"),
        ("a | | b", "unexpected token '|' at position 4"),
        ("& a", "unexpected token '&' at position 0"),
        ("+", "'+' must be followed by a set name at position 0"),
        ("a & + b", "'+' must be followed by a set name at position 4"),
        ("a @ b", "unexpected character '@' at position 2"),
        ("a:b", "unexpected character ':' at position 1"),
        ("a & zz", 'unknown var or model "zz" at position 4'),
        ("+nope | a", 'references undefined set "nope" at position 0'),
    ],
)
def test_errors_name_set_and_position(text: str, message: str) -> None:
    with pytest.raises(DslError) as info:
        _compile({"ok": "a", "s": text})
    assert str(info.value) == f'set "s": {message}'
    assert info.value.set_name == "s"
    assert info.value.position is not None


def test_unknown_identifier_message_matches_llama_swap() -> None:
    with pytest.raises(DslError, match=r'^set "s": unknown var or model "x" at position 0$'):
        _compile({"s": "x"})


def test_alias_is_not_an_identifier() -> None:
    with pytest.raises(DslError, match='unknown var or model "alias-of-a"'):
        _compile({"s": "alias-of-a"}, models=("a",))


def test_cycle_between_sets() -> None:
    with pytest.raises(
        DslError, match=r'^set "b": circular reference detected involving set "a" at position 4$'
    ):
        _compile([("a", "+b"), ("b", "c & +a")])


def test_self_reference_is_a_cycle() -> None:
    with pytest.raises(
        DslError, match='set "a": circular reference detected involving set "a" at position 4'
    ):
        _compile({"a": "b | +a"})


def test_error_in_a_later_set_names_that_set() -> None:
    with pytest.raises(DslError, match=r'^set "second": unexpected character'):
        _compile([("first", "a"), ("second", "a # b")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sets": ()}, "at least one set is required"),
        ({"sets": (("s", "a"), ("s", "b"))}, 'set "s": duplicate set name'),
        ({"vars": {"g": "alias-of-a"}}, 'matrix.vars.g: "alias-of-a" is not a model id'),
        ({"evict_costs": {"a": 0}}, "matrix.evict_costs.a: cost must be a positive integer, got 0"),
        ({"evict_costs": {"a": -3}}, "cost must be a positive integer"),
        ({"evict_costs": {"a": True}}, "cost must be a positive integer"),
        ({"evict_costs": {"nope": 2}}, 'matrix.evict_costs.nope: unknown var or model "nope"'),
    ],
)
def test_config_level_errors(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"sets": (("s", "a"),), **kwargs}
    with pytest.raises(DslError, match=message):
        compile_matrix(MatrixConfig(**fields), ("a", "b"))  # type: ignore[arg-type]


def test_dsl_error_is_a_value_error() -> None:
    assert issubclass(DslError, ValueError)


def test_evict_costs_keyed_by_var_resolve_to_the_model() -> None:
    compiled = _compile({"s": "g"}, vars={"g": "gemma"}, costs={"g": 7})
    assert compiled.cost("gemma") == 7
    assert compiled.cost("qwen") == 1


# --- size -----------------------------------------------------------------------------------------


def test_hundred_by_hundred_never_multiplies_out() -> None:
    left = [f"l{i}" for i in range(100)]
    right = [f"r{i}" for i in range(100)]
    compiled = _compile({"big": f"({' | '.join(left)}) & ({' | '.join(right)})"}, models=(*left, *right))
    states = compiled.project("big", ("l3", "r97", "l50"))
    # Bits: l3=1, r97=2, l50=4. Every other leaf projects to nothing; later subsets are covered.
    assert states == [0b000, 0b010, 0b001, 0b011, 0b100, 0b110]


def test_more_than_64_relevant_models() -> None:
    models = tuple(f"m{i}" for i in range(100))
    compiled = _compile({"all": " & ".join(models), "half": " | ".join(models[:50])}, models=models)
    assert compiled.project("all", models) == [(1 << 100) - 1]
    assert compiled.can_contain_all(models)
    assert len(compiled.project("half", models)) == 50
