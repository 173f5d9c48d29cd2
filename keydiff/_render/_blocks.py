"""The terminal report read back as plain blocks (lines and tables), the input of the markdown and HTML reports.

The reports are written once, as rich renderables (``_rich.render_diff``, ``_values.render_values``...); this module
turns those renderables into ``Line`` and ``Grid`` values, so that a shared report says exactly what the terminal
said, cell for cell.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from rich.console import RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text

__all__ = ["Block", "Grid", "Line", "Tone", "to_blocks"]

Tone = Literal["", "ok", "bad", "warn", "note", "dim", "strong"]
_TONES: tuple[tuple[str, Tone], ...] = (("green", "ok"), ("red", "bad"), ("yellow", "warn"), ("cyan", "note"),
                                         ("dim", "dim"), ("bold", "strong"))
# Columns that hold keys or key patterns: code spans in markdown, monospace in HTML.
_KEY_COLUMNS = frozenset({"checkpoint", "model", "keys", "key", "nearest", "cluster"})
_NUMBER = re.compile(r"[-+]?(\d[\d,]*\.?\d*(e[-+]?\d+)?%?|nan|inf)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Line:
    """One line of text."""

    text: str
    """Plain text, no markup."""
    tone: Tone = ""
    """What the terminal's colour meant."""


@dataclass(frozen=True, slots=True)
class Grid:
    """A table: a title, column names and rows of plain text."""

    title: str
    """Shown above the table."""
    columns: tuple[str, ...]
    """Header cells."""
    rows: tuple[tuple[str, ...], ...]
    """Body cells, one tuple per row, as many cells as columns."""
    code: tuple[bool, ...]
    """Per column: holds keys (code-formatted)."""
    numeric: tuple[bool, ...]
    """Per column: every cell is a number (right-aligned)."""
    tone: Tone = ""
    """The title's tone."""


Block = Line | Grid


def _tone(style: str | Style | None) -> Tone:
    text = str(style or "")
    return next((tone for name, tone in _TONES if name in text), "")


def _plain(cell: RenderableType) -> str:
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        # cells added as strings are rich markup (escaped by the renderers)
        return Text.from_markup(cell).plain
    return str(cell)


def _grid(table: Table) -> Grid:
    columns = tuple(_plain(c.header) for c in table.columns)
    cells = [[_plain(cell) for cell in c.cells] for c in table.columns]
    rows = tuple(zip(*cells, strict=True)) if cells else ()
    numeric = tuple(bool(col) and all(_NUMBER.fullmatch(v) for v in col) for col in cells)
    code = tuple(name in _KEY_COLUMNS and not num for name, num in zip(columns, numeric, strict=True))
    title = _plain(table.title) if table.title is not None else ""
    return Grid(title=title, columns=columns, rows=rows, code=code, numeric=numeric, tone=_tone(table.title_style))


def to_blocks(renderables: Iterable[RenderableType]) -> list[Block]:
    """Plain blocks of a report's renderables: ``Text`` becomes a ``Line``, ``Table`` a ``Grid``.

    Example:
        >>> to_blocks([Text("✓ done", style="bold green")])
        [Line(text='✓ done', tone='ok')]
    """
    out: list[Block] = []
    for r in renderables:
        if isinstance(r, Table):
            out.append(_grid(r))
        elif isinstance(r, Text):
            out.append(Line(r.plain, _tone(r.style)))
        elif isinstance(r, str):
            text = Text.from_markup(r)
            out.append(Line(text.plain, _tone(text.spans[0].style if text.spans else "")))
        else:
            raise TypeError(f"cannot export a {type(r).__name__} to a shared report")
    return out
