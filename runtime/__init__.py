"""Running compiled patterns: the backends and what they share.

Dense reference attention (`reference`); the fast CPU executor over block
schedules (`cpu`); the generated Triton kernels, their file cache and tile
choice (`triton_backend`, `cache`, `tuning`); FlexAttention (`flex`, running
what `codegen.flex` generates); clustered attention for `cluster` patterns (`clustered`,
`clustered_triton`); decoding steps against a KV cache (`decode`); attention
dropout's counter-based keep mask (`dropout`); the exact log-sum-exp merge of
partial results (`merge`); and the wiring of a call:
inputs checked and a backend picked (`dispatch`), per-call data (`prepare`),
autograd and the `maskc::attention` custom op (`op`).
"""
