"""The `maskc` command (also `python -m maskc`).

`check` checks .mask files, `show` draws a pattern's mask or block schedule
(ASCII, PNG), `compile` prints a pattern's normal form or its generated Triton
source, `fuzz` checks a pattern's schedule and kernels on random cases, and
`patterns` lists the library, and `plan` simulates a context-parallel plan
(KV bytes each rank receives, visited blocks per rank) without processes.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch

import maskc
from maskc import patterns as library
from maskc.codegen import plan
from maskc.codegen.emit import emit, emit_clustered
from maskc.codegen.irtext import pattern_text
from maskc.dsl import evaluate, parse, printer
from maskc.dsl.errors import MaskError
from maskc.dsl.spec import load
from maskc.picture import (
    PNG_MAX_CELLS,
    ascii_picture,
    head_ranges,
    png_cell,
    reduce_mask,
    schedule_picture,
    write_plan_png,
    write_png,
    write_schedule_png,
)
from maskc.runtime.tuning import POLICY


def _parse_set(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"maskc: --set expects NAME=INTEGER, got {item!r}")
        try:
            out[name] = int(value)
        except ValueError:
            raise SystemExit(f"maskc: --set {name} expects an integer, got {value!r}") from None
    return out


def _split_params(program_spec: str, values: dict[str, int], pattern: str | None = None) -> tuple[dict, dict]:
    """--set values naming a parameter fix it; the others are call-time sizes."""
    probe = maskc.compile(program_spec, pattern=pattern)
    d = probe.spec.definition
    declared = {p.name for p in d.node.params} if d else set()
    params = {k: v for k, v in values.items() if k in declared}
    sizes = {k: v for k, v in values.items() if k not in declared}
    return params, sizes


def demo_tensors(program: maskc.Program, instance, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for patterns that read data (segments, route, cluster)."""
    from maskc.dsl import ir

    s = instance.sizes
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for pattern in instance.patterns:
        for node in ir.walk(pattern.mask):
            if isinstance(node, ir.Segments):
                n = node.coord.size
                cuts = torch.sort(torch.randint(1, max(2, n), (3,), generator=g)).values
                out[node.tensor] = torch.bucketize(torch.arange(n), cuts, right=True)[None]
            if isinstance(node, (ir.Route, ir.Cluster, ir.VerticalSlash)):
                out.setdefault("q", torch.randn(1, s.heads, s.lq, 16, generator=g))
                out.setdefault("k", torch.randn(1, s.heads, s.lk, 16, generator=g))
            if isinstance(node, ir.Route) and node.scores:
                nq = math.prod(c.size for c in node.query_regions)
                nk = math.prod(c.size for c in node.regions)
                out.setdefault(node.scores, torch.randn(1, s.heads, nq, nk, generator=g))
            if isinstance(node, ir.Cluster):
                out.setdefault("centroids", torch.randn(s.heads, node.clusters, 16, generator=g))
    return out


def cmd_check(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            text = Path(path).read_text()
        except OSError as e:
            print(f"{path}: cannot read: {e.strerror}", file=sys.stderr)
            status = 1
            continue
        try:
            module = parse(text, path)
            kw = dict(filename=path, library=library.lookup, library_names=library.names)
            for d in module.defs:
                load(text, pattern=d.name, **kw)
            if module.main is not None:
                load(text, **kw)
            count = len(module.defs) + (module.main is not None)
            print(f"{path}: ok ({count} pattern{'s' if count != 1 else ''})")
        except MaskError as e:
            print(str(e), file=sys.stderr)
            status = 1
    return status


def _program_and_instance(args: argparse.Namespace):
    values = _parse_set(args.set)
    params, sizes = _split_params(args.spec, values, args.pattern)
    program = maskc.compile(args.spec, pattern=args.pattern, **params)
    lk = args.lk or args.lq
    instance = program.instantiate(args.lq, lk, heads=args.heads, **sizes)
    data = demo_tensors(program, instance, args.seed)
    return program, instance, data, sizes


def cmd_show(args: argparse.Namespace) -> int:
    try:
        program, instance, data, sizes = _program_and_instance(args)
        tensors = evaluate.Tensors(data, instance)
        if args.schedule:
            sched = program.schedule(
                args.lq,
                args.lk,
                block_q=args.block,
                block_k=args.block,
                heads=args.heads,
                layout=args.layout,
                **sizes,
                **data,
            )
        else:
            reduced = reduce_mask(instance, tensors, max_cells=args.width)
            if args.png:  # the PNG has its own, finer reduction (1 position a pixel up to PNG_MAX_CELLS)
                cell = png_cell(args.lq, args.lk or args.lq)
                fine = reduced if reduced.cell == (cell, cell) else reduce_mask(instance, tensors, PNG_MAX_CELLS)
    except (MaskError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 1
    print(program.source().rstrip())
    if program.params:
        print(f"(parameters: {', '.join(f'{k} = {v}' for k, v in program.params.items())})")
    if data:
        print(f"(random {', '.join(sorted(data))} with seed {args.seed})")
    if args.schedule:
        print(schedule_picture(sched, args.width))
        if args.png:
            layout = write_schedule_png(sched, args.png)
            print(f"wrote {args.png} ({layout.describe('block')}; full dark blue, partial orange, empty white)")
        return 0
    print(ascii_picture(reduced, args.lq, args.lk or args.lq))
    if args.png:
        layout = write_png(fine, args.png)
        rule = "black allowed, white not" if layout.cell == 1 else "grey by the fraction allowed, black all"
        print(f"wrote {args.png} ({layout.describe('position')}; {rule})")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    try:
        program, instance, _, _ = _program_and_instance(args)
    except MaskError as e:
        print(str(e), file=sys.stderr)
        return 1
    forms = plan.normal_forms(instance)
    clustered = plan.clustered_splits(forms)  # the Triton backend runs these gathered into cluster order
    for i, form in enumerate(forms):
        heads = [h for h, g in enumerate(instance.head_group) if g == i]
        if len(forms) > 1:
            print(f"# heads {head_ranges(heads)}")
        if args.emit == "normal":
            print(pattern_text(form))
        else:
            title, version = program.source(), maskc.__version__
            # the tiles the Triton backend runs under the interpreter (a GPU may pick a smaller rung)
            c = POLICY.triton_config(forms, title, torch.float16, args.head_dim, args.lq, "cpu")
            if clustered is not None:
                source = emit_clustered(form, clustered[i][1], title, c.block_q, c.block_k, version)
            else:
                source = emit(form, title, c.block_q, c.block_k, version)
            print(source.text)
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    from maskc import testing

    try:
        params, sizes = _split_params(args.spec, _parse_set(args.set), args.pattern)
        program = maskc.compile(args.spec, pattern=args.pattern, **params)
    except MaskError as e:
        print(str(e), file=sys.stderr)
        return 1
    backends = tuple(args.backend) if args.backend else None
    if args.case:
        report = testing.replay(program, args.case, backends)
        print(report)
        return 0 if report.ok else 1
    words = ["maskc", "fuzz", args.spec, *(["--pattern", args.pattern] if args.pattern else [])]
    words += [w for item in args.set for w in ("--set", item)]
    command = shlex.join(words)
    budget = f", time budget {args.time_budget:g} s" if args.time_budget > 0 else ""
    print(f"fuzzing up to {args.examples} cases{budget}", file=sys.stderr, flush=True)
    start = time.monotonic()

    def progress(n: int, case: testing.Case, note: str) -> None:
        what = f" ({note})" if note else ""
        elapsed = time.monotonic() - start
        print(f"  case {n}/{args.examples}{what} at {elapsed:.1f} s: {case.text()}", file=sys.stderr, flush=True)

    try:
        report = testing.fuzz(
            program,
            examples=args.examples,
            backends=backends,
            seed=args.seed,
            progress=progress,
            command=command,
            sizes=sizes,
            time_budget=args.time_budget,
        )
    except MaskError as e:  # --set sizes the pattern does not accept
        print(str(e), file=sys.stderr)
        return 1
    print(report)
    return 0 if report.ok else 1


def cmd_patterns(args: argparse.Namespace) -> int:
    for name, definition in sorted(library.definitions().items()):
        d = definition.node
        params = ", ".join(printer.to_text(p) for p in d.params)
        grid = f" on grid({printer.values_text(d.body.grid)})" if d.body.grid is not None else ""
        print(f"{name}({params}){grid}    [{definition.unit.filename}]")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from maskc.parallel.plan import make_plan
    from maskc.parallel.simulate import summarize

    try:
        program, _, data, sizes = _program_and_instance(args)
        start = time.perf_counter()
        ids = {n: t for n, t in data.items() if n not in ("q", "k", "centroids")}
        plan_ = make_plan(program, args.lq, args.lk, heads=args.heads, balance=args.balance, block=args.block,
                          world=args.world, bindings={**sizes, **ids})  # fmt: skip
        if plan_.schedule is None:  # route / cluster: the exchange of one call, for the random q and k
            sched = program.schedule(args.lq, args.lk, block_q=plan_.block, block_k=plan_.block, heads=args.heads,
                                     layout="rowmajor", **sizes, **data)  # fmt: skip
            plan_ = plan_.with_schedule(sched)
        elapsed = time.perf_counter() - start
    except MaskError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(program.source().rstrip())
    if data:
        print(f"(random {', '.join(sorted(data))} with seed {args.seed})")
    print(f"planned in {1000 * elapsed:.0f} ms")
    summary = summarize(plan_, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype_bytes=args.dtype_bytes)
    print(summary.text())
    if args.png:
        write_plan_png(plan_, args.png)
        print(f"wrote {args.png}")
    return 0


def _add_instance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="spec text, a .mask file, or a library pattern name")
    p.add_argument("--lq", type=int, required=True, help="number of queries")
    p.add_argument("--lk", type=int, help="number of keys (default: lq)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--pattern", help="which definition of a multi-pattern file")
    p.add_argument("--set", action="append", default=[], metavar="NAME=INT", help="a parameter or grid size")
    p.add_argument("--seed", type=int, default=0, help="seed for random tensors of data-dependent patterns")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskc", description="A compiler for attention sparsity patterns.")
    parser.add_argument("--version", action="version", version=f"maskc {maskc.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="check .mask files; exit 1 with a located error if any is wrong")
    check.add_argument("files", nargs="+")
    check.set_defaults(run=cmd_check)

    show = sub.add_parser("show", help="draw a pattern's mask")
    _add_instance_args(show)
    show.add_argument("--png", help="also write a PNG picture here")
    show.add_argument("--width", type=int, default=64, help="characters across (default 64)")
    show.add_argument("--schedule", action="store_true", help="draw the block schedule (full, partial, empty)")
    show.add_argument("--block", type=int, default=64, help="block size of --schedule (default 64)")
    show.add_argument("--layout", default="auto", choices=plan.LAYOUTS, help="token layout of --schedule")
    show.set_defaults(run=cmd_show)

    comp = sub.add_parser("compile", help="print what the compiler makes of a pattern")
    _add_instance_args(comp)
    comp.add_argument(
        "--emit",
        choices=["normal", "triton"],
        default="normal",
        help="normal: the simplified normal form; triton: the generated kernel source",
    )
    comp.add_argument("--head-dim", type=int, default=64, help="head dim the Triton tiles are chosen for")
    comp.set_defaults(run=cmd_compile)

    fuzz = sub.add_parser("fuzz", help="check a pattern's schedule and kernels on random cases")
    fuzz.add_argument("spec", help="spec text, a .mask file, or a library pattern name")
    fuzz.add_argument("--pattern", help="which definition of a multi-pattern file")
    fuzz.add_argument(
        "--set", action="append", default=[], metavar="NAME=INT", help="fix a parameter or a grid size (h=56)"
    )
    fuzz.add_argument("--examples", type=int, default=50, help="number of random cases (default 50)")
    fuzz.add_argument("--backend", nargs="+", choices=["cpu", "triton", "flex"], help="backends to check")
    fuzz.add_argument("--seed", type=int, help="random seed (default: derandomised, the same cases every run)")
    fuzz.add_argument("--case", help="replay one case printed by an earlier failure")
    fuzz.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="stop cleanly before the next case once this is spent (default 120; 0: no limit)",
    )
    fuzz.set_defaults(run=cmd_fuzz)

    cp = sub.add_parser("plan", help="simulate a context-parallel plan: KV bytes received and blocks per rank")
    _add_instance_args(cp)
    cp.add_argument("--world", type=int, required=True, help="number of ranks")
    cp.add_argument("--balance", default="blocks", choices=["blocks", "contiguous", "zigzag"])
    cp.add_argument("--block", type=int, default=None, help="tokens per block (default 64)")
    cp.add_argument("--kv-heads", type=int, default=1, help="key/value heads counted in bytes (default 1)")
    cp.add_argument("--head-dim", type=int, default=64, help="head dim counted in bytes (default 64)")
    cp.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element (default 2: bf16)")
    cp.add_argument("--png", help="also draw which rank computes which blocks")
    cp.set_defaults(run=cmd_plan)

    pats = sub.add_parser("patterns", help="list the library's patterns and their parameters")
    pats.set_defaults(run=cmd_patterns)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
