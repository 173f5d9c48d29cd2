"""The terminal (and Jupyter) report: verdict, diagnoses, mapping by cluster, leftovers, next step."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from keydiff._render._group import group_entries, group_leftovers
from keydiff._render._keytext import KeyText

if TYPE_CHECKING:
    from keydiff._diff import Diff
    from keydiff._repair import Proof

__all__ = ["DEFAULT_BUDGET", "mimebundle", "render_diff"]

DEFAULT_BUDGET = 40
"""Rows shown per section before the rest is summarised."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def verdict(d: Diff) -> Text:
    """The first line: does it load, and how."""
    total, missing = len(d.model), len(d.mapping.missing)
    exact = d.exact
    mapped = len(d.mapping.entries) - exact
    unexplained = len(d.mapping.unexplained)
    if d.ok:
        how = f"{exact} by name" + (f", {mapped} by the proposed mapping" if mapped else "")
        text = Text(f"✓ all {total} model keys filled ({how})", style="bold green")
    elif not missing:
        how = f"{exact} by name" + (f", {mapped} by the proposed mapping" if mapped else "")
        text = Text(f"✗ all {total} model keys filled ({how}), but {_plural(unexplained, 'checkpoint tensor')} "
                    "should have gone somewhere", style="bold red")
        return text
    else:
        text = Text(f"✗ {missing} of {total} model keys unresolved ({exact} filled by name, {mapped} by the "
                    "proposed mapping)", style="bold red")
    if d.mapping.unused:
        why = "" if unexplained or not d.ok else " (expected: see reasons)"
        text.append(f"; {_plural(len(d.mapping.unused), 'checkpoint tensor')} unused{why}", style="yellow")
    return text


def proof_verdict(proof: Proof) -> Text:
    """The first line with a source model: proven or not, and why."""
    d, rel = proof.diff, proof.rel_diff
    total, missing = len(d.model), len(d.mapping.missing)
    shown = "" if rel is None else f"{rel:.1g}"
    if proof.proven:
        text = Text(f"✓ proven: all {total} model keys filled and the converted model reproduces the source's "
                    f"outputs (max rel. diff {shown})", style="bold green")
    elif proof.verification.ok:
        text = Text(f"✗ not proven: {missing} of {total} model keys unresolved; the outputs compared agree "
                    f"(max rel. diff {shown})", style="bold red")
    else:
        text = Text("✗ not proven: the converted model does not reproduce the source's outputs"
                    + (f" (closest: rel. diff {shown})" if shown else "")
                    + (f"; {missing} of {total} model keys unresolved" if missing else ""), style="bold red")
    if proof.changes:
        text.append(f"; {_plural(len(proof.changes), 'key')} changed by verification", style="cyan")
    if d.mapping.unused:
        text.append(f"; {_plural(len(d.mapping.unused), 'checkpoint tensor')} unused", style="yellow")
    return text


def render_proof(proof: Proof, budget: int) -> Iterator[RenderableType]:
    """The outputs compared, what verification changed entry by entry, and where a repair stopped."""
    yield proof.verification.table()
    if proof.changes:
        table = Table(title=f"What verification changed ({_plural(proof.trials, 'trial')}, at most "
                            f"{proof.max_trials})", title_justify="left", title_style="cyan")
        for col in ("model key", "was", "now", "why"):
            table.add_column(col, overflow="fold")
        for c in proof.changes[:budget]:
            table.add_row(KeyText(c.target), escape(c.was), KeyText(c.now), escape(c.why))
        yield table
        if len(proof.changes) > budget:
            yield Text(f"  … {len(proof.changes) - budget} more changes; use --all to list them", style="dim")
    if proof.stopped:
        yield Text(f"Repair by running stopped: {proof.stopped} ({_plural(proof.trials, 'trial')}, at most "
                   f"{proof.max_trials}); nothing it tried is kept, the mapping below is the proposal", style="red")


def render_diff(d: Diff, *, budget: int = DEFAULT_BUDGET, show_exact: bool = False,
                proof: Proof | None = None, output: str | None = None,
                partial: bool = False) -> Iterator[RenderableType]:
    """Yield the report's parts, each bounded by ``budget`` rows; with a ``proof`` (``d`` is ``proof.diff``) the
    verdict says whether running proved the mapping, and what running changed follows the diagnoses. ``output``
    and ``partial`` are what the command line asked for, so the next step does not repeat them."""
    yield verdict(d) if proof is None else proof_verdict(proof)
    yield Text(f"  model: {d.model.origin} ({len(d.model)} keys)   checkpoint: {d.checkpoint.origin} "
               f"({len(d.checkpoint)} keys{', ' + d.checkpoint_format if d.checkpoint_format else ''})"
               + (f"   source: {proof.source}" if proof is not None else ""), style="dim")
    for dg in d.diagnoses:
        style, mark = ("yellow", "⚠") if dg.level == "warning" else ("cyan", "•")
        yield Text(f"{mark} {dg.message}", style=style)
    if proof is not None:
        yield from render_proof(proof, budget)
    entries = [e for e in d.mapping.entries if show_exact or e.evidence.method not in ("exact", "prefix")]
    groups = group_entries(entries)
    if groups:
        table = Table(title="Proposed mapping", title_justify="left", show_lines=False, expand=False)
        for col in ("checkpoint", "model", "keys", "op", "conf.", "evidence"):
            table.add_column(col, overflow="fold")
        for g in groups[:budget]:
            conf_style = "green" if g.confidence >= 0.8 else "yellow" if g.confidence >= 0.6 else "red"
            table.add_row(KeyText(g.source), KeyText(g.target), str(g.count), g.op,
                          Text(f"{g.confidence:.2f}", style=conf_style),
                          escape(g.method + (f": {g.note}" if g.note else "")))
        yield table
        if len(groups) > budget:
            yield Text(f"  … {len(groups) - budget} more mapping rows; use --all to list them", style="dim")
    if d.exact and not show_exact:
        yield Text(f"  {_plural(d.exact, 'key')} match by name; use --all to list them", style="dim")
    yield from _leftovers("Unresolved model keys", group_leftovers(d.mapping.missing), budget, "red")
    yield from _leftovers("Unused checkpoint tensors", group_leftovers(d.mapping.unused), budget, "yellow")
    yield Text(next_step(d, output=output, partial=partial) if proof is None else proof_next_step(proof),
               style="bold")


def _leftovers(title: str, groups: list, budget: int, style: str) -> Iterator[RenderableType]:
    if not groups:
        return
    table = Table(title=title, title_justify="left", title_style=style)
    for col in ("keys", "n", "reason", "nearest"):
        table.add_column(col, overflow="fold")
    for g in groups[:budget]:
        table.add_row(KeyText(g.label), str(g.count), escape(g.reason), KeyText(", ".join(g.candidates[:2])))
    yield table
    if len(groups) > budget:
        yield Text(f"  … {len(groups) - budget} more rows; use --all to list them", style="dim")


_CAUSE_STEPS = {
    "coverage": "check that this is the checkpoint for this model (and these model arguments)",
    "width": "build the model variant with the checkpoint's width",
    "depth": "build the model with the checkpoint's depth as said above",
    "pos_embed": "build the model with the checkpoint's image size and prefix tokens, or resample the position "
                 "embedding",
    "head": "the head is re-initialised by design: train it after loading",
}
"""What to do about each cause that leaves model keys unresolved, in the order the causes matter."""


def next_step(d: Diff, *, output: str | None = None, partial: bool = False) -> str:
    """What to do now, in one line, from what was found and what was asked (``-o``, ``--partial``).

    Example:
        >>> next_step(keydiff.diff(model, model.state_dict()))  # doctest: +SKIP
        'Next: nothing to convert: the checkpoint loads into the model as it is (strict=True).'
    """
    m = d.mapping
    if d.ok:
        converts = m.unwrap.container or m.unwrap.strip_prefix or m.unwrap.add_prefix or any(
            e.evidence.method != "exact" for e in m.entries)
        if not converts:
            return "Next: nothing to convert: the checkpoint loads into the model as it is (strict=True)."
        write = (f"{output} loads with strict=True" if output else
                 "add -o converted.safetensors to write a checkpoint that loads with strict=True (--json map.json "
                 "saves the mapping)")
        return (f"Next: {write}. Checked: names, shapes, structure; not checked: that the converted model computes "
                "the same function: `keydiff verify SOURCE_MODEL CKPT TARGET_MODEL` runs both (or add --source "
                "SOURCE_MODEL to prove the mapping, repairing it where running shows it wrong).")
    kinds = {g.kind for g in d.diagnoses if g.kind in _CAUSE_STEPS}
    steps = [_CAUSE_STEPS[k] for k in _CAUSE_STEPS if k in kinds]
    weak = [x for x in m.missing if x.reason.startswith("proposed")]
    # a proposal in doubt about a layout is decided by running, not by lowering the threshold (which applies it)
    doubt = [x for x in weak if "--source" in x.reason]
    if doubt:
        steps.append(f"{len(doubt)} unresolved keys are unproven (a layout their shapes cannot show): add --source "
                     "SOURCE_MODEL to decide by running both models")
    if len(weak) > len(doubt):
        steps.append(f"{len(weak) - len(doubt)} unresolved keys have weaker proposals: check them and lower "
                     "--min-confidence")
    if not steps:
        steps.append("the unresolved keys need tensors the checkpoint lacks" if m.missing else
                     "the unused checkpoint tensors above have no place in this model; follow the cause above")
    if partial:
        steps.append("--partial keeps the model's initialisation for the unresolved keys")
    elif m.entries and "coverage" not in kinds:
        steps.append("or --partial converts what fits")
    return "Next: " + "; ".join(steps) + "."


def proof_next_step(proof: Proof) -> str:
    """What running showed and what to do now, in one line."""
    shape = list(proof.verification.input_shape)
    if proof.proven:
        return (f"Checked: names, shapes, structure, and the function: {proof.source} and the converted model agree "
                f"on a random input {shape}. Next: -o converted.safetensors writes the checkpoint (--json map.json "
                "the verified mapping).")
    if proof.verification.ok:
        return ("Next: the outputs agree but some model keys stay unresolved; --partial converts the rest, "
                "the unresolved keys keep the model's initialisation.")
    return ("Next: the mapping is not proven, so nothing is written (--partial writes it anyway); compare the "
            "module named above with its counterpart in both models' code.")


def render_text(d: Diff, *, width: int = 120, budget: int = DEFAULT_BUDGET, show_exact: bool = False,
                color: bool = False) -> str:
    """The report as plain text."""
    console = Console(file=io.StringIO(), width=width, force_terminal=color, color_system="standard" if color else None)
    console.print(Group(*render_diff(d, budget=budget, show_exact=show_exact)))
    return console.file.getvalue()


def mimebundle(d: Diff) -> dict[str, str]:
    """Text and HTML forms for Jupyter."""
    console = Console(record=True, file=io.StringIO(), width=120)
    console.print(Group(*render_diff(d)))
    return {"text/plain": console.export_text(clear=False), "text/html": console.export_html(inline_styles=True)}
