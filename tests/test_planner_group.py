"""GroupPlanner: the group truth table, the group rules at planner level, and logging."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from swapper.config.schema import Config, GroupConfig, ModelConfig, RoutingConfig
from swapper.planners import PlanView
from swapper.planners.build import make_planner
from swapper.planners.group import DEFAULT_GROUP, GroupPlanner


def _model(model_id: str) -> ModelConfig:
    return ModelConfig(
        id=model_id, cmd=("svr",), cmd_text="svr", proxy="http://127.0.0.1:1", check_endpoint="/health"
    )


def _config(models: str, *groups: GroupConfig, add_default: bool = True) -> Config:
    """Models named by the letters of ``models``; ungrouped ones land in "(default)" as the loader does."""
    grouped = {m for g in groups for m in g.members}
    all_groups = list(groups)
    ungrouped = tuple(m for m in models if m not in grouped)
    if add_default and ungrouped:
        all_groups.append(GroupConfig(DEFAULT_GROUP, ungrouped))
    return Config(
        models={m: _model(m) for m in models},
        routing=RoutingConfig(use="group", groups=tuple(all_groups)),
    )


def _evict(config: Config, target: str, running: str) -> set[str]:
    return set(GroupPlanner(config).evict_for(target, PlanView(running=frozenset(running))))


# --- the truth table: target t and peer s in G, o in another group O -----------------------------

TRUTH_TABLE = [
    # (G.swap, G.exclusive, O.persistent, same-group peer evicted, other-group model evicted)
    (True, True, False, True, True),
    (True, True, True, True, False),
    (True, False, False, True, False),
    (True, False, True, True, False),
    (False, True, False, False, True),
    (False, True, True, False, False),
    (False, False, False, False, False),
    (False, False, True, False, False),
]


@pytest.mark.parametrize(("swap", "exclusive", "persistent", "evict_same", "evict_other"), TRUTH_TABLE)
def test_truth_table(
    swap: bool, exclusive: bool, persistent: bool, evict_same: bool, evict_other: bool
) -> None:
    config = _config(
        "tso",
        GroupConfig("G", ("t", "s"), swap=swap, exclusive=exclusive),
        GroupConfig("O", ("o",), persistent=persistent),
    )
    expected = {m for m, yes in (("s", evict_same), ("o", evict_other)) if yes}
    assert _evict(config, "t", "so") == expected


@pytest.mark.parametrize("other_exclusive", [True, False])
@pytest.mark.parametrize("other_swap", [True, False])
def test_other_groups_own_flags_do_not_matter(other_swap: bool, other_exclusive: bool) -> None:
    config = _config(
        "to",
        GroupConfig("G", ("t",)),
        GroupConfig("O", ("o",), swap=other_swap, exclusive=other_exclusive),
    )
    assert _evict(config, "t", "o") == {"o"}


# --- group rules ----------------------------------------------------------------------------------


def test_10_default_config_is_one_at_a_time() -> None:
    assert _evict(_config("ab"), "b", "a") == {"a"}


def test_11_swap_false_group_runs_together() -> None:
    config = _config("ab", GroupConfig("g", ("a", "b"), swap=False, exclusive=False))
    assert _evict(config, "b", "a") == set()


def test_12_exclusive_groups_evict_each_other() -> None:
    config = _config("ab", GroupConfig("g1", ("a",)), GroupConfig("g2", ("b",)))
    assert _evict(config, "b", "a") == {"a"}
    assert _evict(config, "a", "b") == {"b"}


def test_13_non_exclusive_groups_load_in_parallel() -> None:
    config = _config(
        "ab", GroupConfig("g1", ("a",), exclusive=False), GroupConfig("g2", ("b",), exclusive=False)
    )
    # The scheduler counts the other in-flight swap target as running; neither evicts the other.
    assert _evict(config, "b", "a") == set()
    assert _evict(config, "a", "b") == set()


def test_14_same_group_swap_serialises() -> None:
    config = _config("ab", GroupConfig("g", ("a", "b"), swap=True, exclusive=False))
    assert _evict(config, "b", "a") == {"a"}


def test_15_persistent_group_survives_exclusive_target() -> None:
    config = _config(
        "ab",
        GroupConfig("persist", ("a",), persistent=True, exclusive=False),
        GroupConfig("other", ("b",)),
    )
    assert _evict(config, "b", "a") == set()


def test_16_non_exclusive_target_does_not_unload_exclusive_group() -> None:
    config = _config("ab", GroupConfig("g1", ("a",)), GroupConfig("g2", ("b",), exclusive=False))
    assert _evict(config, "b", "a") == set()
    # ...while the exclusive group's target does unload the non-exclusive one.
    assert _evict(config, "a", "b") == {"b"}


def test_16_gotcha_against_default_group() -> None:
    config = _config("abc", GroupConfig("side", ("c",), swap=False, exclusive=False))
    assert _evict(config, "c", "ab") == set()
    assert _evict(config, "a", "bc") == {"b", "c"}


# --- edges ----------------------------------------------------------------------------------------


def test_persistent_does_not_protect_inside_its_group() -> None:
    config = _config("ab", GroupConfig("p", ("a", "b"), persistent=True))
    assert _evict(config, "b", "a") == {"a"}


def test_target_never_evicts_itself() -> None:
    assert _evict(_config("ab"), "a", "ab") == {"b"}


def test_target_in_no_group_has_default_semantics() -> None:
    config = _config(
        "abp",
        GroupConfig("g", ("a",), exclusive=False),
        GroupConfig("keep", ("p",), persistent=True),
    )
    assert _evict(config, "unknown", "abp") == {"a", "b"}


def test_default_group_synthesised_when_absent() -> None:
    config = _config("abc", GroupConfig("g", ("a",), exclusive=False), add_default=False)
    planner = GroupPlanner(config)
    assert planner.group_of("b").name == DEFAULT_GROUP
    assert set(planner.evict_for("b", PlanView(running=frozenset("ac")))) == {"a", "c"}


def test_declared_default_group_is_used() -> None:
    config = _config("ab", GroupConfig(DEFAULT_GROUP, ("a", "b"), swap=False, exclusive=True))
    assert _evict(config, "b", "a") == set()


def test_busy_and_last_used_do_not_change_the_decision() -> None:
    planner = GroupPlanner(_config("ab"))
    view = PlanView(running=frozenset("a"), busy=frozenset("a"), last_used={"a": 1.0})
    assert planner.evict_for("b", view) == frozenset("a")


def test_make_planner_builds_group_planner() -> None:
    assert isinstance(make_planner(_config("ab")), GroupPlanner)


def test_evict_for_never_logs_and_on_commit_logs_once() -> None:
    planner = GroupPlanner(_config("abc"))
    with capture_logs() as logs:
        evict = planner.evict_for("a", PlanView(running=frozenset("bc")))
        assert logs == []
        planner.on_commit("a", evict)
    assert logs == [
        {
            "event": "group swap",
            "model": "a",
            "group": DEFAULT_GROUP,
            "evict": ["b", "c"],
            "log_level": "info",
        }
    ]
