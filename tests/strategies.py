"""Hypothesis strategies for the pattern language.

Two families:

* `modules()` (and `values()`, `exprs()`, `bodies()`, `pattern_defs()`) build random
  *syntax trees* (`maskc.dsl.ast` nodes) covering every form the grammar has.  They
  need not mean anything (unknown names, wrong types) and are meant for
  print/parse round trips.
* `valid_specs()` and `valid_cases()` build *semantically valid* spec texts: only
  real atoms and modifiers with well-typed, in-range arguments, combined with
  ``| & - ~``, ``on blocks``, ``on grid``, ``heads { }`` and pattern definitions.
  `valid_specs()` gives texts that compile and evaluate for *every* lq, lk >= 1
  and heads >= 1 with no bindings; `valid_cases()` gives a `ValidCase` (text plus
  the lq, lk, heads and grid bindings it is valid for), which also covers grids
  and neighborhoods whose windows must fit their axes.
"""

from __future__ import annotations

import math
import operator
import re
import string
from dataclasses import dataclass, field

from hypothesis import strategies as st
from maskc.dsl import ast

# Words the grammar reserves somewhere; generated names avoid them.
KEYWORDS = frozenset(
    {"pattern", "on", "heads", "true", "false", "in", "with", "grid", "blocks", "int", "bool", "float", "tensor"}
)
TYPES = ("int", "bool", "float", "tensor")
ARITH_OPS = ("+", "-", "*", "//", "%")
COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")
SET_OPS = ("|", "&", "-")

# ---------------------------------------------------------------------------
# Random syntax trees
# ---------------------------------------------------------------------------

_COMMON_NAMES = (
    "a",
    "b",
    "x",
    "w",
    "h",
    "t",
    "k",
    "head",
    "lq",
    "lk",
    "causal",
    "window",
    "min",
    "max",
    "abs",
    "index",  # starts with the keyword 'in'
    "ongoing",  # starts with 'on'
    "integer",  # starts with 'int'
    "heads_",
    "pattern2",
    "truey",
    "_",
    "e1",
    "E",
)


_FIRST = string.ascii_letters + "_"
_REST = _FIRST + string.digits


def names() -> st.SearchStrategy[str]:
    """Identifiers that are not keywords (some are built-in or atom names)."""
    return st.one_of(
        st.sampled_from(_COMMON_NAMES),
        st.builds(operator.add, st.sampled_from(_FIRST), st.text(_REST, max_size=8)),
    ).filter(lambda n: n not in KEYWORDS)


def int_lits() -> st.SearchStrategy[ast.IntLit]:
    return st.builds(
        ast.IntLit,
        st.one_of(st.integers(0, 16), st.integers(min_value=0), st.just(2**62), st.just(2**64 + 1)),
    )


def float_lits() -> st.SearchStrategy[ast.FloatLit]:
    finite = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
    return st.builds(ast.FloatLit, st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.5, 1e-7, 1e16]), finite)).filter(
        lambda f: math.copysign(1.0, f.value) > 0
    )


def str_lits() -> st.SearchStrategy[ast.StrLit]:
    text = st.text(st.characters(blacklist_characters='"\n', blacklist_categories=("Cs",)), max_size=8)
    return st.builds(ast.StrLit, st.one_of(st.sampled_from(["hv", "vh", "", "# not a comment"]), text))


def value_leaves(nm: st.SearchStrategy[str] | None = None, ints=None) -> st.SearchStrategy:
    return st.one_of(
        int_lits() if ints is None else st.builds(ast.IntLit, ints),
        float_lits(),
        st.builds(ast.BoolLit, st.booleans()),
        str_lits(),
        st.builds(ast.Name, names() if nm is None else nm),
    )


def values(max_leaves: int = 6, nm: st.SearchStrategy[str] | None = None, ints=None) -> st.SearchStrategy:
    """Every value form: literals, names, -, + - * // %, comparisons, functions,
    tuples, ranges and position sets, nested arbitrarily.  `nm` and `ints` draw
    the names and integers (default: any)."""
    nm = names() if nm is None else nm

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(
            st.builds(ast.Negate, children),
            st.builds(ast.BinOp, st.sampled_from(ARITH_OPS + COMPARE_OPS), children, children),
            st.builds(
                ast.Func,
                st.one_of(st.sampled_from(["min", "max", "abs"]), nm),
                st.lists(children, min_size=1, max_size=3).map(tuple),
            ),
            st.builds(ast.Tuple, st.lists(children, min_size=2, max_size=4).map(tuple)),
            st.builds(ast.Range, children, children),
            st.builds(ast.ModEq, children, children),
            st.builds(ast.ModIn, children, children, children),
        )

    return st.recursive(value_leaves(nm, ints), extend, max_leaves=max_leaves)


def args(vals: st.SearchStrategy, nm: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[tuple]:
    nm = names() if nm is None else nm
    arg = st.one_of(st.builds(ast.Arg, st.none(), vals), st.builds(ast.Arg, nm, vals))
    return st.lists(arg, max_size=3).map(tuple)


def calls(vals: st.SearchStrategy | None = None, nm: st.SearchStrategy[str] | None = None) -> st.SearchStrategy:
    vals = values(3) if vals is None else vals
    nm = names() if nm is None else nm
    return st.builds(ast.Call, nm, args(vals, nm))


def exprs(
    max_leaves: int = 6, vals: st.SearchStrategy | None = None, nm: st.SearchStrategy[str] | None = None
) -> st.SearchStrategy:
    """Every pattern-expression form: calls, | & -, ~, on blocks, on grid, heads { }."""
    vals = values(3) if vals is None else vals

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(
            st.builds(ast.SetOp, st.sampled_from(SET_OPS), children, children),
            st.builds(ast.Complement, children),
            st.builds(ast.OnBlocks, vals, children),
            st.builds(ast.OnGrid, st.lists(vals, min_size=1, max_size=3).map(tuple), children),
            st.builds(
                ast.PerHead,
                st.lists(st.builds(ast.HeadCase, vals, vals, children), min_size=1, max_size=3).map(tuple),
            ),
        )

    return st.recursive(calls(vals, nm), extend, max_leaves=max_leaves)


def bodies(vals: st.SearchStrategy | None = None, nm: st.SearchStrategy[str] | None = None) -> st.SearchStrategy:
    vals = values(3) if vals is None else vals
    return st.builds(
        ast.Body,
        exprs(vals=vals, nm=nm),
        st.lists(calls(vals, nm), max_size=2).map(tuple),
        st.one_of(st.none(), st.lists(vals, min_size=1, max_size=3).map(tuple)),
    )


def params(vals: st.SearchStrategy | None = None, nm: st.SearchStrategy[str] | None = None) -> st.SearchStrategy:
    vals = values(3) if vals is None else vals
    return st.builds(
        ast.Param,
        names() if nm is None else nm,
        st.one_of(st.none(), st.sampled_from(TYPES)),
        st.one_of(st.none(), vals),
    )


def pattern_defs(
    vals: st.SearchStrategy | None = None, nm: st.SearchStrategy[str] | None = None
) -> st.SearchStrategy[ast.PatternDef]:
    vals = values(3) if vals is None else vals
    return st.builds(
        ast.PatternDef,
        names() if nm is None else nm,
        st.lists(params(vals, nm), max_size=2).map(tuple),
        bodies(vals, nm),
    )


def modules(nm: st.SearchStrategy[str] | None = None, ints=None) -> st.SearchStrategy[ast.Module]:
    """Whole specs: definitions and/or a bare body (possibly neither)."""
    vals = values(3, nm, ints)
    return st.builds(
        ast.Module,
        st.lists(pattern_defs(vals, nm), max_size=2).map(tuple),
        st.one_of(st.none(), bodies(vals, nm)),
    )


def near_valid_modules() -> st.SearchStrategy[ast.Module]:
    """Random trees over the language's real vocabulary (atoms, modifiers, their
    argument names, built-ins, a few pattern names) and small integers: most are
    wrong in some way, and they reach every check behind the parser."""
    vocabulary = st.sampled_from(
        (*ATOM_NAMES, *MODIFIER_NAMES, *ARGUMENT_NAMES, "head", "lq", "lk", "h", "p", "q", "mistral", "natten2d")
    )
    return modules(vocabulary, st.one_of(st.integers(0, 9), st.just(4611686018427387904)))


# ---------------------------------------------------------------------------
# Semantically valid specs
# ---------------------------------------------------------------------------


@dataclass
class ValidCase:
    """A spec text and the sizes it is valid for:
    ``maskc.compile(text).mask(lq, lk, heads=heads, **bindings)`` succeeds."""

    text: str
    lq: int
    lk: int
    heads: int
    bindings: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Ctx:
    """What an atom may assume where it is written.

    `sizes` holds the size of each axis (None when unknown: `valid_specs`);
    `flat` is the size of the flat coordinate or None when unknown, and
    `has_flat` says whether flat positions exist (not inside blocks over a grid).
    """

    sizes: tuple[int | None, ...]
    flat: int | None
    has_flat: bool = True
    grids: bool = True  # 'on grid' may be used (queries lie on the keys)

    @property
    def ndim(self) -> int:
        return len(self.sizes)


_LIBRARY_1D = ("mistral", "longformer", "streaming")


class _Gen:
    """Draws one valid expression; `params` maps pattern parameters to values."""

    def __init__(self, draw, heads: int | None, params: dict[str, int]) -> None:
        self.draw = draw
        self.heads = heads
        self.params = params
        self.bindings: dict[str, int] = {}

    # ------------------------------------------------------------ integers

    def num(self, value: int) -> str:
        """Text of an integer expression that evaluates to `value`."""
        d = self.draw
        choice = d(st.integers(0, 9))
        names = [n for n, v in self.params.items() if v == value]
        if names and choice <= 2:
            return d(st.sampled_from(names))
        if choice == 3:
            a = d(st.integers(0, 5))
            return f"{value + a} - {a}"
        if choice == 4:
            m = d(st.integers(1, 4))
            return f"{value * m} // {m}" if value >= 0 else f"-{-value * m} // {m}"
        if choice == 5:
            return f"max({self.num(value)}, {value - d(st.integers(0, 3))})"
        if choice == 6:
            return f"min({value + d(st.integers(0, 3))}, {self.num(value)})"
        if choice == 7 and value >= 0:
            return f"abs(-{value})"
        return str(value) if value >= 0 else f"-{-value}"

    def nonneg(self, hi: int, *, lo: int = 0, per_head: bool = True) -> str:
        """A non-negative integer expression in [lo, hi] (may depend on `head`)."""
        if per_head and self.draw(st.integers(0, 9)) == 0:
            m = self.draw(st.integers(1, 3))
            base = self.draw(st.integers(lo, max(lo, hi - m + 1)))
            return f"{base} + head % {m}" if base else f"head % {m}"
        return self.num(self.draw(st.integers(lo, hi)))

    def per_axis(self, ctx: _Ctx, make) -> str:
        """One number for every axis, or a tuple with one per axis."""
        if ctx.ndim == 1 or self.draw(st.booleans()):
            limit = min((s for s in ctx.sizes if s is not None), default=None)
            return make(limit)
        return "(" + ", ".join(make(s) for s in ctx.sizes) + ")"

    # ------------------------------------------------------------ atoms

    def position_set(self, ctx: _Ctx) -> str:
        d = self.draw
        top = (ctx.flat or 8) + 2
        kind = d(st.integers(0, 3))
        if kind == 0:
            a = d(st.integers(0, top))
            b = d(st.integers(a, top + 1))
            return f"{self.num(a)} .. {self.num(b)}"
        if kind == 1:
            m = d(st.integers(1, 5))
            return f"% {self.num(m)} == {self.num(d(st.integers(0, m - 1)))}"
        if kind == 2:
            m = d(st.integers(1, 5))
            a = d(st.integers(0, m))
            return f"% {self.num(m)} in {self.num(a)} .. {self.num(d(st.integers(a, m)))}"
        return self.nonneg(top)

    def position_sets(self, ctx: _Ctx) -> str:
        n = self.draw(st.integers(1, 3))
        return ", ".join(self.position_set(ctx) for _ in range(n))

    def atom(self, ctx: _Ctx) -> str:
        d = self.draw
        choices = ["all", "none", "window", "window2", "dilated", "block", "stride", "neighborhood"]
        if ctx.has_flat:
            choices += ["causal", "keys", "queries", "global", "sink", "prefix", "random", "library"]
        kind = d(st.sampled_from(choices))
        if kind in ("all", "none"):
            return kind
        if kind == "causal":
            return "causal" if d(st.booleans()) else f"causal({self.num(d(st.integers(-3, 3)))})"
        if kind == "window":
            return f"window({self.per_axis(ctx, lambda s: self.nonneg(4))})"
        if kind == "window2":
            return (
                f"window({self.per_axis(ctx, lambda s: self.nonneg(4))}, "
                f"{self.per_axis(ctx, lambda s: self.nonneg(4))})"
            )
        if kind == "dilated":
            return (
                f"dilated({self.per_axis(ctx, lambda s: self.nonneg(3))}, "
                f"{self.per_axis(ctx, lambda s: self.nonneg(3, lo=1))})"
            )
        if kind == "block":
            return f"block({self.per_axis(ctx, lambda s: self.nonneg(5, lo=1))})"
        if kind == "stride":
            return f"stride({self.per_axis(ctx, lambda s: self.nonneg(4, lo=1))})"
        if kind == "neighborhood":
            return self.neighborhood(ctx)
        if kind in ("keys", "queries", "global"):
            return f"{kind}({self.position_sets(ctx)})"
        if kind in ("sink", "prefix"):
            return f"{kind}({self.nonneg((ctx.flat or 8) + 1)})"
        if kind == "random":
            parts = [self.num(d(st.integers(0, 3))), f"block = {self.num(d(st.integers(1, 4)))}"]
            if d(st.booleans()):
                parts.append(f"seed = {self.num(d(st.integers(0, 99)))}")
            if d(st.booleans()):
                parts.append(f"skip = {self.num(d(st.integers(0, 2)))}")
            return f"random({', '.join(parts)})"
        name = d(st.sampled_from(_LIBRARY_1D))
        if name == "mistral":
            return d(st.sampled_from(["mistral", f"mistral(w = {self.nonneg(4)})", f"mistral({self.nonneg(4)})"]))
        if name == "longformer":
            return f"longformer({self.nonneg(3)}, g = {self.nonneg(3)})"
        return f"streaming(sinks = {self.nonneg(3)}, w = {self.nonneg(5, lo=1)})"

    def neighborhood(self, ctx: _Ctx) -> str:
        """NATTEN neighborhood with window x dilation fitting each axis and
        stride <= window; with unknown sizes only the trivial window 1."""
        d = self.draw
        if any(s is None for s in ctx.sizes):
            return d(st.sampled_from(["neighborhood(1)", "neighborhood(1, causal = true)", "neighborhood(w = 1)"]))
        # One (window, dilation, stride, causal) per axis, drawn to fit.
        chosen = []
        for size in ctx.sizes:
            w = d(st.integers(1, max(1, min(size, 5))))
            dil = d(st.integers(1, max(1, size // w)))
            s = d(st.integers(1, w))
            chosen.append((w, dil, s, d(st.booleans())))
        if ctx.ndim == 1 or (d(st.booleans()) and len(set(chosen)) == 1):
            w, dil, s, c = chosen[0]
            parts = [self.num(w)]
            if dil != 1 or d(st.booleans()):
                parts.append(f"dilation = {self.num(dil)}")
            if s != 1 or d(st.booleans()):
                parts.append(f"stride = {self.num(s)}")
            if c or d(st.booleans()):
                parts.append(f"causal = {'true' if c else 'false'}")
            return f"neighborhood({', '.join(parts)})"

        def tup(i: int) -> str:
            items = [str(c[i]).lower() if isinstance(c[i], bool) else self.num(c[i]) for c in chosen]
            return "(" + ", ".join(items) + ")"

        return f"neighborhood({tup(0)}, dilation = {tup(1)}, stride = {tup(2)}, causal = {tup(3)})"

    # ------------------------------------------------------------ combinations

    def expr(self, ctx: _Ctx, budget: int) -> str:
        d = self.draw
        if budget <= 0:
            return self.atom(ctx)
        kind = d(st.sampled_from(["atom", "atom", "setop", "setop", "complement", "blocks", "heads", "grid"]))
        if kind == "atom":
            return self.atom(ctx)
        if kind == "setop":
            op = d(st.sampled_from(SET_OPS))
            left = self.expr(ctx, budget // 2)
            right = self.expr(ctx, budget // 2)
            return f"({left} {op} {right})"
        if kind == "complement":
            return f"~({self.expr(ctx, budget - 1)})"
        if kind == "blocks":
            return self.blocks(ctx, budget)
        if kind == "heads":
            return self.per_head(ctx, budget)
        return self.grid(ctx, budget)

    def blocks(self, ctx: _Ctx, budget: int) -> str:
        d = self.draw
        sizes = [d(st.integers(1, 4)) for _ in ctx.sizes]
        if ctx.ndim == 1 or d(st.booleans()):
            sizes = [sizes[0]] * ctx.ndim
            text = self.num(sizes[0])
        else:
            text = "(" + ", ".join(self.num(b) for b in sizes) + ")"
        inner = _Ctx(
            tuple(None if s is None else -(-s // b) for s, b in zip(ctx.sizes, sizes, strict=True)),
            None if ctx.flat is None or ctx.ndim > 1 else -(-ctx.flat // sizes[0]),
            ctx.has_flat and ctx.ndim == 1,
            ctx.grids,
        )
        return f"on blocks({text}) ({self.expr(inner, budget - 1)})"

    def per_head(self, ctx: _Ctx, budget: int) -> str:
        d = self.draw
        n = d(st.integers(1, 3))
        if self.heads is None or d(st.booleans()):
            # Split points written with `heads`: valid for any number of heads.
            bounds = {
                1: ["0", "heads"],
                2: ["0", "heads // 2", "heads"],
                3: ["0", "heads // 3", "2 * heads // 3", "heads"],
            }[n]
        else:
            cuts = sorted(d(st.lists(st.integers(0, self.heads), min_size=n - 1, max_size=n - 1)))
            bounds = [self.num(v) for v in [0, *cuts, self.heads]]
        cases = [f"{bounds[i]} .. {bounds[i + 1]}: {self.expr(ctx, budget // n - 1)}" for i in range(n)]
        order = d(st.permutations(range(n)))  # the order of cases does not matter
        sep = "; "
        return "heads { " + sep.join(cases[i] for i in order) + (";" if d(st.booleans()) else "") + " }"

    def grid(self, ctx: _Ctx, budget: int) -> str:
        if not (ctx.has_flat and ctx.grids and ctx.flat is not None):
            return self.expr(ctx, budget - 1)
        sizes = self.factorization(ctx.flat)
        text = ", ".join(self.num(s) for s in sizes)
        inner = _Ctx(tuple(sizes), ctx.flat, True, True)
        return f"on grid({text}) ({self.expr(inner, budget - 1)})"

    def factorization(self, n: int) -> list[int]:
        d = self.draw
        ndim = d(st.integers(1, 3))
        sizes = []
        rest = n
        for _ in range(ndim - 1):
            divisors = [k for k in range(1, rest + 1) if rest % k == 0]
            k = d(st.sampled_from(divisors))
            sizes.append(k)
            rest //= k
        sizes.append(rest)
        return sizes

    def modifiers(self, ctx: _Ctx) -> str:
        d = self.draw
        mods = d(
            st.lists(
                st.sampled_from(["alibi", "alibi()", "softcap(2.5)", "softcap(30)", "polyline(decay = 0.5)"]),
                max_size=2,
            )
        )
        return f" with {', '.join(mods)}" if mods else ""


@st.composite
def _valid(draw, sized: bool) -> ValidCase:
    heads = draw(st.integers(1, 4)) if sized else None
    lk = draw(st.integers(1, 24)) if sized else None
    defaults = {}
    if draw(st.booleans()):
        for i in range(draw(st.integers(1, 3))):
            defaults[f"p{i}"] = draw(st.integers(0, 5))
    gen = _Gen(draw, heads, defaults)
    use_grid = sized and draw(st.integers(0, 3)) == 0
    budget = draw(st.integers(0, 6))
    suffix = ""
    if use_grid:
        sizes = gen.factorization(lk)
        if len(sizes) == 1:
            sizes = [1, *sizes]
        axis_names = ["t", "h", "w"][-len(sizes) :]
        literal = [draw(st.booleans()) for _ in sizes]
        words = [str(s) if lit else n for s, n, lit in zip(sizes, axis_names, literal, strict=True)]
        gen.bindings = {n: s for s, n, lit in zip(sizes, axis_names, literal, strict=True) if not lit}
        ctx = _Ctx(tuple(sizes), lk, True, True)
        grid = f"on grid({', '.join(words)})"
        lq = draw(st.integers(1, lk))
    else:
        ctx = _Ctx((lk,), lk, True, sized)
        lq = draw(st.integers(1, 24)) if sized else None
        grid = ""
        if sized and lq > lk:
            ctx = _Ctx((lk,), lk, True, False)  # queries before the keys cannot lie on a grid
    body = gen.expr(ctx, budget)
    mods = gen.modifiers(ctx) if draw(st.integers(0, 3)) == 0 else ""
    if defaults:
        header = ", ".join(f"{n} = {v}" for n, v in defaults.items())
        if grid and draw(st.booleans()):
            text = f"# a definition\npattern p({header}) {grid} =\n    {body}{mods}\n"
        else:
            suffix = f" {grid}" if grid else ""
            text = f"pattern p({header}) = {body}{mods}{suffix}\n"
    else:
        text = f"{body}{mods}{' ' + grid if grid else ''}"
    return ValidCase(text, lq or 1, lk or 1, heads or 1, dict(gen.bindings))


def valid_cases() -> st.SearchStrategy[ValidCase]:
    """Valid spec texts with the lq, lk, heads and grid bindings they fit
    (grids, neighborhoods and literal head ranges included)."""
    return _valid(sized=True)


def valid_specs() -> st.SearchStrategy[str]:
    """Valid spec texts that compile and evaluate for every lq, lk >= 1 and
    heads >= 1, with no bindings (1-D, head ranges written with `heads`)."""
    return _valid(sized=False).map(lambda case: case.text)


# ---------------------------------------------------------------------------
# Raw text: token soups and mutations of valid specs
# ---------------------------------------------------------------------------

ATOM_NAMES = (
    "all",
    "none",
    "causal",
    "window",
    "dilated",
    "block",
    "stride",
    "keys",
    "queries",
    "sink",
    "global",
    "prefix",
    "neighborhood",
    "random",
    "segments",
    "route",
    "cluster",
)
MODIFIER_NAMES = ("alibi", "softcap", "bias", "polyline")
ARGUMENT_NAMES = (
    "o", "l", "r", "w", "d", "b", "s", "n", "dilation", "stride", "causal", "block", "seed", "among",
    "skip", "ids", "topk", "own", "shared", "size", "slopes", "c", "table", "alpha", "beta", "path", "decay",
)  # fmt: skip
TOKENS = (
    *sorted(KEYWORDS),
    *ATOM_NAMES,
    *MODIFIER_NAMES,
    *ARGUMENT_NAMES,
    "head", "lq", "lk", "min", "max", "abs", "h", "x", "p", "q",
    "mistral", "longformer", "streaming", "natten2d",
    "(", ")", "{", "}", ",", ";", ":", "=", "==", "!=", "<", "<=", ">", ">=",
    "+", "-", "*", "//", "%", "..", "|", "&", "~", ".", "/", "!",
    "0", "1", "2", "3", "7", "64", "4611686018427387904", "99999999999999999999999", "0.5", "1e400", "1.0",
    '"hv"', '"vh"', '""', '"', "# comment\n", "\n", "\t",
)  # fmt: skip


def token_soups(max_size: int = 30) -> st.SearchStrategy[str]:
    """Random sequences of the language's tokens (and near-tokens), joined by
    spaces, newlines or nothing at all (so that tokens also run together)."""
    return st.lists(st.tuples(st.sampled_from(TOKENS), st.sampled_from([" ", " ", "", "\n"])), max_size=max_size).map(
        lambda pairs: "".join(tok + sep for tok, sep in pairs)
    )


_TOKEN_RE = re.compile(r"\s+|#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\.|//|==|!=|<=|>=|\S")


def tokenize(text: str) -> list[str]:
    """Split text into tokens (whitespace and comments kept), losslessly."""
    tokens = _TOKEN_RE.findall(text)
    assert "".join(tokens) == text
    return tokens


_NUMBERS = (
    *("0", "1", "2", "3", "5", "8", "17", "64", "4611686018427387904", "0.5", "2.5", "-1"),
    *("heads", "head", "lq", "lk"),
)
_SIMILAR = (
    (*ATOM_NAMES, "mistral", "longformer", "streaming", "natten2d"),
    MODIFIER_NAMES,
    ARGUMENT_NAMES,
    ("|", "&", "-"),
    ("+", "-", "*", "//", "%"),
    ("==", "!=", "<", "<=", ">", ">="),
    ("true", "false", "0", "1"),
    ("int", "bool", "float", "tensor"),
    _NUMBERS,
)


@st.composite
def mutate(draw, text: str, max_edits: int = 3) -> str:
    """`text` with 1..max_edits random edits of characters or tokens: deletions,
    duplications, swaps, insertions and replacements."""
    for _ in range(draw(st.integers(1, max_edits))):
        if draw(st.booleans()):
            items = list(text)
            filler = st.sampled_from(list('()|&-~,.;:={}%<>*/#"0123456789 \nabcxyz_'))
        else:
            items = tokenize(text)
            filler = st.sampled_from(TOKENS)
        if not items:
            items = [draw(filler)]
        i = draw(st.integers(0, len(items) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace", "similar", "similar"]))
        if op == "similar":
            # Replace a token by one of its kind: likely to still parse, and to
            # reach the checks behind the parser.
            kinds = [k for k in _SIMILAR if items[i] in k or (items[i].isdigit() and k is _NUMBERS)]
            if kinds:
                items[i] = draw(st.sampled_from(kinds[0]))
            else:
                op = "replace"
        if op == "delete":
            del items[i]
        elif op == "duplicate":
            items.insert(i, items[i])
        elif op == "swap":
            j = draw(st.integers(0, len(items) - 1))
            items[i], items[j] = items[j], items[i]
        elif op == "insert":
            items.insert(i, draw(filler))
        else:
            items[i] = draw(filler)
        text = "".join(items)
    return text


@st.composite
def mutated_cases(draw, max_edits: int = 3) -> tuple[ValidCase, str]:
    """A valid case and a mutation of its text."""
    case = draw(valid_cases())
    return case, draw(mutate(case.text, max_edits))


__all__ = [
    "KEYWORDS",
    "ValidCase",
    "bodies",
    "calls",
    "exprs",
    "modules",
    "mutate",
    "mutated_cases",
    "names",
    "near_valid_modules",
    "params",
    "pattern_defs",
    "token_soups",
    "tokenize",
    "valid_cases",
    "valid_specs",
    "values",
]
