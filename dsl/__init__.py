"""The front end: grammar, parser, AST, printer, checks, and the meaning of every
primitive (`semantics`, written in the expressions of `expr`) with its dense
reference evaluation (`evaluate`)."""

from .errors import MaskError, MaskSyntaxError, MaskTypeError
from .parser import parse
from .printer import to_text

__all__ = ["MaskError", "MaskSyntaxError", "MaskTypeError", "parse", "to_text"]
