"""FlexAttention's `mask_mod` and `score_mod`, generated from the normal forms.

Each head group's normal form becomes expressions by the definitions of
`dsl.semantics` (`mask_expr`, `modifier_term`), and those run on Flex's index
tensors through the same torch interpreter as the dense evaluator
(`dsl.expr.Program`).  What is particular to Flex:

- Flex passes positions in *execution order*; they become absolute positions
  through the layout permutation and `q_offset` first (clamped: Flex may
  evaluate the padding rows and columns of a last block).
- One function serves every head.  The head groups' expressions are merged
  (`merge`): where they have the same shape, the constants that differ (window
  sizes, residues, ALiBi slopes, ...) become a lookup by head group, and tables
  drawn per group (random blocks, routing, clusters) are stacked; where shapes
  differ, each variant is computed and `torch.where` picks per head.
- Tables live on the device and are captured by the generated functions (Flex
  passes them to its kernel): random-block draws for the queries' rows, segment
  ids, routing selections, cluster memberships, ALiBi slopes per head, bias
  tables, polyline prefix sums.
- The modifiers are one expression of the logit `s` (`chain`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from maskc.dsl import evaluate, expr, ir, semantics
from maskc.dsl.expr import Const, Expr, Load, Named, Op, Reach, TableRef, Var
from maskc.dsl.random_blocks import draw
from maskc.dsl.spec import Sizes

S = Var("s")  # the logit a chain of modifiers changes


@dataclass(frozen=True)
class PerGroup:
    """The nodes behind one table in each head group (None: the group does not read it)."""

    nodes: tuple[object, ...]


# ---------------------------------------------------------------- merging head groups


def _group_value(values: dict[int, object], groups: int, dtype: str) -> Expr:
    """A value that may differ between head groups: read by group.  Groups outside
    `values` take a value of the others, never 0: a divisor there is still
    evaluated (torch.where computes both sides)."""
    fill = next(iter(values.values()))
    table = tuple(values.get(g, fill) for g in range(groups))
    return Load(TableRef("group", table, dtype=dtype), ())


def _data_key(table: TableRef) -> tuple:
    """What must agree for tables of several groups to be one table."""
    node = table.node
    if table.shared and not isinstance(node, PerGroup):
        names = {f.name for f in fields(node)}
        node = replace(node, **{n: v for n, v in (("head", 0), ("slope", 0.0)) if n in names})
    return (table.kind, table.part, table.dtype, node if table.shared else None)


def _signature(e: Expr) -> tuple:
    """What must agree between head groups for one expression to serve them all."""
    if isinstance(e, Var):
        return ("var", e.name)
    if isinstance(e, Const):
        return ("const", type(e.value).__name__)
    if isinstance(e, Op):
        return ("op", e.name)
    if isinstance(e, Load):
        return ("load", _data_key(e.table), len(e.index), e.guard is None)
    if isinstance(e, Reach):
        return ("reach", _data_key(e.table), e.axis)
    if isinstance(e, Named):
        return ("named", e.hint)
    raise TypeError(f"unknown expression {e!r}")


def _merge_tables(tables: dict[int, TableRef], groups: int) -> TableRef:
    first = next(iter(tables.values()))
    if all(t == first for t in tables.values()):
        return first
    nodes = tuple(tables[g].node if g in tables else None for g in range(groups))
    return replace(first, node=PerGroup(nodes))


def merge(exprs: dict[int, Expr], groups: int) -> Expr:
    """One expression with the value of `exprs[g]` for the heads of each group g."""
    values = list(exprs.values())
    first = values[0]
    if all(v == first for v in values):
        return first
    parts: dict[tuple, dict[int, Expr]] = {}
    for g, e in exprs.items():
        parts.setdefault(_signature(e), {})[g] = e
    if len(parts) > 1:
        *rest, last = (merge(p, groups) for p in parts.values())
        out = last
        for members, variant in zip(reversed(list(parts.values())[:-1]), reversed(rest), strict=True):
            member = _group_value({g: g in members for g in range(groups)}, groups, "bool")
            out = expr.where(member, variant, out)
        return out
    if isinstance(first, Const):
        kind = "bool" if isinstance(first.value, bool) else "float" if isinstance(first.value, float) else "int"
        return _group_value({g: e.value for g, e in exprs.items()}, groups, kind)
    if isinstance(first, Reach):
        return Reach(_merge_tables({g: e.table for g, e in exprs.items()}, groups), first.axis)
    kids = [expr.children(e) for e in exprs.values()]
    merged = tuple(merge({g: k[i] for g, k in zip(exprs, kids, strict=True)}, groups) for i in range(len(kids[0])))
    if isinstance(first, Load):
        table = _merge_tables({g: e.table for g, e in exprs.items()}, groups)
        n = len(first.index)
        return Load(table, merged[:n], merged[n] if first.guard is not None else None)
    return expr.rebuild(first, merged)


def chain(terms: list[semantics.Term]) -> Expr:
    """A list of modifier terms as one expression of the logit `s`."""
    s: Expr = S
    for kind, value in terms:
        if kind == "softcap":
            s = expr.op("mul", value, expr.op("tanh", expr.op("div", s, value)))
        else:
            s = s + expr.op("like", value, S)
    return s


# ---------------------------------------------------------------- tables


class Tables:
    """The tables of the generated functions, built once on the device."""

    def __init__(self, forms, head_group: list[int], tensors: evaluate.Tensors, sizes: Sizes, device) -> None:
        self.forms = forms
        self.groups = len(forms)
        self.head_group = head_group
        self.tensors = tensors
        self.sizes = sizes
        self.device = device
        self.bound: dict[TableRef, tuple[torch.Tensor, tuple[int, ...] | None, bool]] = {}

    def members(self, table: TableRef) -> dict[int, object]:
        if isinstance(table.node, PerGroup):
            return {g: n for g, n in enumerate(table.node.nodes) if n is not None}
        return dict.fromkeys(range(self.groups), table.node)

    def bind_all(self, e: Expr) -> None:
        """Build every table `e` reads (before Flex traces the functions that read them)."""
        for n in expr.nodes([e]):
            if isinstance(n, (Load, Reach)) and n.table not in self.bound:
                self.bound[n.table] = self._build(n.table)

    def bind(self, table: TableRef) -> tuple[torch.Tensor, tuple[int, ...] | None, bool]:
        """(data, origin of each logical axis or None, whether the group is the first index)."""
        return self.bound[table]

    def _build(self, table: TableRef):
        if table.kind == "group":
            dtype = {"bool": torch.bool, "float": torch.float32, "int": torch.int64}[table.dtype]
            return torch.tensor(table.node, dtype=dtype, device=self.device), None, False
        members = self.members(table)
        if table.kind == "alibi":
            return self._alibi(members).to(self.device), None, False
        if table.kind == "random":
            return self._random(table, members)
        stacked = isinstance(table.node, PerGroup) and not table.shared
        if not stacked:  # one tensor for every group
            ref = replace(table, node=next(iter(members.values())))
            return self._data(ref).to(self.device), None, False
        per_group = {g: self._data(replace(table, node=n)) for g, n in members.items()}
        return (
            self._stack(
                per_group, {"route": False, "vs_columns": False, "vs_diagonals": False, "cluster": 0}[table.kind]
            ),
            None,
            True,
        )

    def _data(self, table: TableRef) -> torch.Tensor:
        if table.kind == "ids":  # on the tensors' device, as [batch or 1, n]
            ids = evaluate.segment_ids(table.node, self.tensors)
            return ids[None] if ids.dim() == 1 else ids
        return evaluate.table_data(table, self.tensors)

    def _alibi(self, members: dict[int, ir.Alibi]) -> torch.Tensor:
        """The slope of each head's own term (the slopes tensor itself where every head reads it)."""
        nodes = [members.get(g) for g in self.head_group]
        named = {m.tensor for m in nodes if m is not None}
        if len(named) == 1 and None not in named and None not in nodes:
            return evaluate.alibi_slopes(nodes[0], self.tensors)
        slopes = []
        for h, m in enumerate(nodes):
            if m is not None and m.tensor is not None:
                slopes.append(evaluate.alibi_slopes(m, self.tensors)[h].float())
            else:
                slopes.append(torch.tensor(0.0 if m is None else m.slope))
        return torch.stack(slopes)

    def _stack(self, per_group: dict[int, torch.Tensor], fill) -> torch.Tensor:
        tables = list(per_group.values())
        shape = [max(t.shape[i] for t in tables) for i in range(tables[0].dim())]
        stack = torch.full((self.groups, *shape), fill, dtype=tables[0].dtype)
        for g, t in per_group.items():
            stack[(g, *(slice(0, n) for n in t.shape))] = t
        return stack.to(self.device)

    def _random(self, table: TableRef, members: dict[int, ir.RandomBlocks]):
        """Draws for every query block the queries fall in, from the lowest one on."""
        if not isinstance(table.node, PerGroup):
            members = {0: table.node}
        s = self.sizes
        positions = torch.arange(s.lq, dtype=torch.int64) + s.q_offset
        lo = hi = None
        for n in members.values():
            c = evaluate.coordinate(positions, n.coord)
            lo = int(c.min()) if lo is None else min(lo, int(c.min()))
            hi = int(c.max()) if hi is None else max(hi, int(c.max()))
        rows = torch.arange(lo, hi + 1, dtype=torch.int64)
        drawn = {g: draw(rows, n.count, n.seed, n.head, n.lo, n.hi, n.skip) for g, n in members.items()}
        width = max(max(d.shape[1] for d in drawn.values()), 1)
        drawn = {g: torch.cat([d, torch.full((d.shape[0], width - d.shape[1]), -1)], 1) for g, d in drawn.items()}
        if not isinstance(table.node, PerGroup):
            return next(iter(drawn.values())).to(self.device), (lo, 0), False
        return self._stack(drawn, -1), (lo, 0), True


class FlexEnv(expr.Env):
    """Flex's (b, h, q_idx, kv_idx), as the variables of the definitions."""

    def __init__(self, values: dict, tables: Tables, group) -> None:
        super().__init__(values, torch.float32)
        self.tables = tables
        self.group = group

    def read(self, load: Load, index: list, guard) -> object:
        data, origin, stacked = self.tables.bind(load.table)
        if load.table.kind == "group":
            return data[self.group]
        if stacked:
            index = [self.group, *index]
            origin = None if origin is None else (0, *origin)
        return expr.gather(data, index, clamp=guard is not None or origin is not None, origin=origin)

    def reach(self, table: TableRef, axis: int) -> int:
        data, _, stacked = self.tables.bind(table)
        return (data.shape[axis + stacked] - 1) // 2


@dataclass
class FlexCode:
    """The generated functions of one prepared call (`runtime.flex.lower` keeps them)."""

    forms: list[ir.HeadPattern]
    head_group: list[int]
    tensors: evaluate.Tensors
    sizes: Sizes
    lq: int
    lk: int
    perm_q: torch.Tensor | None
    perm_k: torch.Tensor | None
    device: torch.device

    def __post_init__(self) -> None:
        self.tables = Tables(self.forms, self.head_group, self.tensors, self.sizes, self.device)
        self.groups = len(self.forms)

    def _positions(self) -> Callable:
        """(b, h, q_idx, kv_idx) in execution order -> the environment of the definitions."""
        lq, lk, offset = self.lq, self.lk, self.sizes.q_offset
        perm_q = None if self.perm_q is None else self.perm_q.to(self.device, torch.int64)
        perm_k = None if self.perm_k is None else self.perm_k.to(self.device, torch.int64)
        head_group = torch.tensor(self.head_group, dtype=torch.int64, device=self.device) if self.groups > 1 else None
        tables = self.tables

        def env(b, h, q_idx, kv_idx, **more) -> FlexEnv:
            # Flex may evaluate padding rows/columns of the last block: clamp before any lookup.
            qi = torch.clamp(q_idx.to(torch.int64), 0, lq - 1)
            ki = torch.clamp(kv_idx.to(torch.int64), 0, lk - 1)
            q = (qi if perm_q is None else perm_q[qi]) + offset
            k = ki if perm_k is None else perm_k[ki]
            values = {"q": q, "k": k, "b": b, "h": h, "q_offset": offset, **more}
            return FlexEnv(values, tables, None if head_group is None else head_group[h])

        return env

    def mask_mod(self, kv_length: int | None = None) -> Callable:
        """Flex's `mask_mod`; keys from `lk` up to `kv_length` are padding, never allowed."""
        merged = merge({g: semantics.mask_expr(f.mask) for g, f in enumerate(self.forms)}, self.groups)
        self.tables.bind_all(merged)
        program = expr.compiled(merged)
        env, lk = self._positions(), self.lk

        def mask_mod(b, h, q_idx, kv_idx):
            (out,) = program(env(b, h, q_idx, kv_idx))
            return out if isinstance(out, torch.Tensor) else torch.full_like(q_idx, out, dtype=torch.bool)

        if kv_length is None or kv_length <= lk:
            return mask_mod

        def padded_mask_mod(b, h, q_idx, kv_idx):
            return mask_mod(b, h, q_idx, kv_idx) & (kv_idx < lk)

        return padded_mask_mod

    def score_mod(self) -> Callable | None:
        if not any(f.modifiers for f in self.forms):
            return None
        self._check_modifiers()
        chains = {g: chain([semantics.modifier_term(m) for m in f.modifiers]) for g, f in enumerate(self.forms)}
        merged = merge(chains, self.groups)
        self.tables.bind_all(merged)
        program = expr.compiled(merged)
        env = self._positions()

        def score_mod(score, b, h, q_idx, kv_idx):
            (out,) = program(env(b, h, q_idx, kv_idx, s=score))
            return out

        return score_mod

    def _check_modifiers(self) -> None:
        """Shape errors exactly as the reference reports them (one pair evaluated)."""
        qp = torch.tensor([[self.sizes.q_offset]], dtype=torch.int64)
        kp = torch.zeros(1, 1, dtype=torch.int64)
        for form in self.forms:
            evaluate.modifier_terms(form.modifiers, qp, kp, self.tensors)
