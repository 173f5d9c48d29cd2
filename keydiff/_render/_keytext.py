"""A table cell holding keys that wraps only between tokens: after a ``.`` (outside ``{...}``) or a space.

Rich folds a long cell at any character (``encoder.layers.{0..23}.at`` / ``tn.qkv``); a key cut mid-token reads as
two other names. ``KeyText`` measures its narrowest width as its longest token, so a table shrinks the column to
that at most, and wraps at token ends; a token wider than the column is folded (nothing is ever cut off).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.measure import Measurement
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["KeyText", "tokens"]


def tokens(text: str) -> Iterator[str]:
    """Split ``text`` after each ``.`` outside braces and after each run of spaces; the parts join back to ``text``.

    Example:
        >>> list(tokens("blocks.{0..11}.attn.{weight,bias}, head.fc"))
        ['blocks.', '{0..11}.', 'attn.', '{weight,bias}, ', 'head.', 'fc']
    """
    depth, start = 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if (ch == "." and depth == 0) or (ch == " " and nxt != " "):
            yield text[start:i + 1]
            start = i + 1
    if start < len(text):
        yield text[start:]


class KeyText(Text):
    """Text that wraps at key-token boundaries in a table column (see the module docstring)."""

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        longest = max((len(t.rstrip()) for t in tokens(self.plain)), default=1)
        return Measurement(min(longest, options.max_width), min(len(self.plain), options.max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(options.max_width, 1)
        lines = [""]
        for token in tokens(self.plain):
            if len(lines[-1]) + len(token.rstrip()) > width and lines[-1]:
                lines.append("")
            lines[-1] += token
            while len(lines[-1].rstrip()) > width:  # a single token wider than the column: fold it
                lines[-1], rest = lines[-1][:width], lines[-1][width:]
                lines.append(rest)
        yield Text("\n".join(line.rstrip() for line in lines), style=self.style, no_wrap=True, overflow="ignore")
