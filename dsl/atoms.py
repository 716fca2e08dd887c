"""The atoms and modifiers of the language: their signatures and their meaning.

Each entry binds call arguments against a signature (with the checks that do
not need call-time sizes), then, at call time, builds `ir` nodes in the
current coordinate frame.  docs/language.md §8 and §9 describe what this module implements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from . import ast, ir
from .errors import MaskTypeError, Span
from .values import (
    ModSetVal,
    RangeVal,
    TensorRef,
    is_bool,
    is_int,
    is_number,
    known,
    type_name,
)

REQUIRED = object()


def axes_phrase(n: int) -> str:
    return f"{n} axis" if n == 1 else f"{n} axes"


@dataclass(frozen=True)
class Frame:
    """The coordinates atoms read: one per grid axis (one for a 1-D sequence).

    `axes` is None at compile time, when sizes are not known yet; `flat` is the
    row-major token coordinate, absent inside `on blocks` over a grid;
    `blocked` says whether `on blocks` was applied (tokens are then blocks).
    """

    ndim: int
    axes: tuple[ir.Coord, ...] | None
    flat: ir.Coord | None
    has_flat: bool = True
    blocked: bool = False


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str
    default: object = REQUIRED


@dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[ParamSpec, ...]
    doc: str
    variadic: str | None = None  # kind of extra positional arguments, gathered in "items"
    flat: bool = False  # reads flat token positions
    build: Callable | None = None


class Lowering:
    """What an atom's `build` may read besides its arguments."""

    def __init__(self, head: int, heads: int, lq: int = 0) -> None:
        self.head = head
        self.heads = heads
        self.lq = lq


# ---------------------------------------------------------------- binding


def bind(sig: Signature, call: ast.Call, values: list[tuple[ast.Arg, object]], frame: Frame) -> dict:
    """Match evaluated arguments to `sig`; check types and compile-time constraints."""
    bound: dict[str, object] = {}
    spans: dict[str, Span] = {}
    items: list[tuple[object, Span]] = []
    positional = [p for p in sig.params]
    pos_index = 0
    for arg, value in values:
        if arg.name is None:
            if sig.variadic is not None:
                items.append((value, arg.span))
                continue
            if pos_index >= len(positional):
                raise MaskTypeError(
                    f"{sig.name}() takes at most {len(positional)} positional argument"
                    f"{'s' if len(positional) != 1 else ''}, got more",
                    arg.span,
                )
            spec = positional[pos_index]
            pos_index += 1
        else:
            matches = [p for p in sig.params if p.name == arg.name]
            if not matches:
                names = ", ".join(p.name for p in sig.params) or "none"
                raise MaskTypeError(
                    f"{sig.name}() has no argument '{arg.name}' (its arguments: {names})",
                    arg.span,
                )
            spec = matches[0]
        if spec.name in bound:
            raise MaskTypeError(f"{sig.name}() got argument '{spec.name}' twice", arg.span)
        bound[spec.name] = _check_kind(sig, spec.name, spec.kind, value, arg.span, frame)
        spans[spec.name] = arg.span
    for spec in sig.params:
        if spec.name not in bound:
            if spec.default is REQUIRED:
                raise MaskTypeError(f"{sig.name}() needs argument '{spec.name}'", call.span)
            default = spec.default
            if default is not None:
                default = _check_kind(sig, spec.name, spec.kind, default, call.span, frame)
            bound[spec.name] = default
            spans[spec.name] = call.span
    if sig.variadic is not None:
        if not items:
            raise MaskTypeError(f"{sig.name}() needs at least one position set, such as 0 .. 4", call.span)
        bound["items"] = [_check_kind(sig, "a set", sig.variadic, v, s, frame) for v, s in items]
    if sig.flat and not frame.has_flat:
        raise MaskTypeError(
            f"{sig.name} reads token positions, which do not exist inside 'on blocks' over a grid",
            call.span,
        )
    bound["_spans"] = {**spans, "_call": call.span}
    return bound


def _check_kind(sig: Signature, name: str, kind: str, value: object, span: Span, frame: Frame) -> object:
    where = f"{sig.name}() argument '{name}'"
    if kind.endswith("?") and kind not in ("tensor?", "range?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind.startswith("axis_"):
        base = kind[len("axis_") :]
        items = value if isinstance(value, tuple) else (value,) * frame.ndim
        if len(items) != frame.ndim:
            raise MaskTypeError(
                f"{where} has {len(items)} values, but the grid here has {axes_phrase(frame.ndim)}",
                span,
            )
        return tuple(_check_kind(sig, name, base, v, span, frame) for v in items)
    if kind in ("int", "nonneg", "pos"):
        if not is_int(value):
            raise MaskTypeError(f"{where} must be an integer, got {type_name(value)}", span)
        if known(value) and kind == "nonneg" and value < 0:
            raise MaskTypeError(f"{where} must be >= 0, got {value}", span)
        if known(value) and kind == "pos" and value < 1:
            raise MaskTypeError(f"{where} must be >= 1, got {value}", span)
        return value
    if kind == "bool":
        if not is_bool(value):
            raise MaskTypeError(f"{where} must be true or false, got {type_name(value)}", span)
        return value
    if kind in ("number", "positive_number", "decay"):
        if not is_number(value):
            raise MaskTypeError(f"{where} must be a number, got {type_name(value)}", span)
        if known(value):
            value = float(value)
            if not math.isfinite(value):
                raise MaskTypeError(f"{where} must be finite, got {value}", span)
            if kind == "positive_number" and value <= 0:
                raise MaskTypeError(f"{where} must be > 0, got {value}", span)
            if kind == "decay" and not 0 < value <= 1:
                raise MaskTypeError(f"{where} must be in (0, 1], got {value}", span)
        return value
    if kind == "fraction":
        if not is_number(value):
            raise MaskTypeError(f"{where} must be a number, got {type_name(value)}", span)
        if known(value):
            value = float(value)
            if not 0 < value <= 1:
                raise MaskTypeError(f"{where} must be in (0, 1], got {value}", span)
        return value
    if kind == "scorer":
        if value not in SCORERS:
            names = ", ".join(f'"{s}"' for s in SCORERS)
            raise MaskTypeError(f"{where} must be one of {names}, got {_shown(value)}", span)
        return value
    if kind == "path":
        if value not in ("hv", "vh"):
            raise MaskTypeError(f'{where} must be "hv" or "vh", got {value!r}', span)
        return value
    if kind in ("tensor", "tensor?"):
        if value is None and kind == "tensor?":
            return None
        if not isinstance(value, TensorRef):
            raise MaskTypeError(
                f"{where} must be a tensor parameter or a name bound to a tensor when calling, got {type_name(value)}",
                span,
            )
        return value
    if kind == "range?":
        if value is None:
            return None
        if not isinstance(value, RangeVal):
            raise MaskTypeError(f"{where} must be a range a .. b, got {type_name(value)}", span)
        return value
    if kind == "set":
        if is_int(value):
            return RangeVal(value, value + 1 if known(value) else value)
        if not isinstance(value, (RangeVal, ModSetVal)):
            raise MaskTypeError(
                f"{sig.name}() takes position sets (a .. b, % m == r, % m in a .. b), got {type_name(value)}",
                span,
            )
        return value
    raise AssertionError(kind)


# ---------------------------------------------------------------- meaning


def _per_axis(frame: Frame, build) -> ir.Mask:
    parts = tuple(build(i, axis) for i, axis in enumerate(frame.axes))
    return parts[0] if len(parts) == 1 else ir.And(parts)


def _pos_sets(side: str, coord: ir.Coord, items: list) -> ir.Mask:
    parts = []
    for item in items:
        if isinstance(item, RangeVal):
            parts.append(ir.PosSet(side, coord, None, item.start, item.stop))
        else:
            parts.append(ir.PosSet(side, coord, item.modulus, item.lo, item.hi))
    return parts[0] if len(parts) == 1 else ir.Or(tuple(parts))


def _window(a, f, low):
    l, r = a["l"], a["r"] if a["r"] is not None else a["l"]
    return _per_axis(f, lambda i, ax: ir.Offset(ax, -l[i], r[i]))


def _dilated(a, f, low):
    w, d = a["w"], a["d"]
    return _per_axis(
        f,
        lambda i, ax: ir.And((ir.Offset(ax, -w[i] * d[i], w[i] * d[i]), ir.OffsetMod(ax, d[i], 0))),
    )


def _neighborhood(a, f, low):
    w, d, s, c = a["w"], a["dilation"], a["stride"], a["causal"]
    span = a["_spans"]["w"]
    for i, ax in enumerate(f.axes):
        if w[i] * d[i] > ax.size:
            raise MaskTypeError(
                f"neighborhood window {w[i]} with dilation {d[i]} needs at least "
                f"{w[i] * d[i]} positions on axis {i}, which has {ax.size}",
                span,
            )
    return _per_axis(f, lambda i, ax: ir.Neighborhood(ax, w[i], d[i], s[i], bool(c[i])))


def _random(a, f, low):
    coord = f.flat.blocked(a["block"])
    among = a["among"] or RangeVal(0, coord.size)
    lo, hi = max(0, among.start), min(coord.size, among.stop)
    return ir.RandomBlocks(coord, a["r"], a["seed"], low.head, lo, max(lo, hi), a["skip"])


SCORERS = ("mean", "max", "minmax", "antidiagonal")
SELECTORS = ("topk", "mass", "cdf", "threshold")


def _route(a, f, low):
    spans = a["_spans"]
    regions = tuple(ax.blocked(b) for ax, b in zip(f.axes, a["block"], strict=True))
    q_regions = None
    if a["query_block"] is not None and a["query_block"] != a["block"]:
        q_regions = tuple(ax.blocked(b) for ax, b in zip(f.axes, a["query_block"], strict=True))
    score = a["score"] or "mean"
    stride = a["stride"] if a["stride"] is not None else (8 if score == "antidiagonal" else 1)
    if score == "antidiagonal":
        if len(regions) != 1 or regions[0].mod is not None:
            raise MaskTypeError(
                'route(score = "antidiagonal") reads token order: it needs a 1-D sequence', spans["score"]
            )
        tokens = [r[0].div for r in (regions, q_regions) if r is not None]
        if any(t % stride for t in tokens):
            raise MaskTypeError(
                f'route(score = "antidiagonal") needs blocks of a multiple of its stride {stride} tokens, '
                f"got {tokens[-1]}",
                spans["stride" if a["stride"] is not None else "block"],
            )
    head = None if a["shared"] else low.head
    scores = a["scores"].name if a["scores"] is not None else None
    selector_span = next((spans[s] for s in SELECTORS if a[s] is not None), spans["topk"])
    return ir.Route(
        a["topk"],
        regions,
        bool(a["own"]),
        bool(a["causal"]),
        head,
        selector_span,
        score,
        stride,
        a["mass"],
        a["cdf"],
        a["threshold"],
        bool(a["first"]),
        scores,
        q_regions,
    )


def _cluster(a, f, low):
    return ir.Cluster(a["n"], a["size"], low.head, a["_spans"]["n"])


def _vertical_slash(a, f, low):
    if f.flat.div != 1 or f.flat.mod is not None:
        raise MaskTypeError(
            "vertical_slash selects token columns and diagonals: it cannot be used inside 'on blocks'",
            a["_spans"]["_call"],
        )
    return ir.VerticalSlash(
        f.flat,
        a["v"],
        a["s"],
        a["last"],
        a["sink"],
        a["local"],
        bool(a["causal"]),
        low.head,
        low.lq,
        a["_spans"]["v"],
    )


def _sig(name, params, doc, build, variadic=None, flat=False):
    return Signature(name, tuple(ParamSpec(*p) for p in params), doc, variadic, flat, build)


ATOMS: dict[str, Signature] = {
    s.name: s
    for s in [
        _sig("all", [], "every pair", lambda a, f, low: ir.Const(True)),
        _sig("none", [], "no pair", lambda a, f, low: ir.Const(False)),
        _sig(
            "causal",
            [("o", "int", 0)],
            "k <= q + o",
            lambda a, f, low: ir.Offset(f.flat, None, a["o"]),
            flat=True,
        ),
        _sig(
            "window",
            [("l", "axis_nonneg"), ("r", "axis_nonneg", None)],
            "-l <= k - q <= r (r = l if omitted), per axis",
            _window,
        ),
        _sig(
            "dilated",
            [("w", "axis_nonneg"), ("d", "axis_pos")],
            "|k - q| <= w*d and (k - q) mod d == 0, per axis",
            _dilated,
        ),
        _sig(
            "block",
            [("b", "axis_pos")],
            "floor(q / b) == floor(k / b), per axis",
            lambda a, f, low: _per_axis(f, lambda i, ax: ir.Offset(ax.blocked(a["b"][i]), 0, 0)),
        ),
        _sig(
            "stride",
            [("s", "axis_pos")],
            "(q - k) mod s == 0, per axis",
            lambda a, f, low: _per_axis(f, lambda i, ax: ir.OffsetMod(ax, a["s"][i], 0)),
        ),
        _sig(
            "keys",
            [],
            "k in the given sets",
            lambda a, f, low: _pos_sets("k", f.flat, a["items"]),
            variadic="set",
            flat=True,
        ),
        _sig(
            "queries",
            [],
            "q in the given sets",
            lambda a, f, low: _pos_sets("q", f.flat, a["items"]),
            variadic="set",
            flat=True,
        ),
        _sig(
            "sink",
            [("n", "nonneg")],
            "k < n (attention sinks)",
            lambda a, f, low: ir.PosSet("k", f.flat, None, 0, a["n"]),
            flat=True,
        ),
        _sig(
            "prefix",
            [("n", "nonneg")],
            "k < n (with causal: prefix-LM)",
            lambda a, f, low: ir.PosSet("k", f.flat, None, 0, a["n"]),
            flat=True,
        ),
        _sig(
            "global",
            [],
            "q or k in the given sets (symmetric global tokens)",
            lambda a, f, low: ir.Or((_pos_sets("q", f.flat, a["items"]), _pos_sets("k", f.flat, a["items"]))),
            variadic="set",
            flat=True,
        ),
        _sig(
            "neighborhood",
            [
                ("w", "axis_pos"),
                ("dilation", "axis_pos", 1),
                ("stride", "axis_pos", 1),
                ("causal", "axis_bool", False),
            ],
            "NATTEN neighborhood per axis (docs/language.md §8.1)",
            _neighborhood,
        ),
        _sig(
            "random",
            [
                ("r", "nonneg"),
                ("block", "pos"),
                ("seed", "int", 0),
                ("among", "range?", None),
                ("skip", "nonneg", 0),
            ],
            "r random key blocks per query block and head (BigBird)",
            _random,
            flat=True,
        ),
        _sig(
            "segments",
            [("ids", "tensor")],
            "ids[q] == ids[k] (packed documents)",
            lambda a, f, low: ir.Segments(a["ids"].name, f.flat, a["_spans"]["ids"]),
            flat=True,
        ),
        _sig(
            "route",
            [
                ("topk", "pos?", None),
                ("block", "axis_pos"),
                ("own", "bool", False),
                ("causal", "bool", False),
                ("shared", "bool", True),
                ("score", "scorer?", None),
                ("stride", "pos?", None),
                ("mass", "fraction?", None),
                ("cdf", "fraction?", None),
                ("threshold", "fraction?", None),
                ("first", "bool", False),
                ("scores", "tensor?", None),
                ("query_block", "axis_pos?", None),
            ],
            "key blocks per query block, scored and selected (BiFormer, MoBA, XAttention, Quest, SpargeAttn)",
            _route,
        ),
        _sig(
            "vertical_slash",
            [
                ("v", "nonneg"),
                ("s", "nonneg"),
                ("last", "pos", 64),
                ("sink", "nonneg", 30),
                ("local", "nonneg", 100),
                ("causal", "bool", True),
            ],
            "top-v key columns and top-s diagonals per head from the last queries' softmax (MInference)",
            _vertical_slash,
            flat=True,
        ),
        _sig(
            "cluster",
            [("n", "pos"), ("size", "pos")],
            "same balanced k-means cluster (Routing Transformer)",
            _cluster,
        ),
    ]
}

# Each atom's checks that need no sizes but relate two arguments.


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else type_name(value)


def check_relations(sig: Signature, args: dict) -> None:
    if sig.name == "route":
        _check_route(args)
    if sig.name == "neighborhood":
        for w, s in zip(args["w"], args["stride"], strict=True):
            if known(w, s) and s > w:
                raise MaskTypeError(
                    f"neighborhood stride {s} is larger than its window {w}",
                    args["_spans"]["stride"],
                )


def _check_route(args: dict) -> None:
    """One selector; `stride` only with the antidiagonal scorer; a score tensor
    replaces the scorer (docs/language.md §8.4)."""
    spans = args["_spans"]
    given = [s for s in SELECTORS if args[s] is not None]
    if not given:
        raise MaskTypeError("route() needs a selector: topk = k, mass = t, cdf = t or threshold = t", spans["topk"])
    if len(given) > 1:
        raise MaskTypeError(f"route() takes one selector, got {given[0]} and {given[1]}", spans[given[1]])
    if args["stride"] is not None and args["score"] != "antidiagonal":
        raise MaskTypeError("route() argument 'stride' needs score = \"antidiagonal\"", spans["stride"])
    if args["scores"] is not None and args["score"] is not None:
        raise MaskTypeError(
            "route() takes a score tensor or a scorer, not both (scores = ... replaces score = ...)", spans["score"]
        )


# ---------------------------------------------------------------- modifiers


def alibi_slope(head: int, heads: int) -> float:
    """ALiBi's geometric slopes (Press et al.), with its rule for head counts
    that are not powers of two."""
    closest = 2 ** math.floor(math.log2(heads))

    def slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    values = slopes(closest)
    if closest < heads:
        values += slopes(2 * closest)[0::2][: heads - closest]
    return values[head]


def _alibi(a, f, low):
    tensor = a["slopes"]
    slope = 0.0 if tensor is not None else alibi_slope(low.head, low.heads)
    return ir.Alibi(f.flat, slope, tensor.name if tensor else None, low.head, a["_spans"]["slopes"])


def _polyline(a, f, low):
    spans = a["_spans"]
    if a["decay"] is not None:
        if a["alpha"] is not None or a["beta"] is not None:
            raise MaskTypeError("polyline takes either alpha and beta, or decay, not both", spans["decay"])
        return ir.Decay(math.log(a["decay"]), f.axes)
    if a["alpha"] is None or a["beta"] is None:
        raise MaskTypeError("polyline needs alpha and beta tensors, or decay = g", spans["alpha"])
    return ir.Polyline(a["alpha"].name, a["beta"].name, a["path"], low.head, f.axes, spans["alpha"])


MODIFIERS: dict[str, Signature] = {
    s.name: s
    for s in [
        _sig(
            "alibi",
            [("slopes", "tensor?", None)],
            "logit -= slope[head] * |k - q| (ALiBi's slopes if none given)",
            _alibi,
            flat=True,
        ),
        _sig(
            "softcap",
            [("c", "positive_number")],
            "logit -> c * tanh(logit / c)",
            lambda a, f, low: ir.Softcap(a["c"]),
        ),
        _sig(
            "bias",
            [("table", "tensor")],
            "logit += table[head, dk_1, ..., dk_n] (relative position bias per grid axis)",
            lambda a, f, low: ir.Bias(a["table"].name, low.head, f.axes, a["_spans"]["table"]),
        ),
        _sig(
            "polyline",
            [
                ("alpha", "tensor?", None),
                ("beta", "tensor?", None),
                ("path", "path", "hv"),
                ("decay", "decay", None),
            ],
            "PPMA polyline path mask (alpha, beta) or Manhattan decay (decay = g)",
            _polyline,
        ),
    ]
}


def check_modifier(sig: Signature, args: dict, frame: Frame, call: ast.Call) -> None:
    if sig.name == "polyline":
        if args["decay"] is None and (args["alpha"] is None or args["beta"] is None):
            raise MaskTypeError("polyline needs alpha and beta tensors, or decay = g", call.span)
        if args["decay"] is not None and (args["alpha"] is not None or args["beta"] is not None):
            raise MaskTypeError("polyline takes either alpha and beta, or decay, not both", call.span)
        if args["decay"] is None and frame.ndim != 2:
            raise MaskTypeError(
                "polyline(alpha, beta) needs a 2-D grid (add 'on grid(h, w)'); "
                f"here the tokens have {axes_phrase(frame.ndim)}",
                call.span,
            )
