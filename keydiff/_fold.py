"""Identical repeats matched once: the key-scale path of the engine.

A mixture-of-experts checkpoint holds ``layers.{0..63}.experts.{0..511}.w1.weight``: 98,000 keys that are 64 x 512
copies of one small set of names. A *fold* is a container (``layers.3.experts``) whose numbered children all hold
the same names, shapes and dtypes; only its first child is kept for matching, and the mapping found for it is then
repeated over the other children, each child to the child of the same index on the other side (folds pair only
over the same index values).

The folded result is used only when it is clean: every fold of one side paired with exactly one fold of the other,
of the same size, and every key of both sides filled or used by a confident entry. Anything else (a leftover, a
weak proposal, folds that do not pair) sends the caller back to the full engine, so a fold never changes an answer,
it only reaches it sooner.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from keydiff._keys import KeySet, TensorInfo, format_indices
from keydiff._mapping import Entry, Evidence
from keydiff._patterns import fill_template, remember_templates, template_of

__all__ = [
    "FOLD_MIN_KEYS", "FOLD_MIN_SHARE", "Fold", "Folding", "align_folds", "can_pair", "expand_entries", "fold_keys",
    "fold_labels",
]

FOLD_MIN_KEYS = 10_000
"""Below this many unmatched keys (both sides together) the full engine runs on every key."""
FOLD_MIN_SHARE = 0.5
"""Folds are used only when they hide at least this share of the unmatched keys."""

_CHILD = re.compile(r"(.*)\.(\d+)\.")  # greedy: the last numbered token that has a token after it


@dataclass(frozen=True, slots=True)
class Fold:
    """A container whose numbered children are identical: ``layers.3.experts`` with children ``0..511``."""

    container: str
    """The container path, ``layers.3.experts``."""
    tokens: tuple[str, ...]
    """The children's index tokens in numeric order; the first is the representative that is matched."""
    heads: tuple[str, ...]
    """Each child's path, ``layers.3.experts.7``, in the same order."""
    values: tuple[int, ...]
    """The index values, in the same order."""
    slot: int
    """Which index of a child key's template this fold's index is."""
    complete: bool = True
    """Whether every child of the container is in the fold (else the odd ones stay outside, matched one by one)."""

    def pairs_with(self, other: Fold) -> bool:
        """Whether child ``r`` of this fold stands for child ``r`` of ``other``: only over the same indices.

        Ranks over different index sets would cross children (experts 0-4,6,7 against 0-2,4-7 would pair 3 with
        4); such folds are left to the full engine, which pairs equal indices and reports the rest.
        """
        return self.values == other.values

    @property
    def cut(self) -> int:
        """Where a representative key's remainder (``.w1.weight``) starts."""
        return len(self.container) + 1 + len(self.tokens[0])


@dataclass(frozen=True, slots=True)
class Folding:
    """One side's keys with every fold reduced to its representative child."""

    keys: tuple[str, ...]
    """The kept keys, in the input order."""
    fold_of: Mapping[str, Fold]
    """Each kept key of a representative child -> its fold."""
    folds: tuple[Fold, ...]
    """Every fold, in the order of first appearance."""
    dropped: int
    """How many keys the folds hide."""


def fold_keys(keys: Iterable[str], info: Mapping[str, TensorInfo]) -> Folding:
    """Fold every container whose numbered children (at least two) hold the same names, shapes and dtypes.

    A key's child is found at its last numbered token that has a token after it, so the children of
    ``layers`` hold each layer's own tensors (attention, norms) while the experts fold under ``layers.N.experts``.
    A container folds the children that agree, when they are at least two and at least half of its children (the
    others, an expert with a tensor missing, stay as they are); index tokens must be plain numbers (``07`` is not).

    Example:
        >>> from keydiff._keys import TensorInfo
        >>> w = TensorInfo((4, 2), "float32")
        >>> keys = [f"layers.0.experts.{e}.w{i}.weight" for e in range(3) for i in (1, 2)]
        >>> f = fold_keys(keys, dict.fromkeys(keys, w))
        >>> f.keys, f.folds[0].tokens, f.dropped
        (('layers.0.experts.0.w1.weight', 'layers.0.experts.0.w2.weight'), ('0', '1', '2'), 4)
    """
    keys = list(keys)
    info = info.infos if isinstance(info, KeySet) else info
    children: dict[str, dict[str, list[str]]] = {}  # container -> index token -> keys
    match = _CHILD.match
    for key in keys:
        m = match(key)
        if m is not None:
            container, token = m.group(1, 2)
            kids = children.get(container)
            if kids is None:
                children[container] = {token: [key]}
            else:
                members = kids.get(token)
                if members is None:
                    kids[token] = [key]
                else:
                    members.append(key)
    fold_of: dict[str, Fold] = {}
    hidden: list[str] = []
    folds: list[Fold] = []
    for container, kids in children.items():
        if len(kids) < 2 or any(t != str(int(t)) for t in kids):
            continue
        start = len(container) + 2  # a child key is container + "." + token + "." + remainder
        contents = {t: [(k[start + len(t):], info[k]) for k in members] for t, members in kids.items()}
        complete = len(set(map(len, contents.values()))) == 1 and _identical(list(contents.values()))
        tokens = tuple(sorted(kids, key=int) if complete else _alike(contents))
        if len(tokens) < 2:
            continue
        heads = tuple(f"{container}.{t}" for t in tokens)
        fold = Fold(container, tokens, heads, tuple(map(int, tokens)), len(template_of(container)[1]), complete)
        folds.append(fold)
        fold_of.update(dict.fromkeys(kids[tokens[0]], fold))
        for token in tokens[1:]:
            hidden.extend(kids[token])
    gone = set(hidden)
    kept = tuple(k for k in keys if k not in gone) if gone else tuple(keys)
    return Folding(keys=kept, fold_of=fold_of, folds=tuple(folds), dropped=len(hidden))


def _alike(contents: dict[str, list[tuple[str, TensorInfo]]]) -> list[str]:
    """The largest set of children (at least half of them) that hold the same contents, in numeric order; the
    others (an expert with a tensor missing) stay as they are."""
    groups: dict[tuple, list[str]] = {}
    for token, content in contents.items():
        groups.setdefault(tuple(sorted(content, key=_by_name)), []).append(token)
    best = max(groups.values(), key=lambda tokens: (len(tokens), -min(map(int, tokens))))
    return sorted(best, key=int) if 2 * len(best) >= len(contents) else []


def _identical(children: list[list[tuple[str, TensorInfo]]]) -> bool:
    """Whether every child holds the same (remainder, tensor facts) pairs, in any order."""
    first = children[0]
    if all(c == first for c in children):  # keys listed in the same order in every child: the usual case
        return True
    first = sorted(first, key=_by_name)
    return all(sorted(c, key=_by_name) == first for c in children)


def _by_name(pair: tuple[str, TensorInfo]) -> tuple:
    return pair[0], pair[1].shape, pair[1].dtype


def can_pair(source: Folding, target: Folding) -> bool:
    """Whether the folds of two sides could pair one to one over the same index values, as a clean answer needs.

    ``expand_entries`` accepts an answer only when every fold is paired with exactly one fold of the other side
    that has the same index values (a fold left unpaired leaves its hidden keys unfilled or unused), so two sides
    whose folds' index sets differ as multisets (an expert missing from one layer on one side) cannot give a clean
    folded answer: the engine need not run on the folds to find out.

    Example:
        >>> from keydiff._keys import TensorInfo
        >>> w = TensorInfo((4, 2), "float32")
        >>> a = [f"a.experts.{e}.w.weight" for e in range(3)]
        >>> b = [f"b.experts.{e}.w.weight" for e in (0, 2, 3)]
        >>> fa, fb = fold_keys(a, dict.fromkeys(a, w)), fold_keys(b, dict.fromkeys(b, w))
        >>> can_pair(fa, fa), can_pair(fa, fb)
        (True, False)
    """
    return Counter(f.values for f in source.folds) == Counter(f.values for f in target.folds)


def align_folds(source: Folding, target: Folding, source_keys: Sequence[str], target_keys: Sequence[str],
                source_info: Mapping[str, TensorInfo], target_info: Mapping[str, TensorInfo]
                ) -> tuple[Folding, Folding] | None:
    """Both sides' folds cut to the children that every fold of their kind holds, on both sides; None if nothing
    changes.

    A fold's kind is what one child holds, by shapes and dtypes (names differ across conventions). When folds of
    one kind hold other index sets (an expert with a tensor missing stays out of its layer's fold), every fold of
    that kind, on both sides, keeps only the indices common to all of them; the children it gives up come back as
    plain keys, with their true indices. Both sides then hide the same children of the same kind and show the
    odd ones in full, so the engine sees the hole where it is, as the full engine would (a fold hides only what
    is the same everywhere, never the indices that tell a hole from a renumbering).

    Example:
        >>> from keydiff._keys import TensorInfo
        >>> w = TensorInfo((4, 2), "float32")
        >>> a = [f"a.{n}.experts.{e}.w.weight" for n in range(2) for e in range(4)]
        >>> b = [k for k in a if k != "a.1.experts.2.w.weight"]
        >>> fa, fb = fold_keys(a, dict.fromkeys(a, w)), fold_keys(b, dict.fromkeys(b, w))
        >>> ca, cb = align_folds(fa, fb, a, b, dict.fromkeys(a, w), dict.fromkeys(b, w))
        >>> [f.values for f in ca.folds], [f.values for f in cb.folds]
        ([(0, 1, 3), (0, 1, 3)], [(0, 1, 3), (0, 1, 3)])
        >>> [k for k in cb.keys if ".2." in k]
        ['a.0.experts.2.w.weight']
    """
    sides = [(source, source_info), (target, target_info)]
    reps = [_representatives(f) for f, _ in sides]
    kinds: list[dict[int, tuple]] = [{fid: _kind(keys, info) for fid, keys in rep.items()}
                                     for rep, (_, info) in zip(reps, sides, strict=True)]
    common: dict[tuple, set[int]] = {}
    for (folding, _), kind in zip(sides, kinds, strict=True):
        for fold in folding.folds:
            k = kind[id(fold)]
            common[k] = common[k] & set(fold.values) if k in common else set(fold.values)
    shared = set(kinds[0].values()) & set(kinds[1].values())
    cut = {k: v for k, v in common.items() if k in shared}
    if all(set(f.values) == cut.get(kind[id(f)], set(f.values))
           for (folding, _), kind in zip(sides, kinds, strict=True) for f in folding.folds):
        return None
    out = []
    for (folding, _), rep, kind, keys in zip(sides, reps, kinds, (source_keys, target_keys), strict=True):
        out.append(_refold(folding, rep, {id(f): cut.get(kind[id(f)]) for f in folding.folds}, keys))
    return out[0], out[1]


def _representatives(folding: Folding) -> dict[int, list[str]]:
    """Each fold (by id) -> the kept keys of its representative child, in order."""
    out: dict[int, list[str]] = {}
    for key, fold in folding.fold_of.items():
        out.setdefault(id(fold), []).append(key)
    return out


def _kind(keys: list[str], info: Mapping[str, TensorInfo]) -> tuple:
    """What one child of a fold holds, without its names: the sorted shapes and dtypes of its tensors."""
    return tuple(sorted((info[k].shape, info[k].dtype) for k in keys))


def _refold(folding: Folding, reps: dict[int, list[str]], keep: dict[int, set[int] | None],
            keys: Sequence[str]) -> Folding:
    """``folding`` with each fold cut to the index values ``keep`` gives it (None: as it is); a fold left with
    fewer than two children is undone. ``keys`` are the keys the folding was made of, in their order."""
    folds: list[Fold] = []
    fold_of: dict[str, Fold] = {}
    hidden: set[str] = set()
    for old in folding.folds:
        values = keep[id(old)]
        tokens = old.tokens if values is None else tuple(t for t in old.tokens if int(t) in values)
        if len(tokens) < 2:
            continue
        fold = old if tokens == old.tokens else replace(
            old, tokens=tokens, heads=tuple(f"{old.container}.{t}" for t in tokens), values=tuple(map(int, tokens)),
            complete=False)
        tails = [k[old.cut:] for k in reps[id(old)]]  # the children are alike: every one holds these remainders
        folds.append(fold)
        fold_of.update((fold.heads[0] + tail, fold) for tail in tails)
        hidden.update(head + tail for head in fold.heads[1:] for tail in tails)
    kept = tuple(k for k in keys if k not in hidden)
    return Folding(keys=kept, fold_of=fold_of, folds=tuple(folds), dropped=len(hidden))


def expand_entries(entries: Sequence[Entry], source: Folding, target: Folding,
                   to_model: Mapping[str, str], to_raw: Mapping[str, str],
                   labels: Mapping[str, tuple[str, str]] | None = None) -> list[Entry] | None:
    """Repeat each entry of a representative child over its fold; None when the folds do not pair one to one.

    ``to_model``/``to_raw`` translate between the checkpoint's stored keys (entries' sources) and the normalised
    keys the source folding was built on.
    """
    pair_of: dict[int, Fold] = {}  # id(source fold) -> target fold
    back: dict[int, int] = {}  # id(target fold) -> id(source fold)
    expand = _Expander(to_model, to_raw, labels or {})
    out: list[Entry] = []
    for e in entries:
        t_fold = target.fold_of.get(e.target)
        s_folds = [source.fold_of.get(to_model[s]) for s in e.source]
        if t_fold is not None and not s_folds:
            return None  # a tensor made from nothing (zeros) in a fold: the full engine decides
        if t_fold is None and not any(s_folds):
            out.append(replace(e, evidence=_relabelled(e.evidence, labels)) if labels and e.evidence.cluster in labels
                       else e)
            continue
        if t_fold is None or not all(s_folds):
            return None  # a repeated tensor mapped from or to a single one
        for s_fold in s_folds:
            if not s_fold.pairs_with(t_fold):
                return None
            if pair_of.setdefault(id(s_fold), t_fold) is not t_fold:
                return None
            if back.setdefault(id(t_fold), id(s_fold)) != id(s_fold):
                return None
        out.extend(expand(e, s_folds, t_fold))
    return out


def fold_labels(entries: Sequence[Entry], source: Folding, target: Folding, to_model: Mapping[str, str],
                left: Iterable[str] = (), right: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """Cluster labels (and the note on differing index sets) for the entries of a folded run, as they will read
    once expanded: after ``align_folds`` a cluster holds a fold's representative and children shown in full
    (``experts.{0,256}``), so widening the representative's index (``_relabel``) would not give its true index sets
    and member counts. The members are counted from the folds' index values, without expanding anything.

    ``left``/``right`` are the keys of each side that no entry takes (normalised checkpoint keys, model keys): a
    cluster's members include them (the hole is part of the cluster's index set). A label whose sides do not each
    come down to one template (a fused unit) is left out: it keeps the widened form.

    Returns:
        Old label -> (new label, new note for an entry whose note was about differing index sets).
    """
    members: dict[str, tuple[set, set]] = {}
    for e in entries:
        if not e.evidence.cluster:
            continue
        src, dst = members.setdefault(e.evidence.cluster, (set(), set()))
        if len(e.source) != 1:
            src.add(None)
            continue
        key = to_model.get(e.source[0], e.source[0])
        _spread(src, key, source.fold_of.get(key))
        _spread(dst, e.target, target.fold_of.get(e.target))
    if not members:
        return {}
    by_template: tuple[dict[str, list], dict[str, list]] = ({}, {})
    for side, keys in zip(by_template, (left, right), strict=True):
        for key in keys:
            unit = _unit_of(key)
            side.setdefault(unit[0], []).append(unit)
    labels: dict[str, tuple[str, str]] = {}
    for label, (src, dst) in members.items():
        if None in src or len({t for t, _ in src}) != 1 or len({t for t, _ in dst}) != 1:
            continue
        src.update(by_template[0].get(next(iter(src))[0], ()))
        dst.update(by_template[1].get(next(iter(dst))[0], ()))
        note = f"index sets differ: {len(src)} in the checkpoint, {len(dst)} in the model"
        labels[label] = f"{_fill(src)} -> {_fill(dst)}", note
    return labels


def _spread(units: set, key: str, fold: Fold | None) -> None:
    """Add ``key``'s unit, and when it is a fold's representative, its copies in the fold's other children."""
    template, indices = _unit_of(key)
    if fold is None:
        units.add((template, indices))
        return
    before, after = indices[: fold.slot], indices[fold.slot + 1:]
    units.update((template, (*before, v, *after)) for v in fold.values)


def _relabelled(evidence: Evidence, labels: Mapping[str, tuple[str, str]]) -> Evidence:
    label, note = labels[evidence.cluster]
    return replace(evidence, cluster=label,
                   note=note if evidence.note.startswith("index sets differ:") else evidence.note)


def _unit_of(key: str) -> tuple[str, tuple[int, ...]]:
    """A key's unit (its module path) as template and indices, from the key's own memoised template."""
    template, indices = template_of(key)
    return template.rpartition(".")[0], indices


def _fill(units: set[tuple[str, tuple[int, ...]]]) -> str:
    template = next(iter(units))[0]
    return fill_template(template, sorted(ix for _, ix in units))


class _Expander:
    """Repeats one entry over its folds (keys, templates and the cluster label)."""

    def __init__(self, to_model: Mapping[str, str], to_raw: Mapping[str, str],
                 given: Mapping[str, tuple[str, str]]) -> None:
        self.to_model, self.to_raw, self.given = to_model, to_raw, given
        self.labels: dict[tuple[str, int, int], str] = {}

    def __call__(self, e: Entry, s_folds: list[Fold], t_fold: Fold) -> Iterable[Entry]:
        evidence = e.evidence
        if evidence.cluster in self.given:
            evidence = _relabelled(evidence, self.given)  # counted ahead (fold_labels): shared by every copy
        elif evidence.cluster:
            cache = (evidence.cluster, id(s_folds[0]), id(t_fold))
            if cache not in self.labels:
                self.labels[cache] = _relabel(evidence.cluster, s_folds[0], t_fold)
            evidence = replace(evidence, cluster=self.labels[cache])
        # every copy's keys: the fold's child prefixes, each followed by the representative key's remainder
        columns = [_copies(f, self.to_model[s]) for f, s in zip(s_folds, e.source, strict=True)]
        if self.to_raw is not self.to_model:
            columns = [[self.to_raw[k] for k in column] for column in columns]
        op, confidence, shapes, shape = e.op, e.confidence, e.source_shapes, e.target_shape
        return (Entry(source=src, target=target, op=op, confidence=confidence, evidence=evidence,
                      source_shapes=shapes, target_shape=shape)
                for src, target in zip(zip(*columns, strict=True), _copies(t_fold, e.target), strict=True))


def _copies(fold: Fold, key: str) -> list[str]:
    """``key`` of the representative child and its copies in the other children, in rank order; their templates
    are recorded on the way (the same template, one index changed), so later steps need not parse them."""
    tail = key[fold.cut:]
    keys = [head + tail for head in fold.heads]
    template, indices = template_of(key)
    before, after = indices[: fold.slot], indices[fold.slot + 1:]
    singles = _singles(fold.values)
    if after:
        remember_templates(zip(keys, [(template, before + v + after) for v in singles], strict=True))
    else:
        remember_templates(zip(keys, [(template, before + v) for v in singles], strict=True))
    return keys


@lru_cache(maxsize=256)
def _singles(values: tuple[int, ...]) -> tuple[tuple[int], ...]:
    return tuple((v,) for v in values)


@lru_cache(maxsize=256)
def _index_set(values: tuple[int, ...]) -> str:
    return format_indices(values)


def _relabel(label: str, source: Fold, target: Fold) -> str:
    """A cluster label of the folded run (``a.experts.0.w1 -> b.experts.0.w1``) with the folds' index sets."""
    def widen(side: str, fold: Fold) -> str:
        name = re.escape(fold.container.rpartition(".")[2])
        values = _index_set(fold.values)
        return re.sub(rf"(^|\.)({name})\.{fold.tokens[0]}(?=\.|$)", rf"\g<1>\g<2>.{values}", side, count=1)

    left, arrow, right = label.partition(" -> ")
    return widen(left, source) + arrow + widen(right, target) if arrow else label
