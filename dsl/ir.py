"""The instantiated meaning of a pattern for one head: every number known.

Lowering (`dsl.lower`) turns the AST plus call-time sizes into these nodes;
the dense evaluator (`dsl.evaluate`) defines what they mean, and the compiler
(`codegen/`) reasons about them.  Every predicate compares *coordinates*: a
token at absolute position p has coordinate (p % mod) // div in a context
(1-D sequence, a grid axis, blocks of either), ranging over [0, size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span

NO_SPAN = Span(0, 0, 0, 0)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True)
class Coord:
    """The coordinate (p % mod) // div of absolute position p; `size` values."""

    div: int = 1
    mod: int | None = None
    size: int = 0

    def blocked(self, block: int) -> Coord:
        return Coord(self.div * block, self.mod, -(-self.size // block))


# ------------------------------------------------------------------ masks


@dataclass(frozen=True)
class Const:
    value: bool


@dataclass(frozen=True)
class And:
    parts: tuple[Mask, ...]


@dataclass(frozen=True)
class Or:
    parts: tuple[Mask, ...]


@dataclass(frozen=True)
class Not:
    part: Mask


@dataclass(frozen=True)
class Offset:
    """lo <= k - q <= hi on one coordinate (None: unbounded)."""

    coord: Coord
    lo: int | None
    hi: int | None


@dataclass(frozen=True)
class OffsetMod:
    """(k - q) mod modulus == residue on one coordinate."""

    coord: Coord
    modulus: int
    residue: int


@dataclass(frozen=True)
class PosSet:
    """lo <= c < hi, where c is the query's (side 'q') or key's (side 'k')
    coordinate, reduced mod `modulus` first when it is not None."""

    side: str
    coord: Coord
    modulus: int | None
    lo: int
    hi: int


@dataclass(frozen=True)
class Neighborhood:
    """NATTEN's neighborhood on one axis of length coord.size (docs/language.md §8.1)."""

    coord: Coord
    window: int
    dilation: int
    stride: int
    causal: bool


@dataclass(frozen=True)
class RandomBlocks:
    """Each query block (coordinate `coord`) keeps `count` key blocks drawn from
    [lo, hi) minus |kb - qb| < skip by the generator in `dsl.random_blocks`."""

    coord: Coord
    count: int
    seed: int
    head: int
    lo: int
    hi: int
    skip: int


@dataclass(frozen=True)
class Segments:
    """ids[q] == ids[k] for a runtime integer tensor (packed documents)."""

    tensor: str
    coord: Coord
    span: Span = _span()


@dataclass(frozen=True)
class Route:
    """Key region is among the regions `dsl.selection` selects for the query's
    region: scored by `score` (or read from the call-time tensor `scores`), chosen
    by one selector (`topk`, `mass`, `cdf` or `threshold`), with the forced
    regions (`own`: the query's own/diagonal region, `first`: region 0) always
    kept.  Regions are row-major over `regions` (keys) and `q_regions` (queries;
    None: the same as the keys')."""

    topk: int | None
    regions: tuple[Coord, ...]
    own: bool
    causal: bool
    head: int | None  # None: one routing shared by all heads
    span: Span = _span()
    score: str = "mean"  # "mean", "max", "minmax", "antidiagonal"
    stride: int = 1  # antidiagonal: tokens per strided group
    mass: float | None = None
    cdf: float | None = None
    threshold: float | None = None
    first: bool = False
    scores: str | None = None  # an external score tensor [batch, heads, q regions, k regions]
    q_regions: tuple[Coord, ...] | None = None

    @property
    def query_regions(self) -> tuple[Coord, ...]:
        return self.regions if self.q_regions is None else self.q_regions


@dataclass(frozen=True)
class Cluster:
    """Query and key share one of n balanced clusters (Routing Transformer)."""

    clusters: int
    size: int
    head: int
    span: Span = _span()


@dataclass(frozen=True)
class VerticalSlash:
    """MInference's vertical-slash pattern for one head: the key is a selected column,
    or k - q is a selected diagonal, both picked from the softmax of the last `last`
    queries (`dsl.dynamic.vertical_slash_selection`).  `rows` is the number of
    queries: the diagonals' table is indexed by k - row + rows - 1."""

    coord: Coord  # token positions (size: the keys)
    vertical: int
    slash: int
    last: int
    sink: int
    local: int
    causal: bool
    head: int
    rows: int
    span: Span = _span()


Mask = (
    Const
    | And
    | Or
    | Not
    | Offset
    | OffsetMod
    | PosSet
    | Neighborhood
    | RandomBlocks
    | Segments
    | Route
    | Cluster
    | VerticalSlash
)

DYNAMIC = (Segments, Route, Cluster, VerticalSlash)


# ------------------------------------------------------------------ modifiers


@dataclass(frozen=True)
class Alibi:
    """logit -= slope * |k - q| on the flat coordinate; slope from a tensor
    [heads] when `tensor` is set, else the constant `slope`."""

    coord: Coord
    slope: float
    tensor: str | None
    head: int
    span: Span = _span()


@dataclass(frozen=True)
class Softcap:
    """logit -> cap * tanh(logit / cap)."""

    cap: float


@dataclass(frozen=True)
class Bias:
    """logit += table[head, clamp(dk_1), ..., clamp(dk_n)]: a relative position
    table with one axis per grid axis, offsets clamped to the table's reach."""

    tensor: str
    head: int
    coords: tuple[Coord, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Polyline:
    """PPMA's path mask from per-token decays alpha (horizontal) and beta (vertical)."""

    alpha: str
    beta: str
    path: str  # "hv" or "vh"
    head: int
    coords: tuple[Coord, Coord]
    span: Span = _span()


@dataclass(frozen=True)
class Decay:
    """logit += log_gamma * sum over axes of |k - q| (RMT's Manhattan decay)."""

    log_gamma: float
    coords: tuple[Coord, ...]


Modifier = Alibi | Softcap | Bias | Polyline | Decay


@dataclass(frozen=True)
class HeadPattern:
    """What one head attends to, and how its logits are changed."""

    mask: Mask
    modifiers: tuple[Modifier, ...] = ()


def walk(node: object):
    """Every mask node below (and including) `node`, parents first."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, (And, Or)):
            stack.extend(reversed(current.parts))
        elif isinstance(current, Not):
            stack.append(current.part)


def is_dynamic(mask: Mask) -> bool:
    return any(isinstance(n, DYNAMIC) for n in walk(mask))


def reads_qk(mask: Mask) -> bool:
    """Whether the pattern depends on the contents of q and k (routing, clusters):
    such a schedule holds for one call only."""
    return any(isinstance(n, (Route, Cluster, VerticalSlash)) for n in walk(mask))
