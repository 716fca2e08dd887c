"""Context parallelism (maskc/parallel/): plans without processes, then real gloo
process groups of 2, 3 and 4 ranks (one spawn per world size, every case inside
it) checked against one process: output and all gradients, float64 to 1e-9."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import maskc
from maskc.parallel import make_plan
from maskc.parallel.balance import imbalance
from maskc.parallel.plan import plan_schedule

TIMEOUT = 150  # seconds for one world size's processes, spawn included

# ---------------------------------------------------------------- plans, no processes


def _visited(schedule) -> set[tuple[int, int]]:
    return {tuple(x) for x in torch.nonzero(schedule.to_dense().amax(0)).tolist()}


PLAN_CASES = [
    ("causal & window(20)", 203, None, {}),
    ("documents_causal", 150, None, {"ids": torch.tensor([[0] * 7 + [1] * 90 + [2] * 3 + [3] * 50])}),
    ("natten2d", 96, None, {"k": 3, "h": 8, "w": 12}),
    ("bigbird", 160, None, {"b": 16, "r": 1}),
    ("causal", 40, 130, {}),
    ("window(3) | queries(0 .. 9)", 150, None, {}),  # global rows: split over the ranks holding their keys
    ("window(3) | queries(110 .. 114)", 121, 117, {}),  # the same with lq != lk
]


def check_plan(plan, visited: set[tuple[int, int]]) -> None:
    """Every visited (query block, key block) pair is computed by exactly one rank: a whole row's
    by the rank owning the query block, which holds the key block or receives it; a split row's
    by the rank holding the key block, which owns the query block or is its guest.  Each rank
    receives exactly the key blocks (and guest rows) it needs, once, grouped by sender; every
    token lives on one rank; block counts are equal to within one."""
    world, split = plan.world, set(plan.split.tolist())
    for qb, kb in visited:
        if qb in split:
            helper = plan.k_owner[kb]
            assert plan.q_owner[qb] == helper or qb in set(plan.guests[helper].tolist())
        else:
            r = plan.q_owner[qb]
            assert plan.k_owner[kb] == r or kb in set(plan.recv[r].tolist())
    computed = np.zeros(world)
    for qb, kb in visited:
        computed[plan.k_owner[kb] if qb in split else plan.q_owner[qb]] += 1
    assert np.array_equal(computed, plan.visited)  # one head: visited blocks per rank
    for r in range(world):
        mine = [(qb, kb) for qb, kb in visited if qb not in split and plan.q_owner[qb] == r]
        needed = {kb for _, kb in mine if plan.k_owner[kb] != r}
        assert set(plan.recv[r].tolist()) == needed  # exactly what is needed, each once
        assert plan.recv[r].size == len(needed)
        assert (np.diff(plan.k_owner[plan.recv[r]]) >= 0).all()  # grouped by sender, as the all-to-all delivers
        guests = {qb for qb, kb in visited if qb in split and plan.k_owner[kb] == r and plan.q_owner[qb] != r}
        assert set(plan.guests[r].tolist()) == guests and plan.guests[r].size == len(guests)
        assert (np.diff(plan.q_owner[plan.guests[r]]) >= 0).all()
    q_all = torch.cat([plan.q_tokens(r) for r in range(world)]).sort().values
    assert torch.equal(q_all, torch.arange(plan.lq))
    k_all = torch.cat([plan.k_tokens(r) for r in range(world)]).sort().values
    assert torch.equal(k_all, torch.arange(plan.lk))
    counts = [plan.q_blocks(r).size for r in range(world)]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("spec,lq,lk,extra", PLAN_CASES, ids=[c[0].split()[0] for c in PLAN_CASES])
def test_plan_covers_every_visited_pair_once_and_receives_only_what_is_needed(spec, lq, lk, extra):
    params = {n: v for n, v in extra.items() if n in ("k", "b", "r")}
    bindings = {n: v for n, v in extra.items() if n not in params}
    program = maskc.compile(spec, **params)
    schedule = plan_schedule(program, lq, lk or lq, 1, 8, bindings)
    visited = _visited(schedule)
    splits = 0
    for world in (2, 3, 5):
        for balance in ("blocks", "contiguous", "zigzag"):
            kw = dict(world=world, balance=balance, block=8, bindings=bindings, schedule=schedule)
            plan = make_plan(program, lq, lk, **kw)
            assert not plan.split.size or balance == "blocks"
            splits += plan.split.size
            check_plan(plan, visited)
    assert splits > 0 or "queries" not in spec  # the global rows were split for some world size


def test_grid_dealt_along_inner_axes_receives_less():
    """On a row-major video grid with more ranks than frames, "blocks" deals boxes of the grid
    (frames cut by rows) instead of runs of the sequence, and receives less."""
    program = maskc.compile("natten3d", k=3)
    bindings = {"t": 4, "h": 16, "w": 16}
    schedule = plan_schedule(program, 1024, 1024, 1, 16, bindings, layout="rowmajor")
    visited = _visited(schedule)
    received = {}
    for balance in ("blocks", "contiguous"):
        plan = make_plan(program, 1024, None, world=8, balance=balance, block=16, bindings=bindings, schedule=schedule)
        check_plan(plan, visited)
        received[balance] = max(r.size for r in plan.recv)
        assert plan.cost.max() / plan.cost.mean() <= 1.02 or balance != "blocks"
    assert received["blocks"] < received["contiguous"]


def test_blocks_balance_beats_contiguous_and_zigzag_on_documents():
    ids = torch.repeat_interleave(torch.arange(6), torch.tensor([700, 40, 1500, 90, 300, 1566]))[None]
    program = maskc.compile("documents_causal")
    scores = {}
    for balance in ("blocks", "contiguous", "zigzag"):
        plan = make_plan(program, 4196, None, world=4, balance=balance, block=16, bindings={"ids": ids})
        scores[balance] = imbalance(plan.cost, np.arange(4), 4)
    assert scores["blocks"] <= 1.02
    assert scores["blocks"] < scores["zigzag"] and scores["blocks"] < scores["contiguous"]
    plan = make_plan(maskc.compile("causal"), 1000, None, world=3, balance="blocks", block=10, bindings={})
    assert plan.cost.max() / plan.cost.mean() <= 1.02


def test_split_rows_balance_bigbird():
    """BigBird's global rows attend every key: dealt whole, the rank holding one has more than
    its share; split over the ranks holding their keys, every rank does about the same."""
    program = maskc.compile("bigbird")
    schedule = plan_schedule(program, 16384, 16384, 1, 64, {})
    for world in (8, 32):
        whole = make_plan(program, 16384, None, world=world, balance="contiguous", block=64, bindings={},
                          schedule=schedule)  # fmt: skip
        plan = make_plan(program, 16384, None, world=world, block=64, bindings={}, schedule=schedule)
        assert plan.split.size > 0
        assert plan.visited.max() / plan.visited.mean() <= 1.05 < whole.visited.max() / whole.visited.mean()
        assert plan.visited.sum() == whole.visited.sum()
        assert max(r.size for r in plan.recv) < 0.5 * max(r.size for r in whole.recv)


def test_plan_errors():
    program = maskc.compile("causal")
    with pytest.raises(maskc.MaskError, match="larger than the number of blocks"):
        make_plan(program, 64, None, world=9, block=8, bindings={})
    with pytest.raises(maskc.MaskError, match="balance must be one of"):
        make_plan(program, 64, None, world=2, block=8, balance="ring", bindings={})
    plan = make_plan(program, 64, None, world=2, block=8, bindings={})
    with pytest.raises(maskc.MaskError, match="simulation"):
        plan.shard(torch.zeros(1, 1, 64, 2))
    if not dist.is_initialized():  # this test process never joins a group
        with pytest.raises(maskc.MaskError, match="init_process_group"):
            maskc.ContextParallel(program)


# ---------------------------------------------------------------- processes


def _ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


CENTROIDS = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
GATE = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
PER_HEAD = "heads { 0 .. 1: causal & window(5); 1 .. 2: ~causal } with alibi"
# (name, spec, params, lq, lk, heads, kv_heads, block, plan bindings, balance)
CASES = [
    ("causal window", "causal & window(11)", {}, 53, None, 2, 2, 8, {}, "blocks"),
    ("sinks", "streaming", {"sinks": 3, "w": 9}, 45, None, 2, 1, 4, {}, "zigzag"),
    ("documents", "documents_causal", {}, 47, None, 1, 1, 4, {"ids": _ids([5, 30, 1, 11])}, "blocks"),
    ("natten2d", "natten2d", {"k": 3}, 48, None, 1, 1, 4, {"h": 6, "w": 8}, "blocks"),  # tiled 2 x 2
    ("bigbird", "bigbird", {"b": 8, "r": 1}, 64, None, 1, 1, 8, {}, "blocks"),
    ("biformer", "biformer", {"s": 2, "topk": 1}, 64, None, 2, 2, 8, {"h": 8, "w": 8}, "blocks"),
    ("per head", PER_HEAD, {}, 37, None, 2, 2, 4, {}, "blocks"),
    ("gqa", "causal & window(6) with softcap(5.0)", {}, 40, None, 4, 2, 4, {}, "blocks"),
    ("lq != lk", "causal & window(9)", {}, 21, 43, 1, 1, 4, {}, "blocks"),
    ("empty rows", "causal & window(4) & ~queries(3 .. 14)", {}, 30, None, 1, 1, 4, {}, "contiguous"),
    ("only remote", "keys(0 .. 4)", {}, 32, None, 1, 1, 4, {}, "contiguous"),
    ("split rows", "window(3) | queries(0 .. 4)", {}, 60, None, 2, 1, 4, {}, "blocks"),
    ("split rows, lq != lk", "window(3) | queries(52 .. 56)", {}, 61, 57, 1, 1, 4, {}, "blocks"),
    ("cluster", "routing_causal", {"n": 2, "w": 9}, 30, None, 1, 1, 4, {"centroids": CENTROIDS}, "blocks"),
    # selections from every rank's share (dsl/sharded.py): Quest's minmax bounds (GQA), XAttention's
    # antidiagonal (groups of 3 cut by blocks of 4), a bound score tensor, MInference
    ("quest", "quest", {"page": 4, "pages": 2}, 45, None, 2, 1, 4, {}, "zigzag"),
    ("xattention", "xattention", {"b": 9, "s": 3, "tau": 0.6}, 50, None, 1, 1, 4, {}, "blocks"),
    ("seer", "seer", {"b": 8, "t": 0.3}, 40, None, 2, 2, 4, {"gate": GATE}, "blocks"),
    ("vslash", "causal & vertical_slash(5, 6, last = 9, sink = 1, local = 3)", {}, 47, None, 2, 1, 4, {}, "zigzag"),
]


def _run_case(cp_cls, case, rank: int, dtype=torch.float64, backend: str = "auto") -> list[str]:
    name, spec, params, lq, lk, heads, kv_heads, block, bindings, balance = case
    program = maskc.compile(spec, **params)
    lk_ = lq if lk is None else lk
    g = torch.Generator().manual_seed(len(name))
    # q, k, v permuted out of one fused projection (non-contiguous views)
    qkv = torch.randn(2, lq, heads + 2 * kv_heads, 5, generator=g, dtype=dtype) if lq == lk_ else None
    if qkv is not None:
        q, k, v = qkv.permute(0, 2, 1, 3).split([heads, kv_heads, kv_heads], dim=1)
    else:
        q = torch.randn(2, heads, lq, 5, generator=g, dtype=dtype)
        k, v = (torch.randn(2, kv_heads, lk_, 5, generator=g, dtype=dtype) for _ in range(2))
    dout = torch.randn(2, heads, lq, 5, generator=g, dtype=dtype)
    full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = program.reference(*full, **bindings)
    want.backward(dout)
    cp = cp_cls(program)
    plan = cp.plan(lq, lk, heads=heads, block=block, balance=balance, **bindings)
    local = [plan.shard(t).detach().requires_grad_() for t in (q, k, v)]
    out = cp(*local, plan=plan, backend=backend)
    out.backward(plan.shard(dout))
    got = {
        "out": plan.unshard(out),
        "dq": plan.unshard(local[0].grad),
        "dk": plan.unshard(local[1].grad, keys=True),
        "dv": plan.unshard(local[2].grad, keys=True),
    }
    expected = {"out": want, "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    errors = []
    for key, value in got.items():
        if not torch.isfinite(value).all():
            errors.append(f"{name}: {key} not finite")
        elif not torch.allclose(value, expected[key].to(value.dtype), atol=tol, rtol=tol):
            err = (value - expected[key]).abs().max().item()
            errors.append(f"{name} (rank {rank}): {key} differs by {err:.3g}")
    if name == "empty rows" and not (got["out"][:, :, 3:14] == 0).all():
        errors.append("empty rows: rows with no key are not 0")
    if name.startswith("split rows") and plan.split.size == 0:
        errors.append(f"{name}: no query block was split")
    if name == "natten2d" and not plan.schedule.layout.startswith("tiled"):
        errors.append(f"natten2d: expected a tiled layout, got {plan.schedule.layout}")
    # "only remote": rank 0 receives nothing; every other rank's queries visit only block 0, remote
    if name == "only remote" and (plan.recv[0].size or any(plan.recv[r].tolist() != [0] for r in range(1, plan.world))):
        errors.append(f"only remote: unexpected exchange lists {plan.recv}")
    return errors


def _compiled_case(rank: int) -> list[str]:
    """The call inside a function compiled with inductor (split rows: three exchanges), forward
    and backward equal to one process; the call itself runs eagerly, so every rank runs every
    exchange, in the same order."""
    program = maskc.compile("window(3) | queries(0 .. 4)")
    cp = maskc.ContextParallel(program)
    qkv = torch.randn(2, 60, 6, 8, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.permute(0, 2, 1, 3).split([2, 2, 2], dim=1)
    plan = cp.plan(60, heads=2, block=4)
    local = [plan.shard(t).detach().requires_grad_() for t in (q, k, v)]
    out = torch.compile(lambda a, b, c: torch.tanh(cp(a, b, c, plan=plan)))(*local)
    out.sum().backward()
    full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = torch.tanh(program.reference(*full))
    want.sum().backward()
    got = [plan.unshard(out), *(plan.unshard(t.grad, keys=i > 0) for i, t in enumerate(local))]
    expected = [want, *(t.grad for t in full)]
    names = ("out", "dq", "dk", "dv")
    errors = [
        f"compiled: {n} differs"
        for n, a, b in zip(names, got, expected, strict=True)
        if not torch.allclose(a, b, atol=1e-5)
    ]
    return errors + ([] if plan.split.size else ["compiled: no split rows"])


def _batch_zero_case(rank: int) -> list[str]:
    """A batch of no sequences through split rows' three exchanges: empty outputs and gradients."""
    cp = maskc.ContextParallel(maskc.compile("window(3) | queries(0 .. 4)"))
    plan = cp.plan(60, heads=2, block=4)
    local = [plan.shard(torch.zeros(0, 2, 60, 8)).requires_grad_() for _ in range(3)]
    out = cp(*local, plan=plan)
    out.sum().backward()
    n = plan.local_positions.numel()
    ok = out.shape == (0, 2, n, 8) and all(t.grad is not None and t.grad.shape == t.shape for t in local)
    return [] if ok else [f"batch 0 with split rows: out {tuple(out.shape)}"]


def _error_cases(cp_cls, rank: int) -> list[str]:
    errors = []
    program = maskc.compile("causal & window(4)")
    cp = cp_cls(program)

    def expect(message: str, fn) -> None:
        try:
            fn()
        except maskc.MaskError as e:
            if message not in str(e):
                errors.append(f"wrong message {e!r}, wanted {message!r}")
        else:
            errors.append(f"no MaskError ({message})")

    expect("different context-parallel plans", lambda: cp.plan(32 + 8 * rank, block=4))
    expect("larger than the number of blocks", lambda: cp.plan(4, block=4))
    plan = cp.plan(32, block=4)
    x = torch.zeros(1, 1, plan.local_positions.numel() + 1, 4)
    expect("share of the plan", lambda: cp(x, x, x, plan=plan))
    return errors


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    errors = []
    try:
        for case in CASES:
            errors += _run_case(maskc.ContextParallel, case, rank)
        errors += _run_case(maskc.ContextParallel, CASES[0], rank, torch.float32)
        split = [c for c in CASES if c[0].startswith("split rows")]
        errors += _run_case(maskc.ContextParallel, split[0], rank, torch.float32)
        for case in (CASES[1], CASES[6], CASES[8], *split):  # dense tiles (what cluster patterns run)
            errors += _run_case(maskc.ContextParallel, case, rank, backend="reference")
        errors += _error_cases(maskc.ContextParallel, rank)
        errors += _batch_zero_case(rank)
        if world == 2:
            errors += _compiled_case(rank)
    except Exception:
        errors.append(traceback.format_exc())
    finally:
        with open(f"{path}.{rank}", "w") as f:
            f.write("\n".join(errors))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_context_parallel_matches_one_process(world, tmp_path):
    path = str(tmp_path / "errors")
    os.environ.setdefault("MASKC_CACHE_DIR", str(tmp_path / "cache"))
    ctx = mp.start_processes(_worker, args=(world, _free_port(), path), nprocs=world, start_method="spawn", join=False)
    end = time.monotonic() + TIMEOUT
    while not ctx.join(timeout=5):  # True once every rank has exited (it raises if one failed)
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {TIMEOUT} s")
    found = []
    for r in range(world):
        with open(f"{path}.{r}") as f:
            text = f.read()
        if text:
            found.append(f"rank {r}:\n{text}")
    assert not found, "\n".join(found)


def test_simulator_and_cli(capsys, tmp_path):
    """A window of one block: with contiguous shards every rank but 0 receives exactly the
    block before its first; bytes are tokens x kv_heads x (K + V) x head_dim x dtype bytes."""
    from maskc.cli import main
    from maskc.parallel.simulate import summarize

    plan = make_plan(maskc.compile("causal & window(10)"), 200, None, world=4, block=10,
                     balance="contiguous", bindings={})  # fmt: skip
    s = summarize(plan, kv_heads=2, head_dim=8, dtype_bytes=4)
    assert s.recv_blocks.tolist() == [0, 1, 1, 1]
    assert s.recv_bytes.tolist() == [0] + [10 * 2 * 2 * 8 * 4] * 3
    assert s.ring_bytes == 200 * 2 * 2 * 8 * 4 * 3 / 4
    assert s.visited.sum() == plan.schedule.visited_blocks()
    png = tmp_path / "plan.png"
    assert main(["plan", "causal & window(10)", "--lq", "200", "--world", "4", "--block", "10",
                 "--balance", "contiguous", "--png", str(png)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "(1 blocks max)" in out and "imbalance" in out
    assert png.stat().st_size > 0
    assert main(["plan", "causal", "--lq", "16", "--world", "4", "--block", "8"]) == 1
    assert "larger than the number of blocks" in capsys.readouterr().err
    # split rows: each (split block, remote rank holding its keys) pair moves the block's queries
    # there (q_heads x head_dim x dtype bytes a token) and its piece back (q_heads x (head_dim + 1) x 4)
    program = maskc.compile("window(3) | queries(0 .. 9)")
    plan = make_plan(program, 150, None, world=3, block=8, bindings={})
    assert plan.split.size
    visited = _visited(plan_schedule(program, 150, 150, 1, 8, {}))
    pairs = {(qb, plan.k_owner[kb]) for qb, kb in visited if qb in set(plan.split.tolist())}
    tokens = sum(min(8, 150 - 8 * qb) for qb, helper in pairs if helper != plan.q_owner[qb])
    s = summarize(plan, kv_heads=2, q_heads=4, head_dim=8, dtype_bytes=2)
    assert s.split_rows == plan.split.size
    assert s.split_bytes.sum() == tokens * (4 * 8 * 2 + 4 * 9 * 4)
    assert main(["plan", "window(3) | queries(0 .. 9)", "--lq", "150", "--world", "3", "--block", "8"]) == 0
    assert "split over the ranks holding their keys" in capsys.readouterr().out
