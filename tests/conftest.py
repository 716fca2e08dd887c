import os

# Generated Triton kernels run on CPU tensors under the interpreter in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
