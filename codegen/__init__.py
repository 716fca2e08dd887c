"""The compiler: from a pattern instantiated for concrete sizes to kernels.

Normal forms and their simplification (`normal`, printed by `irtext`); token
layouts that reorder a grid's tokens into tiles (`layout`, `geometry`);
exact block schedules from three-valued reasoning over rectangles of blocks
(`labels`, `dynamic_labels`, `schedule`); the plan that ties them together
for one instance (`plan`); Triton source emission (`emit`, `triton_exprs`,
`kernel_template`, `tiles`); FlexAttention's `mask_mod` and `score_mod`
(`flex`); ahead-of-time compilation checks for sm_80/sm_90 without a GPU
(`aot`); the file cache of generated kernels (`cache`) and maskc's version,
which names them (`version`).  Triton and Flex code derive from the definitions of `dsl.semantics`.
"""
