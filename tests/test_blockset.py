"""Attention of query-block subsets against key-block buffers (runtime/blockset.py) vs one process.

The query blocks are split among a few fake "ranks" (contiguous, zigzag, or
given by hand); each rank gets a buffer of exactly the key blocks its queries
visit (shuffled on even ranks, sorted on odd ones); its output and the gradients of its q, k and v are scattered
back to global positions (key gradients summed over ranks, as the owners sum
them) and compared with the dense reference of the whole call: float64, tight
tolerances, on the CPU executor; float32 under the Triton interpreter.
"""

from __future__ import annotations

import threading

import pytest
import torch
from maskc.dsl.errors import MaskTypeError
from maskc.runtime.blockset import attend_block_subset, prepare_blockset, route_tables, schedule_block
from maskc.runtime.merge import merge_partials

import maskc

F64 = {"atol": 1e-10, "rtol": 1e-9}


def zigzag(blocks: int, ranks: int) -> list[list[int]]:
    """Rank r holds chunks r and 2 * ranks - 1 - r of 2 * ranks chunks (ring attention's zigzag)."""
    chunks = torch.arange(blocks).tensor_split(2 * ranks)
    return [torch.cat([chunks[r], chunks[2 * ranks - 1 - r]]).tolist() for r in range(ranks)]


def contiguous(blocks: int, ranks: int) -> list[list[int]]:
    return [c.tolist() for c in torch.arange(blocks).tensor_split(ranks)]


def run_ranks(program, ranks, lq, lk=None, *, heads=2, kv_heads=None, dim=8, batch=2, dtype=torch.float64,
              backend="cpu", tol=F64, bindings=None, fused_views=False, layout="rowmajor", seed=0):  # fmt: skip
    """Run each rank's query blocks (`ranks`: lists of blocks, or a function of the number of
    blocks giving them) and compare with the reference; returns the global schedule and
    each rank's key blocks."""
    bindings = bindings or {}
    lk = lq if lk is None else lk
    kv_heads = kv_heads or heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, lk, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, lk, dim, generator=g, dtype=dtype, requires_grad=True)
    glob = prepare_blockset(program, lq, lk, heads=heads, backend=backend, dtype=dtype, head_dim=dim, layout=layout,
                            **bindings)  # fmt: skip
    if callable(ranks):
        ranks = ranks(glob.num_q_blocks)
    assert sorted(b for r in ranks for b in r) == list(range(glob.num_q_blocks))
    ref, ref_lse = program.reference(q, k, v, return_lse=True, **bindings)
    dout = torch.randn(ref.shape, generator=g, dtype=dtype)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    out, lse = torch.zeros_like(ref), torch.zeros_like(ref_lse)
    got = [torch.zeros_like(x) for x in (q, k, v)]
    buffers = []
    for r, q_blocks in enumerate(ranks):
        q_blocks = torch.tensor(q_blocks, dtype=torch.long)
        k_blocks = glob.visited(q_blocks)
        k_blocks = k_blocks[torch.randperm(k_blocks.numel(), generator=g)] if r % 2 == 0 else k_blocks
        buffers.append(k_blocks)
        qt, kt = glob.q_tokens(q_blocks), glob.k_tokens(k_blocks)
        if fused_views:  # q as a view of [batch, len, heads, dim], k and v of one [batch, len, 2, heads, dim]
            qx = q.detach()[:, :, qt].transpose(1, 2).contiguous().requires_grad_()
            kvx = torch.stack([k.detach()[:, :, kt], v.detach()[:, :, kt]], 2).permute(0, 3, 2, 1, 4)
            kvx = kvx.contiguous().requires_grad_()
            ql, kl, vl = qx.transpose(1, 2), kvx[:, :, 0].transpose(1, 2), kvx[:, :, 1].transpose(1, 2)
            leaves = (qx, kvx)
        else:
            ql = q.detach()[:, :, qt].requires_grad_()
            kl, vl = (x.detach()[:, :, kt].requires_grad_() for x in (k, v))
            leaves = (ql, kl, vl)
        o, lse_local = attend_block_subset(glob, ql, kl, vl, q_blocks, k_blocks, return_lse=True)
        grads = torch.autograd.grad(o, leaves, dout[:, :, qt])
        if fused_views:
            grads = [grads[0].transpose(1, 2), grads[1][:, :, 0].transpose(1, 2), grads[1][:, :, 1].transpose(1, 2)]
        out[:, :, qt], lse[:, :, qt] = o.detach(), lse_local.to(lse.dtype)
        got[0][:, :, qt] += grads[0]
        got[1][:, :, kt] += grads[1]
        got[2][:, :, kt] += grads[2]
    torch.testing.assert_close(out, ref, **tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    # the CPU executor's lse is float64 for float64 inputs (exact merges); Triton's is float32
    lse_tol = tol if backend == "cpu" and dtype == torch.float64 else {"atol": 2e-5, "rtol": 2e-5}
    torch.testing.assert_close(lse[finite], ref_lse[finite], **lse_tol)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"d{name}: {m}")
    return glob, buffers


# per-head patterns, one head group with softcap (the CPU executor's generic path)
PER_HEAD = """
pattern capped = window(20) with softcap(4.0)
pattern per_head = heads { 0 .. 2: causal & window(40, 0); 2 .. 4: capped }
"""

CASES = [
    # (spec, params, lq, lk, heads, kv_heads, bindings, ranks)
    ("causal & window(70, 0) | sink(3)", {}, 300, None, 2, 2, {}, lambda n: zigzag(n, 2)),
    ("causal & window(50, 0)", {}, 300, None, 2, 1, {}, lambda n: [[4, 0], [2], [3, 1]]),  # short block first
    ("natten2d", {"k": 5}, 240, None, 2, 2, {"h": 12, "w": 20}, lambda n: contiguous(n, 3)),
    ("bigbird", {"b": 16}, 200, None, 2, 2, {}, lambda n: zigzag(n, 3)),
    (PER_HEAD, {"pattern": "per_head"}, 260, None, 4, 2, {}, lambda n: zigzag(n, 2)),
    ("causal & window(70, 0) with alibi()", {}, 150, 330, 4, 2, {}, lambda n: contiguous(n, 2)),
]


@pytest.mark.parametrize(
    "spec,params,lq,lk,heads,kv_heads,bindings,ranks", CASES, ids=[c[0].strip()[:30] for c in CASES]
)
def test_ranks_match_one_process(spec, params, lq, lk, heads, kv_heads, bindings, ranks):
    program = maskc.compile(spec, **params)
    glob, _ = run_ranks(program, ranks, lq, lk, heads=heads, kv_heads=kv_heads, bindings=bindings)
    full, partial = glob.row_counts()  # summed over heads, what balancing weighs
    dense = glob.schedule.to_dense()
    assert torch.equal(full, (dense == 2).sum((0, 2))) and torch.equal(partial, (dense == 1).sum((0, 2)))


def test_documents_per_batch_ids_and_fused_views():
    """documents_causal with uneven documents, different per batch element; q, k, v as
    non-contiguous views of one projection."""
    first = maskc.document_ids([50, 130, 7, 113])
    second = maskc.document_ids([200, 1, 99])
    ids = torch.cat([first, second])
    program = maskc.compile("documents_causal & window(90, 0)")
    run_ranks(program, lambda n: zigzag(n, 2), 300, bindings={"ids": ids}, fused_views=True)


def test_tiled_grid_layout_and_route():
    """A grid pattern in NATTEN's tile order (blocks are grid tiles: shard with q_tokens),
    and BiFormer's routing from region sums added up over the ranks."""
    natten = maskc.compile("natten2d", k=5)
    glob, _ = run_ranks(natten, lambda n: zigzag(n, 2), 512, batch=1, bindings={"h": 16, "w": 32}, layout="auto")
    assert glob.schedule.layout == "tiled 16x4"
    assert torch.equal(
        glob.q_tokens(torch.tensor([1]))[:8], torch.arange(4, 8).repeat(2) + torch.tensor([0] * 4 + [32] * 4)
    )
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 2, 196, 8, generator=g, dtype=torch.float64) for _ in range(2))
    biformer = maskc.compile("biformer", s=7, topk=3)
    with torch.no_grad():
        whole = prepare_blockset(biformer, 196, heads=2, dtype=torch.float64, head_dim=8, h=14, w=14, q=q, k=k)
        ranks = [torch.tensor(r) for r in zigzag(whole.num_q_blocks, 2)]
        # each rank pools its own tokens (its blocks in tile order); the ranks route as one process does
        tokens = [whole.q_tokens(r) for r in ranks]

        def share(r, coll):
            t = tokens[r]
            return route_tables(biformer, 196, 196, q[:, :, t], k[:, :, t], t, t, coll, h=14, w=14)

        tables = ThreadRanks(2).run(share)
        glob = prepare_blockset(biformer, 196, heads=2, dtype=torch.float64, head_dim=8, h=14, w=14, routes=tables[1])
        assert torch.equal(glob.schedule.to_dense(), whole.schedule.to_dense())
        ref = biformer.reference(q, k, k, h=14, w=14)
        out = torch.zeros_like(ref)
        for q_blocks in ranks:
            k_blocks = glob.visited(q_blocks)
            qt, kt = glob.q_tokens(q_blocks), glob.k_tokens(k_blocks)
            out[:, :, qt] = attend_block_subset(glob, q[:, :, qt], k[:, :, kt], k[:, :, kt], q_blocks, k_blocks)
    torch.testing.assert_close(out, ref, **F64)
    with pytest.raises(MaskTypeError, match="routes must be what route_tables returns"):
        prepare_blockset(biformer, 196, heads=2, head_dim=8, h=14, w=14, routes=torch.zeros(5))


class ThreadRanks:
    """Fake ranks as threads: each runs a function with its rank and a `dsl.sharded.Collective`
    whose calls meet at a barrier (no processes: fast)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world

    def run(self, fn) -> list:
        results, errors = [None] * self.world, []

        def main(rank: int) -> None:
            try:
                results[rank] = fn(rank, _ThreadCollective(self, rank))
            except BaseException as e:  # re-raised below; the other ranks must not wait forever
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class _ThreadCollective:
    def __init__(self, ranks: ThreadRanks, rank: int) -> None:
        self.ranks, self.rank = ranks, rank

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.ranks.slots[self.rank] = x.clone()
        self.ranks.barrier.wait()
        out = [s.clone() for s in self.ranks.slots]
        self.ranks.barrier.wait()
        return out

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        parts = torch.stack(self.all_gather(x))
        return parts.sum(0) if op == "sum" else parts.amax(0)


def _shares(length: int, world: int, chunk: int) -> list[torch.Tensor]:
    """Tokens dealt to ranks in chunks of `chunk` (round robin), shuffled within each rank."""
    owner = (torch.arange(length) // chunk) % world
    g = torch.Generator().manual_seed(world)
    return [
        t[torch.randperm(t.numel(), generator=g)] for t in (torch.nonzero(owner == r).flatten() for r in range(world))
    ]


SELECTIONS = [
    # (spec, params, bindings): every scorer, per-head and shared routes, query regions of one token
    ("moba", {"b": 24, "topk": 2}, {}),
    ('causal & route(topk = 3, block = 20, score = "max", causal = true, own = true)', {}, {}),
    # key regions fewer than heads x dim or not: logits or query means cross ranks
    ("sparge", {"bq": 32, "bk": 40, "tau": 0.5}, {}),
    ("route(topk = 3, block = 40)", {}, {}),
    ('route(topk = 5, block = 8, score = "max", shared = false)', {}, {}),
    ("quest", {"page": 16, "pages": 3}, {}),
    ('route(topk = 4, block = 16, query_block = 1, score = "minmax", shared = false)', {}, {}),
    ("xattention", {"b": 24, "s": 8, "tau": 0.6}, {}),
    ('route(cdf = 0.7, block = 30, score = "antidiagonal", stride = 5)', {}, {}),
    ("seer", {"b": 32, "t": 0.2}, {"gate": torch.rand(2, 4, 7, 7, generator=torch.Generator().manual_seed(2))}),
    ("causal & vertical_slash(9, 12, last = 20, sink = 3, local = 4)", {}, {}),
    ("vertical_slash(6, 10, last = 7, sink = 2, local = 3, causal = false) | window(3)", {}, {}),
]


@pytest.mark.parametrize("spec,params,bindings", SELECTIONS, ids=[c[0][:40] for c in SELECTIONS])
def test_selections_from_shares_match_one_process(spec, params, bindings):
    """Route (every scorer, scores = NAME) and vertical_slash selected from each fake rank's
    own tokens (dealt in chunks of 13 tokens, so strided groups and regions straddle ranks;
    GQA; lq = 201, no multiple of anything) give every rank one process's tables and schedule."""
    check_shares(maskc.compile(spec, **params), 201, 201, bindings, (2, 3))


@pytest.mark.parametrize("lq,lk", [(40, 130), (130, 40)])
def test_selections_from_shares_with_lq_ne_lk(lq, lk):
    """Queries at an offset (lq < lk) and queries past the keys (lq > lk)."""
    for spec in (
        "causal & vertical_slash(5, 7, last = 9, sink = 1, local = 2)",
        'causal & route(topk = 2, block = 16, score = "minmax", causal = true, own = true)',
        'causal & route(mass = 0.5, block = 12, score = "antidiagonal", stride = 4, causal = true, shared = false)',
    ):
        check_shares(maskc.compile(spec), lq, lk, {}, (3,))


def check_shares(program, lq: int, lk: int, bindings: dict, worlds) -> None:
    heads, kv_heads = 4, 2
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(2, heads, lq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, kv_heads, lk, 8, generator=g, dtype=torch.float64)
    kw = dict(heads=heads, dtype=torch.float64, head_dim=8, **bindings)
    one = prepare_blockset(program, lq, lk, q=q, k=k, **kw)
    whole = one.schedule.to_dense()
    cache = one.prepared.tensors.cache  # one process's selection tables, filled by the schedule
    for world in worlds:
        q_shares, k_shares = _shares(lq, world, 13), _shares(lk, world, 11)

        def share(r, coll, qs=q_shares, ks=k_shares):
            return route_tables(program, lq, lk, q[:, :, qs[r]], k[:, :, ks[r]], qs[r], ks[r], coll, **bindings)

        tables = ThreadRanks(world).run(share)
        for table in tables:
            assert bool(table) != ("gate" in bindings)  # scores = NAME: read from the bindings
            for key, selected in table.items():
                pairs = zip(*(x if isinstance(x, tuple) else (x,) for x in (selected, cache[key])), strict=True)
                for got, want in pairs:
                    assert torch.equal(got, want), key
                    assert 0 < int(want.sum()) < want.numel()  # a selection, not everything or nothing
            assert torch.equal(prepare_blockset(program, lq, lk, routes=table, **kw).schedule.to_dense(), whole)


def test_remote_only_keys_and_empty_rows():
    """A rank whose queries visit only other ranks' key blocks, and one whose queries visit
    nothing (an empty buffer): rows of zeros with zero gradients, lse -inf."""
    program = maskc.compile("sink(20) | keys(100 .. 110)")
    glob, buffers = run_ranks(program, [[0, 1, 2], [3, 4]], 320)
    assert buffers[1].sort().values.tolist() == [0, 1]
    # lq > lk: the first 150 queries precede every key; query blocks 0 and 1 visit nothing
    causal = maskc.compile("causal")
    glob, buffers = run_ranks(causal, [[0, 1], [2, 3, 4]], 300, 150)
    assert buffers[0].numel() == 0
    q = torch.randn(1, 2, 128, 8, requires_grad=True)
    empty = torch.zeros(1, 2, 0, 8, requires_grad=True)
    out, lse = attend_block_subset(glob, q, empty, empty, [0, 1], [], return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isinf(lse).all())
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq, torch.zeros_like(dq))
    # a rank without query blocks
    assert attend_block_subset(glob, q[:, :, :0], empty, empty, [], []).shape == (1, 2, 0, 8)
    # batch 0
    none = torch.zeros(0, 2, 128, 8)
    assert attend_block_subset(glob, none, none[:, :, :64], none[:, :, :64], [0, 1], [0]).shape == (0, 2, 128, 8)


def test_modifier_tensor_gradients_sum_over_ranks():
    """A bias table that requires grad: each rank's share (CPU executor) sums to the one-process gradient."""
    program = maskc.compile("causal & window(40, 0) with bias(table)")
    g = torch.Generator().manual_seed(2)
    table = torch.randn(2, 41, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 150, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = program.reference(q, k, v, table=table)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (want,) = torch.autograd.grad(ref, table, dout)
    glob = prepare_blockset(program, 150, heads=2, dtype=torch.float64, head_dim=8, table=table)
    got = torch.zeros_like(table)
    for q_blocks in ([0, 2], [1]):
        k_blocks = glob.visited(q_blocks)
        qt, kt = glob.q_tokens(q_blocks), glob.k_tokens(k_blocks)
        out = attend_block_subset(glob, q[:, :, qt], k[:, :, kt], v[:, :, kt], q_blocks, k_blocks)
        got += torch.autograd.grad(out, table, dout[:, :, qt])[0]
    torch.testing.assert_close(got, want, **F64)


def test_triton_interpreter_matches_one_process():
    """A bias table read at global offsets, GQA, and a short last block listed first; a heavy
    pattern with wide heads schedules 16 x 16 blocks (the smaller side of its 16 x 32 tiles),
    which keeps the interpreter quick."""
    program = maskc.compile("causal & window(12, 0) with bias(table)")
    table = torch.randn(2, 25, generator=torch.Generator().manual_seed(1))
    assert schedule_block(program, 40, backend="triton", head_dim=72, heads=2, table=table) == 16
    tol = {"atol": 2e-5, "rtol": 2e-5}
    run_ranks(program, [[2, 0], [1]], 40, heads=2, kv_heads=1, dim=72, batch=1, dtype=torch.float32,
              backend="triton", tol=tol, bindings={"table": table})  # fmt: skip


SLOW_TRITON = [
    # (spec, params, lq, bindings, ranks): tables read at global positions under the interpreter
    ("documents_causal", {}, 80, {"ids": torch.tensor([[0] * 30 + [1] * 50, [0] * 7 + [1] * 73])}, [[2, 0], [1]]),
    ("bigbird", {"b": 16}, 80, {}, [[1], [2, 0]]),
    ("natten2d", {"k": 3}, 96, {"h": 8, "w": 12}, [[2, 0], [1]]),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec,params,lq,bindings,ranks", SLOW_TRITON, ids=[c[0] for c in SLOW_TRITON])
def test_triton_tables_at_global_positions(spec, params, lq, bindings, ranks):
    """Segment ids per batch element, BigBird's random blocks and a grid on the Triton
    interpreter (the fast test covers the mechanism with a bias table)."""
    program = maskc.compile(spec, **params)
    run_ranks(program, ranks, lq, heads=2, kv_heads=1, dim=72, dtype=torch.float32, backend="triton",
              tol={"atol": 2e-5, "rtol": 2e-5}, bindings=bindings)  # fmt: skip


def test_bad_input_names_the_problem():
    program = maskc.compile("causal & window(70, 0)")
    glob = prepare_blockset(program, 300, heads=1, dtype=torch.float64, head_dim=8)
    assert glob.block == 64 and glob.num_q_blocks == 5
    q = torch.randn(1, 1, 128, 8, dtype=torch.float64)
    kv = torch.randn(1, 1, 64, 8, dtype=torch.float64)
    with pytest.raises(MaskTypeError, match="query block 2 visits key block 0, which is not in k_blocks"):
        attend_block_subset(glob, q, kv, kv, [2, 3], [3])
    with pytest.raises(MaskTypeError, match="q_local holds 128 tokens, but the 2 blocks of q_blocks hold 108"):
        attend_block_subset(glob, q, kv, kv, [3, 4], [3])
    with pytest.raises(MaskTypeError, match="q_blocks lists block 3 more than once"):
        attend_block_subset(glob, q, kv, kv, [3, 3], [3])
    with pytest.raises(MaskTypeError, match="k_blocks holds block 5, outside the 5 blocks"):
        attend_block_subset(glob, q, kv, kv, [2, 3], [5])
    with pytest.raises(MaskTypeError, match="q_local has 2 heads, the schedule was prepared for 1"):
        attend_block_subset(glob, q.expand(1, 2, -1, -1), kv, kv, [2, 3], [3])
    ids = torch.zeros(2, 300, dtype=torch.long)
    per_batch = prepare_blockset(maskc.compile("documents_causal"), 300, dtype=torch.float64, head_dim=8, ids=ids)
    with pytest.raises(MaskTypeError, match="q_local has batch 1, the bound tensors have batch 2"):
        attend_block_subset(per_batch, q, kv, kv, [2, 3], [3])
    with pytest.raises(MaskTypeError, match="takes what prepare_blockset returns, not Program"):
        attend_block_subset(program, q, kv, kv, [2, 3], [3])
    with pytest.raises(MaskTypeError, match="context parallel runs on cpu and triton"):
        prepare_blockset(program, 300, backend="flex")
    with pytest.raises(MaskTypeError, match="cluster"):
        x = torch.randn(1, 1, 64, 8)
        prepare_blockset(maskc.compile("routing", n=2, w=16), 64, q=x, k=x, centroids=torch.randn(1, 2, 8))


def test_pieces_over_disjoint_key_sets_merge_to_one_process():
    """`only_buffer=True`: each piece is the rows' attention over one buffer's keys alone (the
    missing visited blocks skipped); merged by log-sum-exp the pieces equal one process, and so
    do the gradients through the merge (which reach each piece's lse): context parallelism's
    split rows."""
    program = maskc.compile("causal & window(40) | queries(0 .. 30) with alibi")
    lq, heads, kv_heads = 300, 4, 2
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, heads, lq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, lq, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    ref, ref_lse = program.reference(q, k, v, return_lse=True)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    glob = prepare_blockset(program, lq, heads=heads)
    rows = torch.tensor([3, 0, 4])  # in any order; block 4 is the short last one
    qt = glob.q_tokens(rows)
    key_sets = [[2, 0], [4], [1, 3]]  # disjoint, together every key block; the middle one short
    pieces = []
    for keys in key_sets:
        kt = glob.k_tokens(keys)
        pieces.append(attend_block_subset(glob, q[:, :, qt], k[:, :, kt], v[:, :, kt], rows, keys, return_lse=True,
                                          only_buffer=True))  # fmt: skip
    n = qt.numel()
    out = torch.cat([o for o, _ in pieces], 2).flatten(0, 1)
    lse = torch.cat([s for _, s in pieces], 2).flatten(0, 1)
    merged, merged_lse = merge_partials(out, lse, torch.arange(n).repeat(len(key_sets)), n)
    merged = merged.view(2, heads, n, 8)
    torch.testing.assert_close(merged, ref[:, :, qt], **F64)
    torch.testing.assert_close(merged_lse.view(2, heads, n), ref_lse[:, :, qt], **F64)
    got = torch.autograd.grad(merged, (q, k, v), dout[:, :, qt])
    ref_rows = torch.autograd.grad(ref[:, :, qt], (q, k, v), dout[:, :, qt])
    for name, a, b in zip("qkv", got, ref_rows, strict=True):
        torch.testing.assert_close(a, b, **F64, msg=lambda m, name=name: f"d{name}: {m}")
    # without only_buffer a missing visited block is an error naming it
    with pytest.raises(MaskTypeError, match="not in k_blocks"):
        attend_block_subset(glob, q[:, :, qt], k[:, :, :128], v[:, :, :128], rows, [0, 1])
