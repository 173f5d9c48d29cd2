"""Several small tensors as one: ``point_embeddings.{0..3}.weight [1, D]`` <-> ``point_embed.weight [4, D]``.

One library keeps a list of small modules (an ``nn.ModuleList`` of one-row embeddings), another one tensor that
holds their rows in order. Before matching, ``gather_pieces`` looks at what no name matched on both sides: a group of
pieces on one side (one template ``H.{}.L``) and one tensor on the other (``T.L``) become a concat along dim 0, in
index order, or a split into those parts, only when all of this holds:

- the pieces' index set is complete and contiguous from 0 (a hole could be a part that was dropped);
- every piece has the whole tensor's trailing shape, and their sizes along dim 0 sum exactly to the whole's;
- the names agree: the same leaf ``L``, one of the module names ``H``/``T`` starts with the other once a plural
  ``s`` is dropped (``point_embed``, ``point_embeddings``), and so do their parents' names, token by token;
- exactly one tensor on the other side fits.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from keydiff._keys import KeySet, format_indices, natural_key
from keydiff._mapping import Entry, Evidence
from keydiff._ops import Op

__all__ = ["gather_pieces", "same_stem"]

_MIN_STEM = 4
"""Shortest name a stem comparison accepts (``emb`` alone says nothing)."""
CONFIDENCE = 0.9
"""How sure a gathered entry is: names, the complete index set and exact shapes agree."""


def same_stem(a: str, b: str) -> bool:
    """Whether two module names are one word in two forms: one starts with the other, plural ``s`` dropped.

    Example:
        >>> same_stem("point_embeddings", "point_embed"), same_stem("point_embeddings", "point_proj")
        (True, False)
    """
    a, b = a.lower().removesuffix("s"), b.lower().removesuffix("s")
    short, long = sorted((a, b), key=len)
    return len(short) >= _MIN_STEM and long.startswith(short)


_PIECE = re.compile(r"\.\d+\.([^.\n]+)$", re.MULTILINE)
"""The end of a key ``H.{i}.L``: its index and its leaf ``L`` (``H`` is the rest of its line)."""


class _Shapes(dict):
    """The shapes of one side's keys, each looked up when first asked (most keys never are)."""

    def __init__(self, side: KeySet) -> None:
        super().__init__()
        self.side = side

    def __missing__(self, key: str) -> tuple[int, ...]:
        shape = self[key] = self.side[key].shape
        return shape


def _pieces(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[tuple[str, str], list[str]]:
    """``(H, L) -> keys`` for keys ``H.{i}.L`` (one leaf token after the index), each list in index order."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    # only keys whose last token but one is an index: found by one C-speed search over the keys' text
    text = "\n".join(keys)
    for m in _PIECE.finditer(text):
        start = text.rfind("\n", 0, m.start()) + 1
        k, parent, leaf = text[start:m.end()], text[start:m.start()], m.group(1)
        if parent and shapes[k]:
            groups[parent, leaf].append(k)
    return {g: sorted(ks, key=natural_key) for g, ks in groups.items()}


def _complete(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The parts' sizes along dim 0 when the index set is ``0..n-1`` (n >= 2) and the trailing shapes agree."""
    indices = [int(k.rpartition(".")[0].rpartition(".")[2]) for k in keys]
    rests = {shapes[k][1:] for k in keys}
    if len(keys) < 2 or indices != list(range(len(keys))) or len(rests) != 1:
        return None
    return tuple(shapes[k][0] for k in keys)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _parents_agree(a: str, b: str) -> bool:
    """Two parent paths name the same place: token by token equal or one word in two forms (``same_stem``)."""
    ta, tb = a.split(".") if a else [], b.split(".") if b else []
    return len(ta) == len(tb) and all(x == y or same_stem(x, y) for x, y in zip(ta, tb, strict=True))


def gather_pieces(model: KeySet, checkpoint: KeySet, src_rest: Sequence[str], dst_rest: Sequence[str],
                  to_raw: Mapping[str, str]) -> tuple[list[Entry], list[str]]:
    """Concat and split entries for pieces on one side whose whole is on the other, among keys no name matched.

    Run before the matcher, which would otherwise fill a one-row model tensor from the first piece by order.

    Args:
        model: the model's keys.
        checkpoint: the checkpoint's keys, named as the matcher sees them (wrapper prefix handled).
        src_rest: checkpoint names left after exact matching.
        dst_rest: model keys left after exact matching.
        to_raw: checkpoint name -> the raw key (an entry's sources are raw keys).

    Returns:
        The new entries and a note for each gathered group.
    """
    src_shapes, dst_shapes = _Shapes(checkpoint), _Shapes(model)
    out: list[Entry] = []
    notes: list[str] = []
    for pieces_side, wholes, concat, shapes, whole_shapes in ((src_rest, dst_rest, True, src_shapes, dst_shapes),
                                                              (dst_rest, src_rest, False, dst_shapes, src_shapes)):
        for (head, leaf), keys in _pieces(pieces_side, shapes).items():
            sizes = _complete(keys, shapes)
            if sizes is None:
                continue
            want = (sum(sizes), *shapes[keys[0]][1:])
            fits = [w for w in wholes if w.endswith("." + leaf) and whole_shapes[w] == want
                    and same_stem(head.rpartition(".")[2], _parent(w).rpartition(".")[2])
                    and _parents_agree(_parent(head), _parent(_parent(w)))]
            if len(fits) != 1:
                continue
            whole = fits[0]
            label = f"{head}.{format_indices(range(len(keys)))}.{leaf}"
            note = (f"{label} concatenated along dim 0 in index order into {whole}" if concat else
                    f"{whole} split along dim 0 into {label}, in index order")
            evidence = Evidence(method="cluster", shape="fused" if concat else "split", note=note,
                                cluster=f"{label} -> {whole}" if concat else f"{whole} -> {label}")
            if concat:
                out.append(Entry(source=tuple(to_raw[k] for k in keys), target=whole,
                                 op=Op(kind="concat", dim=0, sizes=sizes), confidence=CONFIDENCE, evidence=evidence,
                                 source_shapes=tuple(shapes[k] for k in keys), target_shape=want))
            else:
                out.extend(Entry(source=(to_raw[whole],), target=k, op=Op(kind="split", dim=0, index=i, sizes=sizes),
                                 confidence=CONFIDENCE, evidence=evidence, source_shapes=(want,),
                                 target_shape=shapes[k]) for i, k in enumerate(keys))
            notes.append(note)
    return out, notes
