"""Readable text for `ir` trees (what `maskc compile --emit normal` prints)."""

from __future__ import annotations

from maskc.dsl import ir


def coord_text(side: str, coord: ir.Coord) -> str:
    text = side if coord.mod is None else f"({side} % {coord.mod})"
    return text if coord.div == 1 else f"{text} // {coord.div}"


def _bound(value: int | None) -> str:
    return "" if value is None else str(value)


def mask_text(node: ir.Mask, top: bool = True) -> str:
    if isinstance(node, ir.Const):
        return "all" if node.value else "none"
    if isinstance(node, ir.Or):
        sep = "\n| " if top else " | "
        text = sep.join(mask_text(p, False) for p in node.parts)
        return text if top else f"({text})"
    if isinstance(node, ir.And):
        return " & ".join(mask_text(p, False) for p in node.parts)
    if isinstance(node, ir.Not):
        return f"~({mask_text(node.part, False)})"
    if isinstance(node, ir.Offset):
        q, k = coord_text("q", node.coord), coord_text("k", node.coord)
        diff = f"{k} - {q}" if node.coord.div == 1 and node.coord.mod is None else f"[{k}] - [{q}]"
        if node.lo is not None and node.lo == node.hi:
            return f"{diff} == {node.lo}"
        if node.lo is None:
            return f"{diff} <= {node.hi}"
        if node.hi is None:
            return f"{diff} >= {node.lo}"
        return f"{node.lo} <= {diff} <= {node.hi}"
    if isinstance(node, ir.OffsetMod):
        q, k = coord_text("q", node.coord), coord_text("k", node.coord)
        return f"([{k}] - [{q}]) % {node.modulus} == {node.residue}"
    if isinstance(node, ir.PosSet):
        c = coord_text(node.side, node.coord)
        if node.modulus is not None:
            return f"[{c}] % {node.modulus} in {node.lo} .. {node.hi}"
        if node.lo <= -(2**61):
            return f"{c} < {node.hi}"
        if node.hi >= 2**61:
            return f"{c} >= {node.lo}"
        return f"{node.lo} <= {c} < {node.hi}"
    if isinstance(node, ir.Neighborhood):
        c = coord_text("·", node.coord)
        causal = ", causal" if node.causal else ""
        return f"neighborhood[{c} of {node.coord.size}](w={node.window}, d={node.dilation}, s={node.stride}{causal})"
    if isinstance(node, ir.RandomBlocks):
        c = coord_text("·", node.coord)
        return (
            f"random[{c}](r={node.count}, seed={node.seed}, head={node.head}, among={node.lo} .. {node.hi}, "
            f"skip={node.skip})"
        )
    if isinstance(node, ir.Segments):
        return f"segments({node.tensor})[{coord_text('·', node.coord)}]"
    if isinstance(node, ir.Route):
        regions = ", ".join(coord_text("·", c) for c in node.regions)
        who = "shared" if node.head is None else f"head={node.head}"
        selector = next(
            f"{s}={getattr(node, s)}" for s in ("topk", "mass", "cdf", "threshold") if getattr(node, s) is not None
        )
        scorer = f"scores={node.scores}" if node.scores else f"score={node.score}"
        if node.score == "antidiagonal" and not node.scores:
            scorer += f", stride={node.stride}"
        extra = "".join(
            [
                ", first=True" if node.first else "",
                f", query_regions=[{', '.join(coord_text('·', c) for c in node.q_regions)}]" if node.q_regions else "",
            ]
        )
        return f"route({selector}, {scorer}, regions=[{regions}], own={node.own}, causal={node.causal}, {who}{extra})"
    if isinstance(node, ir.VerticalSlash):
        return (
            f"vertical_slash(v={node.vertical}, s={node.slash}, last={node.last}, sink={node.sink}, "
            f"local={node.local}, causal={node.causal}, head={node.head})"
        )
    if isinstance(node, ir.Cluster):
        return f"cluster(n={node.clusters}, size={node.size}, head={node.head})"
    raise TypeError(f"unknown node {node!r}")


def modifier_text(m: ir.Modifier) -> str:
    if isinstance(m, ir.Alibi):
        slope = f"{m.tensor}[h]" if m.tensor else (f"{m.slope:.6g}" if m.slope else "slope[h]")
        return f"alibi(-{slope} * |k - q|)"
    if isinstance(m, ir.Softcap):
        return f"softcap({m.cap:g})"
    if isinstance(m, ir.Bias):
        return f"bias({m.tensor}[{m.head}], axes={len(m.coords)})"
    if isinstance(m, ir.Polyline):
        return (
            f"polyline({m.alpha}, {m.beta}, path={m.path}, head={m.head}, grid={m.coords[0].size}x{m.coords[1].size})"
        )
    if isinstance(m, ir.Decay):
        return f"decay({m.log_gamma:.6g} * manhattan over {len(m.coords)} axes)"
    raise TypeError(f"unknown modifier {m!r}")


def pattern_text(p: ir.HeadPattern) -> str:
    text = mask_text(p.mask)
    if p.modifiers:
        text += "\nwith " + ", ".join(modifier_text(m) for m in p.modifiers)
    return text
