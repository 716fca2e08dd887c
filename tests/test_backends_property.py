"""Every backend against the dense reference on random specs from the grammar-aware strategy.

A case is a valid spec from `strategies.valid_cases()` (atoms, set operations,
`on blocks`, `on grid`, `heads { }`, definitions, modifiers), wrapped in an outer
pattern that may add per-head groups with `none` (and empty head ranges), a
tensor atom (`segments`, `route`, `cluster`) and modifiers (`alibi` with a slopes
tensor, `bias` with a table, `softcap`, `polyline(decay)`), at lengths up to 40
with lq != lk, both signs of `q_offset`, GQA, batch 1-2 and small head dims.
Tensors come from `maskc.testing.make_tensors`, as `maskc fuzz` makes them.

Each backend (cpu, flex, triton) must give the reference's output and
log-sum-exp, and cpu and triton (flex where FlexAttention has a backward here)
its gradients for q, k, v and the float tensor bindings, through both output
and log-sum-exp.  Tolerances are the project's float32 ones (atol = rtol = 3e-5,
as tests/test_issue10_runtime.py; float32 rounding is seen ~1e-6).  A case is
skipped only when the reference itself refuses it with a `MaskError` whose
message is one of the documented refusals below; anything else is a failure.

CI runs a few cases per backend (the Triton interpreter and Flex's per-shape
compiles are slow); MASKC_PROPERTY_SCALE=N multiplies the counts for a longer
campaign, e.g. `MASKC_PROPERTY_SCALE=10 pytest tests/test_backends_property.py`.
The first campaign (2 CPU cores, about 27 minutes, 10 of them shrinking) passed
about 1,950 cpu, 200 triton and 32 flex cases, and found two Triton bugs, both in
the ALiBi slopes table (`triton_backend._table_args` takes the first `Alibi` of
each head's form, not the table's own): a head group without `alibi` raised
StopIteration, and `alibi(slopes)` with `alibi` used one slope for both.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from strategies import valid_cases

import maskc
from maskc import testing

SCALE = max(1, int(os.environ.get("MASKC_PROPERTY_SCALE", "1")))
EXAMPLES = {"cpu": 25, "flex": 8, "triton": 6}
TOL = {"atol": 3e-5, "rtol": 3e-5}
PAIR_EPS = 1e-7  # per pair, for gradients summed over every pair (modifier tensors)
MODIFIERS = ("alibi(slopes)", "alibi", "softcap(2.5)", "softcap(30)", "bias(table)", "polyline(decay = 0.5)")
MAX_LEN = {"cpu": 40, "flex": 40, "triton": 24}  # the interpreter runs one Python program per tile

# What the reference may refuse, documented in the README: on a grid (also one laid over
# blocks) the queries must lie within the keys' positions (a q_offset that puts rows
# before or after them is refused).
DOCUMENTED_REFUSALS = re.compile(r"on a grid( \(here of blocks of \d+ tokens\))?, queries must lie on the grid")


@dataclass
class BackendCase:
    """A spec, the sizes it runs at and the seed of every random tensor."""

    text: str
    lq: int
    lk: int
    heads: int
    kv_heads: int
    batch: int
    dim: int
    q_offset: int | None
    seed: int
    sizes: dict[str, int] = field(default_factory=dict)

    def fuzz_case(self) -> testing.Case:
        sizes = tuple(sorted(self.sizes.items()))
        return testing.Case(self.lq, self.lk, self.heads, self.kv_heads, self.batch, self.dim, self.seed, sizes)


def _head_groups(draw, heads: int, inner: str) -> str:
    """`heads { }` over literal ranges (some empty), each group `none`, the inner pattern
    or `causal`; at least one group is `none` and one the inner pattern."""
    n = draw(st.integers(2, 3))
    cuts = sorted(draw(st.lists(st.integers(0, heads), min_size=n - 1, max_size=n - 1)))
    bounds = [0, *cuts, heads]
    more = draw(st.lists(st.sampled_from(["none", inner, "causal"]), min_size=n - 2, max_size=n - 2))
    bodies = [inner, "none", *more]
    bodies = draw(st.permutations(bodies))
    cases = [f"{bounds[i]} .. {bounds[i + 1]}: {bodies[i]}" for i in range(n)]
    return "heads { " + "; ".join(draw(st.permutations(cases))) + " }"


@st.composite
def backend_cases(draw, max_len: int) -> BackendCase:
    """A valid case from the grammar-aware strategy, wrapped with head groups, a tensor
    atom and modifiers, at free lengths (1-D specs), GQA, batch, head dim and q_offset."""
    base = draw(valid_cases())
    grid = "grid" in base.text
    if grid or base.lk > max_len:
        lk, lq = base.lk, draw(st.integers(1, base.lk))  # the grid fixes the keys
    else:  # any lq; more keys keep neighborhood windows fitting
        lk, lq = draw(st.integers(base.lk, max_len)), draw(st.integers(1, max_len))
    heads = base.heads
    name = "p" if "pattern p(" in base.text else "base"
    defs = base.text if name == "p" else f"pattern base = {base.text}"
    body = name
    if draw(st.integers(0, 2)) == 0:
        body = _head_groups(draw, heads, body)
    extra = draw(st.sampled_from(["", "", "segments", "route", "cluster", "vertical_slash"]))
    if extra == "segments":
        body = f"{body} {draw(st.sampled_from(['&', '|']))} segments(ids)"
    elif extra == "route":
        body = f"{body} {draw(st.sampled_from(['&', '|']))} {_route(draw)}"
    elif extra == "vertical_slash":
        v, s, last = draw(st.integers(0, 6)), draw(st.integers(0, 6)), draw(st.integers(1, 9))
        flags = f", sink = {draw(st.integers(0, 3))}, local = {draw(st.integers(0, 3))}"
        flags += f", causal = {str(draw(st.booleans())).lower()}"
        body = f"{body} {draw(st.sampled_from(['&', '|']))} vertical_slash({v}, {s}, last = {last}{flags})"
    elif extra == "cluster":
        n = draw(st.integers(1, 3))
        body = f"{body} {draw(st.sampled_from(['&', '|']))} cluster({n}, size = {draw(st.integers(1, 12))})"
    mods = draw(st.permutations([m for m in MODIFIERS if draw(st.integers(0, 4)) == 0]))
    text = f"{defs}\n{body}{' with ' + ', '.join(mods) if mods else ''}\n"
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        q_offset = None  # lk - lq: queries aligned to the end of the keys
    elif kind == 1 and lq <= lk:
        q_offset = draw(st.integers(0, lk - lq))  # queries among the keys
    elif kind == 2:
        q_offset = draw(st.integers(-lq - 2, -1))  # rows before the keys
    else:
        q_offset = draw(st.integers(max(0, lk - lq + 1), lk + 2))  # rows after the keys
    return BackendCase(
        text,
        lq,
        lk,
        heads,
        kv_heads,
        batch=draw(st.integers(1, 2)),
        dim=draw(st.sampled_from([4, 8, 16, 20])),
        q_offset=q_offset,
        seed=draw(st.integers(0, 2**16)),
        sizes=dict(base.bindings),
    )


def _route(draw) -> str:
    """A `route` with any scorer (or external scores), selector and forced blocks."""
    block = draw(st.integers(1, 8))
    topk = f"topk = {draw(st.integers(1, 3))}"
    selector = draw(st.sampled_from([topk, "mass = 0.7", "cdf = 0.5", "threshold = 0.2"]))
    args = [selector, f"block = {block}"]
    score = draw(st.sampled_from(["mean", "max", "minmax", "antidiagonal", "scores"]))
    stride = draw(st.sampled_from([d for d in range(1, block + 1) if block % d == 0]))
    if score == "scores":
        args.append("scores = s")
    elif score == "antidiagonal":
        args.append(f'score = "antidiagonal", stride = {stride}')
    elif score != "mean":
        args.append(f'score = "{score}"')
    if draw(st.integers(0, 2)) == 0:
        args.append(f"query_block = {stride * draw(st.integers(1, 8 // stride))}")
    args += [f"{f} = {str(draw(st.booleans())).lower()}" for f in ("own", "causal", "shared", "first")]
    return f"route({', '.join(args)})"


def _inputs(program: maskc.Program, case: BackendCase) -> dict[str, torch.Tensor]:
    """q, k, v and the pattern's tensors; a MaskError here is the pattern refusing the sizes."""
    return testing.make_tensors(program, case.fuzz_case())


def _refused(error: maskc.MaskError) -> None:
    """Skip a case the reference refuses for a documented reason; fail on any other."""
    assert DOCUMENTED_REFUSALS.search(str(error)), f"reference refused a valid case: {error}"
    assert currently_in_test_context(), f"the fixed case was refused: {error}"
    event("refused: queries off the grid")
    assume(False)


def _record(what: str, *, detail: bool = False) -> None:
    """A hypothesis note (printed with a failure) or event (statistics), inside property tests."""
    if currently_in_test_context():
        (note if detail else event)(what)


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


def _loss(out: torch.Tensor, lse: torch.Tensor, seed: int) -> torch.Tensor:
    """A random linear function of the output and the finite log-sum-exps."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g)
    w_lse = torch.randn(lse.shape, generator=g)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * w_out).sum() + (finite * w_lse).sum()


def _flex_has_backward() -> bool:
    from maskc.runtime import op

    has = getattr(op, "flex_has_backward", None)
    return has is not None and has(torch.device("cpu"))


def _features(case: BackendCase) -> list[str]:
    """What a case exercises, for the statistics (--hypothesis-show-statistics)."""
    out = []
    if case.q_offset is None:
        out.append("q_offset: default")
    elif case.q_offset < 0 or case.q_offset + case.lq > case.lk:
        out.append(f"q_offset: rows {'before' if case.q_offset < 0 else 'after'} the keys")
    else:
        out.append("q_offset: among the keys")
    out.append("lq < lk" if case.lq < case.lk else "lq > lk" if case.lq > case.lk else "lq == lk")
    if case.kv_heads < case.heads:
        out.append("GQA")
    if "grid" in case.text:
        out.append("grid")
    if ": none" in case.text:
        out.append("a head group of none")
    for word in ("segments", "route", "cluster", "alibi(slopes)", "bias(table)", "softcap", "polyline"):
        if word in case.text:
            out.append(word)
    return out


def check_backend(case: BackendCase, backend: str) -> None:
    _record(f"spec:\n{case.text}", detail=True)
    try:
        program = maskc.compile(case.text)
        tensors = _inputs(program, case)
    except maskc.MaskError as error:
        _refused(error)
    grads = backend != "flex" or _flex_has_backward()
    wanted = {n: grads and t.is_floating_point() and n != "centroids" for n, t in tensors.items()}
    leaves = {n: t.detach().clone().requires_grad_(wanted[n]) for n, t in tensors.items()}
    q, k, v = leaves.pop("q"), leaves.pop("k"), leaves.pop("v")
    call = {"q_offset": case.q_offset, **case.sizes, **leaves}
    try:
        ref, ref_lse = program.reference(q, k, v, return_lse=True, **call)
    except maskc.MaskError as error:
        _refused(error)
    _record(f"{backend}: {'with' if grads else 'without'} gradients")
    for feature in _features(case):
        _record(feature)
    if not grads:
        q, k, v = (x.detach() for x in (q, k, v))
        call = {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in call.items()}
    out, lse = program(q, k, v, backend=backend, return_lse=True, **call)
    _close(f"{backend} output", out, ref)
    empty = ref_lse == -math.inf
    assert torch.equal(lse == -math.inf, empty), f"{backend}: rows without keys differ"
    _close(f"{backend} log-sum-exp", lse[~empty], ref_lse[~empty])
    assert torch.all(out[empty[..., None].expand_as(out)] == 0)
    if not grads:
        return
    inputs = {"q": q, "k": k, "v": v, **{n: t for n, t in leaves.items() if t.requires_grad}}
    got = torch.autograd.grad(_loss(out, lse, case.seed), list(inputs.values()), allow_unused=True)
    want = torch.autograd.grad(_loss(ref, ref_lse, case.seed), list(inputs.values()), allow_unused=True)
    for (name, x), a, b in zip(inputs.items(), got, want, strict=True):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        if name in ("q", "k", "v"):
            _close(f"{backend} d{name}", a, b)
        else:
            # A modifier tensor's gradient sums one term per (batch, head, query, key):
            # a flash backward's float32 rounding (ds = p * (dp - delta)) adds up over
            # all of them, where the dense reference's softmax backward cancels exactly.
            atol = max(TOL["atol"], PAIR_EPS * out.shape[0] * out.shape[1] * case.lq * case.lk)
            torch.testing.assert_close(a, b, atol=atol, rtol=TOL["rtol"], msg=lambda m, n=name: f"{backend} d{n}: {m}")


def _property(backend: str):
    @settings(
        max_examples=EXAMPLES[backend] * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(case=backend_cases(MAX_LEN[backend]))
    def test(case: BackendCase) -> None:
        check_backend(case, backend)

    test.__doc__ = f"backend={backend!r} equals the reference on random specs: forward, log-sum-exp, gradients."
    return test


test_cpu_backend_matches_reference = _property("cpu")
test_flex_backend_matches_reference = _property("flex")
test_triton_backend_matches_reference = _property("triton")


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
def test_a_wrapped_case(backend: str) -> None:
    """One fixed case of every kind the strategy wraps in: a `none` head group and an
    empty head range, segments, alibi with slopes, a bias table, GQA, rows before the keys."""
    case = BackendCase(
        "pattern base = causal & window(5) | sink(2)\n"
        "heads { 0 .. 0: causal; 0 .. 1: none; 1 .. 4: base } & segments(ids) with alibi(slopes), bias(table)\n",
        lq=9,
        lk=13,
        heads=4,
        kv_heads=2,
        batch=2,
        dim=8,
        q_offset=-2,
        seed=5,
    )
    check_backend(case, backend)
