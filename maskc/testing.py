"""Fuzzing a pattern: random shapes and tensors that fit it, every check against the reference.

    >>> report = maskc.testing.fuzz(maskc.compile("natten2d", k=3), examples=20)
    >>> assert report.ok, report

For each case (lengths, heads, batch, grid sizes, head dim and seeded random
tensors, drawn by hypothesis within what the pattern accepts) `check_case`
verifies that the block schedule is exact against the dense mask and that
every backend's forward output (and, where the backend has one, backward:
gradients of q, k, v and of the pattern's float tensors) matches
`Program.reference`.  A failure is shrunk to the smallest case hypothesis finds
and reported with a `maskc fuzz ... --case ...` command that replays it.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from maskc.dsl import ast, ir
from maskc.dsl.errors import MaskError

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
    examples: int
    backends: tuple[str, ...]
    failure: FuzzError | None = None
    command: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def __str__(self) -> str:
        lines = [f"fuzzed {self.spec!r}: {self.examples} cases, backends {', '.join(self.backends) or 'none'}"]
        lines += [f"  backend {name} skipped: {why}" for name, why in self.skipped.items()]
        if self.failure is None:
            lines.append("  all checks passed")
        else:
            lines.append(f"  FAILED {self.failure.check}: {self.failure.detail}")
            lines.append(f"  smallest case: {self.failure.case.text()}")
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


# Above this many keys a case keeps to one batch element and at most two heads,
# so that the dense reference stays small.
LARGE = 2048


def size_hints(program) -> dict[str, list[int]]:
    """Grid sizes worth trying besides small ones: a library pattern's documented example."""
    from maskc import patterns

    entry = patterns.entries().get(program.name or "")
    if entry is None or program.spec.unit.filename != entry.definition.unit.filename:
        return {}
    return {name: [value] for name, value in entry.example.items() if name != "lq"}


def case_strategy(program, max_len: int = 80, hints: dict[str, list[int]] | None = None):
    """Hypothesis strategy of cases the pattern accepts (grid sizes when it has grids).

    Grid sizes are drawn from 1 .. 9 and from `hints` (default: the library
    example's sizes), since some patterns need large grids (a 7x7x7 window)."""
    from hypothesis import strategies as st

    spec = program.spec
    names = spec.bindable()
    grids = [g for g in spec._grids()]
    head_options = [h for h in range(1, 9) if _heads_fit(program, h)] or [1]
    hints = size_hints(program) if hints is None else hints

    def size(name: str):
        small = st.integers(1, 9)
        return st.one_of(small, st.sampled_from(hints[name])) if hints.get(name) else small

    @st.composite
    def draw(draw_):
        sizes = {name: draw_(size(name)) for name in names}
        large = 1
        for value in sizes.values():
            large *= value
        options = [h for h in head_options if large <= LARGE or h <= 2] or head_options[:1]
        heads = draw_(st.sampled_from(options))
        kv_heads = draw_(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
        if grids:
            lq = lk = _tokens(grids[0], sizes)
        else:
            lk = draw_(st.integers(1, max_len))
            lq = draw_(st.integers(1, lk))
        return Case(
            lq=lq,
            lk=lk,
            heads=heads,
            kv_heads=kv_heads,
            batch=1 if lk > LARGE else draw_(st.integers(1, 2)),
            dim=draw_(st.sampled_from([16, 24, 40])),
            seed=draw_(st.integers(0, 2**16)),
            sizes=tuple(sorted(sizes.items())),
        )

    return draw().filter(lambda c: (c.lk <= 4 * max_len or c.lk <= _product_of_hints(hints)) and _fits(program, c))


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


def _product_of_hints(hints: dict[str, list[int]]) -> int:
    total = 1
    for values in hints.values():
        total *= max(values)
    return total


def _heads_fit(program, heads: int) -> bool:
    for length in (16, 64):
        try:
            program.instantiate(length, heads=heads, **{n: 4 for n in program.spec.bindable()})
            return True
        except MaskError:
            continue
    return False


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


def fuzz(
    program,
    *,
    examples: int = 50,
    backends: tuple[str, ...] | None = None,
    seed: int | None = None,
    max_len: int = 80,
    progress: Callable[[int, Case], None] | None = None,
    command: str | None = None,
    hints: dict[str, list[int]] | None = None,
) -> Report:
    """Check `program` on `examples` random cases; see the module docstring."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    names, skipped = available_backends(backends)
    spec_text = _describe(program)
    report = Report(spec_text, examples, names, skipped=skipped)
    failures: list[FuzzError] = []
    count = [0]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=seed is None,
        print_blob=False,
    )
    @given(case=case_strategy(program, max_len, hints))
    def run(case: Case) -> None:
        count[0] += 1
        if progress is not None:
            progress(count[0], case)
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
        report.failure = failures[-1]  # hypothesis replays the smallest failing case last
        sets = "".join(f" --set {k}={v}" for k, v in program.params.items())
        base = command or f"maskc fuzz {shlex.quote(program.source().strip())}{sets}"
        report.command = f"{base} --case {shlex.quote(report.failure.case.text())} --backend {' '.join(names)}"
    return report


def replay(program, case_text: str, backends: tuple[str, ...] | None = None) -> Report:
    """Run the checks of one case (from a `--case` string)."""
    names, skipped = available_backends(backends)
    case = Case.parse(case_text)
    report = Report(_describe(program), 1, names, skipped=skipped)
    try:
        check_case(program, case, names)
    except FuzzError as failure:
        report.failure = failure
    return report
