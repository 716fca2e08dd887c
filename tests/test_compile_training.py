"""Training under `torch.compile` with the default (inductor) backend.

A ViT-style block (one fused qkv projection whose output is reshaped and
permuted into q, k, v views, maskc attention, an output projection) trains a
few SGD steps compiled and eagerly from the same weights on the same batches:
losses and every parameter's gradient agree.  Inductor, unlike "aot_eager",
checks that each custom op returns the strides its fake kernel promises.
Lengths are not multiples of the CPU backend's 64-token block (and one is,
256, where the permuted views alone broke that promise), and the length
changes between steps: under dynamic shapes (`dynamic=True`, or the automatic
dynamic shapes torch turns on at the second length) one compilation serves
every later length, forward and backward.

Inductor compilations cost tens of seconds on a small CPU machine, so each
test compiles at most twice.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maskc

DIM, HEADS = 32, 2
TOL = {"atol": 1e-5, "rtol": 1e-4}


class ViTBlock(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.attn = attn
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor, **bindings) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        y = self.attn(q, k, v, **bindings)
        return x + self.proj(y.transpose(1, 2).reshape(b, n, d))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled frames and automatic dynamic shapes start from nothing in each test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(model: nn.Module, call, batches, compiled_steps: int = 0) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(loss, parameter gradients) per SGD step; steps from `compiled_steps` on must not
    compile again (the frame compiled at the first of them serves them all)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for i, (x, target, bindings) in enumerate(batches):
        opt.zero_grad()
        with torch._dynamo.config.patch(error_on_recompile=i >= compiled_steps):
            loss = F.mse_loss(call(x, **bindings), target)
            loss.backward()
        steps.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return steps


def batches(lengths: list[int], bindings: list[dict]) -> list:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, n, DIM, generator=gen), torch.randn(2, n, DIM, generator=gen), b)
        for n, b in zip(lengths, bindings, strict=True)
    ]


def check_compiled_training(attn: nn.Module, data, dynamic: bool | None, compiled_steps: int) -> None:
    torch.manual_seed(0)
    eager = ViTBlock(attn)
    model = copy.deepcopy(eager)
    got = train(model, torch.compile(model, dynamic=dynamic), data, compiled_steps)
    want = train(eager, eager, data)
    for (loss, grads), (want_loss, want_grads) in zip(got, want, strict=True):
        torch.testing.assert_close(loss, want_loss, **TOL)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, **TOL)


def test_natten_on_grids_of_two_sizes_compiles_once_with_dynamic_shapes():
    """natten2d k=7 on a 14 x 14 grid (196 tokens), then on 12 x 12 (144): one compilation."""
    attn = maskc.SparseAttention("natten2d", k=7, backend="cpu")
    data = batches([196, 196, 144, 144], [{"h": 14, "w": 14}] * 2 + [{"h": 12, "w": 12}] * 2)
    check_compiled_training(attn, data, dynamic=True, compiled_steps=1)


def test_automatic_dynamic_shapes_serve_every_later_length():
    """256 tokens (a multiple of the block: only the permuted views differ from the
    fake kernel), then 100 (torch recompiles with dynamic shapes), then 150 (no recompile)."""
    attn = maskc.SparseAttention("causal & window(31, 0)", backend="cpu")
    data = batches([256, 256, 100, 150], [{}] * 4)
    check_compiled_training(attn, data, dynamic=None, compiled_steps=3)


@pytest.mark.parametrize("spec", ["xattention(b = 16, s = 4)", "vertical_slash(8, 8, last = 16, sink = 4, local = 16)"])
def test_selections_from_q_and_k_train_compiled(spec):
    """Patterns that select blocks from q and k at each call (XAttention's antidiagonal
    scores, MInference's vertical-slash) train compiled as eagerly, at a length that is not a
    multiple of the block; the selections themselves carry no gradient."""
    attn = maskc.SparseAttention(spec, backend="cpu")
    check_compiled_training(attn, batches([200, 200], [{}] * 2), dynamic=None, compiled_steps=1)


def test_eager_gradients_are_laid_out_like_their_inputs():
    """Not views into the backend's padded buffers (196 tokens pad to 256): the strides of
    `torch.empty_like` of each permuted input, in storage of their own size."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 196, 3, HEADS, 16, generator=gen, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = maskc.compile("natten2d", k=7)(q, k, v, h=14, w=14, backend="cpu")
    for grad, x in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), (q, k, v), strict=True):
        assert grad.stride() == torch.empty_like(x).stride()
        assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
