"""The report as GitHub-flavoured markdown: compact, made to paste into an issue.

Lines become paragraphs (diagnoses a list, the verdict and the next step bold) and tables GFM tables. Every cell is
escaped for a GFM table (``|`` as ``\\|``, no line breaks); keys sit in code spans, so ``blocks.{0..11}`` and
``__init__`` show as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.console import RenderableType

from keydiff._render._blocks import Grid, to_blocks

__all__ = ["escape_text", "render_markdown"]

_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")
_BLOCK_START = re.compile(r"^(#|[-+=>]|\d+[.)])")
_ITEM_MARKS = ("⚠ ", "• ")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def escape_text(text: str, *, cell: bool = False) -> str:
    """Escape inline markdown, keeping balanced ``code`` spans as code.

    In a table ``cell`` pipes are escaped inside code spans too: GFM splits cells before it parses code.

    Example:
        >>> print(escape_text("a|b `c|d` *e*"), escape_text("`c|d`", cell=True))
        a\\|b `c|d` \\*e\\* `c\\|d`
    """
    text = _one_line(text)
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unbalanced backtick is text, not code
        return _SPECIAL.sub(r"\\\1", text)
    code_pipe = "\\|" if cell else "|"
    return "`".join(_SPECIAL.sub(r"\\\1", p) if i % 2 == 0 else p.replace("|", code_pipe)
                    for i, p in enumerate(parts))


def _code(text: str) -> str:
    text = _one_line(text).replace("|", "\\|")
    if not text:
        return ""
    if "`" not in text:
        return f"`{text}`"
    # a code span closes at the first backtick run as long as its opener: use a longer one, padded by spaces
    fence = "`" * (max(len(run) for run in re.findall(r"`+", text)) + 1)
    return f"{fence} {text} {fence}"


def _paragraph(text: str) -> str:
    out = escape_text(text.strip())
    return "\\" + out if _BLOCK_START.match(out) else out


def _table(g: Grid) -> list[str]:
    def row(cells: Iterable[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = []
    if g.title:
        out += [f"**{escape_text(g.title)}**", ""]
    out.append(row(escape_text(c, cell=True) for c in g.columns))
    out.append(row("---:" if num else "---" for num in g.numeric))
    for cells in g.rows:
        out.append(row(_code(c) if code else escape_text(c, cell=True) for c, code in zip(cells, g.code, strict=True)))
    return out


def render_markdown(renderables: Iterable[RenderableType]) -> str:
    """The report's renderables as one markdown document.

    Example:
        >>> from rich.text import Text
        >>> print(render_markdown([Text("✓ all 2 model keys filled", style="bold green"), Text("  note", style="dim")]))
        **✓ all 2 model keys filled**
        <BLANKLINE>
        note
        <BLANKLINE>
    """
    chunks: list[list[str]] = []
    for block in to_blocks(renderables):
        if isinstance(block, Grid):
            chunks.append(_table(block))
            continue
        text = block.text.strip()
        if text.startswith(_ITEM_MARKS):
            if chunks and chunks[-1] and chunks[-1][0].startswith("- "):
                chunks[-1].append(f"- {escape_text(text)}")
            else:
                chunks.append([f"- {escape_text(text)}"])
        elif block.tone in ("ok", "bad", "warn", "strong") and text:
            chunks.append([f"**{_paragraph(text)}**"])
        elif text:
            chunks.append([_paragraph(text)])
    return "\n\n".join("\n".join(c) for c in chunks) + "\n"
