"""One call of a program, all but its tensors: the context every step of the call reads.

`Call` names the program (by its key, runtime/registry.py), the backend, the
softmax scale, the queries' offset, the call-time bindings and the dropout.
The bound tensors travel beside it (autograd and the custom ops must see them
as tensors), in the order of `tensor_names`.

The torch.library ops take no dicts and no lists of strings, so names travel
joined by commas (they are identifiers) and values as parallel lists: a `Call`
is made from an op's arguments and gives them back (`op_args`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .dropout import Dropout


@dataclass(frozen=True)
class Call:
    program: str  # the program's key
    backend: str  # "cpu", "triton" or "flex"
    scale: float
    q_offset: int | None = None
    tensor_names: str = ""  # the bound tensors' names, comma-joined
    size_names: str = ""  # grid sizes and call-time parameters, comma-joined ...
    sizes: tuple[int, ...] = ()  # ... and their values
    dropout_p: float = 0.0
    seed: int | None = None  # dropout's seed, drawn when the forward runs

    @property
    def dropout(self) -> Dropout | None:
        return Dropout(self.dropout_p, self.seed) if self.dropout_p else None

    def with_seed(self, seed: int) -> Call:
        return dataclasses.replace(self, seed=seed)

    def names(self) -> list[str]:
        """The bound tensors' names, in the order of the tensors."""
        return split_names(self.tensor_names)

    def bindings(self, tensors) -> dict:
        """Sizes and tensors by name, as `prepare` takes them."""
        return bindings_of(self.tensor_names, tensors, self.size_names, self.sizes)

    def op_args(self, tensors) -> tuple:
        """The custom ops' arguments after q, k, v:
        (program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes)."""
        return (self.program, self.backend, self.scale, self.q_offset, self.tensor_names, list(tensors),
                self.size_names, list(self.sizes))  # fmt: skip


def split_names(joined: str) -> list[str]:
    return joined.split(",") if joined else []


def bindings_of(tensor_names: str, tensors, size_names: str, sizes) -> dict:
    """Bindings by name from comma-joined names and parallel values."""
    return {
        **dict(zip(split_names(size_names), sizes, strict=True)),
        **dict(zip(split_names(tensor_names), tensors, strict=True)),
    }


def joined(bindings: dict) -> tuple[str, list[torch.Tensor], str, list[int]]:
    """(tensor names, tensors, size names, sizes): bindings as the custom ops take them."""
    tensor_names = [n for n, x in bindings.items() if isinstance(x, torch.Tensor)]
    size_names = [n for n, x in bindings.items() if not isinstance(x, torch.Tensor)]
    tensors, sizes = [bindings[n] for n in tensor_names], [bindings[n] for n in size_names]
    return ",".join(tensor_names), tensors, ",".join(size_names), sizes
