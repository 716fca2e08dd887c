"""A call's context (runtime/call.py) and its steps (runtime/op.py): the custom ops' arguments
round-trip through `Call`, and eagerly a forward runs once whether or not gradients need its graph."""

from __future__ import annotations

import math

import pytest
import torch
from maskc.runtime import execute, op
from maskc.runtime.call import Call, bindings_of, joined

import maskc


def test_bindings_travel_joined_and_come_back():
    ids = torch.zeros(1, 8, dtype=torch.long)
    names, tensors, size_names, sizes = joined({"h": 2, "ids": ids, "w": 4})
    assert (names, size_names, sizes) == ("ids", "h,w", [2, 4]) and tensors[0] is ids
    call = Call("key", "cpu", 0.5, None, names, size_names, tuple(sizes))
    assert call.bindings(tensors) == bindings_of(names, tensors, size_names, sizes) == {"h": 2, "w": 4, "ids": ids}
    assert call.op_args(tensors) == ("key", "cpu", 0.5, None, "ids", [ids], "h,w", [2, 4])
    assert call.dropout is None and Call("key", "cpu", 0.5, dropout_p=0.1).with_seed(3).dropout.seed == 3


def test_the_op_and_the_eager_call_agree():
    program = maskc.compile("causal & window(6)")
    q, k, v = (torch.randn(1, 2, 30, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    call = Call(program.key, "cpu", 1 / math.sqrt(8))
    eager, eager_lse = op.attention(q, k, v, call, [])
    traced, traced_lse = op.attention_op(q, k, v, *call.op_args([]))
    torch.testing.assert_close(eager, traced)
    torch.testing.assert_close(eager_lse, traced_lse)


@pytest.mark.parametrize(("spec", "graph"), [("causal & window(6)", False), ("causal with softcap(2)", True)])
def test_an_eager_forward_runs_once(spec, graph, monkeypatch):
    """With gradients from the kernels (a plain pattern) or through a kept graph (softcap on
    the CPU), the backend's forward runs once per call, forward and backward together."""
    forwards, backwards = [], []
    real_run, real_backward = execute.run_prepared, execute.backward_prepared
    monkeypatch.setattr(execute, "run_prepared", lambda *a, **kw: forwards.append(1) or real_run(*a, **kw))
    monkeypatch.setattr(execute, "backward_prepared", lambda *a, **kw: backwards.append(1) or real_backward(*a, **kw))
    program = maskc.compile(spec)
    q = torch.randn(1, 2, 40, 8, requires_grad=True)
    out = program(q, q, q, backend="cpu")
    out.square().sum().backward()
    assert len(forwards) == 1
    assert len(backwards) == (0 if graph else 1)
    ref_q = q.detach().requires_grad_()
    program.reference(ref_q, ref_q, ref_q).square().sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad, atol=2e-5, rtol=2e-5)
