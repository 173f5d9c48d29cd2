"""Group a mapping's entries and leftovers into cluster-level rows, the unit every report shows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from keydiff._conventions import LEAVES
from keydiff._mapping import Entry, Leftover
from keydiff._patterns import fill_template, template_of

__all__ = ["EntryGroup", "LeftoverGroup", "group_entries", "group_leftovers"]


@dataclass(frozen=True, slots=True)
class EntryGroup:
    """Entries that share a source template, a target template, an op and a method."""

    source: str
    target: str
    op: str
    method: str
    count: int
    confidence: float
    note: str


@dataclass(frozen=True, slots=True)
class LeftoverGroup:
    """Leftovers of one template that share a reason."""

    label: str
    count: int
    reason: str
    candidates: tuple[str, ...]


def _label(keys: Sequence[str]) -> str:
    by_tpl: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for k in keys:
        tpl, ix = template_of(k)
        by_tpl[tpl].append(ix)
    return ", ".join(fill_template(t, ix) for t, ix in by_tpl.items())






def _with_leaves(label: str, leaves: list[str]) -> str:
    leaves = [lf for lf in dict.fromkeys(leaves) if lf]
    if not leaves:
        return label
    label, marker, ragged = label.partition(" (")  # keep "(5 of 8)" at the end
    label = f"{label}.{leaves[0]}" if len(leaves) == 1 else f"{label}.{{{','.join(leaves)}}}"
    return label + marker + ragged


@dataclass(slots=True)
class _Cell:
    """Entries that share their keys' full templates, their op and their method."""

    first: Entry
    confidence: float
    count: int = 1
    sources: list[tuple[tuple[int, ...], ...]] = field(default_factory=list)
    """Each entry's source indices, one tuple per source key."""
    targets: list[tuple[int, ...]] = field(default_factory=list)
    """Each entry's target indices."""


def group_entries(entries: Iterable[Entry]) -> list[EntryGroup]:
    """Module-level rows (``x.{weight,bias}``), in the model's order of their first entry.

    Entries are first grouped by the full templates of their keys (one template lookup per key, no parsing of
    a key twice), then those groups merge into rows by module template; labels are built from index tuples.
    """
    cells: dict[tuple, _Cell] = {}  # (source templates, target template, op, method) -> cell
    for e in entries:
        found = [template_of(k) for k in e.source]
        t_tpl, t_ix = template_of(e.target)
        cid = (tuple(t for t, _ in found), t_tpl, id(e.op), e.evidence.method)
        cell = cells.get(cid)
        if cell is None:
            cell = cells[cid] = _Cell(e, e.confidence, 0)
        cell.confidence = min(cell.confidence, e.confidence)
        cell.count += 1
        cell.sources.append(tuple(ix for _, ix in found))
        cell.targets.append(t_ix)
    # (source module templates, target module template, op text, method) -> [(cell, source leaves, target leaf)]
    rows: dict[tuple, list[tuple[_Cell, list[str], str]]] = {}
    ops: dict[int, str] = {}
    for (s_tpls, t_tpl, op_id, method), cell in cells.items():
        op = ops.get(op_id)
        if op is None:
            o = cell.first.op
            op = ops[op_id] = (f"split dim {o.dim}, part {o.index} of {len(o.sizes)}" if o.kind == "split"
                               else o.describe())
        heads = [_head(t) for t in s_tpls]
        t_head, t_leaf = _head(t_tpl)
        rows.setdefault((tuple(h for h, _ in heads), t_head, op, method), []).append(
            (cell, [leaf for _, leaf in heads], t_leaf))
    out = []
    for (s_heads, t_head, op, method), members in rows.items():
        source = " + ".join(
            _with_leaves(fill_template(head, list(dict.fromkeys(ix[i] for c, _, _ in members for ix in c.sources))),
                         [leaves[i] for _, leaves, _ in members])
            for i, head in enumerate(s_heads)
        ) or "(none)"
        target = _with_leaves(fill_template(t_head, list(dict.fromkeys(ix for c, _, _ in members for ix in c.targets))),
                              [leaf for _, _, leaf in members])
        out.append(EntryGroup(source=source, target=target, op=op, method=method,
                              count=sum(c.count for c, _, _ in members),
                              confidence=min(c.confidence for c, _, _ in members),
                              note=members[0][0].first.evidence.note))
    return out


@lru_cache(maxsize=1 << 12)
def _head(template: str) -> tuple[str, str]:
    """A key template as (module template, leaf name), or (template, "") when the last token is no leaf name."""
    head, _, leaf = template.rpartition(".")
    return (head, leaf) if head and leaf in LEAVES else (template, "")


def group_leftovers(leftovers: Iterable[Leftover]) -> list[LeftoverGroup]:
    """Leftovers grouped by template and reason, in their original order."""
    groups: dict[tuple[str, str], list[Leftover]] = {}
    for lo in leftovers:
        reason = lo.reason
        groups.setdefault((template_of(lo.key)[0], _generic(reason)), []).append(lo)
    return [
        LeftoverGroup(label=_label([m.key for m in members]), count=len(members),
                      reason=members[0].reason if len(members) == 1 else reason,
                      candidates=members[0].candidates)
        for (_, reason), members in groups.items()
    ]


def _generic(reason: str) -> str:
    """A reason with its key-specific parts removed, so that a cluster's leftovers group together."""
    if reason.startswith("the checkpoint has this name with shape"):
        return "the checkpoint has these names with other shapes"
    if reason.startswith("the model's "):
        return "the model has these names with other shapes"
    if reason.startswith("proposed"):
        # the why of an unproven or ambiguous proposal (a layout in doubt, how to decide) is said of the cluster
        why = reason.partition(" (")[2][:-1] if reason.endswith(")") else ""
        return "proposed with a confidence below --min-confidence" + (f" ({why})" if why else "")
    return reason
