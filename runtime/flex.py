"""The FlexAttention backend: a maskc program lowered to `flex_attention`.

- The `BlockMask` is maskc's own schedule, handed over with
  `BlockMask.from_kv_blocks`: partial blocks in `kv_*`, full blocks in
  `full_kv_*` (Flex skips `mask_mod` there).  Nothing evaluates the predicate
  at every (query, key) pair; `create_block_mask` is never called.
- `mask_mod` and `score_mod` are generated from the normal form (`ir` nodes),
  translated node by node into torch expressions on Flex's index tensors.  Flex
  passes positions in *execution order*; they become absolute positions through
  the layout permutation and `q_offset` first.
- Different heads may have different normal forms.  Heads are mapped to their
  head group by a table; where the groups' trees have the same shape, the
  numbers that differ (window sizes, residues, ALiBi slopes, random tables...)
  are looked up per group, so one expression serves every head.  Where the
  shapes differ, each variant is computed and `torch.where` picks per head.
- Runtime tensors (segment ids, routing selections, cluster memberships, bias
  tables, polyline prefix sums, random-block draws) become small lookup tables
  captured by the generated functions; Flex passes them to its kernel.

Flex runs through `torch.compile(flex_attention)` (compiled once per process;
Dynamo recompiles per distinct pattern structure and shape, so the recompile
limit is raised around the call).  On CPU, FlexAttention has no backward and
cannot return the log-sum-exp (its CPU lowering refuses `return_lse`): the
output comes from Flex, and the log-sum-exp, when wanted, from maskc's CPU
executor over the same schedule (`cpu_lse`, exact, with a one-channel v), which
roughly doubles the cost of a CPU call; `lower` plus `compiled_flex_attention`
time Flex alone.  Elsewhere Flex returns the log-sum-exp itself
(`AuxRequest(lse=True)`, natural log).  Rows with no allowed key get output 0
and lse -inf.

On CPU, keys are padded to a multiple of 16 (`cpu_key_length`): Flex's compiled
CPU kernel (torch 2.13, AVX2) computes q @ k^T over a key chunk of 8 mod 16 keys
as if it had 16 more, reading past k and overwriting the running maxima of
queries 0..7 -- wrong or NaN rows that depend on whatever memory follows k
(`bench/flex_cpu_bug.py`).  The padded keys are zeros, masked by `mask_mod`, and
the last key block is never full, so Flex evaluates the mask there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from maskc.dsl import evaluate, ir
from maskc.dsl.dynamic import BITS_PER_WORD, cluster_members, in_regions, membership_bits, region_ids
from maskc.dsl.errors import MaskTypeError
from maskc.dsl.random_blocks import draw
from torch.nn.attention import flex_attention as _flex

from .prepare import Prepared

# Stands for "no bound" when head groups disagree; far above any position.
BIG = 2**40
# Upper bound on Dynamo recompiles of the compiled flex_attention (one per
# distinct pattern structure and shape); past the default of 8 Dynamo would
# silently fall back to the unfused eager path.
RECOMPILE_LIMIT = 256

# Flex's CPU kernel is handed keys in multiples of this (its q @ k^T micro-GEMM's
# block_n, `GemmBlocking(1, 16, 1)`): a chunk of 8 mod 16 keys hits the bug above.
CPU_KEY_MULTIPLE = 16

_compiled: Callable | None = None


def compiled_flex_attention() -> Callable:
    """`torch.compile(flex_attention)`, created once per process."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_flex.flex_attention, dynamic=False)
    return _compiled


# ---------------------------------------------------------------- expressions


@dataclass
class _Env:
    """What a generated expression sees: batch, head, head group, absolute positions."""

    b: torch.Tensor
    h: torch.Tensor
    g: torch.Tensor | None
    q: torch.Tensor
    k: torch.Tensor


Expr = Callable[[_Env], object]
ScoreExpr = Callable[[_Env, torch.Tensor], torch.Tensor]


def _constant(value) -> Expr:
    return lambda env: value


def _min(a, b):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return min(a, b)
    return torch.where(a < b, a, b)


def _max(a, b):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return max(a, b)
    return torch.where(a > b, a, b)


def _batch_index(env: _Env, table: torch.Tensor):
    return env.b if table.shape[0] > 1 else 0


def _mask_signature(node: ir.Mask) -> tuple:
    """What must agree between head groups for one vectorised expression."""
    if isinstance(node, (ir.And, ir.Or)):
        return (type(node), len(node.parts))
    if isinstance(node, ir.PosSet):
        return (ir.PosSet, node.side, node.modulus is None)
    if isinstance(node, ir.Neighborhood):
        return (ir.Neighborhood, node.causal)
    if isinstance(node, ir.RandomBlocks):
        return (ir.RandomBlocks, node.coord)
    if isinstance(node, ir.Segments):
        return (ir.Segments, node.tensor)
    if isinstance(node, ir.Route):
        return (ir.Route, node.regions)
    if isinstance(node, ir.Cluster):
        return (ir.Cluster, node.clusters)
    return (type(node),)


def _modifier_signature(mods: tuple[ir.Modifier, ...]) -> tuple:
    out = []
    for m in mods:
        if isinstance(m, ir.Alibi):
            out.append((ir.Alibi, m.tensor))
        elif isinstance(m, ir.Bias):
            out.append((ir.Bias, m.tensor, len(m.coords)))
        elif isinstance(m, ir.Polyline):
            out.append((ir.Polyline, m.alpha, m.beta, m.path))
        elif isinstance(m, ir.Decay):
            out.append((ir.Decay, len(m.coords)))
        else:
            out.append((type(m),))
    return tuple(out)


def _partition(items: dict[int, object], signature) -> list[dict[int, object]]:
    parts: dict[tuple, dict[int, object]] = {}
    for g, item in items.items():
        parts.setdefault(signature(item), {})[g] = item
    return list(parts.values())


class _Lowering:
    """Translates the normal forms of all head groups into torch expressions."""

    def __init__(self, prepared: Prepared, device: torch.device) -> None:
        self.prepared = prepared
        self.device = device
        self.groups = len(prepared.forms)
        self.tensors = prepared.tensors
        self.sizes = prepared.instance.sizes

    # ------------------------------------------------------------ building blocks

    def put(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)

    def param(self, values: dict[int, object]) -> Expr:
        """A number that may differ between head groups: a constant, or a lookup by group."""
        distinct = set(values.values())
        if len(distinct) == 1:
            return _constant(next(iter(distinct)))
        if all(isinstance(v, bool) for v in distinct):
            dtype = torch.bool
        elif any(isinstance(v, float) for v in distinct):
            dtype = torch.float32
        else:
            dtype = torch.int64
        # Groups outside `values` take a value of the others, never 0: a divisor
        # there would still be evaluated (torch.where computes both sides).
        table = torch.full((self.groups,), next(iter(values.values())), dtype=dtype)
        for g, v in values.items():
            table[g] = v
        table = self.put(table)
        return lambda env: table[env.g]

    def stacked(self, tables: dict[int, torch.Tensor], fill) -> Callable:
        """Per-group tables as one lookup `f(env, *index)`; stacked [groups, ...] if they differ."""
        distinct: list[torch.Tensor] = []
        for t in tables.values():
            if not any(t.shape == d.shape and torch.equal(t, d) for d in distinct):
                distinct.append(t)
        if len(distinct) == 1:
            table = self.put(distinct[0])
            return lambda env, *index: table[index]
        shape = [max(t.shape[i] for t in tables.values()) for i in range(distinct[0].dim())]
        stack = torch.full((self.groups, *shape), fill, dtype=distinct[0].dtype)
        for g, t in tables.items():
            stack[(g, *(slice(0, n) for n in t.shape))] = t
        stack = self.put(stack)
        return lambda env, *index: stack[(env.g, *index)]

    def coord(self, coords: dict[int, ir.Coord]) -> Callable:
        """f(positions, env): the coordinate (p % mod) // div, per group."""
        mods = {g: c.mod for g, c in coords.items()}
        mod = has_mod = None
        if any(m is not None for m in mods.values()):
            mod = self.param({g: 1 if m is None else m for g, m in mods.items()})
            has_mod = self.param({g: m is not None for g, m in mods.items()})
        div = self.param({g: c.div for g, c in coords.items()})

        def f(p, env):
            x = p
            if mod is not None:
                has = has_mod(env)
                x = p % mod(env) if has is True else torch.where(has, p % mod(env), p)
            d = div(env)
            return x if isinstance(d, int) and d == 1 else x // d

        return f

    def select(self, parts: list[tuple[dict[int, object], Callable]]) -> Callable:
        """Pick, per head, the variant built for its group."""
        *rest, (_, last) = parts
        members = []
        for items, fn in rest:
            table = torch.zeros(self.groups, dtype=torch.bool)
            table[list(items)] = True
            members.append((self.put(table), fn))

        def f(env, *args):
            out = last(env, *args)
            for table, fn in reversed(members):
                out = torch.where(table[env.g], fn(env, *args), out)
            return out

        return f

    # ------------------------------------------------------------ masks

    def mask(self, nodes: dict[int, ir.Mask]) -> Expr:
        parts = _partition(nodes, _mask_signature)
        if len(parts) > 1:
            return self.select([(p, self.mask(p)) for p in parts])
        node = next(iter(nodes.values()))
        lower = {
            ir.Const: self._const,
            ir.And: self._and,
            ir.Or: self._or,
            ir.Not: self._not,
            ir.Offset: self._offset,
            ir.OffsetMod: self._offset_mod,
            ir.PosSet: self._pos_set,
            ir.Neighborhood: self._neighborhood,
            ir.RandomBlocks: self._random_blocks,
            ir.Segments: self._segments,
            ir.Route: self._route,
            ir.Cluster: self._cluster,
        }.get(type(node))
        if lower is None:
            raise TypeError(f"unknown pattern node {node!r}")
        return lower(nodes)

    def _const(self, nodes):
        value = self.param({g: bool(n.value) for g, n in nodes.items()})
        return lambda env: torch.zeros_like(env.q, dtype=torch.bool) | value(env)

    def _and(self, nodes):
        n = len(next(iter(nodes.values())).parts)
        parts = [self.mask({g: node.parts[i] for g, node in nodes.items()}) for i in range(n)]

        def f(env):
            out = parts[0](env)
            for p in parts[1:]:
                out = out & p(env)
            return out

        return f

    def _or(self, nodes):
        n = len(next(iter(nodes.values())).parts)
        parts = [self.mask({g: node.parts[i] for g, node in nodes.items()}) for i in range(n)]

        def f(env):
            out = parts[0](env)
            for p in parts[1:]:
                out = out | p(env)
            return out

        return f

    def _not(self, nodes):
        part = self.mask({g: n.part for g, n in nodes.items()})
        return lambda env: ~part(env)

    def _bound(self, values: dict[int, int | None], default: int) -> Expr | None:
        clipped = {g: default if v is None else max(-BIG, min(BIG, v)) for g, v in values.items()}
        if all(v == default for v in clipped.values()):
            return None
        return self.param(clipped)

    def _offset(self, nodes):
        c = self.coord({g: n.coord for g, n in nodes.items()})
        lo = self._bound({g: n.lo for g, n in nodes.items()}, -BIG)
        hi = self._bound({g: n.hi for g, n in nodes.items()}, BIG)

        def f(env):
            d = c(env.k, env) - c(env.q, env)
            out = torch.ones_like(d, dtype=torch.bool)
            if lo is not None:
                out = out & (d >= lo(env))
            if hi is not None:
                out = out & (d <= hi(env))
            return out

        return f

    def _offset_mod(self, nodes):
        c = self.coord({g: n.coord for g, n in nodes.items()})
        modulus = self.param({g: n.modulus for g, n in nodes.items()})
        residue = self.param({g: n.residue for g, n in nodes.items()})
        return lambda env: (c(env.k, env) - c(env.q, env)) % modulus(env) == residue(env)

    def _pos_set(self, nodes):
        first = next(iter(nodes.values()))
        c = self.coord({g: n.coord for g, n in nodes.items()})
        modulus = None if first.modulus is None else self.param({g: n.modulus for g, n in nodes.items()})
        lo = self._bound({g: n.lo for g, n in nodes.items()}, -BIG)
        hi = self._bound({g: n.hi for g, n in nodes.items()}, BIG)

        def f(env):
            x = c(env.q if first.side == "q" else env.k, env)
            if modulus is not None:
                x = x % modulus(env)
            out = torch.ones_like(x, dtype=torch.bool)
            if lo is not None:
                out = out & (x >= lo(env))
            if hi is not None:
                out = out & (x < hi(env))
            return out

        return f

    def _neighborhood(self, nodes):
        causal = next(iter(nodes.values())).causal
        c = self.coord({g: n.coord for g, n in nodes.items()})
        size = self.param({g: n.coord.size for g, n in nodes.items()})
        w_ = self.param({g: n.window for g, n in nodes.items()})
        d_ = self.param({g: n.dilation for g, n in nodes.items()})
        s_ = self.param({g: n.stride for g, n in nodes.items()})

        def f(env):
            # docs/language.md §8.1, as in `evaluate.neighborhood_window`, with per-group numbers.
            qc, kc = c(env.q, env), c(env.k, env)
            w, d, s, n = w_(env), d_(env), s_(env), size(env)
            group = qc % d
            gc = qc // d
            glen = (n - group + d - 1) // d
            if causal:
                leader = _min((gc // s) * s + s - 1, glen - 1)
                start = _max(leader - w + 1, 0)
                end = _min(gc + 1, glen)
            else:
                wl = w // 2
                wr = w // 2 + w % 2 - 1
                leader = _min((gc // s) * s + s // 2, glen - 1)
                start = _max(leader - wl, 0) + (leader + wr >= glen).to(torch.int64) * (glen - wr - leader - 1)
                end = start + w
            kg = kc // d
            return (kc % d == group) & (kg >= start) & (kg < end)

        return f

    def _query_coordinates(self, coord: ir.Coord) -> tuple[int, int]:
        s = self.sizes
        values = evaluate.coordinate(torch.arange(s.lq, dtype=torch.int64) + s.q_offset, coord)
        return int(values.min()), int(values.max())

    def _random_blocks(self, nodes):
        coord = next(iter(nodes.values())).coord
        c = self.coord({g: coord for g in nodes})
        lo, hi = self._query_coordinates(coord)
        rows = torch.arange(lo, hi + 1, dtype=torch.int64)
        tables = {g: draw(rows, n.count, n.seed, n.head, n.lo, n.hi, n.skip).to(torch.int32) for g, n in nodes.items()}
        width = max(t.shape[1] for t in tables.values())
        if width == 0:
            return lambda env: torch.zeros_like(env.q, dtype=torch.bool)
        lookup = self.stacked(tables, -1)
        last = hi - lo

        def f(env):
            row = torch.clamp(c(env.q, env) - lo, 0, last)
            kc = c(env.k, env)
            out = lookup(env, row, 0) == kc
            for j in range(1, width):
                out = out | (lookup(env, row, j) == kc)
            return out

        return f

    def _segments(self, nodes):
        first = next(iter(nodes.values()))
        ids = self.tensors.get(first.tensor)
        if ids.dim() == 1:
            ids = ids[None]
        ids = self.put(ids)
        n = ids.shape[-1]
        c = self.coord({g: node.coord for g, node in nodes.items()})

        def f(env):
            bi = _batch_index(env, ids)
            cq, ck = c(env.q, env), c(env.k, env)
            inside = evaluate.in_segment_range(cq, n) & evaluate.in_segment_range(ck, n)
            return inside & (ids[bi, cq.clamp(0, n - 1)] == ids[bi, ck.clamp(0, n - 1)])

        return f

    def _route(self, nodes):
        regions = next(iter(nodes.values())).regions
        tables = {g: evaluate.route_table(self.tensors, n) for g, n in nodes.items()}  # as the schedule saw them
        lookup = self.stacked(tables, False)
        batched = next(iter(tables.values())).shape[0] > 1

        last = math.prod(c.size for c in regions) - 1

        def f(env):
            bi = env.b if batched else 0
            rq, rk = region_ids(env.q, regions).clamp(0, last), region_ids(env.k, regions).clamp(0, last)
            return lookup(env, bi, rq, rk) & in_regions(env.q, regions) & in_regions(env.k, regions)

        return f

    def _cluster(self, nodes):
        s = self.sizes
        words = -(-next(iter(nodes.values())).clusters // BITS_PER_WORD)
        q_tables, k_tables = {}, {}
        for g, n in nodes.items():
            index_q, index_k = evaluate.cluster_selection(self.tensors, n)  # as the schedule saw them
            q_tables[g] = membership_bits(cluster_members(index_q, s.lq)).cpu()
            k_tables[g] = membership_bits(cluster_members(index_k, s.lk)).cpu()
        q_lookup = self.stacked(q_tables, 0)
        k_lookup = self.stacked(k_tables, 0)
        batched = next(iter(q_tables.values())).shape[0] > 1
        offset = s.q_offset

        def f(env):
            bi = env.b if batched else 0
            qi = env.q - offset
            out = (q_lookup(env, bi, 0, qi) & k_lookup(env, bi, 0, env.k)) != 0
            for w in range(1, words):
                out = out | ((q_lookup(env, bi, w, qi) & k_lookup(env, bi, w, env.k)) != 0)
            return out

        return f

    # ------------------------------------------------------------ modifiers

    def modifiers(self, mods: dict[int, tuple[ir.Modifier, ...]]) -> ScoreExpr | None:
        if not any(mods.values()):
            return None
        self._check_modifiers(mods)
        return self._modifier_chain(mods)

    def _check_modifiers(self, mods) -> None:
        """Shape errors exactly as the reference reports them (one pair evaluated)."""
        qp = torch.tensor([[self.sizes.q_offset]], dtype=torch.int64)
        kp = torch.zeros(1, 1, dtype=torch.int64)
        for chain in mods.values():
            evaluate.modifier_terms(chain, qp, kp, self.tensors)

    def _modifier_chain(self, mods) -> ScoreExpr:
        parts = _partition(mods, _modifier_signature)
        if len(parts) > 1:
            return self.select([(p, self._modifier_chain(p)) for p in parts])
        n = len(next(iter(mods.values())))
        steps = []
        for i in range(n):
            at = {g: chain[i] for g, chain in mods.items()}
            first = next(iter(at.values()))
            lower = {
                ir.Alibi: self._mod_alibi,
                ir.Softcap: self._mod_softcap,
                ir.Bias: self._mod_bias,
                ir.Polyline: self._mod_polyline,
                ir.Decay: self._mod_decay,
            }.get(type(first))
            if lower is None:
                raise TypeError(f"unknown modifier {first!r}")
            steps.append(lower(at))

        def f(env, score):
            for step in steps:
                score = step(env, score)
            return score

        return f

    @staticmethod
    def _add(score: torch.Tensor, term) -> torch.Tensor:
        return score + (term.to(score.dtype) if isinstance(term, torch.Tensor) else term)

    def _mod_alibi(self, mods):
        first = next(iter(mods.values()))
        c = self.coord({g: m.coord for g, m in mods.items()})
        if first.tensor is not None:
            slopes = self.put(self.tensors.get(first.tensor))
            head = self.param({g: m.head for g, m in mods.items()})

            def slope(env):
                return slopes[head(env)]
        else:
            slope = self.param({g: float(m.slope) for g, m in mods.items()})

        def f(env, score):
            dist = (c(env.k, env) - c(env.q, env)).abs()
            return self._add(score, -slope(env) * dist)

        return f

    def _mod_softcap(self, mods):
        cap = self.param({g: float(m.cap) for g, m in mods.items()})

        def f(env, score):
            value = cap(env)
            return value * torch.tanh(score / value)

        return f

    def _mod_bias(self, mods):
        first = next(iter(mods.values()))
        table = self.tensors.get(first.tensor)
        reach = [(table.shape[i + 1] - 1) // 2 for i in range(len(first.coords))]
        head = self.param({g: (m.head if table.shape[0] > 1 else 0) for g, m in mods.items()})
        coords = [self.coord({g: m.coords[i] for g, m in mods.items()}) for i in range(len(first.coords))]
        table = self.put(table)

        def f(env, score):
            index = [head(env)]
            for c, r in zip(coords, reach, strict=True):
                index.append(torch.clamp(c(env.k, env) - c(env.q, env), -r, r) + r)
            return self._add(score, table[tuple(index)])

        return f

    def _mod_polyline(self, mods):
        first = next(iter(mods.values()))
        alpha, beta = self.tensors.get(first.alpha), self.tensors.get(first.beta)
        row_sums = self.put(torch.cumsum(alpha, dim=-1))  # along x within each row
        col_sums = self.put(torch.cumsum(beta, dim=-2))  # along y within each column
        ha = self.param({g: (m.head if alpha.shape[1] > 1 else 0) for g, m in mods.items()})
        hb = self.param({g: (m.head if beta.shape[1] > 1 else 0) for g, m in mods.items()})
        yc = self.coord({g: m.coords[0] for g, m in mods.items()})
        xc = self.coord({g: m.coords[1] for g, m in mods.items()})
        hv = first.path == "hv"

        def f(env, score):
            y1, y2 = yc(env.q, env), yc(env.k, env)
            x1, x2 = xc(env.q, env), xc(env.k, env)
            xlo, xhi = _min(x1, x2), _max(x1, x2)
            ylo, yhi = _min(y1, y2), _max(y1, y2)
            ba, bb = _batch_index(env, row_sums), _batch_index(env, col_sums)
            a, b = ha(env), hb(env)
            if hv:  # along the query's row, then down the key's column
                horizontal = row_sums[ba, a, y1, xhi] - row_sums[ba, a, y1, xlo]
                vertical = col_sums[bb, b, yhi, x2] - col_sums[bb, b, ylo, x2]
            else:  # along the query's column, then across the key's row
                vertical = col_sums[bb, b, yhi, x1] - col_sums[bb, b, ylo, x1]
                horizontal = row_sums[ba, a, y2, xhi] - row_sums[ba, a, y2, xlo]
            return self._add(score, horizontal + vertical)

        return f

    def _mod_decay(self, mods):
        first = next(iter(mods.values()))
        log_gamma = self.param({g: float(m.log_gamma) for g, m in mods.items()})
        coords = [self.coord({g: m.coords[i] for g, m in mods.items()}) for i in range(len(first.coords))]

        def f(env, score):
            total = 0
            for c in coords:
                total = total + (c(env.k, env) - c(env.q, env)).abs()
            return self._add(score, log_gamma(env) * total)

        return f

    # ------------------------------------------------------------ entry points

    def env_maker(self) -> Callable:
        """(b, h, q_idx, kv_idx) in execution order -> `_Env` with absolute positions."""
        p = self.prepared
        lq, lk, offset = p.lq, p.lk, self.sizes.q_offset
        perm_q = None if p.schedule.perm_q is None else self.put(p.schedule.perm_q.to(torch.int64))
        perm_k = None if p.schedule.perm_k is None else self.put(p.schedule.perm_k.to(torch.int64))
        head_group = self.put(torch.tensor(p.head_group, dtype=torch.int64)) if self.groups > 1 else None

        def make(b, h, q_idx, kv_idx):
            # Flex may evaluate padding rows/columns of the last block: clamp before any lookup.
            qi = torch.clamp(q_idx.to(torch.int64), 0, lq - 1)
            ki = torch.clamp(kv_idx.to(torch.int64), 0, lk - 1)
            qa = (qi if perm_q is None else perm_q[qi]) + offset
            ka = ki if perm_k is None else perm_k[ki]
            return _Env(b, h, None if head_group is None else head_group[h], qa, ka)

        return make

    def mask_mod(self, kv_length: int | None = None) -> Callable:
        """Flex's `mask_mod`; keys from `prepared.lk` up to `kv_length` are padding, never allowed."""
        expr = self.mask({g: f.mask for g, f in enumerate(self.prepared.forms)})
        make = self.env_maker()
        lk = self.prepared.lk
        if kv_length is None or kv_length <= lk:

            def mask_mod(b, h, q_idx, kv_idx):
                return expr(make(b, h, q_idx, kv_idx))

            return mask_mod

        def padded_mask_mod(b, h, q_idx, kv_idx):
            return expr(make(b, h, q_idx, kv_idx)) & (kv_idx < lk)

        return padded_mask_mod

    def score_mod(self) -> Callable | None:
        expr = self.modifiers({g: f.modifiers for g, f in enumerate(self.prepared.forms)})
        if expr is None:
            return None
        make = self.env_maker()

        def score_mod(score, b, h, q_idx, kv_idx):
            return expr(make(b, h, q_idx, kv_idx), score)

        return score_mod


# ---------------------------------------------------------------- block mask


def _ordered(rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int):
    """Row-major blocks -> (count [rows], indices [rows, num_cols]) in Flex's layout."""
    counts = torch.bincount(rows, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel()) - starts[rows]
    indices = torch.zeros(num_rows, num_cols, dtype=torch.int32)
    indices[rows, slot] = cols.to(torch.int32)
    return counts.to(torch.int32), indices


def group_block_tables(prepared: Prepared, group: int, padded_keys: bool = False):
    """(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) of one head group;
    with `padded_keys` the last key block holds padding, so it is partial wherever visited
    (Flex skips `mask_mod`, which masks the padding, in full blocks)."""
    sched = prepared.schedule
    rows, cols, full = prepared.runs(group).blocks()
    nq, nk = sched.num_q_blocks, sched.num_k_blocks
    if padded_keys:
        full = full & (cols != nk - 1)
    kv_num, kv_idx = _ordered(rows[~full], cols[~full], nq, nk)
    full_num, full_idx = _ordered(rows[full], cols[full], nq, nk)
    return kv_num, kv_idx, full_num, full_idx


def block_mask(
    prepared: Prepared, device, mask_mod=None, compute_q_blocks: bool = True, kv_length: int | None = None
) -> _flex.BlockMask:
    """maskc's schedule as a Flex `BlockMask` [1, heads or 1, q blocks, kv blocks], for
    `kv_length` keys (default `prepared.lk`; more: padding, see `cpu_key_length`)."""
    kv_length = prepared.lk if kv_length is None else kv_length
    padded = kv_length > prepared.lk
    forms = prepared.forms
    distinct: list[int] = []  # one representative group per distinct mask
    rep_of_group = []
    for g, form in enumerate(forms):
        same = next((r for r in distinct if forms[r].mask == form.mask), None)
        if same is None:
            distinct.append(g)
            same = g
        rep_of_group.append(distinct.index(same))
    tables = [group_block_tables(prepared, g, padded) for g in distinct]
    stacked = [torch.stack([t[i] for t in tables]) for i in range(4)]
    if len(distinct) == 1:
        per_head = [x[None] for x in stacked]  # [1, 1, ...]: Flex broadcasts over heads
    else:
        index = torch.tensor([rep_of_group[g] for g in prepared.head_group])
        per_head = [x[index][None] for x in stacked]
    kv_num, kv_idx, full_num, full_idx = (x.to(device) for x in per_head)
    return _flex.BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(prepared.block_q, prepared.block_k),
        mask_mod=mask_mod,
        seq_lengths=(prepared.lq, kv_length),
        compute_q_blocks=compute_q_blocks,
    )


@dataclass
class FlexLowering:
    """Everything `flex_attention` needs for one prepared call."""

    block_mask: _flex.BlockMask
    mask_mod: Callable
    score_mod: Callable | None


def lower(prepared: Prepared, device, compute_q_blocks: bool = True, kv_length: int | None = None) -> FlexLowering:
    """Lower a prepared program to a `BlockMask`, `mask_mod` and `score_mod` on `device`
    (kept on the `Prepared`, which the runtime reuses across calls of a static pattern),
    for k and v of `kv_length` keys (default `prepared.lk`; more: zero padding, masked)."""
    device = torch.device(device)
    kv_length = prepared.lk if kv_length is None else kv_length
    cache = prepared.__dict__.setdefault("_flex_lowerings", {})
    key = (str(device), compute_q_blocks, kv_length)
    if key not in cache:
        lowering = _Lowering(prepared, device)
        mask_mod = lowering.mask_mod(kv_length)
        score_mod = lowering.score_mod()
        bm = block_mask(prepared, device, mask_mod, compute_q_blocks, kv_length)
        cache[key] = FlexLowering(bm, mask_mod, score_mod)
    return cache[key]


# ---------------------------------------------------------------- keys on CPU


def cpu_key_length(lk: int, block_k: int) -> int:
    """How many keys Flex's CPU kernel is given for `lk` real ones: a multiple of
    `CPU_KEY_MULTIPLE`, so that no key chunk it computes q @ k^T over has 8 mod 16 keys
    (the kernel cuts keys into chunks of min(block_k, keys)); never past the last block."""
    padded = -(-lk // CPU_KEY_MULTIPLE) * CPU_KEY_MULTIPLE
    return min(padded, -(-lk // block_k) * block_k)


# ---------------------------------------------------------------- log-sum-exp on CPU


def cpu_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Prepared, scale: float) -> torch.Tensor:
    """The exact log-sum-exp [B, H, lq] of the same schedule from maskc's CPU executor
    (with one value channel: the log-sum-exp does not depend on v)."""
    from .cpu import cpu_attention

    return cpu_attention(q, k, v[..., :1], prepared, scale)[1].float()


# ---------------------------------------------------------------- backend


def _needs_grad(q, k, v, prepared: Prepared) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [q, k, v, *prepared.tensors.values.values()]
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def flex_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prepared: Prepared,
    scale: float,
    need_lse: bool = True,
):
    """Attention through `torch.compile(flex_attention)` with maskc's schedule.

    q [B, H, lq, D], k/v [B, Hk, lk, D] in the schedule's execution order.
    Returns (out like q, lse float32 [B, H, lq] or None when `need_lse` is False).
    """
    grad = _needs_grad(q, k, v, prepared)
    if q.device.type == "cpu":
        if grad:
            raise NotImplementedError(
                "backend='flex' cannot compute gradients on CPU: FlexAttention has no CPU backward. "
                "Use backend='cpu' or 'reference', or call under torch.no_grad()."
            )
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise MaskTypeError(f"backend='flex' on CPU runs float16, bfloat16 and float32, not {q.dtype}")
    if not grad:  # Flex refuses CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    kv_length = k.shape[2]
    if q.device.type == "cpu":  # keys in multiples of 16: see the module docstring
        kv_length = cpu_key_length(kv_length, prepared.block_k)
    lowering = lower(prepared, q.device, compute_q_blocks=grad, kv_length=kv_length)
    fk, fv = k, v
    if kv_length > k.shape[2]:
        fk, fv = (torch.nn.functional.pad(x, (0, 0, 0, kv_length - x.shape[2])) for x in (k, v))
    native_lse = need_lse and q.device.type != "cpu"
    kwargs = {"return_aux": _flex.AuxRequest(lse=True)} if native_lse else {}
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        result = compiled_flex_attention()(
            q,
            fk,
            fv,
            score_mod=lowering.score_mod,
            block_mask=lowering.block_mask,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
            **kwargs,
        )
    if native_lse:
        out, aux = result
        lse = aux.lse.float()
        empty = ~(lse > -math.inf)  # -inf or NaN: no allowed key
        lse = lse.masked_fill(empty, -math.inf)
    else:
        out = result
        lse = cpu_lse(q, k, v, prepared, scale) if need_lse else None
        empty = None if lse is None else lse == -math.inf
    if empty is not None:
        out = out.masked_fill(empty[..., None], 0)
    return out, lse
