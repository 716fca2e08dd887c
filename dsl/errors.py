"""Errors raised for bad specs and bad bindings.

Every error names where the problem is: a line, a column and a quoted excerpt
with a caret, so that a user never has to read a Python traceback to find the
mistake in their pattern.
"""

from __future__ import annotations

from typing import NamedTuple


class Span(NamedTuple):
    """A region of spec text (1-based lines and columns, end exclusive).

    A named tuple rather than a dataclass: the parser makes one per node, and a
    tuple is several times quicker to make (a 1 MB spec has ~10**5 nodes).
    """

    line: int
    column: int
    end_line: int
    end_column: int


class MaskError(ValueError):
    """Base class of every error maskc reports about a spec or its bindings."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        source: str | None = None,
        filename: str | None = None,
    ) -> None:
        self.message = message
        self.span = span
        self.source = source
        self.filename = filename
        self.trace: list[str] = []
        super().__init__(self._render())

    @property
    def line(self) -> int | None:
        return self.span.line if self._located() else None

    @property
    def column(self) -> int | None:
        return self.span.column if self._located() else None

    def _located(self) -> bool:
        # Nodes built outside the parser carry the empty span (line 0).
        return self.span is not None and self.span.line >= 1

    def with_source(self, source: str, filename: str | None = None) -> MaskError:
        """Attach the spec text (once known) so the message can quote it."""
        if self.source is None:
            self.source = source
            self.filename = filename or self.filename
            self.args = (self._render(),)
        return self

    def called_from(self, pattern: str, span: Span, filename: str | None) -> MaskError:
        """Record a call site the error passed through (innermost first)."""
        self.trace.append(f"in {pattern}() called at {filename or '<spec>'}:{span.line}:{span.column}")
        self.args = (self._render(),)
        return self

    def _render(self) -> str:
        return "\n".join([self._render_location(), *("  " + t for t in self.trace)])

    def _render_location(self) -> str:
        where = self.filename or "<spec>"
        if not self._located():
            return f"{where}: {self.message}"
        head = f"{where}:{self.span.line}:{self.span.column}: {self.message}"
        if self.source is None:
            return head
        # Lines end at "\n" only, as the parser counts them (not at "\f", "\v", ...).
        lines = self.source.split("\n")
        if self.span.line > len(lines):
            text = ""
        else:
            text = lines[self.span.line - 1].rstrip("\r")
        width = 1
        if self.span.end_line == self.span.line:
            width = max(1, self.span.end_column - self.span.column)
        width = min(width, max(1, len(text) - self.span.column + 1))
        # Quote at most 100 characters of a long line, around the problem.
        column = self.span.column
        if len(text) > 100:
            start = max(0, min(column - 1 - 50, len(text) - 100))
            before = "..." if start > 0 else ""
            after = "..." if start + 100 < len(text) else ""
            text = before + text[start : start + 100] + after
            column = column - start + len(before)
            width = min(width, len(before) + 100 - column + 1)
        gutter = f"{self.span.line:>4} | "
        caret = " " * (len(gutter) + column - 1) + "^" * max(1, width)
        # One printable character per column keeps the caret aligned (tabs included)
        # and keeps control characters from the spec out of the terminal.
        text = "".join(c if c.isprintable() else " " for c in text)
        return f"{head}\n{gutter}{text}\n{caret}"

    def __str__(self) -> str:
        return self.args[0]


class MaskSyntaxError(MaskError):
    """The text does not follow the grammar."""


class MaskTypeError(MaskError):
    """The text parses but means nothing: unknown names, wrong arguments or sizes,
    or call-time bindings (lengths, grid sizes, tensors) that do not fit."""
