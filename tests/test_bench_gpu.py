"""bench/gpu.py: it refuses clearly without CUDA, and its counting works on CPU.

The timing itself needs a CUDA GPU; what it counts is checked here: the pairs of the
blocks a schedule visits (against the dense block picture), FLOPs, and the table's
fraction of dense flash."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import maskc

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda(gpu, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--workloads", "causal-window"]) == gpu.NO_CUDA == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "gpu_static.py" in err


def test_visited_pairs_counts_the_blocks_left_at_the_ends(gpu):
    # 200 queries and 150 keys in 64-blocks: the last blocks hold 8 and 22 tokens
    program = maskc.compile("heads { 0 .. 1: causal & window(50, 0) | sink(3); 1 .. 3: window(20) }")
    sched = program.schedule(200, 150, heads=3, block_q=64, block_k=64)
    dense = sched.to_dense()  # [heads, q blocks, k blocks], 0 where not visited
    rows = torch.tensor([min(64, 200 - 64 * i) for i in range(dense.shape[1])])
    cols = torch.tensor([min(64, 150 - 64 * j) for j in range(dense.shape[2])])
    expected = int(((dense > 0) * rows[:, None] * cols[None, :]).sum())
    assert gpu.visited_pairs(sched) == expected
    assert expected < 3 * 200 * 150  # some blocks skipped: the count is not the dense one


def test_flops_and_the_fraction_of_flash(gpu):
    assert gpu.dense_pairs(4, causal=True) == 10 and gpu.dense_pairs(4, causal=False) == 16
    assert gpu.flops(1000, 64, "fwd") == 4 * 64 * 1000
    assert gpu.flops(1000, 64, "fwd+bwd") == 3.5 * gpu.flops(1000, 64, "fwd")
    assert gpu.tflops(2e12, 1000.0) == 2.0 and gpu.tflops(1.0, None) is None
    results = [
        {"workload": "w", "length": 8, "mode": "fwd", "contender": "dense flash", "ms": 2.0, "tflops": 400.0},
        {"workload": "w", "length": 8, "mode": "fwd", "contender": "maskc", "ms": 1.0, "tflops": 100.0},
        {"workload": "w", "length": 8, "mode": "fwd", "contender": "natten", "error": "OutOfMemoryError"},
    ]
    table = gpu.rows(results)
    assert [r[3] for r in table] == ["dense flash", "maskc", "natten"]
    assert table[0][6] == "1.00" and table[1][6] == "0.25" and table[2][6] == ""
    assert table[2][7] == "OutOfMemoryError"
