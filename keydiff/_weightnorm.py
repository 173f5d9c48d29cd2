"""Weight normalisation between a checkpoint and a model: the two names torch gives the pair, and the plain weight.

A weight-normalised tensor is stored as ``g`` and ``v`` (``w = g * v / ||v||``, the norm over every dimension but
the one ``g`` keeps), under the legacy names ``weight_g``/``weight_v`` or the parametrization's
``parametrizations.weight.original0``/``original1`` (``keydiff._conventions.weight_norm_part``). Before matching,
``plan_weight_norm`` decides from the names of both sides what the matcher should see of each checkpoint pair:

- the model normalises its weights too, in the other form: the pair under the model's names (a rename);
- the model has plain weights only: one virtual ``weight`` with ``v``'s shape, which ``fold_entries`` turns back
  into the value op ``weight_norm`` over ``(g, v)`` once the matcher has placed it;
- a pair whose ``g`` is not the norm of ``v`` along any one dimension: nothing; both tensors stay unused, with
  that reason, and the model's weight is not filled from ``v`` alone (it would load and compute something else).

The dimension the norm keeps is read off the shapes: the one dimension where ``g`` is not 1 (0 for a conv's output
channels; wav2vec2's positional conv keeps dim 2); a scalar ``g`` is the norm of the whole tensor (-1).

The other way, a plain weight into a model that normalises it (``split_plain``), has no unique answer: any ``g``
with ``v`` scaled to match gives the same weight. ``g = ||w||`` and ``v = w`` is exact (``||w|| * w / ||w|| = w``);
it is proposed only where the checkpoint holds the plain weight under the model's own module name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from keydiff._conventions import weight_norm_key, weight_norm_part
from keydiff._keys import KeySet
from keydiff._mapping import Entry, Evidence, KeyMap
from keydiff._ops import Op, weight_norm_fits

__all__ = ["WeightNormPlan", "explain_refused", "fold_entries", "plan_weight_norm", "split_plain", "weight_norm_dim"]


def weight_norm_dim(g: tuple[int, ...], v: tuple[int, ...]) -> int | None:
    """The dimension a weight norm keeps, from the shapes of ``g`` and ``v``; -1 for the whole tensor; None when
    ``g`` is not the shape of such a norm of ``v`` (or when the shapes cannot tell which dimension).

    Example:
        >>> weight_norm_dim((16, 1, 1), (16, 8, 3)), weight_norm_dim((1, 1, 5), (4, 4, 5)), weight_norm_dim((), (4, 2))
        (0, 2, -1)
        >>> weight_norm_dim((8, 1, 1), (16, 8, 3)) is None
        True
    """
    if not g:
        return -1
    kept = [d for d, n in enumerate(g) if n != 1]
    if len(kept) > 1 or len(g) != len(v):
        return None
    # a g of ones keeps a dimension of size 1 (one output channel), where the norm is over everything else
    dims = kept or [d for d, n in enumerate(v) if n == 1][:1]
    return dims[0] if dims and weight_norm_fits(g, v, dims[0]) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightNormPlan:
    """What the matcher sees of the checkpoint's weight-normalised pairs."""

    names: dict[str, str] = field(default_factory=dict)
    """Raw checkpoint key -> the name the matcher sees it under, for the keys this plan renames."""
    hidden: frozenset[str] = frozenset()
    """Raw checkpoint keys the matcher does not see (the ``g`` of a folded pair, both tensors of a refused one)."""
    folded: dict[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)
    """Raw ``v`` of a folded pair -> its raw ``g``, ``g``'s shape, and the dimension the norm keeps."""
    refused: dict[str, str] = field(default_factory=dict)
    """Raw key of a refused pair -> why it was not folded."""
    note: str = ""
    """What was done, for the report."""


def _pairs(checkpoint: KeySet, to_model: Mapping[str, str]) -> dict[tuple[str, str, str], dict[str, str]]:
    """(module, name, form) -> {part: raw key}, for complete g/v pairs of the checkpoint."""
    found: dict[tuple[str, str, str], dict[str, str]] = {}
    for raw in checkpoint:
        part = weight_norm_part(to_model[raw])
        if part is not None:
            found.setdefault((part[0], part[1], part[3]), {})[part[2]] = raw
    return {k: v for k, v in found.items() if len(v) == 2}


def plan_weight_norm(model: KeySet, checkpoint: KeySet, to_model: Mapping[str, str]) -> WeightNormPlan | None:
    """How to show the checkpoint's weight-normalised pairs to the matcher, or None when it has none.

    Args:
        model: the model's keys.
        checkpoint: the checkpoint's keys, as stored.
        to_model: raw checkpoint key -> its name once the wrapper prefix is handled.
    """
    pairs = _pairs(checkpoint, to_model)
    if not pairs:
        return None
    model_forms = {part[3] for k in model if (part := weight_norm_part(k)) is not None}
    taken = set(to_model.values())
    names: dict[str, str] = {}
    hidden: set[str] = set()
    folded: dict[str, tuple[str, tuple[int, ...], int]] = {}
    refused: dict[str, str] = {}
    for (module, name, form), raw in sorted(pairs.items()):
        g, v = checkpoint[raw["g"]].shape, checkpoint[raw["v"]].shape
        if model_forms:
            other = next(iter(sorted(model_forms - {form})), None)
            if other is None or len(model_forms) > 1:
                continue  # same form as the model (names decide), or a model that uses both: nothing to rename
            renamed = {p: weight_norm_key(module, name, p, other) for p in "gv"}
            if not taken.intersection(renamed.values()):
                names.update((raw[p], renamed[p]) for p in "gv")
            continue
        dim = weight_norm_dim(g, v)
        plain = weight_norm_key(module, name, "", "")
        if dim is None:
            why = (f"weight-norm pair whose g {list(g)} is not the norm of v {list(v)} along one dimension: "
                   "not folded into a plain weight")
            hidden.update(raw.values())
            refused.update((k, why) for k in raw.values())
        elif plain not in taken:
            names[raw["v"]] = plain
            hidden.add(raw["g"])
            folded[raw["v"]] = (raw["g"], g, dim)
    if model_forms and names:
        form = next(iter(model_forms))
        shown = "parametrizations.weight.original0/original1" if form == "parametrizations" else "weight_g/weight_v"
        note = (f"weight norm: {len(names) // 2} g/v pair(s) of the checkpoint renamed to the model's {shown} "
                "(torch's two names for one pair, g then v)")
    elif folded:
        note = (f"weight norm: the model has plain weights; {len(folded)} g/v pair(s) of the checkpoint folded "
                "into w = g * v / ||v|| (the norm over every dimension but the one g keeps)")
    else:
        note = ""
    if not (names or hidden):
        return None
    return WeightNormPlan(names=names, hidden=frozenset(hidden), folded=folded, refused=refused, note=note)


def fold_entries(entries: Sequence[Entry], plan: WeightNormPlan) -> list[Entry]:
    """The matcher's entries with each folded ``v`` turned back into the value op over ``(g, v)``, and the
    entries a rename of the plan filled by name said to be by ``convention``.

    An entry that does more to the virtual weight than a rename or a reshape (a transpose, a part of a fused
    tensor) is dropped: the weight stays unresolved rather than be made from ``v`` alone.
    """
    out = []
    for e in entries:
        hit = [k for k in e.source if k in plan.folded]
        if not hit:
            renamed = e.evidence.method in ("exact", "prefix") and any(k in plan.names for k in e.source)
            out.append(replace(e, evidence=replace(e.evidence, method=_method(e), note=plan.note)) if renamed else e)
            continue
        if len(e.source) != 1 or e.op.kind not in ("rename", "reshape"):
            continue
        v = e.source[0]
        g, g_shape, dim = plan.folded[v]
        note = f"weight norm folded: g * v / ||v||, the norm over every dimension but {dim}" if dim >= 0 else (
            "weight norm folded: g * v / ||v||, the norm of the whole tensor")
        out.append(replace(e, source=(g, v), op=Op(kind="weight_norm", dim=dim),
                           source_shapes=(g_shape, e.source_shapes[0]),
                           evidence=replace(e.evidence, shape="weight_norm", note=note, method=_method(e))))
    return out


def _method(e: Entry) -> str:
    """A name filled by name only once the convention renamed it is filled by ``convention``."""
    return "convention" if e.evidence.method in ("exact", "prefix") else e.evidence.method


def explain_refused(mapping: KeyMap, plan: WeightNormPlan) -> KeyMap:
    """The mapping with the refused pairs' unused tensors given their reason."""
    if not plan.refused:
        return mapping
    unused = tuple(replace(u, reason=plan.refused[u.key], kind="unexplained") if u.key in plan.refused else u
                   for u in mapping.unused)
    return replace(mapping, unused=unused)


def split_plain(model: KeySet, checkpoint: KeySet, src_rest: Sequence[str], dst_rest: Sequence[str],
                to_raw: Mapping[str, str]) -> list[Entry]:
    """Entries that make a model's weight-normalised pair ``(g, v)`` from the checkpoint's plain weight of the same
    module (``g = ||w||``, op ``norm``; ``v = w``), among keys no name matched.

    Example:
        >>> from keydiff._keys import TensorInfo
        >>> f = lambda *shape: TensorInfo(shape, "float32")
        >>> model = KeySet.from_items([("c.weight_g", f(4, 1)), ("c.weight_v", f(4, 3))])
        >>> ckpt = KeySet.from_items([("c.weight", f(4, 3))])
        >>> entries = split_plain(model, ckpt, ["c.weight"], list(model), {"c.weight": "c.weight"})
        >>> [(e.target, e.op.kind) for e in entries]
        [('c.weight_g', 'norm'), ('c.weight_v', 'rename')]
    """
    left = set(src_rest)
    parts: dict[tuple[str, str, str], dict[str, str]] = {}
    for k in dst_rest:
        part = weight_norm_part(k)
        if part is not None:
            parts.setdefault((part[0], part[1], part[3]), {})[part[2]] = k
    out = []
    for (module, name, _), pair in sorted(parts.items()):
        plain = weight_norm_key(module, name, "", "")
        if len(pair) != 2 or plain not in left:
            continue
        g, v, w = model[pair["g"]].shape, model[pair["v"]].shape, checkpoint[plain].shape
        dim = weight_norm_dim(g, v)
        if dim is None or w != v:
            continue
        note = (f"plain weight into weight norm: g = ||w|| (every dimension but {dim}) and v = w, exact (g * v / ||v|| "
                "= w); the split into g and v is not unique, this is one")
        evidence = Evidence(method="convention", shape="weight_norm", note=note)
        source = (to_raw[plain],)
        out.append(Entry(source=source, target=pair["g"], op=Op(kind="norm", dim=dim), confidence=0.95,
                         evidence=evidence, source_shapes=(w,), target_shape=g))
        out.append(Entry(source=source, target=pair["v"], op=Op(kind="rename"), confidence=0.95, evidence=evidence,
                         source_shapes=(w,), target_shape=v))
    return out
