"""Property-based tests (hypothesis): request model extraction, and the scheduler as a state machine.

Part 1, ``modelid.extract``: over random JSON, multipart, urlencoded and binary bodies, random
content types and queries, it returns a result or raises ``BadRequest``, nothing else; and when the
body is a well-formed JSON object, multipart form or urlencoded form naming a model, it finds it.

Part 2, ``Scheduler``: a random sequence of messages (acquire, release, client leaves, Started ok
or failed, stale Started, Stopped, child crash, child refusing connections, tick, time passing,
unload, config reload of one model, shutdown) is played
against the pure scheduler under a random planner (one at a time, disjoint, or a random symmetric
conflict graph). ``World`` stands in for the run loop and keeps the Effects contract the way
``runtime/runloop.py`` does: a start yields exactly one ``Started`` unless a stop cancels it (then the
``Started`` may already be in the inbox and arrive stale), a stop always yields one ``Stopped``, a
crash is reported only for a ready child, ``grant`` returns False once the requester left, and every
request is released exactly once. It checks after every message:

  * every request gets at most one grant-or-fail call, never one after its release, and a grant
    only for a model whose child is up;
  * the scheduler's in-flight and queued counts equal the world's (granted and not released;
    admitted, unanswered and not released);
  * the scheduler's states match the processes (ready ⇔ child up, stopping ⇔ stop outstanding,
    stopped ⇒ no process at all);
  * no two models the planner says conflict are both starting or ready, and a start is only
    issued once every conflicting model's process is gone (for one-at-a-time: at most one model
    starting or ready);
  * a model whose current child has requests in flight is stopped only by unload or shutdown
    (requests still counted against a child that already died do not hold its successor);
  * no start is issued inside a crash-loop backoff window (computed independently here: failed
    loads and crashes within STABLE_SECONDS of becoming ready count; a stable child clears it).

Liveness, checked at the end: once the world has delivered every outstanding ``Started`` (as
success) and ``Stopped``, and every client has released whatever it holds, no request is left
waiting: each request that was not released before its answer got exactly one grant or failure,
and the scheduler is idle (nothing queued, no swap, nothing in flight). Waiting requests that
need no further message to be answered must not exist, since nothing else would ever wake them.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapper.core.errors import BadRequest, ConcurrencyLimit, ModelLoadFailed, SwapperError
from swapper.core.scheduler import (
    BACKOFF_AFTER_FAILURES,
    BACKOFF_CAP,
    BACKOFF_FIRST,
    STABLE_SECONDS,
    Scheduler,
)
from swapper.core.states import State
from swapper.http import modelid
from tests.fakes import StubPlanner, config, model

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

# ---- Part 1: modelid.extract -----------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
queries = st.dictionaries(
    st.sampled_from(["model", "stream", "x"]),
    st.sampled_from(["", "q-model", "true", "TRUE ", "no"]),
    max_size=3,
)
methods = st.sampled_from(["POST", "PUT", "GET", "HEAD", "PATCH"])
boundaries = st.text(alphabet="abcXYZ019'()+_,-./:=?", min_size=1, max_size=40)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "",
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.api+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            'multipart/form-data; boundary=""',
            "text/plain",
            "application/octet-stream",
        ]
    ),
    boundaries.map(lambda b: f"multipart/form-data; boundary={b}"),
    boundaries.map(lambda b: f'multipart/form-data; charset=utf-8; boundary="{b}"'),
    st.text(max_size=60),
)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    value = draw(json_values)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def multipart_bodies(draw: st.DrawFn, boundary: str, fields: list[tuple[str, bytes]]) -> bytes:
    nl = draw(st.sampled_from([b"\r\n", b"\n"]))
    out = [draw(st.sampled_from([b"", b"preamble" + nl]))]
    for name, value in fields:
        disposition = f'Content-Disposition: form-data; name="{name}"'.encode()
        if draw(st.booleans()):
            disposition += b'; filename="f.bin"'
        headers = [disposition]
        if draw(st.booleans()):
            headers.append(b"Content-Type: application/octet-stream")
        out.append(b"--" + boundary.encode() + nl + nl.join(headers) + nl + nl + value + nl)
    out.append(b"--" + boundary.encode() + b"--" + nl)
    return b"".join(out)


def corrupt(data: st.DataObject, body: bytes) -> bytes:
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "none"]))
    if not body or how == "none":
        return body
    at = data.draw(st.integers(0, len(body) - 1))
    if how == "truncate":
        return body[:at]
    if how == "flip":
        return body[:at] + bytes([body[at] ^ data.draw(st.integers(1, 255))]) + body[at + 1 :]
    return body[:at] + data.draw(st.binary(min_size=1, max_size=8)) + body[at:]


def extract_or_bad_request(method: str, ctype: str | None, body: bytes, query: dict[str, str]) -> None:
    try:
        result = modelid.extract(method, ctype, body, query)
    except BadRequest as exc:
        assert exc.status == 400 and exc.message
        return
    assert result.model is None or (isinstance(result.model, str) and result.model)
    assert isinstance(result.stream, bool)


@FUZZ
@given(
    method=methods,
    ctype=content_types,
    body=st.one_of(st.binary(max_size=300), json_bodies(), st.text(max_size=200).map(str.encode)),
    query=queries,
)
def test_extract_raises_nothing_but_bad_request(
    method: str, ctype: str | None, body: bytes, query: dict[str, str]
) -> None:
    extract_or_bad_request(method, ctype, body, query)


model_names = st.text(min_size=1, max_size=30)


@FUZZ
@given(
    obj=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    name=model_names,
    stream=st.sampled_from([None, True, False, "true", 1]),
    ctype=st.sampled_from([None, "application/json", "application/json; charset=utf-8", "x/y+json"]),
    lead=st.sampled_from(["", " ", "\r\n\t "]),
    ascii_only=st.booleans(),
    query=queries,
)
def test_extract_finds_the_model_of_a_json_object(
    obj: dict[str, Any],
    name: str,
    stream: object,
    ctype: str | None,
    lead: str,
    ascii_only: bool,
    query: dict[str, str],
) -> None:
    obj = {**obj, "model": name}
    if stream is None:
        obj.pop("stream", None)
    else:
        obj["stream"] = stream
    body = (lead + json.dumps(obj, ensure_ascii=ascii_only)).encode("utf-8", "surrogatepass")
    got = modelid.extract("POST", ctype, body, query)
    assert got.model == name
    expected_stream = (
        (query.get("stream", "").strip().lower() == "true") if stream is None else stream is True
    )
    assert got.stream is expected_stream
    assert got.is_json


@FUZZ
@given(data=st.data(), boundary=boundaries, name=model_names, query=queries)
def test_extract_finds_the_model_of_a_multipart_form(
    data: st.DataObject, boundary: str, name: str, query: dict[str, str]
) -> None:
    value = name.encode("utf-8", "surrogatepass")
    fields = data.draw(
        st.lists(st.tuples(st.sampled_from(["file", "prompt", "x"]), st.binary(max_size=64)), max_size=3)
    )
    at = data.draw(st.integers(0, len(fields)))
    fields.insert(at, ("model", value))
    if data.draw(st.booleans()):
        fields.append(("model", b"second-model"))  # the first occurrence wins
    body = data.draw(multipart_bodies(boundary, fields))
    # A value that happens to contain the delimiter would end its part early: not a valid form.
    if any(b"\n--" + boundary.encode() in v for _, v in fields):
        return
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(BadRequest):
            modelid.extract("POST", f"multipart/form-data; boundary={boundary}", body, query)
        return
    got = modelid.extract("POST", f'multipart/form-data; boundary="{boundary}"', body, query)
    assert got.model == name


@FUZZ
@given(
    pairs=st.lists(st.tuples(st.sampled_from(["prompt", "x", "stream"]), st.text(max_size=10)), max_size=4),
    name=st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s),
    at=st.integers(0, 4),
    query=queries,
)
def test_extract_finds_the_model_of_a_urlencoded_form(
    pairs: list[tuple[str, str]], name: str, at: int, query: dict[str, str]
) -> None:
    pairs = list(pairs)
    pairs.insert(min(at, len(pairs)), ("model", name))
    try:
        body = urlencode(pairs).encode()
    except UnicodeEncodeError:
        return  # a lone surrogate cannot be percent-encoded as UTF-8
    got = modelid.extract("POST", "application/x-www-form-urlencoded", body, query)
    assert got.model == name


@FUZZ
@given(data=st.data(), boundary=boundaries, query=queries)
def test_extract_on_corrupted_bodies_raises_nothing_but_bad_request(
    data: st.DataObject, boundary: str, query: dict[str, str]
) -> None:
    kind = data.draw(st.sampled_from(["json", "multipart", "urlencoded"]))
    if kind == "json":
        ctype: str = "application/json"
        obj = data.draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
        body = json.dumps({**obj, "model": data.draw(model_names)}).encode("utf-8", "surrogatepass")
    elif kind == "multipart":
        ctype = f"multipart/form-data; boundary={boundary}"
        fields = [("model", b"m"), ("file", data.draw(st.binary(max_size=64)))]
        body = data.draw(multipart_bodies(boundary, fields))
    else:
        ctype = "application/x-www-form-urlencoded"
        body = b"model=m&prompt=" + data.draw(st.binary(max_size=32))
    extract_or_bad_request("POST", ctype, corrupt(data, body), query)


# ---- Part 2: the scheduler as a state machine ----------------------------------------------------

MODELS = ("a", "b", "c", "d")
GHOST = "ghost"  # not configured


class World:
    """The run loop as the scheduler sees it (its ``Effects``), plus clients and child processes."""

    def __init__(
        self, cfg: Any, conflicts: dict[str, frozenset[str]], planner: StubPlanner, rnd: random.Random
    ):
        self.conflicts = conflicts
        self.rnd = rnd
        self.now = 0.0
        self.cfg = cfg
        self.planner = planner
        self.sched = Scheduler(cfg, planner, self)
        self.models = tuple(cfg.models)
        # clients
        self.next_id = 0
        self.model_of: dict[int, str] = {}
        self.calls: Counter[int] = Counter()  # grant-or-fail calls per request
        self.waiting: set[int] = set()  # admitted or not, unanswered, not released
        self.gone: set[int] = set()  # the client left (its future is cancelled), release pending
        self.released: set[int] = set()
        self.released_unanswered: set[int] = set()
        self.in_flight: dict[int, str] = {}  # granted and not released
        # Which child served it: a request in flight on a child that has since died (crashed or
        # unloaded) is no reason to keep the model's next child alive; its proxy fails anyway.
        self.served_by: dict[int, int] = {}
        self.incarnation: Counter[str] = Counter()  # bumped each time a child comes up
        # child processes
        self.loading: dict[str, int] = {}  # model -> start_id: spawned, Started not delivered
        self.stale: list[tuple[str, int]] = []  # Started already posted when a stop cancelled it
        self.stopping: set[str] = set()  # stop issued, Stopped not delivered
        self.up: set[str] = set()  # healthy and not being stopped
        # crash-loop oracle
        self.failures: Counter[str] = Counter()
        self.last_failure: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}  # a quick crash after this counts as a failure
        self.admin = False  # inside unload/shutdown: stopping a busy model is allowed

    # ---- Effects ----

    def start_child(self, model: str, start_id: int) -> None:
        assert model not in self.loading and model not in self.up and model not in self.stopping, model
        for other in self.conflicts[model]:
            assert other not in self.loading and other not in self.up and other not in self.stopping, (
                f"start of {model} while conflicting {other} still has a process"
            )
        n = self.failures[model]
        if n >= BACKOFF_AFTER_FAILURES:
            window = min(BACKOFF_FIRST * 2.0 ** (n - BACKOFF_AFTER_FAILURES), BACKOFF_CAP)
            assert self.now >= self.last_failure[model] + window, f"start of {model} inside its backoff"
        self.loading[model] = start_id

    def stop_child(self, model: str, grace: float, *, cut: bool = True) -> None:
        assert model not in self.stopping, f"second stop of {model}"
        if not self.admin and model in self.up:
            busy = [
                r
                for r, m in self.in_flight.items()
                if m == model and self.served_by[r] == self.incarnation[m]
            ]
            assert not busy, f"busy {model} stopped"
        if model in self.loading:  # the run loop cancels the start task...
            start_id = self.loading.pop(model)
            if self.rnd.random() < 0.4:  # ...whose Started may already be in the inbox
                self.stale.append((model, start_id))
        self.up.discard(model)
        self.stopping.add(model)

    def grant(self, req_id: int, model: str) -> bool:
        self._answer(req_id)
        assert self.model_of[req_id] == model
        assert model in self.up, f"grant of {req_id} to {model}, whose child is not up"
        if req_id in self.gone:
            return False
        self.in_flight[req_id] = model
        self.served_by[req_id] = self.incarnation[model]
        return True

    def fail(self, req_id: int, error: SwapperError) -> None:
        if isinstance(error, ConcurrencyLimit):
            # Only when the model's limit is really taken, by requests neither answered with an
            # error nor released: a leaked admission would refuse requests for good.
            model = self.model_of[req_id]
            held = {
                r for r in self.waiting | self.in_flight.keys() if r != req_id and self.model_of[r] == model
            }
            assert len(held) >= self.cfg.models[model].concurrency_limit, (
                f"{model}: 429 with {len(held)} held"
            )
        self._answer(req_id)
        assert isinstance(error, SwapperError) and 400 <= error.status < 600

    def _answer(self, req_id: int) -> None:
        assert req_id not in self.released, f"answer to released request {req_id}"
        self.calls[req_id] += 1
        assert self.calls[req_id] == 1, f"request {req_id} answered twice"
        self.waiting.discard(req_id)

    # ---- messages: each one is delivered, then every invariant is checked ----

    def acquire(self, model: str) -> None:
        self.next_id += 1
        self.model_of[self.next_id] = model
        self.waiting.add(self.next_id)
        self.sched.on_acquire(self.next_id, model, self.now)

    def acquire_now(self, model: str) -> None:
        """The front door's fast path: granted at once, exactly when an Acquire would be."""
        self.next_id += 1
        self.model_of[self.next_id] = model
        would = self.sched.serves_now(model, self.now)
        before = (self.sched.status(self.now), self.sched.queue_position(self.next_id))
        if self.sched.admit_now(self.next_id, model, self.now):
            assert would, f"admit_now took {model} when serves_now said no"
            self.waiting.add(self.next_id)
            assert self.grant(self.next_id, model)  # the same checks as a grant by Effects
        else:
            assert not would, f"admit_now refused {model} when serves_now said yes"
            assert (self.sched.status(self.now), self.sched.queue_position(self.next_id)) == before
            del self.model_of[self.next_id]  # it never entered (the client goes on to acquire)

    def release_now(self, req_id: int) -> None:
        """The run loop's fast release: the same outcome as a Release, or nothing changed."""
        before = self.sched.status(self.now)
        if not self.sched.release_now(req_id, self.now):
            assert self.sched.status(self.now) == before, "release_now refused but changed something"
            self.release(req_id)  # the run loop then posts the Release
            return
        assert self.in_flight.get(req_id) is not None, f"release_now took {req_id}, not in flight"
        self.released.add(req_id)
        self.gone.discard(req_id)
        del self.in_flight[req_id]

    def release(self, req_id: int) -> None:
        if req_id in self.waiting:
            self.released_unanswered.add(req_id)
            self.waiting.discard(req_id)
        self.released.add(req_id)
        self.gone.discard(req_id)
        self.in_flight.pop(req_id, None)
        self.sched.on_release(req_id, self.now)

    def started(self, model: str, ok: bool) -> None:
        start_id = self.loading.pop(model)
        if ok:
            self.up.add(model)
            self.incarnation[model] += 1
            self.ready_at[model] = self.now  # the count stays until the child proves stable
            error = None
        else:
            self.failures[model] += 1
            self.last_failure[model] = self.now
            error = ModelLoadFailed(f"{model} exited with code 1 while loading")
        self.sched.on_started(model, start_id, error, self.now)

    def started_stale(self, index: int, ok: bool) -> None:
        model, start_id = self.stale.pop(index)
        before = {m: self.sched.state(m) for m in self.models}
        self.sched.on_started(model, start_id, None if ok else ModelLoadFailed("stale"), self.now)
        assert {m: self.sched.state(m) for m in self.models} == before, "a stale Started changed state"

    def stopped(self, model: str) -> None:
        self.stopping.discard(model)
        self._life_ended(model, crashed=False)
        self.sched.on_stopped(model, self.now)

    def crash(self, model: str) -> None:
        self.up.discard(model)
        self._life_ended(model, crashed=True)
        self.sched.on_child_exited(model, self.now)

    def unreachable(self, model: str) -> None:
        """A request found the ready child refusing connections: it is stopped (a stop that may
        hit a busy model, like an unload) and counts as a quick crash."""
        self._life_ended(model, crashed=True)
        self.admin = True
        self.sched.on_unreachable(model, self.now)
        self.admin = False
        assert model in self.stopping, f"unreachable {model} was not stopped"

    def _life_ended(self, model: str, *, crashed: bool) -> None:
        ready_at = self.ready_at.pop(model, None)
        if ready_at is None:
            return
        if self.now - ready_at >= STABLE_SECONDS:
            self.failures[model] = 0
        elif crashed:
            self.failures[model] += 1
            self.last_failure[model] = self.now

    def unload(self, models: list[str]) -> None:
        self.admin = True
        self.sched.on_unload(models, self.now)
        self.admin = False

    def reload(self, model: str) -> None:
        """A config reload that changes ``model`` only (a busy one retires once drained)."""
        changed = dataclasses.replace(self.cfg.models[model], cmd_text=self.cfg.models[model].cmd_text + "'")
        self.cfg = dataclasses.replace(self.cfg, models={**self.cfg.models, model: changed})
        self.failures[model] = 0  # a changed model deserves a fresh start
        assert self.sched.on_reload(self.cfg, self.planner, self.now) == {model}

    def shutdown(self) -> None:
        self.admin = True
        self.sched.on_shutdown(self.now)
        self.admin = False

    # ---- invariants ----

    def check(self) -> None:
        status = self.sched.status(self.now)
        for m in self.models:
            st_ = status[m]
            in_flight = sum(1 for owner in self.in_flight.values() if owner == m)
            assert st_.in_flight == in_flight, (m, st_, in_flight)
            waiting = sum(1 for r in self.waiting if self.model_of[r] == m)
            assert st_.queued == waiting, (m, st_, waiting)
            state = st_.state
            assert (state is State.READY) == (m in self.up), (m, state, self.up)
            assert (state is State.STOPPING) == (m in self.stopping), (m, state, self.stopping)
            if m in self.loading:
                assert state is State.STARTING, (m, state)
            if state is State.STOPPED:
                assert m not in self.loading and m not in self.up and m not in self.stopping
        live = [m for m in self.models if status[m].state in (State.STARTING, State.READY)]
        for i, x in enumerate(live):
            for y in live[i + 1 :]:
                assert y not in self.conflicts[x], (
                    f"conflicting {x} and {y} both {status[x].state}/{status[y].state}"
                )

    def settle(self) -> None:
        """Delivers everything outstanding and releases every lease until nothing is left to do."""
        for _ in range(500):
            if self.gone or self.in_flight:
                self.release(min([*self.gone, *self.in_flight]))
            elif self.stale:
                self.started_stale(0, ok=True)
            elif self.stopping:
                self.stopped(min(self.stopping))
            elif self.loading:
                self.started(min(self.loading), ok=True)
            else:
                return
            self.check()
        pytest.fail("the world never came to rest")


DTS = (0.05, 0.5, 1.0, 2.5, 10.0, 40.0)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n = draw(st.integers(2, len(MODELS)))
    names = MODELS[:n]
    models = [
        model(
            m,
            concurrency_limit=draw(st.sampled_from([1, 2, 3, 1000])),
            max_wait=draw(st.sampled_from([0.0, 1.0, 5.0, 60.0])),
            ttl=draw(st.sampled_from([0.0, 0.0, 2.0, 5.0])),
            priority=draw(st.integers(0, 2)),
        )
        for m in names
    ]
    cfg = config(*models, max_queued=draw(st.integers(1, 8)))
    kind = draw(st.sampled_from(["one-at-a-time", "disjoint", "graph"]))
    if kind == "one-at-a-time":
        conflicts = {m: frozenset(set(names) - {m}) for m in names}
        planner = StubPlanner()
    else:
        edges: set[frozenset[str]] = set()
        if kind == "graph":
            pairs = [frozenset((x, y)) for i, x in enumerate(names) for y in names[i + 1 :]]
            edges = draw(st.sets(st.sampled_from(pairs)))
        conflicts = {m: frozenset(x for e in edges if m in e for x in e if x != m) for m in names}
        planner = StubPlanner(dict(conflicts))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    return World(cfg, conflicts, planner, rnd)


Action = tuple[str, Any]


def enabled(world: World) -> list[Action]:
    """Every message the world could deliver next, from its current state."""
    actions: list[Action] = [("acquire", m) for m in world.models for _ in range(2)]
    actions.append(("acquire", GHOST))
    actions += [("acquire_now", m) for m in world.models]
    actions += [(kind, r) for r in sorted(world.in_flight) for kind in ("finish", "finish_now")]
    unanswered = sorted(world.waiting - world.gone)
    actions += [("leave", r) for r in unanswered] + [("leave_and_release", r) for r in unanswered]
    actions += [("release", r) for r in sorted(world.gone)]
    actions += [(kind, m) for m in sorted(world.loading) for kind in ("started_ok", "started_fail")]
    actions += [(kind, i) for i in range(len(world.stale)) for kind in ("stale_ok", "stale_fail")]
    actions += [("stopped", m) for m in sorted(world.stopping)]
    actions += [("crash", m) for m in sorted(world.up)]
    actions += [("unreachable", m) for m in sorted(world.up)]
    actions += [("tick", dt) for dt in DTS[::2]] + [("advance", dt) for dt in DTS[1::2]]
    actions += [("unload", (m,)) for m in world.models[:2]] + [("unload", world.models)]
    actions += [("reload", m) for m in world.models[:2]]
    return actions


def play(world: World, action: Action) -> None:
    kind, arg = action
    if kind == "acquire":
        world.acquire(arg)
    elif kind == "acquire_now":
        world.acquire_now(arg)
    elif kind in ("finish", "release"):
        world.release(arg)
    elif kind == "finish_now":
        world.release_now(arg)
    elif kind == "leave":
        world.gone.add(arg)  # its Release comes later; other messages may be handled first
    elif kind == "leave_and_release":
        world.gone.add(arg)
        world.release(arg)
    elif kind in ("started_ok", "started_fail"):
        world.started(arg, ok=kind == "started_ok")
    elif kind in ("stale_ok", "stale_fail"):
        world.started_stale(arg, ok=kind == "stale_ok")
    elif kind == "stopped":
        world.stopped(arg)
    elif kind == "crash":
        world.crash(arg)
    elif kind == "unreachable":
        world.unreachable(arg)
    elif kind == "tick":
        world.now += arg
        world.sched.on_tick(world.now)
    elif kind == "advance":
        world.now += arg
    elif kind == "unload":
        world.unload(list(arg))
    elif kind == "reload":
        world.reload(arg)
    else:
        raise AssertionError(kind)


def run_script(world: World, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(10, 120), label="steps")):
        play(world, data.draw(st.sampled_from(enabled(world))))
        world.check()


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
def test_scheduler_keeps_its_invariants_under_random_messages(world: World, data: st.DataObject) -> None:
    run_script(world, data)
    world.settle()
    # Liveness: nothing outstanding, yet nobody left waiting.
    assert not world.waiting, f"requests left waiting forever: {sorted(world.waiting)}"
    for req_id in world.model_of:
        if req_id not in world.released_unanswered:
            assert world.calls[req_id] == 1, f"request {req_id} got {world.calls[req_id]} answers"
    assert world.sched.is_idle()
    for m, st_ in world.sched.status(world.now).items():
        assert st_.in_flight == 0 and st_.queued == 0, (m, st_)


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
def test_scheduler_shutdown_after_random_messages_stops_everything(world: World, data: st.DataObject) -> None:
    run_script(world, data)
    world.shutdown()
    world.check()
    assert not world.waiting, "shutdown left requests waiting"
    world.settle()
    assert world.sched.all_stopped(world.models)
    world.acquire(world.models[0])
    assert world.calls[world.next_id] == 1  # refused at once


def test_unload_of_a_model_retiring_after_a_reload_stops_it_once() -> None:
    """Found by the state machine: reload (b busy, so it retires), unload b, b's request ends.

    The unload stopped b and the drain after the release stopped it again; the second Stopped
    would then have marked b's next child stopped while it ran.
    """
    world = World(
        config(model("a"), model("b")),
        {"a": frozenset("b"), "b": frozenset("a")},
        StubPlanner(),
        random.Random(0),
    )
    world.acquire("b")
    world.started("b", ok=True)
    world.acquire("a")  # queued: b is busy
    world.reload("b")
    world.unload(["b"])
    world.release(1)  # raised "second stop of b" before the fix
    world.check()
    world.settle()
    assert not world.waiting and world.sched.is_idle()


def test_world_catches_a_double_answer() -> None:
    """The oracle itself: a scheduler that answered twice would be caught."""
    world = World(config(model("a")), {"a": frozenset()}, StubPlanner({}), random.Random(0))
    world.acquire("a")
    world.fail(1, ModelLoadFailed("x"))
    with pytest.raises(AssertionError, match="answered twice"):
        world.fail(1, ModelLoadFailed("x"))


def test_world_catches_a_busy_stop() -> None:
    world = World(config(model("a")), {"a": frozenset()}, StubPlanner({}), random.Random(0))
    world.acquire("a")
    world.started("a", ok=True)
    with pytest.raises(AssertionError, match="busy a stopped"):
        world.stop_child("a", 1.0)
    assert dataclasses.is_dataclass(world.sched.status(0.0)["a"])
