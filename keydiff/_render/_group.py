"""Group a mapping's entries and leftovers into cluster-level rows, the unit every report shows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from keydiff._conventions import LEAVES
from keydiff._keys import natural_key
from keydiff._mapping import Entry, Leftover
from keydiff._patterns import _template, fill_template

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
        tpl, ix = _template(k)
        by_tpl[tpl].append(ix)
    return ", ".join(fill_template(t, ix) for t, ix in by_tpl.items())


def _split(key: str) -> tuple[str, str]:
    head, _, leaf = key.rpartition(".")
    return (head, leaf) if head and leaf in LEAVES else (key, "")




def _with_leaves(label: str, leaves: list[str]) -> str:
    leaves = [lf for lf in dict.fromkeys(leaves) if lf]
    if not leaves:
        return label
    label, marker, ragged = label.partition(" (")  # keep "(5 of 8)" at the end
    label = f"{label}.{leaves[0]}" if len(leaves) == 1 else f"{label}.{{{','.join(leaves)}}}"
    return label + marker + ragged


def group_entries(entries: Iterable[Entry]) -> list[EntryGroup]:
    """Module-level rows (``x.{weight,bias}``), in the model's order of their first entry."""
    groups: dict[tuple, list[tuple[Entry, str]]] = {}
    for e in entries:
        heads = tuple(_template(_split(k)[0])[0] for k in e.source)
        t_head, leaf = _split(e.target)
        op = e.op.describe()
        if e.op.kind == "split":
            op = f"split dim {e.op.dim}, part {e.op.index} of {len(e.op.sizes)}"
        groups.setdefault((heads, _template(t_head)[0], op, e.evidence.method), []).append((e, leaf))
    rows = []
    for (_, _, op, method), members in groups.items():
        leaves = [leaf for _, leaf in members]
        n_src = len(members[0][0].source)
        source = " + ".join(
            _with_leaves(_label(sorted({_split(e.source[i])[0] for e, _ in members}, key=natural_key)),
                         [_split(e.source[i])[1] for e, _ in members])
            for i in range(n_src)
        )
        target = _with_leaves(_label(sorted({_split(e.target)[0] for e, _ in members}, key=natural_key)), leaves)
        first = members[0][0]
        rows.append(EntryGroup(source=source, target=target, op=op, method=method, count=len(members),
                               confidence=min(e.confidence for e, _ in members), note=first.evidence.note))
    return rows


def group_leftovers(leftovers: Iterable[Leftover]) -> list[LeftoverGroup]:
    """Leftovers grouped by template and reason, in their original order."""
    groups: dict[tuple[str, str], list[Leftover]] = {}
    for lo in leftovers:
        reason = lo.reason
        groups.setdefault((_template(lo.key)[0], _generic(reason)), []).append(lo)
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
