"""Shared helpers for benchmarks: timing, peak memory in a child process, tables, JSON."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeat: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Fastest of `repeat` runs, in seconds of `clock` (the machine is shared and noisy;
    `time.process_time` counts this process's CPU only, not waits or other processes)."""
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, *args: str, timeout: float = 900) -> dict:
    """Run `script --child ...` in a fresh interpreter; it prints one JSON line.
    A child that dies (out of memory, say) reports why instead."""
    cmd = [sys.executable, script, "--child", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    reason = "killed (out of memory?)" if done.returncode in (-9, 137) else f"exit {done.returncode}"
    tail = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
    return {"error": reason + (f": {tail[0][:120]}" if tail else "")}


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def write_json(path: str | None, data: object) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {path}")
