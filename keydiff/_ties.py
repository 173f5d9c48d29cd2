"""Tied tensors: one tensor of the model under several names, and one value the checkpoint stores once per layer.

A model ties two keys when both name the same tensor (a language model's output head and its token embedding, a
positional table shared by two modules). A checkpoint stores it once: ``save_pretrained`` drops the tied copies, and
a research codebase that reuses the embedding as its head never had a second name. The model's twins are read from
the model itself (``model_ties``, on the meta device); the matcher sees one key of each group (``hide_twins``) and
the others are filled from its source afterwards (``fill_twins``), so a tie is never counted missing and never
filled from a second, unrelated tensor.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from keydiff._mapping import Entry, Evidence

if TYPE_CHECKING:
    from torch import nn

__all__ = ["fill_twins", "hide_twins", "model_ties", "tie_note"]


def model_ties(module: nn.Module, keys: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Groups of state-dict keys that name one tensor of ``module``, each in ``keys`` order.

    A parameter or buffer reachable under several names (``named_parameters(remove_duplicate=False)``) is one tie;
    transformers' own record of what it ties (``all_tied_weights_keys``, ``target -> source``) adds the ties a model
    built without running its tying code does not show.

    Args:
        module: the model (on the meta device is enough: only object identity is read).
        keys: its state-dict keys, in order.

    Example:
        >>> import torch
        >>> m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(4, 2), "head": torch.nn.Linear(2, 4, bias=False)})
        >>> m.head.weight = m.emb.weight
        >>> model_ties(m, list(m.state_dict()))
        (('emb.weight', 'head.weight'),)
    """
    at = {k: i for i, k in enumerate(keys)}
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.get(k, k) != k:
            k = parent[k]
        return k

    def join(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            first, second = sorted((ra, rb), key=at.__getitem__)
            parent[second] = first

    by_object: dict[int, str] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name not in at:
            continue  # a non-persistent buffer is not in the state dict
        seen = by_object.setdefault(id(tensor), name)
        if seen != name:
            join(seen, name)
    declared = getattr(module, "all_tied_weights_keys", None)
    if isinstance(declared, Mapping):
        for target, source in declared.items():
            if target in at and source in at:
                join(source, target)
    groups: dict[str, list[str]] = {}
    for k in parent:
        groups.setdefault(root(k), []).append(k)
    out = [tuple(sorted({r, *members}, key=at.__getitem__)) for r, members in groups.items()]
    return tuple(sorted(out, key=lambda g: at[g[0]]))


def hide_twins(ties: Iterable[tuple[str, ...]], filled: Collection[str],
               rest: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The model keys left for the matcher with tied twins taken out, and each twin taken out -> its anchor.

    The anchor of a group is a member the checkpoint fills by name, else the group's first key (the one
    ``save_pretrained`` and ``state_dict()`` without duplicates keep). The matcher sees only the anchor: two model
    keys of one shape and one checkpoint tensor would otherwise be an ambiguity, and a twin must never be filled
    from another tensor than its anchor (the model cannot hold two values under one tensor).

    Example:
        >>> hide_twins([("wte.weight", "head.weight")], set(), ["wte.weight", "head.weight", "ln.weight"])
        (['wte.weight', 'ln.weight'], {'head.weight': 'wte.weight'})
    """
    twin_of: dict[str, str] = {}
    for group in ties:
        named = [k for k in group if k in filled]
        anchor = named[0] if named else group[0]
        twin_of.update((k, anchor) for k in group if k != anchor and k not in filled)
    return [k for k in rest if k not in twin_of], twin_of


def fill_twins(entries: Sequence[Entry], twin_of: Mapping[str, str]) -> list[Entry]:
    """One entry per hidden twin whose anchor is filled: the anchor's source and op, evidence ``tied``.

    Example:
        >>> from keydiff._ops import Op
        >>> e = Entry(source=("tok.w",), target="wte.weight", op=Op(kind="rename"), confidence=0.9,
        ...           evidence=Evidence(method="cluster"), source_shapes=((4, 2),), target_shape=(4, 2))
        >>> [(t.source, t.target, t.evidence.note) for t in fill_twins([e], {"head.weight": "wte.weight"})]
        [(('tok.w',), 'head.weight', 'tied to wte.weight in the model')]
    """
    by_target = {e.target: e for e in entries}
    out = []
    for twin, anchor in twin_of.items():
        e = by_target.get(anchor)
        if e is None:
            continue
        evidence = Evidence(method="tied", name_score=e.evidence.name_score, shape=e.evidence.shape,
                            cluster=e.evidence.cluster, note=tie_note(anchor))
        out.append(replace(e, target=twin, evidence=evidence))
    return out


def tie_note(anchor: str) -> str:
    """The evidence note of a twin filled from its anchor's source."""
    return f"tied to {anchor} in the model"
