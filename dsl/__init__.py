"""The front end: grammar, parser, AST, printer, checks and reference semantics."""

from .errors import MaskError, MaskSyntaxError, MaskTypeError
from .parser import parse
from .printer import to_text

__all__ = ["MaskError", "MaskSyntaxError", "MaskTypeError", "parse", "to_text"]
