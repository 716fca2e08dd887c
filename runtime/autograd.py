"""Every `torch.autograd.Function` of maskc: how autograd sees a call and a backend's kernels.

Three Functions, each generic over the work it differentiates, so that this
module imports nothing else of the runtime and anything may use it:

* `call_attention(steps, call, q, k, v, tensors)`: one eager call of a program
  (runtime/op.py says what the steps do).  When gradients need a graph
  (`steps.needs_graph`: Flex's own backward, clustered attention, the CPU
  executor's generic path), the forward runs once under autograd from fresh
  leaves and its graph is kept for the backward; otherwise the forward runs
  without a graph and the backward is `steps.backward`, from the saved output
  and log-sum-exp.  Under `torch.compile` the same steps run inside the
  torch.library ops of runtime/op.py instead.
* `kernel_attention(kernels, q, k, v, prepared, scale, dropout)`: a backend's
  forward kernels, differentiated by its own backward kernels (the CPU
  executor's fused path, the generated Triton kernels).  This is what makes
  `cpu_attention` and `triton_attention` differentiable wherever they run:
  inside a call's graph (clustered attention gathers q, k, v and merges partial
  results around the Triton kernels) or called directly.
* `exchange(x, send, recv, group)`: one uneven all-to-all between processes,
  whose backward is the reverse all-to-all (context parallelism's KV blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# ---------------------------------------------------------------- a backend's kernels


class Kernels(NamedTuple):
    """A backend's kernel pair.

    `forward(q, k, v, prepared, scale, dropout) -> (out, lse, state)` and
    `backward(q, k, v, out, lse, dout, dlse, prepared, scale, dropout, state) -> (dq, dk, dv)`,
    where `state` is whatever the forward leaves for the backward (None: nothing)
    and `dout` or `dlse` may be None (no gradient flows into that output).  With
    `reads_output` False the backward gets out = lse = None (its state holds what
    it needs), and the outputs are not kept for it."""

    forward: Callable
    backward: Callable
    reads_output: bool = True


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: Kernels, q, k, v, prepared, scale: float, dropout):
        out, lse, state = kernels.forward(q, k, v, prepared, scale, dropout)
        ctx.save_for_backward(q, k, v, *((out, lse) if kernels.reads_output else ()))
        ctx.kernels, ctx.args, ctx.state = kernels, (prepared, scale, dropout), state
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, *outputs = ctx.saved_tensors
        out, lse = outputs or (None, None)
        state, ctx.state = ctx.state, None
        dq, dk, dv = ctx.kernels.backward(q, k, v, out, lse, dout, dlse, *ctx.args, state)
        return None, dq, dk, dv, None, None, None


def kernel_attention(kernels: Kernels, q, k, v, prepared, scale: float, dropout=None):
    """(out, lse) from `kernels.forward`, differentiable through `kernels.backward`."""
    return _KernelAttention.apply(kernels, q, k, v, prepared, scale, dropout)


# ---------------------------------------------------------------- a program call


class Graph(NamedTuple):
    """A forward run under autograd: its (out, lse), the leaves it was run from
    (q, k, v, then the bound tensors that want a gradient) and which tensors want one."""

    out: torch.Tensor
    lse: torch.Tensor
    inputs: list[torch.Tensor]
    wanted: list[bool]

    def grads(self, dout, dlse) -> tuple:
        """dq, dk, dv and a gradient (or None where not wanted) per bound tensor."""
        dout = torch.zeros_like(self.out) if dout is None else dout
        dlse = torch.zeros_like(self.lse) if dlse is None else dlse
        with torch.enable_grad():
            grads = torch.autograd.grad((self.out, self.lse), self.inputs, (dout, dlse), allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, self.inputs, strict=True)]
        rest = iter(grads[3:])
        return grads[0], grads[1], grads[2], [next(rest) if w else None for w in self.wanted]


class Steps(NamedTuple):
    """What a call does (runtime/op.py), each step taking the call first:

    `prepare(call, q, k, v, tensors) -> Prepared`;
    `needs_graph(call, prepared, wanted, device) -> bool`;
    `forward(call, q, k, v, tensors, prepared) -> (out, lse)`, without a graph;
    `graph_forward(call, q, k, v, tensors, wanted) -> Graph`;
    `backward(call, q, k, v, out, lse, tensors, dout, dlse, wanted, prepared)
    -> (dq, dk, dv, [gradient per bound tensor])`."""

    prepare: Callable
    needs_graph: Callable
    forward: Callable
    graph_forward: Callable
    backward: Callable


class _CallAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, steps: Steps, call, q, k, v, *tensors):
        ctx.steps, ctx.call, ctx.graph, ctx.prepared = steps, call, None, None
        ctx.wanted = [bool(n) and t.is_floating_point() for n, t in zip(ctx.needs_input_grad[5:], tensors, strict=True)]
        if not any(ctx.needs_input_grad):
            return steps.forward(call, q, k, v, tensors, None)
        prepared = steps.prepare(call, q, k, v, tensors)
        if steps.needs_graph(call, prepared, ctx.wanted, q.device):
            # The forward under autograd now, its graph kept for the backward (no second forward).
            ctx.graph = steps.graph_forward(call, q, k, v, tensors, ctx.wanted)
            return ctx.graph.out.detach(), ctx.graph.lse.detach()
        out, lse = steps.forward(call, q, k, v, tensors, prepared)
        ctx.prepared = prepared
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if ctx.graph is not None:
            graph, ctx.graph = ctx.graph, None
            dq, dk, dv, extra = graph.grads(dout, dlse)
            return None, None, dq, dk, dv, *extra
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        wanted = ctx.wanted
        dq, dk, dv, extra = ctx.steps.backward(ctx.call, q, k, v, out, lse, tensors, dout, dlse, wanted, ctx.prepared)
        return None, None, dq, dk, dv, *(g if w else None for g, w in zip(extra, wanted, strict=True))


def call_attention(steps: Steps, call, q, k, v, tensors):
    """(out, lse) of one eager call, differentiable in q, k, v and the bound tensors."""
    return _CallAttention.apply(steps, call, q, k, v, *tensors)


# ---------------------------------------------------------------- exchanging rows between processes


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group):
        import torch.distributed as dist

        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def exchange(x: torch.Tensor, send: list[int], recv: list[int], group=None) -> torch.Tensor:
    """One uneven all-to-all over dim 0: rows x[sum(send[:r]) : sum(send[:r+1])] go to rank r,
    and the result holds recv[s] rows from each rank s in rank order.  Its backward is
    the reverse exchange, so gradients of received rows are summed at their owners
    (context parallelism, maskc/parallel/)."""
    return _Exchange.apply(x, list(send), list(recv), group)
