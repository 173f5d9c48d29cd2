"""Tied tensors: one tensor of the model under several names, and one value the checkpoint stores once per layer.

A model ties two keys when both name the same tensor (a language model's output head and its token embedding, a
positional table shared by two modules). A checkpoint stores it once: ``save_pretrained`` drops the tied copies, and
a research codebase that reuses the embedding as its head never had a second name. The model's twins are read from
the model itself (``model_ties``, on the meta device); the matcher sees one key of each group (``hide_twins``) and
the others are filled from its source afterwards (``fill_twins``), so a tie is never counted missing and never
filled from a second, unrelated tensor.

The checkpoint side has the mirror case: a tensor its model kept once per layer with the same values (a rotary
``inv_freq`` buffer in every attention layer) where the model keeps one. Same names and shapes do not prove the same
values, so ``one_of_copies`` reads those (small) tensors and takes the first as the source only when every copy is
equal to it; the other copies are then explained, not unused without a reason. Copies that differ fill nothing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from keydiff._keys import KeySet
from keydiff._mapping import Entry, Evidence, KeyMap
from keydiff._ops import Op
from keydiff._patterns import fill_template, template_of

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["COPY_MAX_ELEMENTS", "explain_copies", "explain_held", "fill_twins", "hide_twins", "model_ties",
           "one_of_copies", "tie_note"]

COPY_MAX_ELEMENTS = 1 << 20
"""Most elements ``one_of_copies`` reads to prove copies equal (all copies together); beyond, nothing is proven."""


_DIGIT = re.compile(r"\d")

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


def one_of_copies(model: KeySet, checkpoint: KeySet, src_rest: Sequence[str], dst_rest: Sequence[str],
                  to_raw: Mapping[str, str], read: Callable[[str], torch.Tensor] | None,
                  ) -> tuple[list[Entry], dict[str, str], dict[str, str]]:
    """Model keys filled from one of several equal per-layer copies in the checkpoint, among keys no name matched.

    A model key ``M.L`` outside any repeated block takes the copies ``....{}....M.L`` of one template (two or
    more, the same module name ``M``, leaf ``L`` and shape) when it is the only model key they fit, the model has
    no repeated ``M.L`` of its own for them, and the values, read, are equal. Copies whose values differ cannot
    be the model's one tensor: the model key is then held out of matching (an order step would take one copy),
    unless another tensor of its shape is left that could be its own.

    Args:
        model: the model's keys.
        checkpoint: the checkpoint's keys, named as the matcher sees them.
        src_rest: checkpoint names no name matched.
        dst_rest: model keys no name matched.
        to_raw: checkpoint name -> the raw key.
        read: loads a checkpoint tensor by raw key; None: values cannot be read, and nothing is decided.

    Returns:
        The entries; each other copy's raw key -> the raw key of the copy used; each model key held out -> why.
    """
    if read is None:
        return [], {}, {}
    # a copy ends as a single model key does (``rot_emb.inv_freq``): only keys with such an ending are parsed
    # at scale a key with a digit is taken as repeated without parsing it (100,000 expert keys all have one)
    singles = [m for m in dst_rest if not template_of(m)[1]] if len(dst_rest) < 10_000 else [
        m for m in dst_rest if _DIGIT.search(m) is None]
    single_ends = {".".join(m.rsplit(".", 2)[-2:]) for m in singles}
    groups: dict[str, list[str]] = defaultdict(list)
    for k in src_rest:
        if ".".join(k.rsplit(".", 2)[-2:]) not in single_ends:
            continue
        tpl, ix = template_of(k)
        if ix:
            groups[tpl].append(k)
    repeated = {".".join(template_of(m)[0].split(".")[-2:]) for m in dst_rest
                if ".".join(m.rsplit(".", 2)[-2:]) in single_ends and template_of(m)[1]}
    out: list[Entry] = []
    copies: dict[str, str] = {}
    held: dict[str, str] = {}
    for tpl, keys in sorted(groups.items()):
        shape = checkpoint[keys[0]].shape
        end = ".".join(tpl.split(".")[-2:])
        if len(keys) < 2 or "{}" in end or end in repeated or any(checkpoint[k].shape != shape for k in keys):
            continue
        fits = [m for m in singles if ".".join(m.split(".")[-2:]) == end and model[m].shape == shape]
        if len(fits) != 1 or len(keys) * checkpoint[keys[0]].numel > COPY_MAX_ELEMENTS:
            continue
        first, *rest = (to_raw[k] for k in keys)
        label = fill_template(tpl, [template_of(k)[1] for k in keys])
        if not _all_equal(read, first, rest):
            if any(checkpoint[k].shape == shape for k in src_rest if k not in keys):
                continue  # another tensor may be the model's: the matcher decides, among those
            held[fits[0]] = (f"the checkpoint has {len(keys)} per-layer copies of it ({label}) whose values differ "
                             "(read): the model keeps one tensor, which no single copy is")
        else:
            note = (f"one of {len(keys)} copies in {label}, read and equal: the checkpoint stores the model's one "
                    "tensor once per layer")
            out.append(Entry(source=(first,), target=fits[0], op=Op(kind="rename"), confidence=0.9,
                             evidence=Evidence(method="cluster", shape="same", note=note,
                                               cluster=f"{label} -> {fits[0]}"),
                             source_shapes=(shape,), target_shape=shape))
            copies.update((k, first) for k in rest)
        singles.remove(fits[0])
    return out, copies, held


def _all_equal(read: Callable[[str], Any], first: str, rest: Sequence[str]) -> bool:
    import torch

    try:
        base = read(first)
        return all(torch.equal(base, read(k)) for k in rest)
    except Exception:  # a tensor that cannot be read proves nothing
        return False


def explain_copies(mapping: KeyMap, copies: Mapping[str, str]) -> KeyMap:
    """The mapping with each unused equal copy said to be one (kind ``copy``, an expected leftover)."""
    if not copies:
        return mapping
    unused = tuple(replace(u, kind="copy", reason=f"equal to {copies[u.key]} (values read), which the mapping uses")
                   if u.key in copies else u for u in mapping.unused)
    return replace(mapping, unused=unused)


def explain_held(mapping: KeyMap, held: Mapping[str, str]) -> KeyMap:
    """The mapping with each model key held out by ``one_of_copies`` given its reason."""
    if not held:
        return mapping
    missing = tuple(replace(m, reason=held[m.key]) if m.key in held else m for m in mapping.missing)
    return replace(mapping, missing=missing)
