"""A program call with gradients, eagerly and under `torch.compile`.

`dispatch.run` (`Program.__call__`) describes the call as a `Call`
(runtime/call.py: program key, backend, scale, q_offset, bindings, dropout)
and hands it to `attention` with q, k, v and the bound tensors.  Eagerly the
call runs through `autograd.call_attention`; under `torch.compile` it is the
torch.library custom op `maskc::attention` (with `maskc::attention_backward`),
which Dynamo traces as one opaque node, so `torch.compile(fullgraph=True)`
works on models that call maskc.  (Registering is cheap; the first *use* of a
custom op imports Dynamo, which would cost eager users seconds on their first
call.)  Both run the same steps, in this order:

* `prepare`: the call prepared for its tensors (runtime/prepare.py; reused
  across calls of static patterns);
* `forward`: (out, lse) from the backend (runtime/execute.py), no graph kept;
* `needs_graph`: whether gradients need the forward again under autograd:
  Flex (whose backward is Flex's own), clustered attention (which composes
  under autograd), and the CPU executor's generic path (softcap, gradients for
  modifier tensors, dropout);
* `graph_forward`: that forward under autograd, from fresh leaves;
* `backward`: gradients through `graph_forward`'s graph, or by the backend's
  backward kernels from the saved output and log-sum-exp.

Eagerly the graph is made in the forward and kept for the backward (the
forward runs once); under `torch.compile` the whole backward, recompute
included, is `maskc::attention_backward`, so nothing traced depends on concrete
sizes (dynamic shapes work).  Gradients come back laid out like
`torch.empty_like` of their inputs, what the fake kernels promise.
FlexAttention has no CPU backward (torch 2.13, eager or compiled).

Dropout (`dropout_p > 0`): the forward draws a seed from torch's default CPU
generator (runtime/dropout.py) and keeps it for the backward, which regenerates
the same keep mask.  Under `torch.compile` a call with dropout is the sibling op
`maskc::attention_dropout`, which draws the seed when it runs (so compiled and
eager runs agree under `torch.manual_seed`) and returns it for
`maskc::attention_backward`; it is tagged nondeterministic_seeded.  Calls
without dropout take the paths above unchanged.  On CPU, dropout runs the
generic path (autograd does the backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import autograd, cpu, execute
from .autograd import Graph
from .call import Call
from .cpu.layout import compute_dtype
from .dropout import draw_seed
from .prepare import Prepared, prepared_for
from .registry import program_for


def attention(q, k, v, call: Call, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the call, differentiable in q, k, v and the bound tensors.  Traced as one
    op under torch.compile (`maskc::attention`, or `maskc::attention_dropout` with dropout)."""
    if torch.compiler.is_compiling():
        if call.dropout_p:
            out, lse, _ = attention_dropout_op(q, k, v, *call.op_args(tensors), call.dropout_p)
            return out, lse
        return attention_op(q, k, v, *call.op_args(tensors))
    if call.dropout_p:  # the seed is drawn when the forward runs, and kept for the backward
        call = call.with_seed(draw_seed())
    return autograd.call_attention(STEPS, call, q, k, v, tensors)


# ----------------------------------------------------------------- the steps


def prepare(call: Call, q, k, v, tensors) -> Prepared:
    """The call prepared for these tensors (reused for static patterns)."""
    return prepared_for(program_for(call.program), call.backend, q, k, v, call.q_offset, call.bindings(tensors))


def forward(call: Call, q, k, v, tensors, prepared: Prepared | None = None):
    """(out, lse) without a graph, contiguous and typed like the fake kernel's (the log-sum-exp
    in float32, float64 for float64 inputs, as FlexAttention's)."""
    if prepared is None:
        prepared = prepare(call, q, k, v, tensors)
    with torch.no_grad():
        out, lse = execute.run_prepared(call.backend, q, k, v, prepared, call.scale, call.dropout)
    return out.contiguous(), lse.to(compute_dtype(q.dtype)).contiguous()


def flex_has_backward(device: torch.device) -> bool:
    """FlexAttention differentiates on GPUs, not on CPU or MPS (torch 2.13, eager and compiled)."""
    return device.type not in ("cpu", "mps")


def needs_graph(call: Call, prepared: Prepared, wanted: list[bool], device: torch.device) -> bool:
    """Whether gradients need the forward again under autograd: Flex (its own backward),
    clustered attention (which composes under autograd), CPU softcap / modifier tensors
    / dropout."""
    if call.backend == "flex":
        return flex_has_backward(device)
    if execute.clustered_heads(call.backend, prepared) is not None:
        return True
    if call.backend != "cpu":
        return False
    return bool(call.dropout_p) or any(wanted) or cpu.needs_generic(prepared, for_backward=True)


def graph_forward(call: Call, q, k, v, tensors, wanted: list[bool]) -> Graph:
    """The forward under autograd from fresh leaves: q, k, v and the bound tensors that
    want a gradient."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        extra = [t.detach().requires_grad_() if w else t for t, w in zip(tensors, wanted, strict=True)]
        prepared = prepare(call, *leaves, extra)
        out, lse = execute.run_prepared(call.backend, *leaves, prepared, call.scale, call.dropout)
    return Graph(out, lse, leaves + [t for t, w in zip(extra, wanted, strict=True) if w], wanted)


def backward(call: Call, q, k, v, out, lse, tensors, dout, dlse, wanted: list[bool],
             prepared: Prepared | None = None):  # fmt: skip
    """dq, dk, dv and a gradient per bound tensor (zeros where not wanted), each laid out
    like `torch.empty_like` of its input: the compiled graph checks the strides the fake
    kernel promises, and views into a backend's padded buffers would keep those alive."""
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    if prepared is None:
        prepared = prepare(call, q, k, v, tensors)
    if needs_graph(call, prepared, wanted, q.device):
        with _autograd_inside_op():
            dq, dk, dv, extra = graph_forward(call, q, k, v, tensors, wanted).grads(dout, dlse)
        grads = dict(zip(call.names(), extra, strict=True))
    else:
        dq, dk, dv, grads = execute.backward_prepared(
            call.backend, q, k, v, out, lse, dout, dlse, prepared, call.scale, any(wanted), call.dropout
        )
    extra = []
    for name, t, w in zip(call.names(), tensors, wanted, strict=True):
        g = grads.get(name) if w else None
        extra.append(torch.zeros_like(t) if g is None else laid_out_like(g.reshape(t.shape).to(t.dtype), t))
    return laid_out_like(dq, q), laid_out_like(dk, k), laid_out_like(dv, v), extra


STEPS = autograd.Steps(prepare, needs_graph, forward, graph_forward, backward)


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """A custom op's body runs below autograd (the dispatcher excludes the autograd keys),
    and the recompute path differentiates inside `maskc::attention_backward`: lift that."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for lifted in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(lifted)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def laid_out_like(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad` with the dtype and strides of `torch.empty_like(x)` (copied only when they differ)."""
    if grad.shape == x.shape and grad.dtype == x.dtype:
        want = torch.empty_like(x, device="meta").stride()
        if all(s == w or n == 1 for s, w, n in zip(grad.stride(), want, x.shape, strict=True)):
            return grad
    return torch.empty_like(x).copy_(grad)


# ----------------------------------------------------------------- torch.compile


@torch.library.custom_op("maskc::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    program: str,
    backend: str,
    scale: float,
    q_offset: int | None,
    tensor_names: str,
    tensors: list[torch.Tensor],
    size_names: str,
    sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    call = Call(program, backend, scale, q_offset, tensor_names, size_names, tuple(sizes))
    return forward(call, q, k, v, tensors)


@attention_op.register_fake
def _(q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes):
    batch, heads, lq, _ = q.shape
    return q.new_empty(batch, heads, lq, v.shape[-1]), q.new_empty(batch, heads, lq, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("maskc::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    program: str,
    backend: str,
    scale: float,
    q_offset: int | None,
    tensor_names: str,
    tensors: list[torch.Tensor],
    size_names: str,
    sizes: list[int],
    wanted: list[bool],
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    seed = int(dropout_seed) if dropout_p else None
    call = Call(program, backend, scale, q_offset, tensor_names, size_names, tuple(sizes), dropout_p, seed)
    return backward(call, q, k, v, out, lse, tensors, dout, dlse, wanted)


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
      wanted, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(t) for t in tensors]


def _setup_context(ctx, inputs, output):
    q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes = inputs
    ctx.save_for_backward(q, k, v, *output, *tensors)
    ctx.call = Call(program, backend, scale, q_offset, tensor_names, size_names, tuple(sizes))


def _backward(ctx, dout, dlse):
    """Traced: everything that depends on sizes runs inside `maskc::attention_backward`."""
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    extra = _traced_backward(ctx.call, q, k, v, out, lse, tensors, dout, dlse)
    # The gradient mirrors the inputs' pytree: an empty list of ints counts as a list.
    return *extra[:3], None, None, None, None, None, extra[3], None, (None if ctx.call.sizes else [])


def _traced_backward(call: Call, q, k, v, out, lse, tensors, dout, dlse, seed=None):
    """`maskc::attention_backward` for a traced call: (dq, dk, dv, [gradient or None per tensor])."""
    wanted = [t.requires_grad and t.is_floating_point() for t in tensors]
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dropout = (call.dropout_p, seed) if call.dropout_p else ()
    dq, dk, dv, extra = attention_backward_op(dout, dlse, q, k, v, out, lse, *call.op_args(tensors), wanted, *dropout)
    return dq, dk, dv, [g if w else None for g, w in zip(extra, wanted, strict=True)]


attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------- torch.compile, with dropout


@torch.library.custom_op("maskc::attention_dropout", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def attention_dropout_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    program: str,
    backend: str,
    scale: float,
    q_offset: int | None,
    tensor_names: str,
    tensors: list[torch.Tensor],
    size_names: str,
    sizes: list[int],
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`maskc::attention` with dropout: (out, lse, seed), the seed (int64, CPU) drawn when it runs."""
    seed = draw_seed()
    call = Call(program, backend, scale, q_offset, tensor_names, size_names, tuple(sizes), dropout_p, seed)
    out, lse = forward(call, q, k, v, tensors)
    return out, lse, torch.tensor(seed, dtype=torch.int64)


@attention_dropout_op.register_fake
def _(q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, dropout_p):
    batch, heads, lq, _ = q.shape
    out = q.new_empty(batch, heads, lq, v.shape[-1])
    return out, q.new_empty(batch, heads, lq, dtype=compute_dtype(q.dtype)), torch.empty((), dtype=torch.int64)


def _setup_dropout_context(ctx, inputs, output):
    q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, dropout_p = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed, *tensors)
    ctx.call = Call(program, backend, scale, q_offset, tensor_names, size_names, tuple(sizes), dropout_p)


def _dropout_backward(ctx, dout, dlse, _dseed):
    q, k, v, out, lse, seed, *tensors = ctx.saved_tensors
    extra = _traced_backward(ctx.call, q, k, v, out, lse, tensors, dout, dlse, seed)
    return *extra[:3], None, None, None, None, None, extra[3], None, (None if ctx.call.sizes else []), None


attention_dropout_op.register_autograd(_dropout_backward, setup_context=_setup_dropout_context)
