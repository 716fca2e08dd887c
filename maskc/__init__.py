"""maskc: a compiler for attention sparsity patterns.

Write a pattern once in a small language, get its exact dense mask, and run
attention with it::

    import maskc, torch
    prog = maskc.compile("causal & window(256)")
    q = k = v = torch.randn(1, 4, 1024, 64)
    out = prog(q, k, v)

See README.md for a tour of the language and docs/language.md for its reference.
"""

from maskc.codegen.version import __version__
from maskc.dsl.errors import MaskError, MaskSyntaxError, MaskTypeError
from maskc.module import PolylineAttention, SparseAttention
from maskc.packing import document_ids
from maskc.parallel import ContextParallel
from maskc.program import Program, attention, compile

__all__ = [
    "ContextParallel",
    "MaskError",
    "MaskSyntaxError",
    "MaskTypeError",
    "PolylineAttention",
    "Program",
    "SparseAttention",
    "__version__",
    "attention",
    "compile",
    "document_ids",
]
