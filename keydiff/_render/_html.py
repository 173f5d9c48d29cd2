"""The report as one standalone HTML file: inline CSS, no script, no font, image or stylesheet from the network.

The same blocks as the markdown report (``_blocks.to_blocks``): lines as paragraphs, diagnoses as a list, tables as
``<table>``, keys in ``<code>``. ``html_fragment`` is the same body for Jupyter's ``_repr_html_``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

from rich.console import RenderableType

from keydiff._render._blocks import Grid, Line, to_blocks

__all__ = ["html_fragment", "render_html"]

_CSS = """
.keydiff{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;font-size:14px;color:#1f2328}
.keydiff p{margin:.35em 0}
.keydiff ul{margin:.35em 0;padding-left:1.4em}
.keydiff table{border-collapse:collapse;margin:.3em 0 1em}
.keydiff caption{text-align:left;font-weight:600;padding:.3em 0}
.keydiff th,.keydiff td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
.keydiff th{background:#f6f8fa}
.keydiff td.num{text-align:right;font-variant-numeric:tabular-nums}
.keydiff code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:12px}
.keydiff .ok{color:#1a7f37}.keydiff .bad{color:#cf222e}.keydiff .warn{color:#9a6700}
.keydiff .note{color:#0969da}.keydiff .dim{color:#656d76}
.keydiff .ok,.keydiff .bad,.keydiff .warn,.keydiff .strong{font-weight:600}
"""
_ITEM_MARKS = ("⚠ ", "• ")


def _inline(text: str) -> str:
    """Escaped text; balanced backtick spans become ``<code>``."""
    parts = text.split("`")
    if len(parts) % 2 == 0:
        return html.escape(text)
    return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>" for i, p in enumerate(parts))


def _cls(tone: str) -> str:
    return f' class="{tone}"' if tone else ""


def _table(g: Grid) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in g.columns)
    body = []
    for cells in g.rows:
        tds = []
        for cell, code, num in zip(cells, g.code, g.numeric, strict=True):
            content = f"<code>{html.escape(cell)}</code>" if code and cell else html.escape(cell)
            tds.append(f"<td{_cls('num') if num else ''}>{content}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    caption = f"<caption{_cls(g.tone)}>{html.escape(g.title)}</caption>" if g.title else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def _body(renderables: Iterable[RenderableType]) -> str:
    out: list[str] = []
    items: list[str] = []
    for block in to_blocks(renderables):
        text = block.text.strip() if isinstance(block, Line) else ""
        if isinstance(block, Line) and text.startswith(_ITEM_MARKS):
            items.append(f"<li{_cls(block.tone)}>{_inline(text)}</li>")
            continue
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if isinstance(block, Grid):
            out.append(_table(block))
        elif text:
            out.append(f"<p{_cls(block.tone)}>{_inline(text)}</p>")
    if items:
        out.append("<ul>" + "".join(items) + "</ul>")
    return "\n".join(out)


def html_fragment(renderables: Iterable[RenderableType]) -> str:
    """The report as an HTML fragment with its own scoped style (for Jupyter)."""
    return f'<div class="keydiff"><style>{_CSS}</style>\n{_body(renderables)}\n</div>'


def render_html(renderables: Iterable[RenderableType], *, title: str = "keydiff report") -> str:
    """The report as a standalone HTML document."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}body{{margin:2em}}</style>\n</head>\n<body>\n"
        f'<div class="keydiff">\n{_body(renderables)}\n</div>\n</body>\n</html>\n'
    )
