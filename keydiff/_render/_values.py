"""Terminal reports of tensor values: a ``ValueDiff`` by cluster, and per-tensor statistics with flags first.

Like ``_rich.render_diff`` these yield rich renderables (``Text`` lines and ``Table``s); the markdown and HTML
reports are made from the same renderables, so every format says the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from keydiff._render._keytext import KeyText
from keydiff._render._rich import DEFAULT_BUDGET, _plural

if TYPE_CHECKING:
    import pandas as pd

    from keydiff._values import ClusterChange, ValueDiff

__all__ = ["render_stats", "render_values"]


def _num(x: float) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return f"{x:.4g}"


def _change(g: ClusterChange, x: float, fmt: Callable[[float], str] | None = None) -> str:
    """A cluster's relative change or cosine; tensors that were zero in A have neither, and say so."""
    from keydiff._values import format_change

    if g.was_zero == g.tensors:
        return "was zero"
    shown = (fmt or format_change)(x)
    return f"{shown} ({g.was_zero} was zero)" if g.was_zero else shown


def _some(keys: tuple[str, ...], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def render_values(vd: ValueDiff, *, budget: int = DEFAULT_BUDGET) -> Iterator[RenderableType]:
    """Yield the value report: verdict, one row per cluster (most changed first), what was not compared."""

    n = len(vd.changes)
    same = sum(c.identical for c in vd.changes)
    broken = [c.key for c in vd.changes if not math.isfinite(c.rel_change) and not c.was_zero]
    zero = [c.key for c in vd.changes if c.was_zero]
    if n and same == n:
        what = "the compared tensor is" if n == 1 else f"all {n} compared tensors are"
        yield Text(f"✓ {what} bit-identical", style="bold green")
    elif broken:
        yield Text(f"✗ {n - same} of {_plural(n, 'compared tensor')} changed ({same} bit-identical); "
                   f"{len(broken)} with no finite change (NaN or Inf values): {_some(tuple(broken))}",
                   style="bold red")
    elif n:
        top = vd.clusters[0]
        was = f"; {len(zero)} {'was' if len(zero) == 1 else 'were'} zero in A: {_some(tuple(zero))}" if zero else ""
        yield Text(f"≠ {n - same} of {_plural(n, 'compared tensor')} changed ({same} bit-identical); most changed: "
                   f"{top}{was}", style="bold yellow")
    else:
        yield Text("✗ no tensor could be compared: the mapping matched nothing", style="bold red")
    yield Text(f"  A: {vd.a}   B: {vd.b} (converted into A's names and layout)", style="dim")
    clusters = vd.clusters
    if clusters:
        table = Table(title="Value changes by cluster", title_justify="left")
        for col in ("cluster", "tensors", "identical", "median rel. change", "max rel. change", "min cosine",
                    "max abs diff"):
            table.add_column(col, overflow="fold", justify="left" if col == "cluster" else "right")
        for g in clusters[:budget]:
            style = "green" if g.identical == g.tensors else "yellow" if g.median_rel_change < 0.1 else "red"
            table.add_row(KeyText(g.cluster), str(g.tensors), str(g.identical),
                          Text(_change(g, g.median_rel_change), style=style), _change(g, g.max_rel_change),
                          _change(g, g.min_cosine, _num), _num(g.max_abs_diff))
        yield table
        if len(clusters) > budget:
            yield Text(f"  … {len(clusters) - budget} more clusters; use --all to list them", style="dim")
    if vd.missing:
        yield Text(f"  {_plural(len(vd.missing), 'tensor')} of A not compared (no counterpart in B): "
                   f"{_some(vd.missing)}", style="yellow")
    if vd.unused:
        yield Text(f"  {_plural(len(vd.unused), 'tensor')} of B not compared (unused by the mapping): "
                   f"{_some(vd.unused)}", style="yellow")


def render_stats(frame: pd.DataFrame, *, origin: str = "", budget: int = DEFAULT_BUDGET,
                 show_all: bool = False) -> Iterator[RenderableType]:
    """Yield the statistics report: a summary line, flagged tensors first, then (``show_all``) every tensor."""
    flagged = frame[frame["flag"] != ""]
    # NaN and Inf break a model, an all-zero tensor may be meant (a zero-initialised bias): the worst first
    broken = (flagged["nan"] > 0) | (flagged["inf"] > 0)
    flagged = flagged.iloc[sorted(range(len(flagged)), key=lambda i: not broken.iloc[i])]
    nan, inf = int((frame["nan"] > 0).sum()), int((frame["inf"] > 0).sum())
    zero = int(frame["flag"].str.contains("all zero").sum())
    params = int(frame["numel"].sum())
    summary = f"{_plural(len(frame), 'tensor')}, {params:,} values"
    if nan or inf:
        yield Text(f"✗ {summary}: {nan} with NaN, {inf} with Inf, {zero} all zero", style="bold red")
    elif zero:
        yield Text(f"✓ {summary}, all finite; {zero} all zero", style="bold yellow")
    else:
        yield Text(f"✓ {summary}, all finite, none all zero", style="bold green")
    if origin:
        yield Text(f"  checkpoint: {origin}", style="dim")
    if len(flagged):
        yield from _stats_table("Flagged tensors", flagged, budget, style="red" if nan or inf else "yellow")
    if show_all:
        yield from _stats_table("All tensors", frame, budget)
    elif len(frame) > len(flagged):
        yield Text(f"  {_plural(len(frame) - len(flagged), 'tensor')} not flagged; use --all to list them, --csv "
                   "to save every statistic", style="dim")


def _stats_table(title: str, frame: pd.DataFrame, budget: int, style: str = "") -> Iterator[RenderableType]:
    table = Table(title=title, title_justify="left", title_style=style)
    cols = ("key", "shape", "dtype", "flag", "nan", "inf", "zero frac.", "mean", "std", "abs max")
    for col in cols:
        table.add_column(col, overflow="fold", justify="right" if col in cols[4:] else "left")
    for r in frame.head(budget).itertuples(index=False):
        table.add_row(KeyText(r.key), f"[{', '.join(map(str, r.shape))}]", r.dtype, Text(r.flag, style="red"),
                      str(r.nan), str(r.inf), _num(r.zero_frac), _num(r.mean), _num(r.std), _num(r.abs_max))
    yield table
    if len(frame) > budget:
        yield Text(f"  … {len(frame) - budget} more rows; use --csv to save them all", style="dim")
