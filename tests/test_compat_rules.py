"""Load, warn or reject: swapper's answer to a config, beside llama-swap's, case by case.

Each row is a small config and two outcomes: swapper's (``load``, ``warn``: loads with a warning,
or ``reject``) and what llama-swap's loader (``internal/config/load.go`` and the validators it
calls: ``peer.go``, ``selectors.go``, ``validateProfiles``, ``macros.go``) does with it. ``load``
and ``warn`` agree with llama-swap's ``load``. The rows where they disagree are exactly
``DIFFERENCES``, each with its reason; docs/operations.md lists the same.
"""

from __future__ import annotations

import textwrap

import pytest

from swapper.config.load import parse_config
from swapper.config.schema import ConfigError

M = "  m: {cmd: 'srv ${PORT}'}\n"
N = "  n: {cmd: 'srv ${PORT}', aliases: [nn]}\n"
MODELS = "models:\n" + M + N
PEER = "peers:\n  cloud: {proxy: 'https://api.example.com', models: [big, shared/one]}\n"

# (case id, config, swapper's outcome, llama-swap's outcome, text the message or a warning holds)
ROWS: list[tuple[str, str, str, str, str]] = [
    # -- llama-swap loads these; so does swapper, with a warning where it uses something differently
    ("group member not a model", MODELS + "groups: {g: {members: [m, ghost]}}\n", "warn", "load", "'ghost'"),
    ("group member an alias", MODELS + "groups: {g: {members: [nn]}}\n", "warn", "load", "alias of 'n'"),
    (
        "invalid matrix not in use",
        MODELS + "routing: {router: {use: group, settings: {matrix: {vars: {x: ghost}, sets: {s: x}}}}}\n",
        "warn",
        "load",
        "not in use",
    ),
    (
        "checkEndpoint a full URL",
        "models:\n  m: {cmd: 'srv ${PORT}', checkEndpoint: 'http://h:1/ok'}\n",
        "warn",
        "load",
        "'/ok'",
    ),
    (
        "checkEndpoint without a slash",
        "models:\n  m: {cmd: 'srv ${PORT}', checkEndpoint: health}\n",
        "load",
        "load",
        "",
    ),
    (
        "${...} in a metadata key",
        "models:\n  m: {cmd: 'srv ${PORT}', metadata: {'${k}': 1}}\n",
        "warn",
        "load",
        "${k}",
    ),
    ("an empty config", "", "warn", "load", "none defined"),
    ("peers only", PEER, "warn", "load", "only peers"),
    ("unknown top-level key", MODELS + "healthCheckTimout: 3\n", "warn", "load", "unknown key"),
    ("unknown logLevel", MODELS + "logLevel: loud\n", "warn", "load", "logLevel"),
    ("healthCheckTimeout under 15", MODELS + "healthCheckTimeout: 5\n", "warn", "load", "minimum of 15"),
    # swapper serves it as a pinned service it does not spawn (docs/broker.md)
    ("a model without cmd", "models:\n  m: {proxy: 'http://127.0.0.1:9'}\n", "load", "load", ""),
    (
        "preload of an unknown model",
        MODELS + "hooks: {on_startup: {preload: [ghost]}}\n",
        "warn",
        "load",
        "ghost",
    ),
    (
        "capabilities",
        "models:\n  m:\n    cmd: 'srv ${PORT}'\n"
        "    capabilities: {in: [text, image], out: [text], tools: true, context: 8192}\n",
        "load",
        "load",
        "",
    ),
    ("model timeouts", "models:\n  m: {cmd: 'srv ${PORT}', timeouts: {connect: 5}}\n", "load", "load", ""),
    (
        "compat.ignoreWebsockets",
        "models:\n  m: {cmd: 'srv ${PORT}', compat: {ignoreWebsockets: true}}\n",
        "warn",
        "load",
        "compat",
    ),
    ("performance", MODELS + "performance: {disabled: true}\n", "warn", "load", "performance"),
    ("logTimeFormat", MODELS + "logTimeFormat: rfc3339\n", "warn", "load", "logTimeFormat"),
    ("store.path", MODELS + "store: {path: /tmp/x.db}\n", "warn", "load", "store"),
    (
        "selector pinned to a peer model",
        MODELS + PEER + "selectors: {s: {strategy: pin, targets: [cloud/big]}}\n",
        "load",
        "load",
        "",
    ),
    (
        "selector: a bare peer model",
        MODELS + PEER + "selectors: {s: {strategy: pin, targets: [big]}}\n",
        "load",
        "load",
        "",
    ),
    (
        "spillover over a local model and a peer",
        MODELS
        + PEER
        + "selectors: {s: {strategy: spillover, targets: [m, cloud/big], settings: {spillover: 2}}}\n",
        "load",
        "load",
        "",
    ),
    (
        "spillover over a swap: false group",
        MODELS + "groups: {g: {swap: false, members: [m, n]}}\n"
        "selectors: {s: {strategy: spillover, targets: [m, nn]}}\n",
        "load",
        "load",
        "",
    ),
    (
        "warm over local models",
        MODELS + "selectors: {s: {strategy: warm, targets: [m, nn]}}\n",
        "load",
        "load",
        "",
    ),
    ("profile with a disabled pin", MODELS + "profiles: {p: {pins: {m: ~, x: n}}}\n", "load", "load", ""),
    (
        "profile pinned to a selector",
        MODELS + "selectors: {s: {strategy: pin, targets: [m]}}\nprofiles: {p: {pins: {x: s}}}\n",
        "load",
        "load",
        "",
    ),
    (
        "peer with every timeout",
        "peers:\n  p:\n    proxy: http://10.0.0.2:8080\n    apiKey: sk-1\n    models: [a]\n"
        "    timeouts:\n      {connect: 1, keepalive: 2, responseHeader: 3,\n"
        "       tlsHandshake: 4, idleConn: 5, expectContinue: 1}\n"
        "    filters: {stripParams: 'top_k', setParams: {temperature: 0.1}}\n",
        "warn",  # only "no models"
        "load",
        "only peers",
    ),
    # -- llama-swap rejects these; so does swapper
    ("startPort 0", MODELS + "startPort: 0\n", "reject", "reject", "startPort"),
    ("globalTTL negative", MODELS + "globalTTL: -1\n", "reject", "reject", "globalTTL"),
    ("unloadTimeout negative", MODELS + "unloadTimeout: -1\n", "reject", "reject", "unloadTimeout"),
    ("logToStdout unknown", MODELS + "logToStdout: file\n", "reject", "reject", "logToStdout"),
    (
        "an alias used twice",
        "models:\n  m: {cmd: 'srv ${PORT}', aliases: [x]}\n  n: {cmd: 'srv ${PORT}', aliases: [x]}\n",
        "reject",
        "reject",
        "'x'",
    ),
    ("model ttl negative", "models:\n  m: {cmd: 'srv ${PORT}', ttl: -5}\n", "reject", "reject", "ttl"),
    (
        "capabilities: unknown modality",
        "models:\n  m: {cmd: 'srv ${PORT}', capabilities: {in: [video]}}\n",
        "reject",
        "reject",
        "video",
    ),
    (
        "capabilities: negative context",
        "models:\n  m: {cmd: 'srv ${PORT}', capabilities: {context: -1}}\n",
        "reject",
        "reject",
        "context",
    ),
    (
        "setParamsByID key is another model",
        "models:\n  m: {cmd: 'srv ${PORT}', filters: {setParamsByID: {n: {a: 1}}}}\n" + N,
        "reject",
        "reject",
        "'n'",
    ),
    (
        "legacy groups beside routing.router",
        MODELS + "groups: {g: {members: [m]}}\nrouting: {router: {use: group}}\n",
        "reject",
        "reject",
        "legacy",
    ),
    (
        "use: matrix without a matrix",
        MODELS + "routing: {router: {use: matrix}}\n",
        "reject",
        "reject",
        "matrix",
    ),
    ("unknown router", MODELS + "routing: {router: {use: random}}\n", "reject", "reject", "random"),
    (
        "legacy groups and matrix",
        MODELS + "groups: {g: {members: [m]}}\nmatrix: {sets: {s: m}}\n",
        "reject",
        "reject",
        "matrix",
    ),
    ("invalid matrix in use", MODELS + "matrix: {sets: {s: 'm & ghost'}}\n", "reject", "reject", "ghost"),
    ("a member listed twice", MODELS + "groups: {g: {members: [m, m]}}\n", "reject", "reject", "twice"),
    (
        "a member in two groups",
        MODELS + "groups: {g: {members: [m]}, h: {members: [m]}}\n",
        "reject",
        "reject",
        "both groups",
    ),
    ("unknown scheduler", MODELS + "routing: {scheduler: {use: lifo}}\n", "reject", "reject", "lifo"),
    (
        "priority of an unknown model",
        MODELS + "routing: {scheduler: {settings: {fifo: {priority: {ghost: 1}}}}}\n",
        "reject",
        "reject",
        "ghost",
    ),
    ("an empty API key", MODELS + "apiKeys: ['']\n", "reject", "reject", "apiKeys"),
    ("an API key with a space", MODELS + "apiKeys: ['a b']\n", "reject", "reject", "apiKeys"),
    ("peer without proxy", MODELS + "peers: {p: {models: [a]}}\n", "reject", "reject", "peers.p.proxy"),
    (
        "peer without models",
        MODELS + "peers: {p: {proxy: 'http://h:1'}}\n",
        "reject",
        "reject",
        "peers.p.models",
    ),
    (
        "model id is a peer's full name",
        "models:\n  cloud/big: {cmd: 'srv ${PORT}'}\n" + PEER,
        "reject",
        "reject",
        "cloud/big",
    ),
    (
        "alias is a peer's full name",
        "models:\n  m: {cmd: 'srv ${PORT}', aliases: [cloud/big]}\n" + PEER,
        "reject",
        "reject",
        "cloud/big",
    ),
    (
        "two peers make one full name",
        MODELS
        + "peers:\n  a/b: {proxy: 'http://h:1', models: [c]}\n  a: {proxy: 'http://h:2', models: [b/c]}\n",
        "reject",
        "reject",
        "ambiguous",
    ),
    (
        "selector named like a model",
        MODELS + "selectors: {m: {strategy: pin, targets: [n]}}\n",
        "reject",
        "reject",
        "selectors.m",
    ),
    (
        "selector named like an alias",
        MODELS + "selectors: {nn: {strategy: pin, targets: [m]}}\n",
        "reject",
        "reject",
        "selectors.nn",
    ),
    (
        "selector without strategy",
        MODELS + "selectors: {s: {targets: [m]}}\n",
        "reject",
        "reject",
        "strategy",
    ),
    (
        "selector with an unknown strategy",
        MODELS + "selectors: {s: {strategy: best, targets: [m]}}\n",
        "reject",
        "reject",
        "best",
    ),
    ("selector without targets", MODELS + "selectors: {s: {strategy: pin}}\n", "reject", "reject", "targets"),
    (
        "selectors chained",
        MODELS + "selectors: {s: {strategy: pin, targets: [m]}, t: {strategy: pin, targets: [s]}}\n",
        "reject",
        "reject",
        "chain",
    ),
    (
        "selector target unknown",
        MODELS + "selectors: {s: {strategy: pin, targets: [ghost]}}\n",
        "reject",
        "reject",
        "ghost",
    ),
    (
        "warm over a peer model",
        MODELS + PEER + "selectors: {s: {strategy: warm, targets: [cloud/big]}}\n",
        "reject",
        "reject",
        "local",
    ),
    (
        "spillover 0",
        MODELS + "selectors: {s: {strategy: spillover, targets: [m], settings: {spillover: 0}}}\n",
        "reject",
        "reject",
        "spillover",
    ),
    (
        "spillover names a target twice",
        MODELS + "selectors: {s: {strategy: spillover, targets: [n, nn]}}\n",
        "reject",
        "reject",
        "twice",
    ),
    (
        "spillover over models that swap",
        MODELS + "selectors: {s: {strategy: spillover, targets: [m, n]}}\n",
        "reject",
        "reject",
        "swap: false",
    ),
    (
        "spillover outside one matrix set",
        MODELS + "matrix: {sets: {a: m, b: n}}\nselectors: {s: {strategy: spillover, targets: [m, n]}}\n",
        "reject",
        "reject",
        "matrix set",
    ),
    ("profile without pins", MODELS + "profiles: {p: {description: x}}\n", "reject", "reject", "pins"),
    (
        "profile pinned to an unknown model",
        MODELS + "profiles: {p: {pins: {x: ghost}}}\n",
        "reject",
        "reject",
        "ghost",
    ),
    (
        "profile pins as a list (old syntax)",
        MODELS + "profiles: {p: [m, n]}\n",
        "reject",
        "reject",
        "profiles.p",
    ),
    (
        "profile pin is a peer's full name",
        MODELS + PEER + "profiles: {p: {pins: {cloud/big: m}}}\n",
        "reject",
        "reject",
        "cloud/big",
    ),
    ("unknown macro", "models:\n  m: {cmd: 'srv ${PORT} ${nope}'}\n", "reject", "reject", "${nope}"),
    (
        "unset environment variable",
        "models:\n  m: {cmd: 'srv ${PORT} ${env.SWAPPER_TEST_UNSET_19}'}\n",
        "reject",
        "reject",
        "SWAPPER_TEST_UNSET_19",
    ),
    (
        "proxy uses ${PORT}, cmd does not",
        "models:\n  m: {cmd: 'srv 9', proxy: 'http://127.0.0.1:${PORT}'}\n",
        "reject",
        "reject",
        "${PORT}",
    ),
    ("a macro that names itself", "macros: {a: 'x ${a}'}\n" + MODELS, "reject", "reject", "macros.a"),
    ("a reserved macro name", "macros: {PORT: 1}\n" + MODELS, "reject", "reject", "PORT"),
    # -- where swapper and llama-swap disagree (DIFFERENCES says why)
    ("an empty cmd", "models:\n  m: {cmd: ''}\n", "reject", "load", "cmd"),
    (
        "an unparsable cmdStop",
        "models:\n  m: {cmd: 'srv ${PORT}', cmdStop: 'stop \"'}\n",
        "reject",
        "load",
        "cmdStop",
    ),
    ("performance.every under 5s", MODELS + "performance: {every: 1s}\n", "warn", "reject", "performance"),
]

DIFFERENCES = {
    "an empty cmd": "swapper fails at load what llama-swap fails at the model's first start",
    "an unparsable cmdStop": "llama-swap falls back to SIGTERM at stop; swapper says so at load",
    "performance.every under 5s": "swapper has no performance monitor: the section is ignored (a warning)",
}


def outcome(text: str) -> tuple[str, str]:
    try:
        config = parse_config(textwrap.dedent(text))
    except ConfigError as exc:
        return "reject", str(exc)
    return ("warn" if config.warnings else "load"), "\n".join(config.warnings)


@pytest.mark.parametrize(("case", "text", "ours", "theirs", "says"), ROWS, ids=[r[0] for r in ROWS])
def test_swapper_loads_warns_or_rejects(case: str, text: str, ours: str, theirs: str, says: str) -> None:
    got, message = outcome(text)
    assert got == ours, f"{case}: {message}"
    assert says in message, message


def test_the_only_disagreements_are_the_documented_ones() -> None:
    disagree = {case for case, _, ours, theirs, _ in ROWS if (ours == "reject") != (theirs == "reject")}
    assert disagree == set(DIFFERENCES)


def test_case_ids_are_unique() -> None:
    assert len({r[0] for r in ROWS}) == len(ROWS)
