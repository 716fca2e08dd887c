"""Compile a pattern, draw it, run attention with it, and compare with the dense reference."""

import torch
from maskc.dsl import evaluate

import maskc
from maskc.picture import ascii_picture, reduce_mask

SPEC = "causal & (window(63, 0) | sink(4))"  # StreamingLLM: 4 sinks + a 64-token causal window

program = maskc.compile(SPEC)
instance = program.instantiate(512)
print(ascii_picture(reduce_mask(instance, evaluate.Tensors({}, instance), max_cells=32), 512, 512))

torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 512, 64) for _ in range(3))
out = program(q, k, v)
ref = program.reference(q, k, v)
print(f"{SPEC}: output {tuple(out.shape)}, max |out - reference| = {(out - ref).abs().max():.2e}")

# The same on a 2-D grid, through the library: NATTEN's 7x7 neighborhood on 16x16 tokens.
natten = maskc.compile("natten2d", k=7)
q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
out = natten(q, k, v, h=16, w=16)
ref = natten.reference(q, k, v, h=16, w=16)
allowed = natten.mask(256, h=16, w=16)
print(
    f"natten2d(k=7) on 16x16: {int(allowed.sum())} allowed pairs of {256 * 256}, "
    f"max |out - reference| = {(out - ref).abs().max():.2e}"
)
