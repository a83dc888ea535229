"""MatrixPlanner: llama-swap's matrix rules, the solve rule's costs and tie-breaks, logging, and a
property test of the projected solver against brute-force expansion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from swapper.config.dsl import DslError, compile_matrix
from swapper.config.load import load_config, parse_config
from swapper.config.schema import Config, ConfigError, MatrixConfig, ModelConfig, RoutingConfig
from swapper.planners import PlanView
from swapper.planners.build import make_planner
from swapper.planners.matrix import Decision, MatrixPlanner, solve


def _model(model_id: str) -> ModelConfig:
    return ModelConfig(
        id=model_id, cmd=("svr",), cmd_text="svr", proxy="http://127.0.0.1:1", check_endpoint="/health"
    )


def _config(
    sets: Sequence[tuple[str, str]],
    models: Sequence[str] = ("a", "b", "c", "d", "x"),
    costs: Mapping[str, int] | None = None,
    vars: Mapping[str, str] | None = None,
) -> Config:
    """A config as the loader makes it: the matrix compiled once (DslError when it does not compile)."""
    matrix = MatrixConfig(vars=vars or {}, evict_costs=costs or {}, sets=tuple(sets))
    compiled = compile_matrix(matrix, models)
    return Config(
        models={m: _model(m) for m in models},
        routing=RoutingConfig(use="matrix", matrix=matrix, compiled=compiled),
    )


def _planner(sets: Sequence[tuple[str, str]], **kwargs: object) -> MatrixPlanner:
    return MatrixPlanner(_config(sets, **kwargs))  # type: ignore[arg-type]


def _view(*running: str) -> PlanView:
    return PlanView(running=frozenset(running))


# --- matrix rules ---------------------------------------------------------------------------------


def test_18_disjoint_sets_swap() -> None:
    planner = _planner([("s_a", "a"), ("s_b", "b")])
    assert planner.evict_for("b", _view("a")) == {"a"}


def test_19_shared_set_keeps_both() -> None:
    planner = _planner([("ab", "a & b")])
    assert planner.evict_for("b", _view("a")) == set()
    # Concurrent cold starts: the other in-flight target counts as running and is kept.
    assert planner.evict_for("a", _view("b")) == set()


def test_20_nothing_running_picks_first_set() -> None:
    planner = _planner([("first", "a & b"), ("second", "a & c")])
    assert planner.decide("a", frozenset()) == Decision("a", frozenset(), "first", 0)


def test_21_evict_costs_preferred() -> None:
    planner = _planner([("a_with_c", "a & c"), ("a_with_b", "a & b")], costs={"b": 10, "c": 1})
    decision = planner.decide("a", frozenset({"b", "c"}))
    assert decision == Decision("a", frozenset({"c"}), "a_with_b", 1)


def test_22_target_in_no_set_runs_alone() -> None:
    planner = _planner([("ab", "a & b")], costs={"a": 4})
    assert planner.decide("x", frozenset({"a", "b"})) == Decision("x", frozenset({"a", "b"}), None, 5)


def test_23_and_24_compile_errors_raise_at_compilation() -> None:
    with pytest.raises(DslError, match='set "s": unexpected character'):
        _planner([("s", "a @ b")])
    with pytest.raises(DslError, match="circular reference"):
        _planner([("p", "+q"), ("q", "+p")])
    with pytest.raises(DslError, match="matrix.vars.g"):
        _planner([("s", "g")], vars={"g": "not-a-model"})
    with pytest.raises(DslError, match="positive integer"):
        _planner([("s", "a")], costs={"a": 0})


def test_25_target_running_evicts_nothing() -> None:
    planner = _planner([("s_a", "a"), ("s_b", "b")])
    assert planner.decide("a", frozenset({"a", "b"})) == Decision("a", frozenset(), None, 0)
    planner = _planner([("s_a", "a"), ("s_ab", "a & b")])
    assert planner.decide("a", frozenset({"a", "b"})) == Decision("a", frozenset(), "s_ab", 0)


def test_missing_matrix_section_is_refused_by_the_loader() -> None:
    text = "models:\n  a:\n    cmd: svr --port ${PORT}\nrouting:\n  router:\n    use: matrix\n"
    with pytest.raises(ConfigError, match=r"^routing\.router\.settings\.matrix: is required when"):
        parse_config(text)


# --- tie-breaks -----------------------------------------------------------------------------------


def test_tie_break_by_definition_order() -> None:
    assert _planner([("ac", "a & c"), ("ab", "a & b")]).evict_for("a", _view("b", "c")) == {"b"}
    assert _planner([("ab", "a & b"), ("ac", "a & c")]).evict_for("a", _view("b", "c")) == {"c"}


def test_tie_break_by_compiled_order_puts_references_first() -> None:
    planner = _planner([("combo", "+solo | a & b"), ("solo", "a & c")])
    assert planner.decide("a", frozenset({"b", "c"})).set_name == "solo"


def test_tie_break_within_a_set_follows_expansion_order() -> None:
    assert _planner([("s", "(a & b) | (a & c)")]).evict_for("a", _view("b", "c")) == {"c"}
    assert _planner([("s", "a & (c | b)")]).evict_for("a", _view("b", "c")) == {"b"}


def test_a_later_superset_does_not_steal_an_earlier_tie() -> None:
    # Expansion: {a,b} {b,c} {a,b}. The first {a,b} wins the tie, although a later alternative of
    # the inner choice ("a & b") is a superset of the earlier "a".
    planner = _planner([("s", "(a | c | a & b) & b")])
    assert planner.evict_for("b", _view("a", "c")) == {"c"}


def test_a_choice_shared_with_its_context_is_not_cut_early() -> None:
    # Inside "(a | b) & d" the choice a-or-b looks independent, and a is the heavier; but the
    # enclosing product already holds a, so only b adds anything: keep both a and b.
    planner = _planner([("s", "((a | b) & d | c) & a")], costs={"a": 5, "b": 3})
    assert planner.decide("d", frozenset({"a", "b"})) == Decision("d", frozenset(), "s", 0)


def test_cheaper_later_set_beats_earlier_one() -> None:
    planner = _planner([("one", "a"), ("two", "a & b & c")])
    assert planner.decide("a", frozenset({"b", "c", "d"})) == Decision("a", frozenset({"d"}), "two", 1)


# --- planner mechanics ----------------------------------------------------------------------------


def test_cache_answers_repeated_queries_and_follows_changes() -> None:
    planner = _planner([("s_a", "a"), ("ab", "a & b")])
    first = planner.decide("a", frozenset({"b", "c"}))
    assert planner.decide("a", frozenset({"b", "c"})) is first
    assert planner.evict_for("a", _view("c")) == {"c"}
    assert planner.evict_for("a", _view("b", "c")) == {"c"}


def test_make_planner_builds_matrix_planner() -> None:
    assert isinstance(make_planner(_config([("s", "a")])), MatrixPlanner)


def test_evict_for_never_logs_and_on_commit_logs_once() -> None:
    planner = _planner([("a_with_c", "a & c"), ("a_with_b", "a & b")], costs={"b": 10, "c": 1})
    with capture_logs() as logs:
        evict = planner.evict_for("a", _view("b", "c"))
        planner.evict_for("d", _view("b"))  # a speculative decision for another target
        assert logs == []
        planner.on_commit("a", evict)
    assert logs == [
        {
            "event": "matrix swap",
            "model": "a",
            "set": "a_with_b",
            "dsl": "a & b",
            "evict": ["c"],
            "cost": 1,
            "log_level": "info",
        }
    ]


def test_on_commit_without_matching_decision_still_logs_cost() -> None:
    planner = _planner([("s", "a")], costs={"b": 3})
    with capture_logs() as logs:
        planner.on_commit("x", frozenset({"a", "b"}))
    assert [(e["set"], e["evict"], e["cost"]) for e in logs] == [(None, ["a", "b"], 4)]


def test_hundred_alternatives_squared() -> None:
    left = [f"l{i}" for i in range(100)]
    right = [f"r{i}" for i in range(100)]
    models = (*left, *right)
    sets = [(f"s{k}", f"({' | '.join(left)}) & ({' | '.join(right)})") for k in range(3)]
    planner = _planner(sets, models=models)
    decision = planner.decide("r3", frozenset({"l5", "l9", "r7", "r8"}))
    assert decision == Decision("r3", frozenset({"l9", "r7", "r8"}), "s0", 3)
    everything = frozenset(models) - {"r3"}
    assert planner.decide("r3", everything).cost == len(everything) - 1


def test_more_than_64_models_kept_together() -> None:
    models = tuple(f"m{i}" for i in range(100))
    planner = _planner([("all", " & ".join(models))], models=models)
    assert planner.evict_for("m50", PlanView(running=frozenset(models) - {"m50"})) == set()


# --- property: projected solver == brute force over the full expansion ------------------------------

POOL = ("a", "b", "c", "d", "e")


@dataclass(frozen=True)
class Node:
    op: str  # "m" (model), "ref", "&", "|"
    value: str = ""
    children: tuple[Node, ...] = ()


def _render(node: Node) -> str:
    if node.op == "m":
        return node.value
    if node.op == "ref":
        return "+" + node.value
    return f" {node.op} ".join(f"({_render(c)})" for c in node.children)


def _brute(
    node: Node, defs: Mapping[str, Node], done: dict[str, list[frozenset[str]]]
) -> list[frozenset[str]]:
    """Full expansion straight from the tree, deduplicated, in source order (``done``: by set)."""
    if node.op == "m":
        return [frozenset({node.value})]
    if node.op == "ref":
        if node.value not in done:
            done[node.value] = _brute(defs[node.value], defs, done)
        return done[node.value]
    parts = [_brute(c, defs, done) for c in node.children]
    if node.op == "|":
        return list(dict.fromkeys(s for part in parts for s in part))
    combos = [frozenset[str]()]
    for part in parts:
        combos = list(dict.fromkeys(left | right for left in combos for right in part))
    return combos


def _refs(node: Node) -> list[str]:
    if node.op == "ref":
        return [node.value]
    return [r for c in node.children for r in _refs(c)]


def _dfs_order(defs: Mapping[str, Node]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for ref in _refs(defs[name]):
                visit(ref)
            order.append(name)

    for name in defs:
        visit(name)
    return order


Expansions = list[tuple[str, list[frozenset[str]]]]  # (set name, combinations), in solve order


def _brute_solve(
    expansions: Expansions, target: str, running: frozenset[str], costs: Mapping[str, int]
) -> tuple[frozenset[str], str | None, int]:
    if target in running:
        holding = [name for name, combos in expansions if any(running <= s for s in combos)]
        return frozenset(), (holding[0] if holding else None), 0
    best: tuple[int, str, frozenset[str]] | None = None
    for name, combos in expansions:
        for combo in combos:
            if target in combo:
                cost = sum(costs.get(r, 1) for r in running - combo)
                if best is None or cost < best[0]:
                    best = (cost, name, combo)
    if best is None:
        return running, None, sum(costs.get(r, 1) for r in running)
    return running - best[2], best[1], best[0]


SET_NAMES = ("s0", "s1", "s2", "s3")


def _trees(depth: int, bushy: int) -> st.SearchStrategy[Node]:
    """Trees of at most ``depth`` levels whose top ``bushy`` levels are always ``&``/``|``."""
    leaf = st.sampled_from(POOL).map(lambda m: Node("m", m)) | st.sampled_from(SET_NAMES).map(
        lambda r: Node("ref", r)
    )
    if depth == 0:
        return leaf
    inner = st.lists(_trees(depth - 1, bushy - 1), min_size=2, max_size=3).map(tuple)
    composite = st.builds(Node, st.sampled_from(["&", "|"]), st.just(""), inner)
    return composite if bushy > 0 else composite | leaf


def _nested(a: Node, b: Node, c: Node, d: Node) -> Node:
    return Node("&", "", (Node("|", "", (Node("&", "", (a, b)), c)), d))


# A product inside a choice inside a product is the hard case for the projection (a choice that
# looks independent inside its product may share models with the enclosing one), so it is drawn
# on purpose next to general trees.
TREES = _trees(4, 1) | st.builds(_nested, *[_trees(2, 0)] * 4)


def _fix(node: Node, allowed: Sequence[str], rename: Sequence[str]) -> Node:
    """Renames models through ``rename`` (collapsing some, so that sets overlap more) and turns a
    reference to a set not drawn before this one into a model (so there are no cycles)."""
    if node.op == "ref" and node.value not in allowed:
        return Node("m", rename[SET_NAMES.index(node.value)])
    if node.op == "m":
        return Node("m", rename[POOL.index(node.value)])
    return Node(node.op, node.value, tuple(_fix(c, allowed, rename) for c in node.children))


@st.composite
def _matrices(draw: st.DrawFn) -> dict[str, Node]:
    count = draw(st.integers(1, len(SET_NAMES)))
    rename = draw(st.lists(st.sampled_from(POOL), min_size=len(POOL), max_size=len(POOL)))
    defs: dict[str, Node] = {}
    for name in SET_NAMES[:count]:
        defs[name] = _fix(draw(TREES), list(defs), rename)
    names = draw(st.permutations(list(defs)))  # definition order != dependency order
    return {name: defs[name] for name in names}


ALL = (*POOL, "x")  # "x" is a model that no set mentions
SUBSETS = [frozenset(m for i, m in enumerate(ALL) if bits >> i & 1) for bits in range(1 << len(ALL))]


@pytest.mark.timeout(600)  # room for hypothesis to shrink a failure instead of being killed
@settings(max_examples=100, deadline=None)
@given(defs=_matrices(), costs=st.dictionaries(st.sampled_from(POOL), st.integers(1, 6)))
def test_projected_solver_matches_brute_force(defs: dict[str, Node], costs: dict[str, int]) -> None:
    matrix = MatrixConfig(evict_costs=costs, sets=tuple((n, _render(t)) for n, t in defs.items()))
    compiled = compile_matrix(matrix, ALL)
    done: dict[str, list[frozenset[str]]] = {}
    expansions = [(name, _brute(defs[name], defs, done)) for name in _dfs_order(defs)]
    assert [name for name, _ in expansions] == list(compiled.order)
    for name, combos in expansions:
        assert compiled.expand(name) == [tuple(sorted(s)) for s in combos]
    for target in ALL:  # every query: the hard cases need a specific target, running set and costs
        for running in SUBSETS:
            decision = solve(compiled, target, running)
            expected = _brute_solve(expansions, target, running, costs)
            assert (decision.evict, decision.set_name, decision.cost) == expected, (target, running)


def test_the_matrix_is_compiled_once_at_load_and_the_planner_uses_that_compilation() -> None:
    config = load_config(str(Path(__file__).parent.parent / "examples" / "matrix.yaml"))
    assert config.routing.compiled is not None
    planner = make_planner(config)
    assert getattr(planner, "matrix", None) is config.routing.compiled
