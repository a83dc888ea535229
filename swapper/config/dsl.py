"""The swap-matrix DSL: tokenizer, parser, compiler and the projected query the solver asks.

Owns: nothing mutable. A ``CompiledMatrix`` is immutable once ``compile_matrix`` returns, so the
config loader may build it at load time and the matrix planner may share it freely. Everything
here is pure: no logging, no I/O, no clock.

Grammar
-------
A set is written as an expression over model identifiers::

    expr := and ("|" and)*
    and  := atom ("&" atom)*
    atom := IDENT | "+" SETNAME | "(" expr ")"

``&`` binds tighter than ``|``. ``IDENT`` and ``SETNAME`` are runs of Unicode letters and digits,
``_``, ``.`` and ``-``; ``/`` and ``:`` are not identifier characters, so a model id such as
``org/model:q4`` has to be named through a var. ``+name`` (no space after ``+``) inlines another
set. An identifier names a var first and a model id second, never an alias.

A leaf ``m`` allows the single combination ``{m}``; ``x | y`` allows the combinations of either
side; ``x & y`` allows the union of every pair (the Cartesian product). Duplicates collapse, so
``a & a`` is ``{a}``. A combination lists models that may run *together*; any subset of it may.

Errors are ``DslError`` (a ``ValueError``). Each message starts with ``set "<name>":`` and ends
with ``at position N``, where N is the 0-based character offset into that set's DSL text.

Normal form
-----------
Each set compiles to a sum of products that is never multiplied out. An ``Alt`` is an ordered
tuple of alternatives; each alternative is a ``Prod``: a set of fixed models (``atoms``) and an
ordered tuple of factors, each factor again an ``Alt`` with at least two alternatives. Nested
``|`` is flattened, single-alternative factors are merged into their product, and a ``+ref``
becomes a pointer to the referenced set's compiled ``Alt``, so the compiled form is a DAG whose
size is linear in the DSL text (an ``|`` that inlines a referenced set's alternatives copies a
tuple of pointers, never a subtree). Expansion order, which decides ties, is the order of the
source: alternatives left to right, products lexicographic over their factors left to right, as
in ``"(a | b) & (c | d)"`` -> ``{a,c} {a,d} {b,c} {b,d}``.

The projected query
-------------------
The solver's question is: for target ``t`` and running set ``R``, which allowed combination
containing ``t`` keeps the most (cost-weighted) of ``R``, the first one in expansion order on a
tie? Only the models of ``U = R | {t}`` matter, so ``CompiledMatrix.project`` evaluates the DAG on
bitmasks over ``U``: a leaf outside ``U`` is the empty mask, ``|`` concatenates, ``&`` ORs pairs.
At every node the list of states is kept in expansion order and a state is dropped when an
*earlier* state is a superset of it (equal included). That is exact: every dropped occurrence
has an earlier occurrence that keeps at least as much of ``U``; if that one keeps strictly more
of ``R`` it costs strictly less (costs are positive), and if it keeps the same it is the earlier
of two equal candidates. Either way the first minimum of the full expansion survives, and the
surviving states stay in expansion order, so ties still resolve to the first one found. (Letting
a *later* superset evict an earlier subset would be cheaper but would change tie-breaks.)

The solver also passes weights: each running model's cost, and for ``t`` more than all of them
together, so "heaviest" means "holds t, then cheapest". A factor of a product whose relevant
models appear nowhere else in the combination being built (not in its product's atoms or other
factors, nor in those of any enclosing product) adds its weight independently of the rest, so
only its first heaviest state can be part of the first heaviest combination and the others are
cut there. That is what keeps ``(l0 | ... | l99) & (r0 | ... | r99)`` linear even when all 200
models run. Whether a factor is independent depends on its context, so the memo is keyed by the
node and the part of the context's models the node itself can mention.

Complexity. Parsing and compiling are linear in the total DSL text, plus the pointer tuples of
inlined alternatives (quadratic only for long chains of sets that each ``|`` the previous one).
A query visits each DAG node once per distinct relevant context (in practice once), and answers
a node whose model support is disjoint from ``U`` in O(min(|support|, |U|)) without descending.
With ``W`` the longest state list, a product step costs O(W^2) unions plus O(W) superset checks
per union, so a query is O(nodes * W^3) in the worst case. ``W`` is at most 2^|U| but in practice
tiny: ``U`` is the handful of models running at once, a subtree without them is one empty state,
and independent choices collapse to one state. Masks are Python ints, so there is no limit on
the number of models (more than 64 relevant models work).
``expand`` materialises every combination and is exponential in the number of factors: it is
for tests and small configs only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

_PunctKind = Literal["&", "|", "(", ")"]
_PUNCT: dict[str, _PunctKind] = {"&": "&", "|": "|", "(": "(", ")": ")"}


@dataclass(frozen=True, slots=True)
class MatrixConfig:
    """``routing.router.settings.matrix`` as decoded; ``compile_matrix`` checks it against the models."""

    vars: Mapping[str, str] = field(default_factory=dict)  # short name -> model id
    evict_costs: Mapping[str, int] = field(default_factory=dict)  # model id -> cost (vars resolved)
    sets: tuple[tuple[str, str], ...] = ()  # (set name, DSL text) in definition order


class DslError(ValueError):
    """A matrix definition that does not compile; ``set_name``/``position`` locate it when known."""

    def __init__(self, message: str, *, set_name: str | None = None, position: int | None = None):
        if position is not None:
            message = f"{message} at position {position}"
        if set_name is not None:
            message = f"set {_quote(set_name)}: {message}"
        super().__init__(message)
        self.set_name = set_name
        self.position = position


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
# Tokens and syntax tree


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["ident", "ref", "end"] | _PunctKind
    text: str
    pos: int


@dataclass(frozen=True, slots=True)
class Ident:
    name: str
    pos: int


@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    pos: int


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Expr, ...]


Expr = Ident | Ref | Or | And


def _is_ident_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_.-"


def _scan_word(text: str, start: int) -> int:
    end = start
    while end < len(text) and _is_ident_char(text[end]):
        end += 1
    return end


def _tokenize(text: str, set_name: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _PUNCT:
            tokens.append(_Token(_PUNCT[ch], ch, i))
            i += 1
        elif ch == "+":
            end = _scan_word(text, i + 1)
            if end == i + 1:
                raise DslError("'+' must be followed by a set name", set_name=set_name, position=i)
            tokens.append(_Token("ref", text[i + 1 : end], i))
            i = end
        elif _is_ident_char(ch):
            end = _scan_word(text, i)
            tokens.append(_Token("ident", text[i:end], i))
            i = end
        else:
            raise DslError(f"unexpected character {ch!r}", set_name=set_name, position=i)
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    """Recursive descent over the token list; one instance parses one set's text."""

    def __init__(self, text: str, set_name: str) -> None:
        self._set = set_name
        self._tokens = _tokenize(text, set_name)
        self._i = 0

    def parse(self) -> Expr:
        if self._peek().kind == "end":
            raise self._error("empty expression", self._peek())
        expr = self._expr()
        if self._peek().kind != "end":
            raise self._unexpected(self._peek())
        return expr

    def _peek(self) -> _Token:
        return self._tokens[self._i]

    def _next(self) -> _Token:
        token = self._tokens[self._i]
        self._i += 1
        return token

    def _error(self, message: str, token: _Token) -> DslError:
        return DslError(message, set_name=self._set, position=token.pos)

    def _unexpected(self, token: _Token) -> DslError:
        if token.kind == "end":
            return self._error("unexpected end of expression", token)
        return self._error(f"unexpected token {token.text!r}", token)

    def _expr(self) -> Expr:
        items = [self._and()]
        while self._peek().kind == "|":
            self._next()
            items.append(self._and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def _and(self) -> Expr:
        items = [self._atom()]
        while self._peek().kind == "&":
            self._next()
            items.append(self._atom())
        return items[0] if len(items) == 1 else And(tuple(items))

    def _atom(self) -> Expr:
        token = self._next()
        if token.kind == "ident":
            return Ident(token.text, token.pos)
        if token.kind == "ref":
            return Ref(token.text, token.pos)
        if token.kind != "(":
            raise self._unexpected(token)
        if self._peek().kind == ")":
            raise self._error("empty parentheses '()'", token)
        inner = self._expr()
        close = self._peek()
        if close.kind == "end":
            raise self._error("missing closing parenthesis for '('", token)
        if close.kind != ")":
            raise self._unexpected(close)
        self._next()
        return inner


def parse(text: str, set_name: str = "<expr>") -> Expr:
    """Parses one set's DSL text into a syntax tree; identifiers are not resolved yet."""
    return _Parser(text, set_name).parse()


# ---------------------------------------------------------------------------------------------
# Normal form


@dataclass(frozen=True, slots=True, eq=False)
class Prod:
    """One alternative: every model in ``atoms`` plus one choice from each factor."""

    atoms: frozenset[str]
    factors: tuple[Alt, ...]
    models: frozenset[str]  # every model this product can mention


@dataclass(frozen=True, slots=True, eq=False)
class Alt:
    """An ordered choice between products (a set's compiled root is an ``Alt``)."""

    options: tuple[Prod, ...]
    models: frozenset[str]


def _leaf(model: str) -> Alt:
    one = frozenset((model,))
    return Alt((Prod(one, (), one),), one)


def _union(alts: Sequence[Alt]) -> Alt:
    options = tuple(p for a in alts for p in a.options)
    return Alt(options, frozenset().union(*(a.models for a in alts)))


def _product(alts: Sequence[Alt]) -> Alt:
    atoms: set[str] = set()
    factors: list[Alt] = []
    for alt in alts:
        if len(alt.options) == 1:
            atoms.update(alt.options[0].atoms)
            factors.extend(alt.options[0].factors)
        else:
            factors.append(alt)
    if not atoms and len(factors) == 1:
        return factors[0]
    models = frozenset().union(*(a.models for a in alts))
    return Alt((Prod(frozenset(atoms), tuple(factors), models),), models)


# ---------------------------------------------------------------------------------------------
# Compilation


@dataclass(frozen=True, slots=True)
class CompiledMatrix:
    """The compiled sets, in solve order, with the eviction costs the solver needs."""

    order: tuple[str, ...]  # compiled order: referenced sets first, else definition order
    texts: Mapping[str, str]  # set name -> DSL text, for logs
    roots: Mapping[str, Alt]
    evict_costs: Mapping[str, int]  # model id -> cost; absent means 1

    def cost(self, model: str) -> int:
        return self.evict_costs.get(model, 1)

    def mentions(self, set_name: str, model: str) -> bool:
        return model in self.roots[set_name].models

    def project(
        self, set_name: str, universe: Sequence[str], weights: Sequence[int] | None = None
    ) -> list[int]:
        """The set's combinations projected onto ``universe``, as bitmasks (bit i = universe[i]).

        In expansion order, with every state that an earlier state covers dropped (see the
        module docstring). With positive ``weights`` (one per universe entry), a choice whose
        models nothing else in its combination mentions is cut to its first heaviest state:
        the list then still holds the first maximal-weight combination, but no longer all of
        the maximal ones. Either way this is not a full expansion.
        """
        index = {model: 1 << i for i, model in enumerate(universe)}
        return _Projector(index, weights).alt(self.roots[set_name], 0)

    def can_contain_all(self, models: Collection[str]) -> bool:
        """Whether some combination of some set contains every model in ``models``."""
        return self.first_set_holding(models) is not None

    def first_set_holding(self, models: Collection[str]) -> str | None:
        """The first set, in compiled order, with a combination containing all of ``models``."""
        universe = tuple(dict.fromkeys(models))
        full = (1 << len(universe)) - 1
        ones = [1] * len(universe)
        for name in self.order:
            if full in self.project(name, universe, ones):
                return name
        return None

    def expand(self, set_name: str) -> list[tuple[str, ...]]:
        """Every combination of the set, each sorted, duplicates collapsed, in expansion order.

        Exponential in the number of factors: for tests and small configs only.
        """
        return [tuple(sorted(c)) for c in _expand_alt(self.roots[set_name])]


class _Projector:
    """One query's evaluation: bitmask states over the relevant models, memoised per node.

    ``outside`` is the mask of relevant models that the rest of the enclosing combination may
    hold (atoms and sibling factors of every enclosing product). A factor whose own relevant
    models are disjoint from it adds its weight independently of everything else, so with
    weights only its first heaviest state can be part of the first heaviest combination.
    """

    def __init__(self, index: Mapping[str, int], weights: Sequence[int] | None) -> None:
        self._index = index
        self._weights = weights
        self._relevant = frozenset(index)
        self._rel: dict[int, int] = {}
        self._memo: dict[tuple[int, int], list[int]] = {}

    def rel(self, node: Alt | Prod) -> int:
        """The mask of the relevant models ``node`` can mention."""
        mask = self._rel.get(id(node))
        if mask is None:
            mask = 0
            for model in self._relevant & node.models:
                mask |= self._index[model]
            self._rel[id(node)] = mask
        return mask

    def alt(self, node: Alt, outside: int) -> list[int]:
        rel = self.rel(node)
        if not rel:
            return [0]
        key = (id(node), outside & rel)  # only the overlap with this node changes its answer
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        states: list[int] = []
        for option in node.options:
            for state in self._prod(option, key[1]):
                _add_state(states, state)
        self._memo[key] = states
        return states

    def _prod(self, node: Prod, outside: int) -> list[int]:
        base = 0
        for model in node.atoms:
            base |= self._index.get(model, 0)
        rels = [self.rel(factor) for factor in node.factors]
        others = _or_of_others(rels)
        states = [base]
        for factor, rel, other in zip(node.factors, rels, others, strict=True):
            around = outside | base | other
            choices = self.alt(factor, around)
            if self._weights is not None and not rel & around:
                choices = [_first_heaviest(choices, self._weights)]
            combined: list[int] = []
            for left in states:
                for right in choices:
                    _add_state(combined, left | right)
            states = combined
        return states


def _first_heaviest(states: list[int], weights: Sequence[int]) -> int:
    best, best_weight = states[0], -1
    for state in states:
        weight, rest = 0, state
        while rest:
            low = rest & -rest
            weight += weights[low.bit_length() - 1]
            rest ^= low
        if weight > best_weight:
            best, best_weight = state, weight
    return best


def _or_of_others(masks: Sequence[int]) -> list[int]:
    """For each position, the OR of every other mask (prefix and suffix ORs, linear)."""
    suffix = [0] * (len(masks) + 1)
    for i in range(len(masks) - 1, -1, -1):
        suffix[i] = suffix[i + 1] | masks[i]
    out, prefix = [], 0
    for i, mask in enumerate(masks):
        out.append(prefix | suffix[i + 1])
        prefix |= mask
    return out


def _add_state(states: list[int], state: int) -> None:
    """Appends ``state`` unless an earlier state already covers it (superset or equal)."""
    for kept in states:
        if kept | state == kept:
            return
    states.append(state)


def _expand_alt(node: Alt) -> list[frozenset[str]]:
    out: dict[frozenset[str], None] = {}
    for option in node.options:
        states = [option.atoms]
        for factor in option.factors:
            choices = _expand_alt(factor)
            states = list(dict.fromkeys(left | right for left in states for right in choices))
        out.update(dict.fromkeys(states))
    return list(out)


class _Compiler:
    """Resolves identifiers and ``+refs`` depth-first, emitting sets in compiled order."""

    def __init__(self, trees: Mapping[str, Expr], vars: Mapping[str, str], models: Collection[str]):
        self._trees = trees
        self._vars = vars
        self._models = models
        self._state: dict[str, Literal["visiting", "done"]] = {}
        self.roots: dict[str, Alt] = {}
        self.order: list[str] = []

    def visit(self, name: str) -> None:
        if self._state.get(name) == "done":
            return
        self._state[name] = "visiting"
        self.roots[name] = self._compile(self._trees[name], name)
        self._state[name] = "done"
        self.order.append(name)

    def _compile(self, expr: Expr, set_name: str) -> Alt:
        match expr:
            case Ident(ident, pos):
                return _leaf(self._resolve(ident, set_name, pos))
            case Ref(ref, pos):
                if ref not in self._trees:
                    raise DslError(f"references undefined set {_quote(ref)}", set_name=set_name, position=pos)
                if self._state.get(ref) == "visiting":
                    message = f"circular reference detected involving set {_quote(ref)}"
                    raise DslError(message, set_name=set_name, position=pos)
                self.visit(ref)
                return self.roots[ref]
            case Or(items):
                return _union([self._compile(item, set_name) for item in items])
            case And(items):
                return _product([self._compile(item, set_name) for item in items])

    def _resolve(self, ident: str, set_name: str, pos: int) -> str:
        if ident in self._vars:
            return self._vars[ident]
        if ident in self._models:
            return ident
        raise DslError(f"unknown var or model {_quote(ident)}", set_name=set_name, position=pos)


def _check_vars(vars: Mapping[str, str], models: Collection[str]) -> None:
    for name, model in vars.items():
        if model not in models:
            raise DslError(f"matrix.vars.{name}: {_quote(model)} is not a model id (aliases are not allowed)")


def _resolve_costs(matrix: MatrixConfig, models: Collection[str]) -> dict[str, int]:
    costs: dict[str, int] = {}
    for key, cost in matrix.evict_costs.items():
        model = matrix.vars.get(key, key)
        if model not in models:
            raise DslError(f"matrix.evict_costs.{key}: unknown var or model {_quote(key)}")
        if isinstance(cost, bool) or not isinstance(cost, int) or cost <= 0:
            raise DslError(f"matrix.evict_costs.{key}: cost must be a positive integer, got {cost!r}")
        costs[model] = cost
    return costs


def compile_matrix(matrix: MatrixConfig, model_ids: Collection[str]) -> CompiledMatrix:
    """Parses, resolves and links every set of ``matrix``; raises DslError naming set and position.

    ``model_ids`` are the configured model ids (not aliases). Var values must be model ids and
    evict costs positive. No Cartesian product is formed (see the module docstring).
    """
    models = frozenset(model_ids)
    if not matrix.sets:
        raise DslError("matrix.sets: at least one set is required")
    _check_vars(matrix.vars, models)
    costs = _resolve_costs(matrix, models)
    trees: dict[str, Expr] = {}
    for name, text in matrix.sets:
        if name in trees:
            raise DslError("duplicate set name", set_name=name)
        trees[name] = parse(text, name)
    compiler = _Compiler(trees, matrix.vars, models)
    for name in trees:
        compiler.visit(name)
    return CompiledMatrix(
        order=tuple(compiler.order),
        texts=dict(matrix.sets),
        roots=compiler.roots,
        evict_costs=costs,
    )
