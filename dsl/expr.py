"""Expressions over one (query, key) pair: the form each primitive's meaning is written in.

`dsl.semantics` defines every atom and modifier once, as an expression of this
form; the backends only interpret or print expressions:

- `Program` (below) runs them on torch tensors: the dense evaluator
  (`dsl.evaluate`) over broadcast position tensors, FlexAttention's `mask_mod` and
  `score_mod` (`codegen.flex`) over Flex's index tensors;
- `codegen.triton_exprs` prints them as Triton source.

The variables are `q` and `k` (absolute positions of the query and the key; a
query position may be negative), `b` (batch index), `h` (head index) and
`q_offset` (the position of query row 0); a backend may bind more (`s`, the
logit, for a chain of modifiers).  Values are integers, floats (`to_float`) and
booleans.  Integer division and remainder floor, as in Python, whatever the
signs.  `Load` reads a bound table (`TableRef`): what the table holds and how
it is laid out is each backend's business, its logical indices are the
definition's.

The constructors fold constants and identities (`x * 1`, `x // 1`, `x % 1`,
`x + 0`, `True & x`), so a definition can be written generally and the text a
backend prints stays short.  Nodes compare and hash by structure (equal
subexpressions are computed once), so `==` is structural: comparisons that
build expressions are `<`, `<=`, `>`, `>=` and the methods `eq` and `ne`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

Scalar = int | float | bool


def _binary(name: str, swap: bool = False):
    def method(self, other):
        build = globals()[name]
        return build(other, self) if swap else build(self, other)

    return method


def _compare(name: str):
    return lambda self, other: op(name, self, other)


class Expr:
    """An expression node: structural equality, a cached hash, operators that build nodes."""

    def _fields(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((type(self).__name__, self._fields()))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return type(self) is type(other) and hash(self) == hash(other) and self._fields() == other._fields()

    def __bool__(self) -> bool:
        raise TypeError("an expression has no truth value: use & | ~ and where(), not and/or/if")

    # Operators build expressions (the functions below, looked up when called).
    __add__, __radd__ = _binary("add"), _binary("add", swap=True)
    __sub__, __rsub__ = _binary("sub"), _binary("sub", swap=True)
    __mul__, __rmul__ = _binary("mul"), _binary("mul", swap=True)
    __floordiv__, __mod__ = _binary("floordiv"), _binary("floormod")
    __and__, __rand__ = _binary("and_"), _binary("and_", swap=True)
    __or__, __ror__ = _binary("or_"), _binary("or_", swap=True)
    __lt__, __le__, __gt__, __ge__ = _compare("lt"), _compare("le"), _compare("gt"), _compare("ge")

    def __neg__(self):
        return neg(self)

    def __abs__(self):
        return op("abs", self)

    def __invert__(self):
        return not_(self)

    def eq(self, other) -> Expr:
        return op("eq", self, other)

    def ne(self, other) -> Expr:
        return op("ne", self, other)


@dataclass(frozen=True, eq=False)
class Var(Expr):
    name: str


@dataclass(frozen=True, eq=False)
class Const(Expr):
    value: Scalar

    def _fields(self) -> tuple:
        return (type(self.value).__name__, self.value)  # True and 1 are different constants


@dataclass(frozen=True, eq=False)
class Op(Expr):
    """An operation (`OPS` lists them) on its arguments."""

    name: str
    args: tuple[Expr, ...]


@dataclass(frozen=True)
class TableRef:
    """A table a definition reads, filled by each backend.

    `kind` says what it holds (backends fill it from `node`, the ir node it serves;
    `part` tells apart the tables of one node); `dtype` is the kind of its values
    ("int", "bool" or "float").  `shared`: the same data for every head (the head,
    where it matters, is an index), rather than data drawn for the node's own head.
    `grad`: the table is differentiable (a backend may accumulate d loss / d table)."""

    kind: str
    node: object
    part: str = ""
    dtype: str = "int"
    shared: bool = False
    grad: bool = False


@dataclass(frozen=True, eq=False)
class Load(Expr):
    """table[index...].  Where `guard` is given, the indices only matter where it
    holds: elsewhere they may fall outside the table, a backend keeps the read in
    bounds and the value is unspecified (so a definition masks it with `guard`)."""

    table: TableRef
    index: tuple[Expr, ...]
    guard: Expr | None = None


@dataclass(frozen=True, eq=False)
class Reach(Expr):
    """(n - 1) // 2 for the size n of `table` along `axis`: how far a table of
    offsets -r .. r reaches."""

    table: TableRef
    axis: int


@dataclass(frozen=True, eq=False)
class Named(Expr):
    """`value`, worth a local name (`hint`) where a backend prints code."""

    hint: str
    value: Expr


Q, K, B, H, Q_OFFSET = Var("q"), Var("k"), Var("b"), Var("h"), Var("q_offset")
TRUE, FALSE = Const(True), Const(False)

# name -> number of arguments
OPS = {
    "neg": 1, "abs": 1, "not": 1, "float": 1, "tanh": 1,
    "add": 2, "sub": 2, "mul": 2, "div": 2, "floordiv": 2, "floormod": 2, "min": 2, "max": 2,
    "eq": 2, "ne": 2, "lt": 2, "le": 2, "gt": 2, "ge": 2, "and": 2, "or": 2, "bitand": 2,
    "like": 2,  # like(x, y): x in y's number type (a term added to a logit takes the logit's)
    "where": 3,
}  # fmt: skip

# Python's operators on numbers (floor division and remainder included), and torch's
# on tensors, share the names of `operator`.
_SHARED = {name: getattr(operator, name) for name in ("neg", "abs", "add", "sub", "mul", "floordiv", "eq", "ne",
                                                         "lt", "le", "gt", "ge")}  # fmt: skip
_PY = {**_SHARED, "not": operator.not_, "float": float, "floormod": operator.mod, "min": min, "max": max,
       "and": lambda a, b: a and b, "or": lambda a, b: a or b, "bitand": operator.and_}  # fmt: skip


def const(value: Scalar | Expr) -> Expr:
    if isinstance(value, Expr):
        return value
    if not isinstance(value, (bool, int, float)):
        raise TypeError(f"not a number: {value!r}")
    return Const(value)


def _is(e: Expr, value: Scalar) -> bool:
    """`e` is the constant `value` (of the same kind: 1 is not True)."""
    return isinstance(e, Const) and type(e.value) is type(value) and e.value == value


def op(name: str, *args: Scalar | Expr) -> Expr:
    """The operation `name` on `args`, folded when every argument is a constant."""
    exprs = tuple(const(a) for a in args)
    if len(exprs) != OPS[name]:
        raise TypeError(f"{name} takes {OPS[name]} arguments, got {len(exprs)}")
    if name in _PY and all(isinstance(a, Const) for a in exprs):
        return Const(_PY[name](*(a.value for a in exprs)))
    return Op(name, exprs)


def _int(e: Expr) -> bool:
    return isinstance(e, Const) and type(e.value) is int


def add(a, b) -> Expr:
    a, b = const(a), const(b)
    if _is(a, 0):
        return b
    return _plus(a, b.value) if _int(b) else op("add", a, b)


def sub(a, b) -> Expr:
    a, b = const(a), const(b)
    return _plus(a, -b.value) if _int(b) else op("sub", a, b)


def _plus(x: Expr, c: int) -> Expr:
    """x + c for an integer constant c, its constants gathered: (y ± c1) + c and (c1 - y) + c fold."""
    if c == 0:
        return x
    if isinstance(x, Op) and x.name in ("add", "sub") and _int(x.args[1]):
        return _plus(x.args[0], c + (x.args[1].value if x.name == "add" else -x.args[1].value))
    if isinstance(x, Op) and x.name == "sub" and _int(x.args[0]):
        return sub(x.args[0].value + c, x.args[1])
    return op("add", x, c) if c > 0 else op("sub", x, -c)


def mul(a, b) -> Expr:
    a, b = const(a), const(b)
    if _is(b, 1):
        return a
    if _is(a, 1):
        return b
    if _is(a, 0) or _is(b, 0):
        return Const(0)
    return op("mul", a, b)


def neg(a) -> Expr:
    a = const(a)
    if isinstance(a, Op) and a.name == "neg":
        return a.args[0]
    return op("neg", a)


def floordiv(a, b) -> Expr:
    return const(a) if _is(const(b), 1) else op("floordiv", a, b)


def floormod(a, b) -> Expr:
    return Const(0) if _is(const(b), 1) else op("floormod", a, b)


def minimum(a, b) -> Expr:
    return op("min", a, b)


def maximum(a, b) -> Expr:
    return op("max", a, b)


def to_float(a) -> Expr:
    a = const(a)
    return a if isinstance(a, Const) and isinstance(a.value, float) else op("float", a)


def bitand(a, b) -> Expr:
    return op("bitand", a, b)


def _logic(name: str, unit: bool) -> Callable[..., Expr]:
    """`and` (unit True) or `or` (unit False), folding the constant `unit` and its opposite."""

    def build(a, b) -> Expr:
        a, b = const(a), const(b)
        if _is(a, unit):
            return b
        if _is(b, unit):
            return a
        if _is(a, not unit) or _is(b, not unit):
            return Const(not unit)
        return op(name, a, b)

    return build


and_ = _logic("and", True)
or_ = _logic("or", False)


def not_(a) -> Expr:
    a = const(a)
    if isinstance(a, Op) and a.name == "not":
        return a.args[0]
    return op("not", a)


def all_of(parts: Iterable) -> Expr:
    return _balanced(and_, parts, TRUE)


def any_of(parts: Iterable) -> Expr:
    return _balanced(or_, parts, FALSE)


def _balanced(build: Callable[..., Expr], parts: Iterable, empty: Expr) -> Expr:
    """parts[0] op parts[1] op ... as a balanced tree, in order: thousands of parts
    (`keys(0 .. 1, ...)`) stay a few levels deep."""
    items = [const(p) for p in parts]
    if not items:
        return empty
    while len(items) > 1:
        items = [build(*items[i : i + 2]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def where(cond, a, b) -> Expr:
    cond, a, b = const(cond), const(a), const(b)
    if isinstance(cond, Const):
        return a if cond.value else b
    if a == b:
        return a
    return op("where", cond, a, b)


def named(hint: str, value) -> Expr:
    value = const(value)
    return value if isinstance(value, (Var, Const, Named)) else Named(hint, value)


# ---------------------------------------------------------------- walking


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, Op):
        return e.args
    if isinstance(e, Load):
        return e.index if e.guard is None else (*e.index, e.guard)
    if isinstance(e, Named):
        return (e.value,)
    return ()


def nodes(roots: Iterable[Expr]) -> list[Expr]:
    """Every distinct node under `roots`, each after its children."""
    seen: set[Expr] = set()
    order: list[Expr] = []
    for root in roots:
        stack: list[tuple[Expr, bool]] = [(root, False)]
        while stack:
            e, done = stack.pop()
            if done:
                if e not in seen:
                    seen.add(e)
                    order.append(e)
                continue
            if e in seen:
                continue
            stack.append((e, True))
            stack.extend((c, False) for c in reversed(children(e)) if c not in seen)
    return order


def free_vars(e: Expr) -> frozenset[str]:
    return frozenset(n.name for n in nodes([e]) if isinstance(n, Var))


def rebuild(e: Expr, args: tuple[Expr, ...]) -> Expr:
    """`e` with new children (in `children` order), folded again."""
    if isinstance(e, Op):
        return _REBUILD.get(e.name, lambda *a: op(e.name, *a))(*args)
    if isinstance(e, Load):
        n = len(e.index)
        return Load(e.table, tuple(args[:n]), args[n] if e.guard is not None else None)
    if isinstance(e, Named):
        return named(e.hint, args[0])
    return e


_REBUILD: dict[str, Callable[..., Expr]] = {
    "add": add, "sub": sub, "mul": mul, "neg": neg, "floordiv": floordiv, "floormod": floormod,
    "float": to_float, "and": and_, "or": or_, "not": not_, "where": where,
}  # fmt: skip


def substitute(e: Expr, values: dict[Expr, Expr]) -> Expr:
    """`e` with every node found in `values` replaced (and folded again)."""
    memo: dict[Expr, Expr] = {}
    for n in nodes([e]):
        if n in values:
            memo[n] = values[n]
        else:
            kids = children(n)
            new = tuple(memo[c] for c in kids)
            memo[n] = n if new == kids else rebuild(n, new)
    return memo[e]


# ---------------------------------------------------------------- ranges


Interval = tuple[float, float]
_UNBOUNDED: Interval = (-float("inf"), float("inf"))


def ranges(roots: Iterable[Expr], variables: dict[str, Interval]) -> dict[Expr, Interval]:
    """An interval holding every value of each integer node under `roots`, given
    the variables' (unknown: unbounded)."""
    out: dict[Expr, Interval] = {}
    for e in nodes(roots):
        out[e] = _range(e, [out[c] for c in children(e)], variables)
    return out


def _range(e: Expr, args: list[Interval], variables: dict[str, Interval]) -> Interval:
    if isinstance(e, Var):
        return variables.get(e.name, _UNBOUNDED)
    if isinstance(e, Const):
        return (e.value, e.value) if isinstance(e.value, (int, float)) else (0, 1)
    if isinstance(e, Named):
        return args[0]
    if isinstance(e, Reach):
        return (0, float("inf"))
    if not isinstance(e, Op):
        return _UNBOUNDED
    name = e.name
    if name in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not"):
        return (0, 1)
    if name == "neg":
        return (-args[0][1], -args[0][0])
    if name == "abs":
        lo, hi = args[0]
        return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
    if name == "add":
        return (args[0][0] + args[1][0], args[0][1] + args[1][1])
    if name == "sub":
        return (args[0][0] - args[1][1], args[0][1] - args[1][0])
    if name == "min":
        return (min(args[0][0], args[1][0]), min(args[0][1], args[1][1]))
    if name == "max":
        return (max(args[0][0], args[1][0]), max(args[0][1], args[1][1]))
    if name == "where":
        return (min(args[1][0], args[2][0]), max(args[1][1], args[2][1]))
    if name == "float":
        return args[0]
    if len(args) != 2:
        return _UNBOUNDED
    (alo, ahi), (blo, bhi) = args
    if name == "mul":
        products = [0 if x == 0 or y == 0 else x * y for x in (alo, ahi) for y in (blo, bhi)]
        return (min(products), max(products))
    if name == "floormod" and blo > 0:
        if alo >= 0 and ahi < blo:
            return (alo, ahi)
        return (0, bhi - 1)
    if name == "floordiv" and blo > 0 and blo == bhi:
        return (alo // blo, ahi // blo)
    return _UNBOUNDED


# ---------------------------------------------------------------- derivatives


def derivative(e: Expr, wrt: Load) -> Expr:
    """d e / d wrt for an expression built from sums, products, negations and
    casts of loads: how a backend finds what each differentiable load contributes
    to the gradient of its table."""
    if e == wrt:
        return Const(1.0)
    if not any(n == wrt for n in nodes([e])):
        return Const(0.0)
    if isinstance(e, Named):
        return derivative(e.value, wrt)
    if isinstance(e, Op):
        a = e.args
        if e.name in ("add", "sub"):
            da, db = derivative(a[0], wrt), derivative(a[1], wrt)
            if _is(db, 0.0):
                return da
            if _is(da, 0.0):
                return db if e.name == "add" else neg(db)
            return op(e.name, da, db)
        if e.name == "neg":
            return neg(derivative(a[0], wrt))
        if e.name in ("float", "like"):
            return derivative(a[0], wrt)
        if e.name == "mul":
            da, db = derivative(a[0], wrt), derivative(a[1], wrt)
            left = Const(0.0) if _is(da, 0.0) else _times(da, a[1])
            right = Const(0.0) if _is(db, 0.0) else _times(a[0], db)
            return right if _is(left, 0.0) else left if _is(right, 0.0) else add(left, right)
        if e.name == "where":
            return where(a[0], derivative(a[1], wrt), derivative(a[2], wrt))
    raise TypeError(f"cannot differentiate {e!r}")


def _times(a: Expr, b: Expr) -> Expr:
    if _is(a, 1.0):
        return b
    if _is(b, 1.0):
        return a
    if _is(a, -1.0):
        return neg(b)
    if isinstance(a, Op) and a.name == "neg" and _is(a.args[0], 1.0):
        return neg(b)
    return mul(a, b)


# ---------------------------------------------------------------- torch


class Env:
    """What a running expression reads: its variables, and how tables are read.

    `read(load, index, guard)` returns the values of `load.table` at the evaluated
    indices; `reach(table, axis)` its reach.  `float_dtype` is the type of
    `to_float` (a float value stays in its own type)."""

    def __init__(self, values: dict[str, object], float_dtype: torch.dtype = torch.float64) -> None:
        self.values = values
        self.float_dtype = float_dtype

    def read(self, load: Load, index: list, guard) -> object:
        raise TypeError(f"no table {load.table.kind!r} is bound here")

    def reach(self, table: TableRef, axis: int) -> int:
        raise TypeError(f"no table {table.kind!r} is bound here")


def _tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _min(a, b):
    if _tensor(a):
        return torch.minimum(a, b) if _tensor(b) else a.clamp(max=b)
    return b.clamp(max=a) if _tensor(b) else min(a, b)


def _max(a, b):
    if _tensor(a):
        return torch.maximum(a, b) if _tensor(b) else a.clamp(min=b)
    return b.clamp(min=a) if _tensor(b) else max(a, b)


def _where(c, a, b):
    if not _tensor(c):
        return a if c else b
    return torch.where(c, a, b)


def _like(x, y):
    if _tensor(y) and _tensor(x):
        return x.to(y.dtype)
    return x


TORCH: dict[str, Callable] = {
    **_SHARED,
    "not": lambda a: ~a if _tensor(a) else not a,
    "tanh": torch.tanh,
    "div": operator.truediv,
    "floormod": operator.mod,
    "min": _min,
    "max": _max,
    "and": operator.and_,
    "or": operator.or_,
    "bitand": operator.and_,
    "like": _like,
    "where": _where,
}


class Program:
    """Expressions compiled for torch: one step per distinct node, run in order."""

    def __init__(self, roots: tuple[Expr, ...]) -> None:
        order = nodes(roots)
        slot = {e: i for i, e in enumerate(order)}
        self.steps = [self._step(e, slot) for e in order]
        self.outputs = [slot[r] for r in roots]
        self.size = len(order)
        self.variables = frozenset(e.name for e in order if isinstance(e, Var))

    @staticmethod
    def _step(e: Expr, slot: dict[Expr, int]) -> Callable:
        if isinstance(e, Var):
            name = e.name
            return lambda env, v: env.values[name]
        if isinstance(e, Const):
            value = e.value
            return lambda env, v: value
        if isinstance(e, Named):
            i = slot[e.value]
            return lambda env, v: v[i]
        if isinstance(e, Reach):
            table, axis = e.table, e.axis
            return lambda env, v: env.reach(table, axis)
        if isinstance(e, Load):
            index = [slot[i] for i in e.index]
            guard = None if e.guard is None else slot[e.guard]
            return lambda env, v: env.read(e, [v[i] for i in index], None if guard is None else v[guard])
        args = [slot[a] for a in e.args]
        if e.name == "float":
            (a,) = args
            return lambda env, v: _as_float(v[a], env.float_dtype)
        fn = TORCH[e.name]
        if len(args) == 1:
            (a,) = args
            return lambda env, v: fn(v[a])
        if len(args) == 2:
            a, b = args
            return lambda env, v: fn(v[a], v[b])
        return lambda env, v: fn(*(v[i] for i in args))

    def __call__(self, env: Env) -> list:
        v: list = [None] * self.size
        for i, step in enumerate(self.steps):
            v[i] = step(env, v)
        return [v[i] for i in self.outputs]


def _as_float(x, dtype: torch.dtype):
    if _tensor(x):
        return x if x.is_floating_point() else x.to(dtype)
    return float(x)


@lru_cache(maxsize=4096)
def compiled(*roots: Expr) -> Program:
    return Program(roots)


def run(roots: tuple[Expr, ...] | list[Expr], env: Env) -> list:
    """The values of `roots` (tensors, or Python numbers where nothing varies)."""
    return compiled(*roots)(env)


def gather(data: torch.Tensor, index: list, clamp: bool, origin: tuple[int, ...] | None = None) -> torch.Tensor:
    """data[index...] as a torch backend reads a table: an axis of size 1 is read at 0
    whatever the index (it broadcasts), `ALL` takes the whole axis, `origin` is the
    logical index of each axis' first entry, and `clamp` keeps indices in bounds."""
    picked = []
    for axis, i in enumerate(index):
        if i is ALL:
            picked.append(slice(None))
            continue
        n = data.shape[axis]
        if origin is not None and origin[axis]:
            i = i - origin[axis]
        if clamp or n == 1:  # (clamped, an index keeps its shape: the result broadcasts as it does)
            i = i.clamp(0, n - 1) if _tensor(i) else min(max(i, 0), n - 1)
        picked.append(i)
    return data[tuple(picked)]


class _All:
    """An index meaning every entry of an axis (the dense evaluator's batch index)."""

    def __repr__(self) -> str:
        return "ALL"


ALL = _All()
