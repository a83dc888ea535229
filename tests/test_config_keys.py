"""The key tables (swapper/config/spec.py): each key is declared once, as a row that drives its
decode, the record field it fills and the unknown-key warning of its level.

Pure: parses YAML text, never starts a process.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from swapper.config import fleet, routing, spec, top
from swapper.config import models as model_keys
from swapper.config.load import parse_config
from swapper.config.spec import Key, Section, Tree, check_record, stages

# A config that sets every top-level and model key the tables declare, with a cmd model and a
# service model (a service's keys are read only for a model without cmd).
EVERY_KEY = """
healthCheckTimeout: 30
logLevel: debug
logToStdout: both
logFormat: json
logTimeFormat: rfc3339
startPort: 7000
globalTTL: 60
unloadTimeout: 5
concurrencyLimit: 2
maxWait: 10
maxQueued: 50
maxBodyBytes: 1MiB
requestHeaderTimeout: 5
shutdownTimeout: 7
apiKeys: [k1]
corsOrigins: "*"
includeAliasesInList: true
sendLoadingState: true
loadingStateMode: comments
metricsMaxInMemory: 10
captureBuffer: 1
metricsListen: 127.0.0.1:19150
defaultModel: a
routeUnknownModels: true
timeouts: {connect: 5}
upstream: {ignorePaths: ['\\.css$']}
hooks: {on_startup: {preload: [a]}}
routes: {/v1/audio/speech: svc}
macros: {m: 1}
peers:
  p:
    proxy: http://127.0.0.1:19151
    models: [remote]
    apiKey: k2
    concurrencyLimit: 3
    filters: {strip_params: temperature}
    timeouts: {connect: 5, responseHeader: 10, keepalive: 30}
selectors: {s: {strategy: pin, targets: [a], settings: {spillover: 2}, name: S, description: d,
                unlisted: true, metadata: {k: v}}}
profiles: {pr: {pins: {x: a}, description: d}}
routing:
  router:
    use: memory
    settings:
      groups: {g: {members: [a], swap: true, exclusive: false, persistent: true}}
      matrix: {vars: {x: a}, evict_costs: {x: 2}, sets: {s: x}}
      memory:
        gpuBudget: 20GiB
        ramBudget: 8GiB
        reserve: 1GiB
        stateFile: /tmp/footprints.json
        releaseTimeout: 5
        gpus: {0: {budget: 10GiB, reserve: 1GiB}}
  scheduler: {use: fifo, settings: {fifo: {priority: {a: 2}}}}
models:
  a:
    cmd: svr --port ${PORT} --m ${m}
    cmdStop: kill ${PID}
    macros: {n: 2}
    proxy: http://127.0.0.1:${PORT}
    checkEndpoint: /ready
    env: [A=1]
    aliases: [alpha, {id: beta}]
    useModelName: served
    unlisted: true
    name: A
    description: the a model
    metadata: {n: "${n}"}
    ttl: 30
    unloadTimeout: 3
    concurrencyLimit: 4
    maxWait: 9
    sendLoadingState: false
    filters: {stripParams: temperature, setParams: {top_k: 1}, setParamsByID: {alpha: {top_k: 2}}}
    memory: {device: cpu, devices: [0]}
    memoryEstimate: 1GiB
    capabilities: {in: [text], out: [text]}
    timeouts: {request: 60}
    compat: {ignoreWebsockets: true}
  svc:
    proxy: http://127.0.0.1:19152
    start: systemctl start svc
    stop: systemctl stop svc
    pidFile: /run/svc.pid
    probeInterval: 2
"""


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[frozenset[str], set[str]]]:
    """Records which declared keys each level's decode reads (by the level's set of names)."""
    seen: dict[frozenset[str], set[str]] = {}
    declared = Tree._declared

    def record(self: Tree, key: str) -> str:
        seen.setdefault(self.names, set()).add(key)
        return declared(self, key)

    monkeypatch.setattr(Tree, "_declared", record)
    yield seen


SECTIONS: dict[str, Section[Any]] = {
    "top": top.TOP,
    "hooks": top._HOOKS,
    "hooks.on_startup": top._ON_STARTUP,
    "upstream": top._UPSTREAM,
    "models.*": model_keys.MODEL,
    "models.*.filters": model_keys.FILTERS,
    "models.*.memory": model_keys._MODEL_MEMORY,
    "models.*.aliases[*]": model_keys._ALIAS,
    "routing": routing._ROUTING,
    "routing.router": routing._ROUTER,
    "routing.router.settings": routing._ROUTER_SETTINGS,
    "routing.scheduler": routing._SCHEDULER,
    "routing.scheduler.settings": routing._SCHEDULER_SETTINGS,
    "routing.scheduler.settings.fifo": routing._FIFO,
    "groups.*": routing.GROUP,
    "matrix": routing.MATRIX,
    "memory": routing.MEMORY,
    "memory.gpus.*": routing.GPU,
    "peers.*": fleet.PEER,
    "peers.*.timeouts": fleet.PEER_TIMEOUTS,
    "selectors.*": fleet.SELECTOR,
    "selectors.*.settings": fleet.SELECTOR_SETTINGS,
    "profiles.*": fleet.PROFILE,
}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_key_in_a_table_is_read_by_the_decode(name: str, reads: dict[frozenset[str], set[str]]) -> None:
    section = SECTIONS[name]
    config = parse_config(EVERY_KEY)
    assert config.models["a"].max_wait == 9 and config.models["svc"].service is not None
    assert config.routing.use == "memory" and config.routing.compiled is not None
    # Every key was known: only llama-swap's unsupported ones warn.
    assert config.warnings == (
        "logTimeFormat: not supported by swapper; ignored",
        "models.a.compat: not supported by swapper; ignored",
    )
    unread = section.names - section.ignored - reads.get(section.names, set())
    assert sorted(unread) == []


def test_the_every_key_config_sets_every_declared_key() -> None:
    # So that the test above reads each key with a value, not only its absence.
    import yaml

    raw = yaml.safe_load(EVERY_KEY)
    model_keys_used = set(raw["models"]["a"]) | set(raw["models"]["svc"])
    # The legacy top-level groups and matrix cannot be combined with routing.router.
    assert sorted(top.TOP.names - set(raw)) == ["groups", "matrix"]
    assert sorted(model_keys.MODEL.names - model_keys_used) == []


def test_a_key_no_table_declares_cannot_be_read() -> None:
    tree = Tree(frozenset({"known"}), [("known", 1), ("other", 2)])
    assert tree.get("known") == 1 and tree["known"] == 1
    for read in (tree.get, tree.__getitem__, tree.pop):
        with pytest.raises(KeyError, match="'other' is read but not declared"):
            read("other")


def test_each_key_is_written_once_across_a_level() -> None:
    for section in SECTIONS.values():
        names = [key.name for key in section.keys]
        assert sorted({n for n in names if names.count(n) > 1}) == []
        assert section.names.isdisjoint(section.unsupported)


@dataclass
class _Record:
    max_wait: float
    cmd: str
    id: str


def test_a_table_that_disagrees_with_its_record_fails_when_built() -> None:
    def decode(value: object, path: str, ctx: object) -> object:
        return value

    good: Section[object] = Section((Key("maxWait", decode), Key("cmd", decode), *stages("macros")))
    check_record(_Record, [good], derived=("id",))
    with pytest.raises(TypeError, match=r"no row: \['cmd'\]"):
        check_record(_Record, [Section((Key("maxWait", decode),))], derived=("id",))
    with pytest.raises(TypeError, match=r"no such field: \['ttl'\]"):
        check_record(_Record, [good + Section((Key("ttl", decode),))], derived=("id",))
    with pytest.raises(TypeError, match=r"filled twice: \['cmd'\]"):
        check_record(_Record, [good + Section((Key("command", decode, ("cmd",)),))], derived=("id",))


def test_a_row_fills_the_field_named_after_its_key() -> None:
    def decode(value: object, path: str, ctx: object) -> object:
        return value

    assert Key("maxWait", decode).targets == ("max_wait",)
    assert Key("globalTTL", decode).targets == ("global_ttl",)
    assert Key("includeAliasesInList", decode).targets == ("include_aliases_in_list",)
    assert Key("setParamsByID", decode).targets == ("set_params_by_id",)
    assert Key("metricsMaxInMemory", decode, ("activity_records",)).targets == ("activity_records",)
    assert Key("models", spec.stage).targets == ()


# llama-swap's own keys (its config reference: top level and per model). None may warn as unknown.
_TOP_TEXT = """
healthCheckTimeout logLevel logTimeFormat logToStdout logRequests metricsMaxInMemory captureBuffer
store ui performance startPort sendLoadingState includeAliasesInList globalTTL unloadTimeout macros
apiKeys models profiles selectors peers upstream hooks routing groups matrix
"""
_MODEL_TEXT = """
cmd cmdStop proxy aliases env checkEndpoint ttl unloadTimeout unlisted useModelName name description
concurrencyLimit filters macros metadata sendLoadingState timeouts compat capabilities healthCheckTimeout
"""
LLAMA_SWAP_TOP = frozenset(_TOP_TEXT.split())
LLAMA_SWAP_MODEL = frozenset(_MODEL_TEXT.split())


def test_no_llama_swap_key_is_unknown() -> None:
    assert sorted(LLAMA_SWAP_TOP - top.TOP.names - top.TOP.unsupported) == []
    assert sorted(LLAMA_SWAP_MODEL - model_keys.MODEL.names - model_keys.MODEL.unsupported) == []


# --- unknown keys in nested sections ----------------------------------------------------------------

MODEL_A = "models:\n  a:\n    cmd: svr --port ${PORT}\n"


def _warnings(text: str) -> tuple[str, ...]:
    return parse_config(MODEL_A + textwrap.dedent(text)).warnings


def test_groups_under_routing_itself_is_an_unknown_key() -> None:
    # routing: {groups: ...} is neither llama-swap's legacy top-level groups nor
    # routing.router.settings.groups: it must not be taken silently (nor as groups).
    config = parse_config(MODEL_A + "routing:\n  groups:\n    g: {members: [a]}\n")
    assert config.warnings == ("routing.groups: unknown key; ignored",)
    assert [g.name for g in config.routing.groups] == ["(default)"]


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("routing: {router: {groups: {}}}", "routing.router.groups"),
        ("routing: {router: {settings: {group: {}}}}", "routing.router.settings.group"),
        ("groups: {g: {members: [a], swapp: true}}", "groups.g.swapp"),
        ("matrix: {sets: {s: a}, set: {}}", "matrix.set"),
        (
            "routing: {router: {use: memory, settings: {memory: {budget: 1}}}}",
            "routing.router.settings.memory.budget",
        ),
        (
            "routing: {router: {use: memory, settings: {memory: {gpus: {0: {budgett: 1}}}}}}",
            "routing.router.settings.memory.gpus.0.budgett",
        ),
        ("routing: {scheduler: {settings: {fifo: {prio: {}}}}}", "routing.scheduler.settings.fifo.prio"),
        ("upstream: {ignorePath: []}", "upstream.ignorePath"),
        ("hooks: {on_startup: {preloads: []}}", "hooks.on_startup.preloads"),
        ("timeouts: {conect: 1}", "timeouts.conect"),
        ("peers: {p: {proxy: 'http://h', models: [x], key: k}}", "peers.p.key"),
        ("peers: {p: {proxy: 'http://h', models: [x], timeouts: {conect: 1}}}", "peers.p.timeouts.conect"),
        ("selectors: {s: {strategy: pin, targets: [a], setting: {}}}", "selectors.s.setting"),
        ("profiles: {p: {pins: {x: a}, descr: d}}", "profiles.p.descr"),
    ],
)
def test_an_unknown_key_in_a_nested_section_warns_with_its_path(text: str, warning: str) -> None:
    assert f"{warning}: unknown key; ignored" in _warnings(text + "\n")


@pytest.mark.parametrize(
    ("body", "warning"),
    [
        ("memory: {estimat: 1}", "models.m.memory.estimat"),
        ("filters: {setParam: {}}", "models.m.filters.setParam"),
        ("timeouts: {hang: 1}", "models.m.timeouts.hang"),
        ("aliases: [{id: x, other: 1}]", "models.m.aliases[0].other"),
    ],
)
def test_an_unknown_key_in_a_model_section_warns_with_its_path(body: str, warning: str) -> None:
    text = f"models:\n  m:\n    cmd: svr --port ${{PORT}}\n    {body}\n"
    assert f"{warning}: unknown key; ignored" in parse_config(text).warnings
