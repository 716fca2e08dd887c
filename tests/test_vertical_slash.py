"""`vertical_slash` (MInference's vertical-slash pattern) against an independent
implementation of MInference's index selection.

`minference_indices` below follows `vertical_and_slash_kernel` in
microsoft/MInference (minference/modules/minference_forward.py), written here in
plain torch without the language: softmax of the last `last_q` queries against all
keys (causal inside the last block), column sums with the first `n_sink` columns set
to +inf, diagonal sums (indexed as MInference does, j = q_len - 1 - distance) with
the last `n_local` entries set to +inf, then top-k of each.  MInference leaves ties
to `torch.topk`; the documented rule (docs/language.md section 8.6) is the lower key
and the nearer diagonal, applied here as a stable sort over MInference's own index
order (ascending keys; descending j, i.e. ascending distance).
"""

from __future__ import annotations

import math

import pytest
import torch
from maskc.dsl import dynamic, ir

import maskc


def minference_indices(q, k, vertical_size, slash_size, last_q, n_sink, n_local):
    """(columns, distances q - k) MInference keeps for one head: q, k [L, D]."""
    q_len, dim = q.shape
    last_q = min(last_q, q_len)
    qk = q[-last_q:].double() @ k.double().T / math.sqrt(dim)  # [last_q, L]
    rows = torch.arange(q_len - last_q, q_len)
    qk[:, -last_q:] = torch.where(rows[:, None] >= rows[None, :], qk[:, -last_q:], -math.inf)
    qk = torch.softmax(qk, dim=-1)
    vertical = qk.sum(0)
    vertical[:n_sink] = math.inf
    columns = torch.sort(vertical, descending=True, stable=True).indices[:vertical_size]
    # slash[j]: probabilities on distance q - k = q_len - 1 - j, summed over the rows
    slash = torch.zeros(q_len, dtype=torch.float64)
    for i, row in enumerate(rows.tolist()):
        keys = torch.arange(row + 1)
        slash.index_add_(0, q_len - 1 - (row - keys), qk[i, : row + 1])
    if n_local:
        slash[-n_local:] = math.inf
    by_distance = torch.flip(slash, [0])  # index = distance: nearer first among equals
    distances = torch.sort(by_distance, descending=True, stable=True).indices[:slash_size]
    return set(columns.tolist()), set(distances.tolist())


def selection(spec: str, q, k, heads_of=None):
    """The atom's (columns, distances q - k) per (batch, head), through the language."""
    program = maskc.compile(spec)
    b, h, lq, _ = q.shape
    instance = program.instantiate(lq, k.shape[2], heads=h)
    out = {}
    for head in range(h):
        mask = instance.patterns[instance.head_group[head]].mask
        node = next(n for n in ir.walk(mask) if isinstance(n, ir.VerticalSlash))
        columns, diagonals = dynamic.vertical_slash_selection(node, q, k, instance.sizes.q_offset)
        for batch in range(b):
            offsets = torch.nonzero(diagonals[batch, head]).squeeze(1) - (lq - 1) - instance.sizes.q_offset
            keys = torch.nonzero(columns[batch, head]).squeeze(1)
            out[batch, head] = (set(keys.tolist()), set((-offsets).tolist()))
    return out


def expected_mask(picks, b, h, n):
    """causal & (kept column | kept diagonal), from (columns, distances) per (batch, head)."""
    qi, kj = torch.arange(n)[:, None], torch.arange(n)[None, :]
    out = torch.zeros(b, h, n, n, dtype=torch.bool)
    for (batch, head), (columns, distances) in picks.items():
        col = torch.zeros(n, dtype=torch.bool)
        col[list(columns)] = True
        diag = torch.isin(qi - kj, torch.tensor(sorted(distances), dtype=torch.long))
        out[batch, head] = (col[None, :] | diag) & (kj <= qi)
    return out


def qk(b, h, hk, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)


def test_minference_vs_equals_the_independent_selection_on_random_inputs():
    """The library pattern (MInference's parameters, raised v and s) on random q, k with
    GQA, and the bare atom with other sink/local/last, equal MInference's selection, and
    the mask is causal & (columns | diagonals)."""
    n = 300
    q, k = qk(2, 4, 2, n, 16, seed=1)
    got = selection("minference_vs(v = 45, s = 130)", q, k)
    want = {}
    for batch in range(2):
        for head in range(4):
            want[batch, head] = minference_indices(q[batch, head], k[batch, head // 2], 45, 130, 64, 30, 100)
            assert len(want[batch, head][0]) == 45 and len(want[batch, head][1]) == 130
    assert got == want
    mask = maskc.compile("minference_vs(v = 45, s = 130)").mask(n, heads=4, q=q, k=k)
    assert torch.equal(mask, expected_mask(want, 2, 4, n))

    spec = "vertical_slash(7, 11, last = 20, sink = 2, local = 3)"
    got = selection(spec, q, k)
    for (batch, head), picks in got.items():
        assert picks == minference_indices(q[batch, head], k[batch, head // 2], 7, 11, 20, 2, 3)


def test_sizes_are_clamped_like_minference():
    """MInference raises v to 30 and s to 50 and cuts both to q_len; s below the 100 forced
    diagonals keeps the nearest (the tie rule among MInference's infinities)."""
    q, k = qk(1, 1, 1, 80, 8, seed=2)
    ((columns, distances),) = selection("minference_vs(v = 3, s = 5)", q, k).values()
    assert columns == set(range(30))  # only the forced first columns
    assert distances == set(range(50))  # 50 of the 100 forced diagonals, nearest first
    assert (columns, distances) == minference_indices(q[0, 0], k[0, 0], 30, 50, 64, 30, 100)
    ((columns, distances),) = selection("minference_vs(v = 1000, s = 6096)", q, k).values()
    assert columns == set(range(80)) and distances == set(range(80))  # everything that exists


def test_planted_column_and_diagonal_are_found():
    """One key every late query attends to, and keys k_j aligned with q_{j + 9}: with
    v = s = 1 and nothing forced, the atom keeps exactly that column and that diagonal."""
    n, d, column, distance = 200, 32, 37, 9
    g = torch.Generator().manual_seed(3)
    r = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    q = r.clone()
    k = 0.1 * torch.randn(n, d, generator=g)
    k[: n - distance] += 6 * r[distance:]  # k_j . q_{j + distance} is large
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q += 0.8 * u
    k[column] = 12 * u
    q, k = q[None, None], k[None, None]
    ((columns, distances),) = selection("vertical_slash(1, 1, sink = 0, local = 0)", q, k).values()
    assert (columns, distances) == ({column}, {distance})
    assert (columns, distances) == minference_indices(q[0, 0], k[0, 0], 1, 1, 64, 0, 0)


def test_ties_go_to_the_lower_key_and_the_nearer_diagonal():
    """q = 0: every scored row is uniform over its keys, so the keys before the first
    scored row tie, as do the diagonals that every scored row reaches."""
    n, last = 120, 16
    q, k = torch.zeros(1, 1, n, 8), torch.randn(1, 1, n, 8)
    ((columns, distances),) = selection(f"vertical_slash(10, 12, last = {last}, sink = 0, local = 0)", q, k).values()
    assert columns == set(range(10))
    assert distances == set(range(12))
    assert (columns, distances) == minference_indices(q[0, 0], k[0, 0], 10, 12, last, 0, 0)


def test_general_positions_and_bidirectional_scoring():
    """lq != lk with queries inside the keys, and causal = false (diagonals on both sides
    of the main one): the mask is the union of the selection's columns and diagonals."""
    q, k = qk(1, 2, 2, 40, 8, seed=4)
    k = torch.cat([k, qk(1, 2, 2, 30, 8, seed=5)[1]], dim=2)  # 70 keys
    spec = "vertical_slash(5, 6, last = 8, sink = 1, local = 2, causal = false)"
    program = maskc.compile(spec)
    mask = program.mask(40, 70, heads=2, q=q, k=k, q_offset=10)
    instance = program.instantiate(40, 70, heads=2, q_offset=10)
    for head in range(2):
        node = next(n for n in ir.walk(instance.patterns[head].mask) if isinstance(n, ir.VerticalSlash))
        columns, diagonals = dynamic.vertical_slash_selection(node, q, k, 10)
        columns, diagonals = columns[:, head], diagonals[:, head]
        assert int(columns.sum()) == 5 and int(diagonals.sum()) == 6
        offsets = torch.nonzero(diagonals[0]).squeeze(1) - 39 - 10
        assert (offsets > 0).any() or (offsets < 0).any()
        qpos, kpos = torch.arange(40)[:, None] + 10, torch.arange(70)[None, :]
        want = columns[0][None, :] | torch.isin(kpos - qpos, offsets)
        assert torch.equal(mask[0, head], want)


@pytest.mark.parametrize("block", [7, 16])
def test_schedule_exact_and_decided_from_prefix_sums(monkeypatch, block):
    """Schedules equal the dense mask's block states (one schedule for the batch).  On
    row-major layouts the atom decides every block from its prefix sums; only where
    `causal` cuts a partial block (at most two per block row) is a block settled on
    its pairs."""
    from test_schedule import count_settled, union_block_states

    settled = count_settled(monkeypatch)
    q, k = qk(2, 2, 1, 100, 8, seed=6)
    for spec in ["vertical_slash(3, 40, last = 5)", "causal & vertical_slash(6, 9, last = 12, sink = 2, local = 5)"]:
        program = maskc.compile(spec)
        for lq, q_offset in ((100, 0), (61, 39)):
            settled.clear()
            qq = q[:, :, :lq]
            sched = program.schedule(
                lq, 100, block_q=block, block_k=block, heads=2, layout="rowmajor", q=qq, k=k, q_offset=q_offset
            )
            dense = program.mask(lq, 100, heads=2, q=qq, k=k, q_offset=q_offset)
            assert torch.equal(sched.to_dense(), union_block_states(dense, block, block))
            limit = 0 if spec.startswith("vertical") else 2 * sched.num_q_blocks * 2  # two head groups
            assert sum(settled) <= limit, (spec, settled)


def test_refusals_name_the_problem():
    with pytest.raises(maskc.MaskTypeError, match="cannot be used inside 'on blocks'") as e:
        maskc.compile("on blocks(4) vertical_slash(3, 3)").mask(
            16, q=torch.zeros(1, 1, 16, 4), k=torch.zeros(1, 1, 16, 4)
        )
    assert e.value.column == 14
    with pytest.raises(maskc.MaskTypeError, match="'v' must be >= 0"):
        maskc.compile("vertical_slash(-1, 3)")
    with pytest.raises(maskc.MaskTypeError, match="tensor 'q' is not bound"):
        maskc.compile("vertical_slash(1, 1)").mask(16)
