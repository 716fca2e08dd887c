"""Fuzzing a pattern: random shapes and tensors that fit it, every check against the reference.

    >>> report = maskc.testing.fuzz(maskc.compile("natten2d", k=3), examples=20)
    >>> assert report.ok, report

For each case (lengths, heads, batch, grid sizes, head dim and seeded random
tensors, drawn by hypothesis within what the pattern accepts: small, and around
the pattern's own windows, blocks, strides and grid sizes, see `plan_cases`;
no larger than a `Budget` for the backends allows) `check_case`
verifies that the block schedule is exact against the dense mask and that
every backend's forward output (and, where the backend has one, backward:
gradients of q, k, v and of the pattern's float tensors) matches
`Program.reference`.  A failure is shrunk to the smallest case hypothesis finds
and reported with a `maskc fuzz ... --case ...` command that replays it.
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from maskc.dsl import ast, ir
from maskc.dsl.errors import MaskError
from maskc.dsl.spec import Instance

# FlexAttention compiles once per shape (seconds on CPU), so fuzzing it is opt-in: --backend flex.
DEFAULT_BACKENDS = ("cpu", "triton")
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


@dataclass(frozen=True)
class Case:
    """One fuzz case; `seed` fixes every random tensor."""

    lq: int
    lk: int
    heads: int
    kv_heads: int
    batch: int
    dim: int
    seed: int
    sizes: tuple[tuple[str, int], ...] = ()

    def text(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if k != "sizes"]
        parts += [f"{k}={v}" for k, v in self.sizes]
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> Case:
        values = dict(item.split("=", 1) for item in text.split(",") if item)
        fixed = {k: int(values.pop(k)) for k in ("lq", "lk", "heads", "kv_heads", "batch", "dim", "seed")}
        return cls(**fixed, sizes=tuple((k, int(v)) for k, v in values.items()))


class FuzzError(AssertionError):
    def __init__(self, case: Case, check: str, detail: str) -> None:
        self.case, self.check, self.detail = case, check, detail
        super().__init__(f"{check}: {detail}")


@dataclass
class Report:
    spec: str
    examples: int  # cases asked for
    backends: tuple[str, ...]
    failure: FuzzError | None = None
    command: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    ran: int = 0  # cases checked, shrinking included
    seconds: float = 0.0
    stopped: str | None = None  # why the run ended early
    values: list[int] = field(default_factory=list)  # the pattern's values the sizes were drawn around

    @property
    def ok(self) -> bool:
        return self.failure is None

    def __str__(self) -> str:
        backends = ", ".join(self.backends) or "none"
        lines = [f"fuzzed {self.spec!r}: {self.ran} cases in {self.seconds:.1f} s, backends {backends}"]
        if self.values:
            lines.append(f"  lengths and grid sizes drawn around {', '.join(map(str, self.values))}")
        lines += [f"  backend {name} skipped: {why}" for name, why in self.skipped.items()]
        if self.stopped:
            lines.append(f"  stopped early ({self.ran} of {self.examples} cases): {self.stopped}")
        if self.failure is None:
            lines.append("  all checks passed")
        else:
            lines.append(f"  FAILED {self.failure.check}: {self.failure.detail}")
            label = "failing case" if self.stopped else "smallest case"
            lines.append(f"  {label}: {self.failure.case.text()}")
            lines.append(f"  reproduce: {self.command}")
        return "\n".join(lines)


# ----------------------------------------------------------------- what fits the pattern


def _tensor_needs(program, case: Case) -> dict[str, str]:
    """Call-time tensors the pattern reads at these sizes, and what kind each is."""
    instance = program.instantiate(case.lq, case.lk, heads=case.heads, **dict(case.sizes))
    needs: dict[str, str] = {}
    for pattern in instance.patterns:
        for node in ir.walk(pattern.mask):
            if isinstance(node, ir.Segments):
                needs[node.tensor] = "ids"
            elif isinstance(node, ir.Cluster):
                needs["centroids"] = f"centroids:{node.clusters}"
            elif isinstance(node, ir.Route) and node.scores:
                nq = math.prod(c.size for c in node.query_regions)
                needs[node.scores] = f"scores:{nq}x{math.prod(c.size for c in node.regions)}"
        for m in pattern.modifiers:
            if isinstance(m, ir.Polyline):
                needs[m.alpha] = needs[m.beta] = f"decay:{m.coords[0].size}x{m.coords[1].size}"
            elif isinstance(m, ir.Bias):
                needs[m.tensor] = f"bias:{len(m.coords)}"
            elif isinstance(m, ir.Alibi) and m.tensor:
                needs[m.tensor] = "slopes"
    return needs


def make_tensors(program, case: Case, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """q, k, v and the pattern's tensors for a case, all from `case.seed`."""
    g = torch.Generator().manual_seed(case.seed)
    out = {
        "q": torch.randn(case.batch, case.heads, case.lq, case.dim, generator=g, dtype=dtype),
        "k": torch.randn(case.batch, case.kv_heads, case.lk, case.dim, generator=g, dtype=dtype),
        "v": torch.randn(case.batch, case.kv_heads, case.lk, case.dim, generator=g, dtype=dtype),
    }
    for name, kind in _tensor_needs(program, case).items():
        if kind == "ids":
            cuts = torch.sort(torch.randint(1, max(2, case.lk), (case.batch, 3), generator=g)).values
            out[name] = torch.stack([torch.bucketize(torch.arange(case.lk), c, right=True) for c in cuts])
        elif kind.startswith("centroids"):
            n = int(kind.split(":")[1])
            out[name] = torch.randn(case.heads, n, case.dim, generator=g, dtype=dtype)
        elif kind.startswith("decay"):
            rows, cols = map(int, kind.split(":")[1].split("x"))
            out[name] = -torch.rand(case.batch, case.heads, rows, cols, generator=g, dtype=dtype) * 0.5
        elif kind.startswith("scores"):  # route's external block scores: no gradient flows to them
            nq, nk = map(int, kind.split(":")[1].split("x"))
            out[name] = torch.randn(case.batch, case.heads, nq, nk, generator=g, dtype=dtype)
        elif kind.startswith("bias"):
            axes = int(kind.split(":")[1])
            out[name] = torch.randn(case.heads, *([5] * axes), generator=g, dtype=dtype) * 0.5
        else:
            out[name] = torch.rand(case.heads, generator=g, dtype=dtype) * 0.5
    return out


def _fits(program, case: Case) -> bool:
    try:
        program.instantiate(case.lq, case.lk, heads=case.heads, **dict(case.sizes))
    except MaskError:
        return False
    return True


# The Triton backend runs CPU tensors under its interpreter, where every pair of a
# NOMINAL_TILE-query tile and a NOMINAL_TILE-key tile costs about half a CPU second
# (forward and both backward kernels) per batch element and head.  A case for it
# spans at most this many, a few seconds (3,136 tokens took minutes): one head
# gets 192 x 192 tokens, or 64 queries on 576 keys.
INTERPRETER_TILE_PAIRS = 9
NOMINAL_TILE = 64
# Without the interpreter the dense reference is the cost: pairs over batch and heads.
REFERENCE_PAIRS = 1 << 22
# Sizes of the implementation every pattern is tried across: the schedule check's
# 16-token blocks and the kernels' 32- and 64-token tiles.
IMPLEMENTATION_SIZES = (16, 32, 64)
# Pattern values above this are not worth lengths around them (seeds, 2**20 windows).
VALUE_LIMIT = 1 << 16
# Drawn grid sizes stay below this (a user's 56 x 56 needs --set).
GRID_SIZE_LIMIT = 64
# 1-D patterns are probed at these lengths for the IR values they reach.
PROBE_LENGTHS = (64, 256, 4096)


@dataclass(frozen=True)
class Budget:
    """How large a case may be; `interpreted` when a backend runs under the Triton interpreter."""

    interpreted: bool

    @classmethod
    def for_backends(cls, backends: tuple[str, ...]) -> Budget:
        return cls("triton" in backends)  # fuzz tensors live on the CPU: Triton interprets

    def fits(self, lq: int, lk: int, heads: int = 1, batch: int = 1) -> bool:
        if self.interpreted:
            pairs = -(-lq // NOMINAL_TILE) * -(-lk // NOMINAL_TILE)
            return batch * heads * pairs <= INTERPRETER_TILE_PAIRS
        return batch * heads * lq * lk <= REFERENCE_PAIRS

    def most_queries(self, lk: int) -> int:
        """The most queries a one-head case with `lk` keys may have (0: none)."""
        lo, hi = 0, lk
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits(mid, lk) else (lo, mid - 1)
        return lo

    def most_keys(self, limit: int = VALUE_LIMIT) -> int:
        """The most keys a one-query, one-head case may have, up to `limit`."""
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits(1, mid) else (lo, mid - 1)
        return lo


def pattern_values(program, instance: Instance | None = None) -> list[int]:
    """The pattern's own positive integers, where off-by-one errors live: its parameters
    and literals, and the window, block, stride, dilation and grid sizes in `instance`'s
    IR (on a 1-D sequence, blocked values also in tokens)."""
    spec = program.spec
    sequence = not any(True for _ in spec.grid_sizes())
    found = {v for v in spec.literal_params().values()}
    found |= {abs(node.value) for node in spec.reachable_nodes() if isinstance(node, ast.IntLit)}
    if instance is not None:
        for pattern in instance.patterns:
            for node in ir.walk(pattern.mask):
                found |= _ir_values(node, sequence)
    return sorted(v for v in found if 1 <= v <= VALUE_LIMIT)


def _ir_values(node: object, sequence: bool) -> set[int]:
    if isinstance(node, ir.Offset):
        raw = {abs(v) for v in (node.lo, node.hi) if v is not None}
        if node.lo is not None and node.hi is not None:
            raw.add(node.hi - node.lo + 1)  # keys in the window
    elif isinstance(node, ir.OffsetMod):
        raw = {node.modulus, node.residue}
    elif isinstance(node, ir.PosSet):
        raw = {node.lo, node.hi, node.modulus or 0}
    elif isinstance(node, ir.Neighborhood):
        raw = {node.window, node.dilation, node.stride, node.window * node.dilation}
    elif isinstance(node, ir.RandomBlocks):
        raw = {node.count, node.lo, node.hi, node.skip}
    elif isinstance(node, ir.Cluster):
        raw = {node.clusters}
    elif isinstance(node, ir.Route):
        raw = {v for v in (node.topk, node.stride) if v is not None}
    elif isinstance(node, ir.VerticalSlash):
        raw = {node.vertical, node.slash, node.last, node.sink, node.local}
    else:
        raw = set()
    coords = [node.coord] if hasattr(node, "coord") else list(getattr(node, "regions", ()))
    out = set(raw)
    for c in coords:
        out |= {v for v in (c.div, c.mod or 0) if v > 1}
        if sequence and c.div > 1 and c.mod is None:  # blocks of the sequence: the same values in tokens
            out |= {v * c.div for v in raw}
    return out


def around(values: list[int], limit: int) -> list[int]:
    """v - 1, v, v + 1 and a few multiples (2v, 2v + 1, 3v + 1) of each value, within 1 .. limit."""
    out = {x for v in values for x in (v - 1, v, v + 1, 2 * v, 2 * v + 1, 3 * v + 1)}
    return sorted(x for x in out if 1 <= x <= limit)


@dataclass
class Plan:
    """What `case_strategy` draws from, worked out once per fuzz run."""

    names: list[str]  # integer names bound at call time (grid sizes, parameters)
    grids: list[tuple]
    fixed: dict[str, int]  # names the user fixed (--set h=56)
    hints: dict[str, list[int]]
    values: list[int]  # pattern_values
    lengths: list[int]  # sequence lengths around the values (1-D patterns)
    size_choices: dict[str, list[int]]  # per name: small sizes and those around the values that fit
    head_options: list[int]
    floor: int  # tokens of the smallest case that fits (grid patterns; 0: any length)
    budget: Budget
    max_len: int


def plan_cases(
    program,
    max_len: int = 80,
    hints: dict[str, list[int]] | None = None,
    *,
    sizes: dict[str, int] | None = None,
    budget: Budget | None = None,
) -> Plan:
    """Which lengths and grid sizes to draw: small ones, and around the pattern's own values."""
    spec = program.spec
    names = spec.bindable()
    grids = list(spec.grid_sizes())
    fixed = dict(sizes or {})
    hints = size_hints(program) if hints is None else hints
    budget = budget or Budget(False)
    small = list(range(1, 10))
    choices = sorted({*small, *around(pattern_values(program), GRID_SIZE_LIMIT)})
    floor, probe, trial = _smallest(program, names, grids, fixed, choices, hints)
    values = pattern_values(program, probe)
    if grids:
        choices = sorted({*small, *around(values, GRID_SIZE_LIMIT)})
    per_name = {n: _fitting(program, grids, trial, n, choices, probe) or choices for n in names if n not in fixed}
    if hints and trial is not None:
        hinted = {**trial, **{n: v[0] for n, v in hints.items() if n in names and v}, **fixed}
        tokens = _tokens(grids[0], hinted) if grids else 0
        if not (budget.fits(tokens, tokens) or tokens <= floor):
            hints = {}  # the example's grid is over the budget: draw smaller ones
    lengths = around(sorted({*values, *IMPLEMENTATION_SIZES}), budget.most_keys())
    heads = [h for h in range(1, 9) if _heads_fit(program, h, probe)] or [1]
    return Plan(names, grids, fixed, hints, values, lengths, per_name, heads, floor, budget, max_len)


def _smallest(program, names, grids, fixed, choices, hints) -> tuple[int, Instance | None, dict[str, int] | None]:
    """Tokens, instance and sizes of the smallest fitting case with all free sizes equal
    (or the hinted ones): how large a grid pattern must be, and an instance to read values from."""
    trials = []
    for v in choices:
        trials.append({n: v for n in names})
        trials.append({n: hints[n][0] if hints.get(n) else v for n in names})
    for trial in trials:
        trial.update(fixed)
    if grids:
        trials.sort(key=lambda t: _tokens(grids[0], t))
        attempts = [(_tokens(grids[0], t), t) for t in trials]
    else:
        attempts = [(length, t) for t in trials[:2] for length in PROBE_LENGTHS]
    for tokens, trial in attempts:
        try:
            return (tokens if grids else 0), program.instantiate(tokens, **trial), trial
        except MaskError:
            continue
    return 0, None, None


def _fitting(program, grids, trial, name, choices, probe) -> list[int]:
    """The choices for one size that fit with the others as in `trial` (a 7x7 window
    needs 7 rows; tiles of 8 need multiples of 8), so that few drawn cases are rejected."""
    if trial is None:
        return []
    out = []
    for v in choices:
        sizes = {**trial, name: v}
        tokens = _tokens(grids[0], sizes) if grids else probe.sizes.lk
        try:
            program.instantiate(tokens, **sizes)
        except MaskError:
            continue
        out.append(v)
    return out


def size_hints(program) -> dict[str, list[int]]:
    """Grid sizes worth trying besides small ones: a library pattern's documented example."""
    from maskc import patterns

    entry = patterns.entries().get(program.name or "")
    if entry is None or program.spec.unit.filename != entry.definition.unit.filename:
        return {}
    return {name: [value] for name, value in entry.example.items() if name != "lq"}


def case_strategy(program, max_len: int = 80, hints: dict[str, list[int]] | None = None, *, plan: Plan | None = None):
    """Hypothesis strategy of cases the pattern accepts, within the plan's budget.

    Lengths (1-D patterns) and grid sizes are drawn small, and around the pattern's own
    values (`pattern_values`: windows, blocks, strides, grid sizes) so that their edges
    are crossed; half the cases of a library pattern take its example's grid sizes
    (`hints`), since some need large grids (a 7x7x7 window).  A case above the budget
    is drawn only where the pattern fits nothing smaller, with one head and batch 1."""
    from hypothesis import assume
    from hypothesis import strategies as st

    plan = plan or plan_cases(program, max_len, hints)
    budget = plan.budget

    @st.composite
    def draw(draw_):
        hinted = bool(plan.hints) and draw_(st.booleans())
        sizes = {}
        for name in plan.names:
            if name in plan.fixed:
                sizes[name] = plan.fixed[name]
            elif hinted and plan.hints.get(name):
                sizes[name] = draw_(st.sampled_from(plan.hints[name]))
            else:
                sizes[name] = draw_(st.sampled_from(plan.size_choices[name]))
        if plan.grids:
            lq = lk = _tokens(plan.grids[0], sizes)
        else:
            lk = draw_(st.one_of(st.integers(1, plan.max_len), st.sampled_from(plan.lengths or [1])))
            top = min(lk, budget.most_queries(lk))
            assume(top > 0)
            near = [n for n in plan.lengths if n <= top] or [top]
            lq = draw_(st.one_of(st.integers(1, top), st.sampled_from(near), st.just(top)))
        assume(budget.fits(lq, lk) or lk <= plan.floor)  # above the budget only when nothing smaller fits
        options = [h for h in plan.head_options if budget.fits(lq, lk, h)] or plan.head_options[:1]
        heads = draw_(st.sampled_from(options))
        kv_heads = draw_(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
        case = Case(
            lq=lq,
            lk=lk,
            heads=heads,
            kv_heads=kv_heads,
            batch=draw_(st.sampled_from([b for b in (1, 2) if budget.fits(lq, lk, heads, b)] or [1])),
            dim=draw_(st.sampled_from([16, 24, 40])),
            seed=draw_(st.integers(0, 2**16)),
            sizes=tuple(sorted(sizes.items())),
        )
        assume(_fits(program, case))
        return case

    return draw()


def _tokens(grid: tuple, sizes: dict[str, int]) -> int:
    """Tokens of a grid whose sizes are names or numbers; else the product of all size
    names (a grid over tiles, `grid(h // th, w // tw)`, still covers h * w tokens)."""
    total = 1
    for value in grid:
        if isinstance(value, ast.Name) and value.id in sizes:
            total *= sizes[value.id]
        elif isinstance(value, ast.IntLit):
            total *= value.value
        else:
            total = 1
            for size in sizes.values():
                total *= size
            return total
    return total


def _heads_fit(program, heads: int, probe: Instance | None) -> bool:
    if probe is None:
        return heads == 1
    try:
        program.instantiate(probe.sizes.lq, heads=heads, **probe.sizes.names)
    except MaskError:
        return False
    return True


# ----------------------------------------------------------------- checks


def _close(name: str, case: Case, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    if got.shape != want.shape:
        raise FuzzError(case, name, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = (got.detach().double() - want.detach().double()).abs()
    bound = tol + tol * want.detach().double().abs()
    if not bool((err <= bound).all()):
        where = tuple(int(i) for i in torch.nonzero(err > bound)[0])
        raise FuzzError(case, name, f"max error {float(err.max()):.3g} (tolerance {tol:g}), first at {where}")


def check_schedule(program, case: Case, tensors: dict) -> None:
    sizes = dict(case.sizes)
    data = {k: v for k, v in tensors.items() if k != "v"}
    sched = program.schedule(case.lq, case.lk, heads=case.heads, block_q=16, block_k=16, layout="auto", **sizes, **data)
    dense = program.mask(case.lq, case.lk, heads=case.heads, batch=case.batch, **sizes, **data)
    perm_q = sched.perm_q if sched.perm_q is not None else torch.arange(case.lq)
    perm_k = sched.perm_k if sched.perm_k is not None else torch.arange(case.lk)
    dense = dense[..., perm_q, :][..., :, perm_k]
    states = _block_states(dense, 16, 16)
    got = sched.to_dense()
    if not torch.equal(got, states):
        bad = torch.nonzero(got != states)[0].tolist()
        raise FuzzError(
            case,
            "schedule",
            f"block {tuple(bad)} is {int(got[tuple(bad)])}, the dense mask says {int(states[tuple(bad)])}",
        )


def _block_states(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """0 empty / 1 partial / 2 full per block; over a batch: visited if any needs it, full if all fill it."""
    batched = dense if dense.dim() == 4 else dense[None]
    b, h, lq, lk = batched.shape
    nq, nk = -(-lq // bq), -(-lk // bk)
    padded = torch.zeros(b, h, nq * bq, nk * bk, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[..., :lq, :lk] = batched
    valid[..., :lq, :lk] = True
    some = padded.view(b, h, nq, bq, nk, bk).any(5).any(3).any(0)
    every = (padded | ~valid).view(b, h, nq, bq, nk, bk).all(5).all(3).all(0)
    return torch.where(every, 2, torch.where(some, 1, 0)).to(torch.int8)


def check_backend(program, case: Case, tensors: dict, backend: str) -> None:
    dtype = torch.float32
    tol = TOLERANCE[dtype]
    sizes = dict(case.sizes)
    grads_wanted = backend != "flex"  # FlexAttention has no CPU backward
    floats = [n for n, t in tensors.items() if t.is_floating_point() and n not in ("q", "k", "v", "centroids")]
    leaves = {
        n: t.detach().clone().requires_grad_(grads_wanted and t.is_floating_point() and n != "centroids")
        for n, t in tensors.items()
    }
    bindings = {n: t for n, t in leaves.items() if n not in ("q", "k", "v")}
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    try:
        out = program(q, k, v, backend=backend, **sizes, **bindings)
    except MaskError:
        raise
    ref = program.reference(q, k, v, **sizes, **bindings)
    _close(f"{backend} forward", case, out, ref, tol)
    if not grads_wanted:
        return
    inputs = [q, k, v] + [leaves[n] for n in floats]
    names = ["q", "k", "v", *floats]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=out.dtype)
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, grad, allow_unused=True)
    for name, a, b in zip(names, got, want, strict=True):
        a = torch.zeros_like(inputs[names.index(name)]) if a is None else a
        b = torch.zeros_like(inputs[names.index(name)]) if b is None else b
        _close(f"{backend} d{name}", case, a, b, tol * 10)


def check_case(program, case: Case, backends: tuple[str, ...]) -> None:
    tensors = make_tensors(program, case)
    check_schedule(program, case, tensors)
    for backend in backends:
        check_backend(program, case, tensors, backend)


def available_backends(requested: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The backends that can run here; the others with the reason."""
    wanted = requested or DEFAULT_BACKENDS
    ok, skipped = [], {}
    for name in wanted:
        if name == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                skipped[name] = "triton is not installed"
                continue
        ok.append(name)
    return tuple(ok), skipped


def _describe(program) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in program.params.items())
    return program.source().strip() + (f" [{params}]" if params else "")


class _OutOfTime(BaseException):
    """Raised inside the hypothesis test when the time budget is spent.  A BaseException,
    because hypothesis takes an Exception for a failure and would shrink it."""


Progress = Callable[[int, Case, str], None]


def fuzz(
    program,
    *,
    examples: int = 50,
    backends: tuple[str, ...] | None = None,
    seed: int | None = None,
    max_len: int = 80,
    progress: Progress | None = None,
    command: str | None = None,
    hints: dict[str, list[int]] | None = None,
    sizes: dict[str, int] | None = None,
    time_budget: float | None = None,
) -> Report:
    """Check `program` on `examples` random cases; see the module docstring.

    `sizes` fixes grid sizes or call-time parameters; `time_budget` (seconds) stops
    the run cleanly before the next case once spent, reporting how many ran (a
    failure found so far is kept, shrunk as far as the time allowed).  `progress`
    is called before each case with its number, the case and a note ("shrinking"
    once a failure is being shrunk)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    start = time.monotonic()
    names, skipped = available_backends(backends)
    plan = plan_cases(program, max_len, hints, sizes=sizes, budget=Budget.for_backends(names))
    report = Report(_describe(program), examples, names, skipped=skipped, values=plan.values)
    failures: list[FuzzError] = []
    deadline = None if not time_budget or time_budget <= 0 else start + time_budget

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=seed is None,
        print_blob=False,
        report_multiple_bugs=False,  # shrink the first failure at once, rather than search on for others
        phases=[p for p in Phase if p != Phase.explain],  # explaining varies the smallest case: minutes of kernels
    )
    @given(case=case_strategy(program, plan=plan))
    def run(case: Case) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise _OutOfTime
        report.ran += 1
        if progress is not None:
            progress(report.ran, case, "shrinking" if failures else "")
        try:
            check_case(program, case, names)
        except FuzzError as failure:
            failures.append(failure)
            raise

    if seed is not None:
        run = hypothesis_seed(seed)(run)
    try:
        run()
    except FuzzError:
        pass
    except _OutOfTime:
        report.stopped = f"time budget of {time_budget:g} s spent" + (
            "; shrinking cut short, the case shown may not be the smallest" if failures else ""
        )
    report.seconds = time.monotonic() - start
    if failures:
        report.failure = failures[-1]  # hypothesis replays the smallest failing case last
        sets = "".join(f" --set {k}={v}" for k, v in program.params.items())
        base = command or f"maskc fuzz {shlex.quote(program.source().strip())}{sets}"
        report.command = f"{base} --case {shlex.quote(report.failure.case.text())} --backend {' '.join(names)}"
    return report


def replay(program, case_text: str, backends: tuple[str, ...] | None = None) -> Report:
    """Run the checks of one case (from a `--case` string)."""
    names, skipped = available_backends(backends)
    case = Case.parse(case_text)
    report = Report(_describe(program), 1, names, skipped=skipped, ran=1)
    start = time.monotonic()
    try:
        check_case(program, case, names)
    except FuzzError as failure:
        report.failure = failure
    report.seconds = time.monotonic() - start
    return report
