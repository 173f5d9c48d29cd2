"""Shareable reports: GFM markdown that a GitHub-style parser reads back cell for cell, and standalone HTML, both
saying what the terminal report says."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import pytest
import torch
from markdown_it import MarkdownIt
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from safetensors.torch import load_file, save_file

import keydiff
from keydiff._render import _html, _markdown, _rich
from keydiff._render import _values as values_render
from keydiff._render._blocks import Grid, Line, to_blocks

from pairs import CORE_PAIRS, write_source

PAIRS = {p.name: p for p in CORE_PAIRS}
NASTY = ["a|b", "pipe at end|", "`tick`", "two``ticks", "*star* _under_", "<b>html</b> & amp", "[link](x)",
         "back\\slash", "1. not a list", "", "line\nbreak", "# not a heading", "~~strike~~"]


def _tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table as GitHub's parser sees it: header cells and body rows of plain cell text."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    row: list[str] = []
    in_cell = False
    for tok in MarkdownIt("commonmark").enable("table").parse(markdown):
        if tok.type == "table_open":
            tables.append(([], []))
        elif tok.type == "tr_open":
            row = []
        elif tok.type in ("th_open", "td_open", "th_close", "td_close"):
            in_cell = tok.type.endswith("_open")
        elif tok.type == "inline" and in_cell:
            assert not any(c.type == "html_inline" for c in tok.children), tok.content  # raw HTML leaked through
            row.append("".join(c.content for c in tok.children if c.type in ("text", "code_inline")))
        elif tok.type == "tr_close":
            header, rows = tables[-1]
            if header:
                rows.append(row)
            else:
                header.extend(row)
    return tables


def _norm(text: str) -> str:
    return " ".join(text.split())


def _check_markdown(renderables: list) -> str:
    """Render, parse back, and compare every table cell and line with the blocks."""
    md = _markdown.render_markdown(renderables)
    blocks = to_blocks(renderables)
    grids = [b for b in blocks if isinstance(b, Grid)]
    parsed = _tables(md)
    assert len(parsed) == len(grids)
    for (header, rows), g in zip(parsed, grids, strict=True):
        assert header == list(g.columns)
        assert len(rows) == len(g.rows)
        for got, want in zip(rows, g.rows, strict=True):
            assert len(got) == len(g.columns)
            got = [c if code else c.replace("`", "") for c, code in zip(got, g.code, strict=True)]
            # balanced backticks in prose cells are code spans, as in the diagnoses; key cells keep them
            assert got == [_norm(c) if code else _norm(c).replace("`", "")
                           for c, code in zip(want, g.code, strict=True)]
    html = MarkdownIt("commonmark").enable("table").render(md)
    text = re.sub(r"<[^>]+>", "", html)
    for line in (b for b in blocks if isinstance(b, Line) and b.text.strip()):
        plain = _norm(line.text).replace("`", "")
        assert _norm(text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
                     .replace("&quot;", '"')).count(plain) >= 1, plain
    return md


class _HTMLTables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.refs += [v for k, v in attrs if k in ("href", "src") and v]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell or []))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def _check_html(renderables: list) -> str:
    page = _html.render_html(renderables)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for remote in ("http://", "https://", "<script", "<link", "@import", "url(", "<img"):
        assert remote not in page
    parser = _HTMLTables()
    parser.feed(page)
    assert not parser.refs
    grids = [b for b in to_blocks(renderables) if isinstance(b, Grid)]
    assert [t[0] for t in parser.tables] == [list(g.columns) for g in grids]
    assert [t[1:] for t in parser.tables] == [[list(r) for r in g.rows] for g in grids]
    return page


def test_cells_that_would_break_a_table_are_escaped():
    table = Table(title="Nasty | title")
    for col in ("key", "reason", "n"):
        table.add_column(col)
    for i, text in enumerate(NASTY):
        table.add_row(Text(text), Text(text), str(i))
    parts = [Text("✗ verdict with a | pipe and `code|span`", style="bold red"), Text("• a `diagnosis` *x*"), table]
    md = _check_markdown(parts)
    assert "| --- | --- | ---: |" in md  # the count column is right-aligned
    assert "`code|span`" in md.splitlines()[0]  # outside a table a pipe in code stays as written
    _check_html(parts)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Real diffs: converted, unresolved, a CNN with ragged clusters, odd key names; a value diff; statistics."""
    directory = tmp_path_factory.mktemp("reports")
    out = {}
    for name in ("hf_vit", "tv_convnext"):
        pair = PAIRS[name]
        (directory / name).mkdir()
        path, _ = write_source(pair, directory / name)
        out[name] = keydiff.diff(pair.target, path, **pair.target_kwargs)
    sd = load_file(str(next((directory / "hf_vit").glob("*.safetensors"))))
    del sd["layers.1.mlp.fc2.weight"]
    sd["layers.0.mlp.fc2.bias"] = torch.full((32,), float("nan"))
    broken = directory / "broken.safetensors"
    save_file(sd, str(broken))
    pair = PAIRS["hf_vit"]
    out["unresolved"] = keydiff.diff(pair.target, broken, **pair.target_kwargs)
    odd = {"we|ird.x*y_z.weight": torch.ones(3, 4), "`tick`.<b>.bias": torch.ones(5)}
    out["odd"] = keydiff.diff(odd, {"module." + k: v for k, v in odd.items()} | {"extra|key": torch.ones(7)})
    converted = directory / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in out["hf_vit"].apply().items()}, str(converted))
    out["values"] = keydiff.compare(converted, broken)
    out["stats"] = keydiff.stats(broken)
    return out


@pytest.mark.parametrize("name", ["hf_vit", "tv_convnext", "unresolved", "odd"])
@pytest.mark.parametrize("show_exact", [False, True])
def test_diff_reports_parse_back_to_the_terminal_report(reports, name, show_exact):
    d = reports[name]
    parts = list(_rich.render_diff(d, show_exact=show_exact))
    md = _check_markdown(parts)
    page = _check_html(parts)
    assert md == d.to_markdown(show_exact=show_exact) and page == d.to_html(show_exact=show_exact)
    # same content as the terminal: every cell and line of the report is in the (unwrapped) terminal text
    console = Console(file=io.StringIO(), width=2000)
    console.print(Group(*parts))
    terminal = _norm(console.file.getvalue())
    for block in to_blocks(parts):
        texts = [block.text] if isinstance(block, Line) else [c for row in block.rows for c in row]
        for t in texts:
            assert _norm(t) in terminal
    assert md.startswith("**✓ all " if d.ok else "**✗ ")


def test_unresolved_report_lists_the_missing_key_and_next_step(reports):
    md = reports["unresolved"].to_markdown()
    header, rows = _tables(md)[-2]
    assert header == ["keys", "n", "reason", "nearest"]
    assert any(r[0] == "blocks.1.mlp.fc2.weight" for r in rows)
    assert md.rstrip().splitlines()[-1].startswith("**Next: ")


def test_odd_key_names_survive_markdown_and_html(reports):
    d = reports["odd"]
    md = d.to_markdown(show_exact=True)
    cells = {c for _, rows in _tables(md) for r in rows for c in r}
    assert {"we|ird.x*y_z.weight", "`tick`.<b>.bias", "extra|key"} <= cells
    assert "<code>extra|key</code>" in d.to_html()


def test_value_and_stats_reports_parse_back(reports):
    vparts = list(values_render.render_values(reports["values"]))
    md = _check_markdown(vparts)
    assert md == reports["values"].to_markdown()
    _check_html(vparts)
    header, rows = _tables(md)[0]
    assert header[:4] == ["cluster", "tensors", "identical", "median rel. change"]
    assert rows[0][0] == "blocks.0.mlp.fc2.bias" and rows[0][3] == "nan"  # block 1 lost its fc2.weight
    sparts = list(values_render.render_stats(reports["stats"], origin="broken.safetensors"))
    md = _check_markdown(sparts)
    _check_html(sparts)
    assert md.startswith("**✗ 39 tensors, 22,912 values: 1 with NaN, 0 with Inf, 0 all zero**")
    assert [r[0] for r in _tables(md)[0][1]] == ["layers.0.mlp.fc2.bias"]


def test_jupyter_html_is_a_scoped_fragment(reports):
    html = reports["values"]._repr_html_()
    assert html.startswith('<div class="keydiff"><style>') and "<html" not in html and "<table>" in html
