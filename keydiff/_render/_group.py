"""Group a mapping's entries and leftovers into cluster-level rows, the unit every report shows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


def group_entries(entries: Iterable[Entry]) -> list[EntryGroup]:
    """Module-level rows (``x.{weight,bias}``), in the model's order of their first entry.

    Entries are first grouped by the full templates of their keys (one template lookup per key, no parsing of
    a key twice), then those groups merge into rows by module template; labels are built from index tuples.
    """
    # (source templates, target template, op, method) ->
    #     [first entry, min confidence, count, [source indices per entry], [target indices per entry]]
    cells: dict[tuple, list] = {}
    for e in entries:
        if len(e.source) == 1:
            s_tpl, s_ix = template_of(e.source[0])
            s_tpls, s_ixs = (s_tpl,), (s_ix,)
        else:
            found = [template_of(k) for k in e.source]
            s_tpls, s_ixs = tuple(t for t, _ in found), tuple(ix for _, ix in found)
        t_tpl, t_ix = template_of(e.target)
        cid = (s_tpls, t_tpl, id(e.op), e.evidence.method)
        cell = cells.get(cid)
        if cell is None:
            cells[cid] = [e, e.confidence, 1, [s_ixs], [t_ix]]
        else:
            if e.confidence < cell[1]:
                cell[1] = e.confidence
            cell[2] += 1
            cell[3].append(s_ixs)
            cell[4].append(t_ix)
    rows: dict[tuple, list] = {}
    ops: dict[int, str] = {}
    for (s_tpls, t_tpl, op_id, method), cell in cells.items():
        op = ops.get(op_id)
        if op is None:
            o = cell[0].op
            op = ops[op_id] = (f"split dim {o.dim}, part {o.index} of {len(o.sizes)}" if o.kind == "split"
                               else o.describe())
        heads = tuple(_head(t) for t in s_tpls)
        t_head, t_leaf = _head(t_tpl)
        rows.setdefault((tuple(h for h, _ in heads), t_head, op, method), []).append((cell, [h[1] for h in heads],
                                                                                     t_leaf))
    out = []
    for (s_heads, t_head, op, method), cells_ in rows.items():
        source = " + ".join(
            _with_leaves(fill_template(head, list(dict.fromkeys(ix[i] for c, _, _ in cells_ for ix in c[3]))),
                         [leaves[i] for _, leaves, _ in cells_])
            for i, head in enumerate(s_heads)
        )
        target = _with_leaves(fill_template(t_head, list(dict.fromkeys(ix for c, _, _ in cells_ for ix in c[4]))),
                              [leaf for _, _, leaf in cells_])
        first = cells_[0][0][0]
        out.append(EntryGroup(source=source, target=target, op=op, method=method,
                              count=sum(c[2] for c, _, _ in cells_), confidence=min(c[1] for c, _, _ in cells_),
                              note=first.evidence.note))
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
        return "proposed with a confidence below --min-confidence"
    return reason
