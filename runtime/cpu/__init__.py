"""The fast CPU executor: the block schedule run by PyTorch's fused CPU kernel.

`cpu_attention(q, k, v, prepared, scale) -> (out, lse)` walks the schedule of
each head group (heads sharing a schedule run together):

* `plan`: per head group, the query blocks bucketed by the shape of their row
  of the schedule into *segments*, each one fused call over query blocks with
  the same number of key blocks (one shared mask where the rows look alike,
  keys as strided views where they move by a fixed step);
* `fused` (the default path): each segment one call of
  ``aten._scaled_dot_product_flash_attention_for_cpu`` with an additive mask
  (modifiers that only add to the logits folded in), partial results merged
  exactly through their log-sum-exps; its backward calls the kernel's backward
  per segment with the merged output and log-sum-exp, and runtime/autograd.py
  differentiates the pair;
* `generic`: the same segments with differentiable torch ops, for softcap,
  modifier tensors that need a gradient, and attention dropout (autograd does
  the backward);
* `threads`: intra-op threads, a pool of single-threaded workers for many big
  calls, and per-thread scratch buffers;
* `layout`: heads grouped by schedule, lengths padded to whole blocks, a
  segment's rows and keys as views, results written back.

Memory grows with the visited blocks: nothing of size lq x lk is built.
Rows with no allowed key output 0, their log-sum-exp is -inf, and their
gradients are 0.  Compute is float32 for half types (float64 stays float64).
"""

from __future__ import annotations

import torch
from maskc.dsl import ir

from ..autograd import Kernels, kernel_attention
from ..dropout import Dropout
from ..prepare import Prepared
from . import fused, generic
from .plan import GroupPlan, build_plan, group_plan

# The fused path as autograd differentiates it: forward kernels, then backward kernels.
FUSED = Kernels(fused.forward, fused.backward_from_state, reads_output=False)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Prepared, scale: float,
                  dropout: Dropout | None = None):  # fmt: skip
    """Attention over the schedule in `prepared`: (out like q with v's head dim,
    lse [batch, heads, lq] float32 (float64 for float64 inputs), -inf for rows with no allowed key), differentiable.
    With `dropout`, the generic path (autograd differentiates it)."""
    if dropout is not None or needs_generic(prepared):
        return generic.attention(q, k, v, prepared, scale, dropout)
    return kernel_attention(FUSED, q, k, v, prepared, scale)


def backward(q, k, v, out, lse, dout, dlse, prepared: Prepared, scale: float):
    """Gradients (dq, dk, dv) from a forward's (out, lse), without recomputing it
    (execution order, like `cpu_attention`; modifier tensors get no gradient here)."""
    if needs_generic(prepared, for_backward=True):
        raise ValueError("this pattern's modifiers need the generic path: differentiate cpu_attention instead")
    return fused.backward(q, k, v, out, lse, dout, dlse, prepared, scale)


def needs_generic(prepared: Prepared, for_backward: bool = False) -> bool:
    """Whether the pattern runs the generic path: softcap is not additive, and modifier
    tensors that need a gradient need autograd (`for_backward`: whether they will)."""
    if any(isinstance(m, ir.Softcap) for f in prepared.forms for m in f.modifiers):
        return True
    if not (torch.is_grad_enabled() or for_backward):
        return False
    values = prepared.tensors.values
    return any(name in values and values[name].requires_grad for name in _modifier_tensors(prepared))


def _modifier_tensors(prepared: Prepared) -> list[str]:
    names = []
    for form in prepared.forms:
        for m in form.modifiers:
            for attr in ("tensor", "alpha", "beta"):
                name = getattr(m, attr, None)
                if isinstance(name, str):
                    names.append(name)
    return names


__all__ = ["FUSED", "GroupPlan", "backward", "build_plan", "cpu_attention", "group_plan", "needs_generic"]
