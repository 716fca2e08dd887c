"""Normal form: a simplified union of conjunctions of literals.

A literal is an atom of `ir` or a negated atom that has no positive form.
Simplification folds constants, pushes negation into intervals, intersects
intervals within a conjunction, merges overlapping intervals across terms,
drops duplicates and absorbed terms, and uses the sizes of an instance to
turn constraints that always (never) hold into true (false).  The result is
canonical: equal meanings written differently usually normalise to the same
tree, and the tree is what kernels are generated from and cached under.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from maskc.dsl import ir

# Beyond this many conjunctions the expansion to disjunctive form stops and
# the simplified tree is kept as it is (still exact, just not flattened).
MAX_TERMS = 64

Term = tuple  # a conjunction: sorted tuple of literals


def _key(node: object) -> str:
    return repr(node)


# ---------------------------------------------------------------- negation


def _negate_atom(atom: ir.Mask) -> ir.Mask:
    """The complement of an atom, as positive atoms where possible."""
    if isinstance(atom, ir.Const):
        return ir.Const(not atom.value)
    if isinstance(atom, ir.Offset):
        parts = []
        if atom.lo is not None:
            parts.append(ir.Offset(atom.coord, None, atom.lo - 1))
        if atom.hi is not None:
            parts.append(ir.Offset(atom.coord, atom.hi + 1, None))
        return _or(parts)
    if isinstance(atom, ir.PosSet):
        if atom.modulus is None:
            return _or(
                [
                    ir.PosSet(atom.side, atom.coord, None, -(2**62), atom.lo),
                    ir.PosSet(atom.side, atom.coord, None, atom.hi, 2**62),
                ]
            )
        lo, hi = max(atom.lo, 0), min(atom.hi, atom.modulus)
        if lo >= hi:
            return ir.Const(True)
        return _or(
            [
                ir.PosSet(atom.side, atom.coord, atom.modulus, 0, lo),
                ir.PosSet(atom.side, atom.coord, atom.modulus, hi, atom.modulus),
            ]
        )
    if isinstance(atom, ir.OffsetMod) and atom.modulus <= 8:
        return _or(
            [ir.OffsetMod(atom.coord, atom.modulus, r) for r in range(atom.modulus) if r != atom.residue % atom.modulus]
        )
    return ir.Not(atom)


def _or(parts: list[ir.Mask]) -> ir.Mask:
    if not parts:
        return ir.Const(False)
    return parts[0] if len(parts) == 1 else ir.Or(tuple(parts))


def push_negations(node: ir.Mask, negate: bool = False) -> ir.Mask:
    """Negation normal form: `Not` only directly above atoms."""
    if isinstance(node, ir.Not):
        return push_negations(node.part, not negate)
    if isinstance(node, (ir.And, ir.Or)):
        parts = tuple(push_negations(p, negate) for p in node.parts)
        flip = isinstance(node, ir.And) == negate  # De Morgan
        return ir.Or(parts) if flip else ir.And(parts)
    return _negate_atom(node) if negate else node


# ---------------------------------------------------------------- conjunctions


class _Bounds:
    """What a conjunction implies about each coordinate, for range reasoning."""

    def __init__(self, q_range: tuple[int, int], k_range: tuple[int, int]) -> None:
        self.q_range = q_range
        self.k_range = k_range

    def coord_range(self, side: str, coord: ir.Coord) -> tuple[int, int]:
        lo, hi = self.q_range if side == "q" else self.k_range
        if coord.mod is not None and hi - lo + 1 >= coord.mod:
            return 0, coord.size - 1
        if coord.mod is not None:
            a, b = lo % coord.mod, hi % coord.mod
            if a > b:  # wraps
                return 0, coord.size - 1
            return a // coord.div, b // coord.div
        return lo // coord.div, hi // coord.div


def _simplify_term(literals: Iterable[ir.Mask], bounds: _Bounds | None) -> Term | None:
    """Intersect what can be intersected; None if the conjunction is empty."""
    offsets: dict[ir.Coord, tuple] = {}
    sets: dict[tuple, tuple] = {}
    mods: dict[tuple, int] = {}
    others: list[ir.Mask] = []
    for lit in literals:
        if isinstance(lit, ir.Const):
            if not lit.value:
                return None
            continue
        if isinstance(lit, ir.Offset):
            lo, hi = offsets.get(lit.coord, (None, None))
            lo = lit.lo if lo is None else (lo if lit.lo is None else max(lo, lit.lo))
            hi = lit.hi if hi is None else (hi if lit.hi is None else min(hi, lit.hi))
            offsets[lit.coord] = (lo, hi)
        elif isinstance(lit, ir.PosSet) and lit.modulus is None:
            key = (lit.side, lit.coord)
            lo, hi = sets.get(key, (-(2**62), 2**62))
            sets[key] = (max(lo, lit.lo), min(hi, lit.hi))
        elif isinstance(lit, ir.OffsetMod):
            key = (lit.coord, lit.modulus)
            residue = lit.residue % lit.modulus
            if mods.get(key, residue) != residue:
                return None
            mods[key] = residue
        else:
            others.append(lit)
    out: list[ir.Mask] = []
    for coord, (lo, hi) in offsets.items():
        if bounds is not None:
            qlo, qhi = bounds.coord_range("q", coord)
            klo, khi = bounds.coord_range("k", coord)
            dmin, dmax = klo - qhi, khi - qlo
            lo = None if lo is not None and lo <= dmin else lo
            hi = None if hi is not None and hi >= dmax else hi
            if (lo is not None and lo > dmax) or (hi is not None and hi < dmin):
                return None
        if lo is not None and hi is not None and lo > hi:
            return None
        if lo is not None or hi is not None:
            out.append(ir.Offset(coord, lo, hi))
    for (side, coord), (lo, hi) in sets.items():
        if bounds is not None:
            cmin, cmax = bounds.coord_range(side, coord)
            lo, hi = max(lo, cmin), min(hi, cmax + 1)
            if lo >= hi:
                return None
            if lo == cmin and hi == cmax + 1:
                continue
        elif lo >= hi:
            return None
        out.append(ir.PosSet(side, coord, None, lo, hi))
    for (coord, modulus), residue in mods.items():
        if modulus != 1:
            out.append(ir.OffsetMod(coord, modulus, residue))
    for lit in others:
        simplified = _simplify_literal(lit, bounds)
        if simplified is None:
            return None
        if simplified is not True:
            out.append(simplified)
    positive = {_key(x) for x in out if not isinstance(x, ir.Not)}
    if any(isinstance(x, ir.Not) and _key(x.part) in positive for x in out):
        return None  # a & ~a
    return tuple(sorted(set(out), key=_key))


def _simplify_literal(lit: ir.Mask, bounds: _Bounds | None):
    """A literal on its own: itself, True (always holds) or None (never)."""
    if isinstance(lit, ir.PosSet) and lit.modulus is not None:
        lo, hi = max(lit.lo, 0), min(lit.hi, lit.modulus)
        if lo >= hi:
            return None
        if lo == 0 and hi == lit.modulus:
            return True
        return replace(lit, lo=lo, hi=hi)
    if isinstance(lit, ir.Neighborhood) and not lit.causal and lit.dilation == 1 and lit.window >= lit.coord.size:
        return True
    if isinstance(lit, ir.RandomBlocks) and (lit.count == 0 or lit.hi <= lit.lo):
        return None
    return lit


# ---------------------------------------------------------------- disjunctions


def _implies(a: Term, b: Term) -> bool:
    """Every pair allowed by conjunction a is allowed by conjunction b."""
    for lit in b:
        if lit in a:
            continue
        if isinstance(lit, ir.Offset):
            match = [x for x in a if isinstance(x, ir.Offset) and x.coord == lit.coord]
            if match and _within(match[0].lo, match[0].hi, lit.lo, lit.hi):
                continue
        if isinstance(lit, ir.PosSet) and lit.modulus is None:
            match = [
                x
                for x in a
                if isinstance(x, ir.PosSet) and x.modulus is None and (x.side, x.coord) == (lit.side, lit.coord)
            ]
            if match and lit.lo <= match[0].lo and match[0].hi <= lit.hi:
                continue
        return False
    return True


def _within(lo_a, hi_a, lo_b, hi_b) -> bool:
    lower = lo_b is None or (lo_a is not None and lo_a >= lo_b)
    upper = hi_b is None or (hi_a is not None and hi_a <= hi_b)
    return lower and upper


def _merge_pair(a: Term, b: Term) -> Term | None:
    """Terms equal but for one interval literal that overlaps: their union."""
    if len(a) != len(b):
        return None
    rest_a = [x for x in a if x not in b]
    rest_b = [x for x in b if x not in a]
    if len(rest_a) != 1 or len(rest_b) != 1:
        return None
    x, y = rest_a[0], rest_b[0]
    if isinstance(x, ir.Offset) and isinstance(y, ir.Offset) and x.coord == y.coord:
        lo_x = x.lo if x.lo is not None else -(2**63)
        lo_y = y.lo if y.lo is not None else -(2**63)
        hi_x = x.hi if x.hi is not None else 2**63
        hi_y = y.hi if y.hi is not None else 2**63
        if max(lo_x, lo_y) <= min(hi_x, hi_y) + 1:
            lo = None if x.lo is None or y.lo is None else min(x.lo, y.lo)
            hi = None if x.hi is None or y.hi is None else max(x.hi, y.hi)
            merged = ir.Offset(x.coord, lo, hi)
            keep = [m for m in a if m != x]
            return tuple(sorted([*keep, merged] if (lo, hi) != (None, None) else keep, key=_key))
    if (
        isinstance(x, ir.PosSet)
        and isinstance(y, ir.PosSet)
        and (x.side, x.coord, x.modulus) == (y.side, y.coord, y.modulus)
        and max(x.lo, y.lo) <= min(x.hi, y.hi)
    ):
        merged = ir.PosSet(x.side, x.coord, x.modulus, min(x.lo, y.lo), max(x.hi, y.hi))
        keep = [m for m in a if m != x]
        return tuple(sorted([*keep, merged], key=_key))
    return None


def _simplify_terms(terms: list[Term], bounds: _Bounds | None) -> list[Term]:
    terms = list(dict.fromkeys(terms))
    changed = True
    while changed:
        changed = False
        # Absorption: drop a term implied by another.
        for i, a in enumerate(terms):
            if any(j != i and _implies(a, b) and (not _implies(b, a) or j < i) for j, b in enumerate(terms)):
                terms.pop(i)
                changed = True
                break
        if changed:
            continue
        # Interval merging.
        for i in range(len(terms)):
            for j in range(i + 1, len(terms)):
                merged = _merge_pair(terms[i], terms[j])
                if merged is not None:
                    again = _simplify_term(merged, bounds)
                    terms = [t for k, t in enumerate(terms) if k not in (i, j)]
                    if again is not None:
                        terms.append(again)
                    changed = True
                    break
            if changed:
                break
    return sorted(terms, key=lambda t: (len(t), _key(t)))


def _dnf(node: ir.Mask) -> list[list[ir.Mask]] | None:
    """Disjunctive form of a negation-normal tree, or None if it grows too big."""
    if isinstance(node, ir.Or):
        out: list[list[ir.Mask]] = []
        for part in node.parts:
            sub = _dnf(part)
            if sub is None:
                return None
            out.extend(sub)
            if len(out) > MAX_TERMS:
                return None
        return out
    if isinstance(node, ir.And):
        out = [[]]
        for part in node.parts:
            sub = _dnf(part)
            if sub is None or len(out) * len(sub) > MAX_TERMS:
                return None
            out = [a + b for a in out for b in sub]
        return out
    return [[node]]


def normalize(mask: ir.Mask, q_range: tuple[int, int] | None = None, k_range: tuple[int, int] | None = None) -> ir.Mask:
    """The normal form of `mask`; with the query and key position ranges it also
    folds constraints that the sizes make always or never true."""
    bounds = _Bounds(q_range, k_range) if q_range is not None and k_range is not None else None
    nnf = push_negations(mask)
    expanded = _dnf(nnf)
    if expanded is None:
        return _simplify_tree(nnf, bounds)
    terms = [t for t in (_simplify_term(lits, bounds) for lits in expanded) if t is not None]
    if any(len(t) == 0 for t in terms):
        return ir.Const(True)
    terms = _simplify_terms(terms, bounds)
    if not terms:
        return ir.Const(False)
    if any(len(t) == 0 for t in terms):
        return ir.Const(True)
    conjunctions = [t[0] if len(t) == 1 else ir.And(t) for t in terms]
    return conjunctions[0] if len(conjunctions) == 1 else ir.Or(tuple(conjunctions))


def _simplify_tree(node: ir.Mask, bounds: _Bounds | None) -> ir.Mask:
    """Constant folding and flattening for trees too big to expand."""
    if isinstance(node, (ir.And, ir.Or)):
        is_and = isinstance(node, ir.And)
        parts: list[ir.Mask] = []
        for part in (_simplify_tree(p, bounds) for p in node.parts):
            if isinstance(part, ir.Const):
                if part.value != is_and:  # False in And, True in Or
                    return part
                continue
            if type(part) is type(node):
                parts.extend(part.parts)
            else:
                parts.append(part)
        parts = sorted(set(parts), key=_key)
        if not parts:
            return ir.Const(is_and)
        if len(parts) == 1:
            return parts[0]
        return type(node)(tuple(parts))
    if isinstance(node, ir.Not):
        return node
    term = _simplify_term([node], bounds)
    if term is None:
        return ir.Const(False)
    if not term:
        return ir.Const(True)
    return term[0] if len(term) == 1 else ir.And(term)
