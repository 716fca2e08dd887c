"""Running compiled patterns: the backends and what they share.

A call, top to bottom: `dispatch` (`Program.__call__`: arguments checked by
`inputs`, the call described as a `call.Call`), `op` (the call's steps, eager
and as the `maskc::attention` custom ops under torch.compile), `autograd` (every
`torch.autograd.Function`), `prepare` (per-call data, kept for static patterns;
programs found by key in `registry`; tiles from the policy in `tuning`),
`execute` (a prepared call on a backend, in the schedule's token order).

The backends: dense reference attention (`reference`); the fast CPU executor
over block schedules (`cpu/`: plan, threads, layout, fused, generic); the
generated Triton kernels (`triton_backend`); FlexAttention (`flex`, running
what `codegen.flex` generates); clustered attention for `cluster` patterns
(`clustered`, `clustered_triton`); decoding steps against a KV cache
(`decode`); attention dropout's counter-based keep mask (`dropout`); the exact
log-sum-exp merge of partial results (`merge`); some query blocks against a
buffer of key blocks, context parallelism's local step (`blockset`).
"""
