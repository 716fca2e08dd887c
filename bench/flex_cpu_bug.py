"""FlexAttention's compiled CPU kernel reads and writes past a key chunk of 8 mod 16 keys.

Plain torch, no maskc.  Run: .venv/bin/python bench/flex_cpu_bug.py

The trigger (torch 2.13, x86 with AVX2, float32/bfloat16): `torch.compile(flex_attention)`
on CPU, a key chunk (the keys, or the last kv block of them) whose length is 8 mod 16
(8, 24, 40, ...) and a head dim of 8 or 16.  Its q @ k^T micro-GEMM
(`GemmBlocking(1, 16, 1)`, the "ntail" kernel's transpose-first path, taken when
K % 8 == 0, N % 8 == 0 and K < 24) treats the 8-key tail as 16 keys: it reads 8 key
rows past the tensor and stores 8 scores past each row, and the last row's spill lands
on the running row maxima of queries 0..7 (the per-thread buffer that follows the
scores).  Their softmax then starts from a garbage maximum: wrong output (rows of zeros
when the garbage is large) or NaN, depending on whatever memory follows k -- hence
"intermittent".  Any mask shows it (even none); `keys(% 6 == 4)` at L = 40 is how users
met it.  Head dims of 24 or more, and key counts that are not 8 mod 16, take other paths.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def natural(flex, trials: int = 10) -> int:
    """The reported case: keys(% 6 == 4) at L = 40, head dim 16, fresh random inputs per call."""
    length, dim = 40, 16
    block_mask = create_block_mask(lambda b, h, q, kv: kv % 6 == 4, 1, 1, length, length, device="cpu")
    allowed = (torch.arange(length) % 6 == 4).expand(length, length)
    wrong = 0
    for seed in range(trials):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 1, length, dim, generator=g) for _ in range(3))
        out = flex(q, k, v, block_mask=block_mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        wrong += not torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    return wrong


def deterministic(flex) -> float:
    """Smallest case, made deterministic: 8 queries, 8 keys, head dim 8, no mask at all, and
    large keys placed in the memory right after k (the rows the kernel reads past the end)."""
    lq, lk, dim = 8, 8, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, lq, dim, generator=g)
    buffer = torch.randn(1, 1, lk + 8, dim, generator=g)
    buffer[:, :, lk:] = 100.0 * torch.sign(q[:, :, -1:])  # q[last] . garbage = 100 * sum|q[last]|
    k = buffer[:, :, :lk]
    v = torch.randn(1, 1, lk, dim, generator=g)
    out = flex(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return (out - ref).abs().max().item()


def main() -> None:
    flex = torch.compile(flex_attention, dynamic=False)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    wrong = natural(flex)
    print(f"keys(% 6 == 4), L = 40, head dim 16: {wrong} of 10 random inputs wrong")
    error = deterministic(flex)
    print(f"8 queries, 8 keys, head dim 8, no mask, garbage after k: max error {error:.3g}")
    print("bug present" if wrong or error > 1e-4 else "bug not shown here")


if __name__ == "__main__":
    main()
