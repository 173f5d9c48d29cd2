"""The report of ``keydiff find``: the verdict, one row per candidate, the command that converts for the best."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from keydiff._render._rich import _plural

if TYPE_CHECKING:
    from keydiff._find import Candidate, Found

__all__ = ["describe_choice", "render_found"]


def _args(c: Candidate) -> str:
    args = c.model_args()
    return ", ".join(f"{k}={v}" for k, v in args.items()) or "defaults"


def _fit(c: Candidate) -> str:
    mapped = c.filled - c.by_name
    how = f"{c.by_name} by name" + (f", {mapped} mapped" if mapped else "")
    return f"{c.filled}/{c.model_keys} keys ({how}), {c.used}/{c.tensors} tensors used"


def describe_choice(found: Found) -> str:
    """One sentence: which model the search chose for the checkpoint, and why (``keydiff CKPT`` without MODEL)."""
    best = found.best
    if best is None:
        return f"no timm architecture resembles {found.checkpoint}"
    args = best.model_args()
    with_args = f" with {', '.join(f'{k}={v}' for k, v in args.items())}" if args else ""
    same = f" (same keys and shapes as {', '.join(best.names[1:4])})" if len(best.names) > 1 else ""
    why = "it fills" if best.fits else "the closest: it fills"
    runner = ""
    if len(found.candidates) > 1:
        second = found.candidates[1]
        runner = f"; next: {second.name} ({second.filled}/{second.model_keys} keys, {second.used}/{second.tensors} " \
                 "tensors)"
    return (f"chose {best.name}{with_args}{same}: {why} {_fit(best)}, out of {found.searched} timm architectures"
            f"{runner}")


def render_found(found: Found) -> Iterator[RenderableType]:
    """Yield the find report: verdict, ranked candidates, what the shapes leave open, the next command."""
    best = found.best
    if best is None:
        yield Text(f"✗ no timm architecture resembles {found.checkpoint}", style="bold red")
        return
    if best.fits:
        yield Text(f"✓ {found.checkpoint} is {best.name} ({_args(best)}): {_fit(best)}", style="bold green")
    else:
        yield Text(f"✗ no architecture fits {found.checkpoint} completely; closest: {best.name} ({_args(best)}): "
                   f"{_fit(best)}", style="bold red")
    table = Table(title=f"{_plural(len(found.candidates), 'candidate')} of {found.searched} timm architectures "
                        f"({found.shortlisted} shortlisted by fingerprint)", title_justify="left")
    for col in ("#", "model", "args", "fit", "similar", "first cause"):
        table.add_column(col, overflow="fold")
    for i, c in enumerate(found.candidates, 1):
        name = c.name + (f" (= {', '.join(c.names[1:4])}{', ...' if len(c.names) > 4 else ''})"
                         if len(c.names) > 1 else "")
        mark = "" if c.verified is None else (" ✓built" if c.verified else " ✗built")
        table.add_row(str(i), name + mark, _args(c), ("✓ " if c.fits else "") + _fit(c), f"{c.similarity:.2f}",
                      c.cause or "-")
    yield table
    if best.open_args:
        yield Text(f"the shapes do not decide {', '.join(best.open_args)} of {best.name}: its defaults are used",
                   style="yellow")
    yield Text(f"next: {best.command(found.checkpoint)}", style="cyan")
