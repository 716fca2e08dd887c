"""How long maskc takes to accept or reject adversarial spec texts near the size limit.

    .venv/bin/python bench/parser.py [--json results.json] [--repeat N]

Every text is about as long as a spec may be (dsl.parser.MAX_SPEC_CHARS, 1 MB)
unless its name says otherwise.  For each, `maskc.compile` either returns a
program or raises a located `MaskError`; the time is the best of --repeat runs.
For the texts that compile, the canonical printer (`Program.source`) and the
normal form at lq = 64 are timed too.  The last line names the slowest text:
the goal is that none takes a second.  The CPU time is given too: on a shared
machine the wall time also counts other processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json
from maskc.dsl.parser import MAX_SPEC_CHARS

import maskc

SIZE = MAX_SPEC_CHARS


def fill(unit: str, size: int = SIZE, head: str = "", tail: str = "") -> str:
    """`head`, then `unit` repeated, then `tail`: at most `size` characters."""
    return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail


def chain(term: str, op: str, size: int = SIZE) -> str:
    """`term op term op ... term` within `size` characters."""
    n = (size + len(op)) // (len(term) + len(op))
    return op.join([term] * n)


def nested(open_: str, inner: str, close: str, size: int = SIZE) -> str:
    n = (size - len(inner)) // (len(open_) + len(close))
    return open_ * n + inner + close * n


CASES: dict[str, Callable[[], str]] = {
    "window(1 + 1 + ...)": lambda: "window(" + chain("1", " + ", SIZE - 8) + ")",
    "all|all|...": lambda: chain("all", "|"),
    "400,000 nested parentheses": lambda: nested("(", "all", ")", 800_003),
    "~~~...all": lambda: fill("~", tail="all"),
    "40k-term | chain (480 KB)": lambda: chain("window(1)", " | ", 40_000 * 12),
    "flat | chain": lambda: chain("window(1)", " | "),
    "flat & chain": lambda: chain("causal", " & "),
    "flat - chain": lambda: chain("all", " - "),
    "mixed set operators": lambda: chain("causal & window(3) - sink(1)", " | "),
    "long arithmetic": lambda: "window(" + chain("2 * 3 - 4 // 2 + 1 % 3", " + ", SIZE - 8) + ")",
    "deep value parentheses": lambda: "window(" + nested("(", "1", ")", SIZE - 8) + ")",
    "long negation chain": lambda: "window(" + fill("-", SIZE - 8, tail="1") + ")",
    "nested on blocks": lambda: fill("on blocks(1) ", tail="all"),
    "nested heads { }": lambda: nested("heads { 0 .. heads: ", "all", " }"),
    "nested calls f(f(...))": lambda: nested("f(", "", ")"),
    "long comment": lambda: fill("x", head="# ", tail="\nall"),
    "many comment lines": lambda: fill("# comment\n", tail="all"),
    "long identifier": lambda: fill("a"),
    "long string": lambda: fill("x", head='all with polyline(a, b, path = "', tail='")'),
    "long number": lambda: fill("9", head="window(", tail=")"),
    "many definitions": lambda: "".join(f"pattern p{i} = all\n" for i in range(SIZE // 22)) + "p0",
    "many calling definitions": lambda: (
        "".join(f"pattern p{i}() = p{i + 1} | causal\n" for i in range(2000)) + "pattern p2000() = all\np0"
    ),
    "many arguments": lambda: "keys(" + chain("0 .. 1", ", ", SIZE - 6) + ")",
    "long with clause": lambda: "all with " + chain("softcap(1)", ", ", SIZE - 9),
    "many lines": lambda: chain("window(1)", "\n| "),
    "whitespace": lambda: fill(" ", tail="all"),
    "unexpected character at the end": lambda: chain("all", " | ", SIZE - 2) + " $",
}


def run(text: str, repeat: int) -> tuple[float, float, str, maskc.Program | None]:
    """(wall seconds, CPU seconds, outcome, program): the best of `repeat` runs."""
    wall, cpu, outcome, program = float("inf"), float("inf"), "", None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            program = maskc.compile(text)
            outcome = "compiled"
        except maskc.MaskError as e:
            program = None
            where = f"{e.line}:{e.column}: " if e.line is not None else ""
            outcome = f"{type(e).__name__} {where}{e.message}"
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, outcome, program


def after(program: maskc.Program) -> float:
    """Printing and the normal form of a compiled program."""
    start = time.perf_counter()
    program.source()
    program.normal_form(64)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--repeat", type=int, default=3, help="runs per text (the best counts)")
    args = parser.parse_args()
    maskc.compile("causal")  # imports and the library, once
    rows, results = [], []
    for name, make in CASES.items():
        text = make()
        seconds, cpu, outcome, program = run(text, args.repeat)
        rest = after(program) if program is not None else None
        results.append(
            {
                "text": name,
                "chars": len(text),
                "seconds": seconds,
                "cpu_seconds": cpu,
                "outcome": outcome,
                "print_normal_s": rest,
            }
        )
        shown = outcome if len(outcome) <= 64 else outcome[:61] + "..."
        rest_text = "" if rest is None else f"{rest:.3f}"
        rows.append([name, f"{len(text):,}", f"{seconds:.3f}", f"{cpu:.3f}", rest_text, shown])
        print(f"  .. {name}: {seconds:.3f} s", file=sys.stderr, flush=True)
    print(table(rows, ["text", "chars", "compile s", "cpu s", "print+normal s", "outcome"]))
    worst = max(results, key=lambda r: r["seconds"])
    print(
        f"worst: {worst['text']} ({worst['chars']:,} chars) in {worst['seconds']:.3f} s "
        f"({worst['cpu_seconds']:.3f} s of CPU; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    write_json(args.json, {"cases": results, "worst": worst})


if __name__ == "__main__":
    main()
