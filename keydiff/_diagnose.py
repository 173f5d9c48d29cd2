"""Causes in plain words, read off the facts of a diff: a wrapper prefix, a container choice, a classifier head
to re-initialise, a width or depth variant, a position embedding of another size, almost nothing in common."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from keydiff._account import Depth, depth_differences
from keydiff._keys import KeySet
from keydiff._mapping import KeyMap
from keydiff._normalize import Prefix
from keydiff._patterns import name_tokens, template_of

__all__ = ["Diagnosis", "diagnose"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    """One cause, in words."""

    kind: str
    """``prefix container head width depth pos_embed coverage non_tensor note``."""
    message: str
    """The sentence shown to the user."""
    level: Literal["info", "warning"] = "info"
    """``warning`` for what needs the user's attention."""


def _is(key: str, canon: str) -> bool:
    return canon in name_tokens(key.rpartition(".")[0] if key.endswith((".weight", ".bias")) else key)


def _widths(keys: KeySet) -> set[int]:
    """The sizes of 1-D tensors (norms, biases): a width variant changes the set, a depth variant does not."""
    return {info.shape[0] for info in keys.values() if len(info.shape) == 1}


def _most_common(keys: KeySet, among: set[int]) -> int | None:
    counts = Counter(info.shape[0] for info in keys.values() if len(info.shape) == 1 and info.shape[0] in among)
    return counts.most_common(1)[0][0] if counts else None


def _depth_diagnosis(depths: Sequence[Depth], hint: Callable[[list[int]], str | None] | None) -> Diagnosis:
    """"the checkpoint has 4 blocks in `blocks`, the model 2: pass `-m depth=4`, or --partial ..."."""
    ckpt, model = [len(d.checkpoint) for d in depths], [len(d.model) for d in depths]
    if len(depths) == 1:
        d = depths[0]
        what = (f"the checkpoint has {ckpt[0]} blocks in `{d.container}` (`{d.container}.{{{_span(d.checkpoint)}}}`), "
                f"the model {model[0]}")
    else:
        where = f"`{depths[0].container}`..`{depths[-1].container}`"
        what = f"the checkpoint has {ckpt} blocks in {where}, the model {model}"
    fix = hint(ckpt) if hint else None
    deeper = all(c >= m for c, m in zip(ckpt, model, strict=True))
    rest = ("--partial to keep the blocks the model has" if deeper else
            "--partial to convert the blocks both have (the others stay unfilled)")
    todo = f"pass `-m {fix}`, or {rest}" if fix else f"build the model with the checkpoint's depth, or {rest}"
    return Diagnosis(kind="depth", level="warning", message=f"{what}: {todo}")


def _span(ix: Sequence[int]) -> str:
    return f"{ix[0]}..{ix[-1]}" if len(ix) > 1 and list(ix) == list(range(ix[0], ix[-1] + 1)) else \
        ",".join(map(str, ix))


def _depth(keys: Sequence[str]) -> tuple[str, int] | None:
    """The most repeated first-level index: ``("blocks.{}", 24)``."""
    counts: Counter[str] = Counter()
    values: dict[str, set[int]] = {}
    for key in keys:
        tpl, ix = template_of(key)
        if not ix:
            continue
        head = tpl[: tpl.index("{}") + 2]
        counts[head] += 1
        values.setdefault(head, set()).add(ix[0])
    if not counts:
        return None
    head = max(counts, key=lambda h: (len(values[h]), counts[h], h))
    return head, len(values[head])


def diagnose(model: KeySet, checkpoint: KeySet, mapping: KeyMap, prefix: Prefix, *, container: str,
             alternatives: Sequence[str], non_tensor: Sequence[str], notes: Sequence[str],
             depth_hint: Callable[[list[int]], str | None] | None = None,
             classifier: Callable[[], Sequence[str]] | None = None) -> tuple[Diagnosis, ...]:
    """Every diagnosis the facts support, most important first.

    ``depth_hint`` turns the checkpoint's block counts into the model argument that builds that depth
    (``depth=4``), when the caller knows the model's spec. ``classifier`` gives the model's classifier modules
    (timm's ``pretrained_cfg['classifier']``: ``fc`` for a ResNet), called only when no key is named a head.
    """
    out: list[Diagnosis] = []
    filled = len(model) - len(mapping.missing)
    if len(model) and filled < 0.1 * len(model):
        out.append(Diagnosis(kind="coverage", level="warning", message=(
            f"almost nothing matches: only {filled} of {len(model)} model keys could be filled. "
            "Is this the checkpoint for this model (and these model arguments)?")))
    if prefix.strip or prefix.add:
        what = []
        if prefix.strip:
            what.append(f"carry the prefix `{prefix.strip}`")
        if prefix.add:
            what.append(f"lack the model's prefix `{prefix.add}`")
        out.append(Diagnosis(kind="prefix", message=(
            f"{prefix.baseline} keys in common as stored: the checkpoint's keys {' and '.join(what)}; "
            f"with it handled, {prefix.matches} match by name")))
    if container:
        listed = ", ".join(f"`{a}`" for a in alternatives)
        also = f"; also present: {listed} (choose with --key)" if alternatives else ""
        out.append(Diagnosis(kind="container", message=f"weights taken from `{container}`{also}"))
    elif alternatives:
        out.append(Diagnosis(kind="container", message=(
            f"weights taken from the top level; also present: {', '.join(f'`{a}`' for a in alternatives)}")))
    if non_tensor:
        out.append(Diagnosis(kind="non_tensor", message=(
            f"{len(non_tensor)} non-tensor entr{'y' if len(non_tensor) == 1 else 'ies'} in the tensor dict ignored: "
            + ", ".join(non_tensor[:5]))))
    heads = _head(mapping, classifier)
    out.extend(heads)
    missing = {m.key: m.shape for m in mapping.missing}
    unused = {u.key: u.shape for u in mapping.unused}
    out.extend(_pos_embed(missing, unused))
    # the depth comparison reads every key: only worth it when a block's worth (two tensors) is left over
    names = [prefix.apply(k) for k in checkpoint] if len(missing) + len(mapping.unexplained) >= 2 else []
    depths = depth_differences(list(model), names) if names else []
    if depths:
        out.append(_depth_diagnosis(depths, depth_hint))
    elif names:
        dm, dc = _depth(list(model)), _depth(names)
        if dm and dc and dm[1] != dc[1]:
            out.append(Diagnosis(kind="depth", level="warning", message=(
                f"the checkpoint has {dc[1]} {dc[0].rstrip('.{}') or 'blocks'} ({dc[0]}), "
                f"the model {dm[1]} ({dm[0]})")))
    if missing:
        # a width cause only where sizes really differ: a deeper variant repeats the same sizes more often
        wm, wc = _widths(model), _widths(checkpoint)
        if heads and heads[0].level == "warning":
            # a head of another size changes the 1-D sizes by its class counts only: that is the head cause
            classes = re.search(r"checkpoint has (\d+) classes, model (\d+)", heads[0].message)
            if classes:
                wc, wm = wc - {int(classes.group(1))}, wm - {int(classes.group(2))}
        if wm and wc and wm != wc and not depths:
            only_m, only_c = _most_common(model, wm - wc), _most_common(checkpoint, wc - wm)
            if only_m and only_c:
                out.append(Diagnosis(kind="width", level="warning", message=(
                    f"different variant: width {only_c} in the checkpoint, {only_m} in the model")))
    out.extend(Diagnosis(kind="note", message=n) for n in notes)
    return tuple(out)


def _head(mapping: KeyMap, classifier: Callable[[], Sequence[str]] | None = None) -> list[Diagnosis]:
    heads_m = [m for m in mapping.missing if _is(m.key, "head") and len(m.shape) == 2]
    heads_c = [u for u in mapping.unused if _is(u.key, "head") and len(u.shape) == 2]
    if not heads_m and classifier is not None and any(len(m.shape) == 2 for m in mapping.missing):
        # the head is called something else (a ResNet's `fc`): the model says which modules classify
        names = tuple(classifier())
        heads_m = [m for m in mapping.missing if len(m.shape) == 2 and m.key.rpartition(".")[0] in names]
        heads_c = heads_c or [u for u in mapping.unused if len(u.shape) == 2 and u.key.rpartition(".")[0] in names]
    if heads_c and not heads_m:
        return [Diagnosis(kind="head", message=(
            f"the checkpoint's head ({heads_c[0].key}, {heads_c[0].shape[0]} outputs) has no place in the model; "
            "it is left unused"))]
    for m in heads_m:
        for u in heads_c:
            if u.shape[1:] == m.shape[1:] and u.shape[0] != m.shape[0]:
                return [Diagnosis(kind="head", level="warning", message=(
                    f"head re-initialisation expected: checkpoint has {u.shape[0]} classes, model {m.shape[0]} "
                    f"({u.key} -> {m.key}); load with --partial and train the head"))]
    return []


def _pos_embed(missing: dict[str, tuple[int, ...]], unused: dict[str, tuple[int, ...]]) -> list[Diagnosis]:
    for mk, ms in missing.items():
        if not _is(mk, "pos_embed") or len(ms) < 2:
            continue
        for uk, us in unused.items():
            if not _is(uk, "pos_embed") or not us or us[-1] != ms[-1]:
                continue
            tm, tc = ms[-2], us[-2] if len(us) >= 2 else 0
            if abs(tm - tc) in (1, 2, 4, 8):
                why = "by one token (class token)" if abs(tm - tc) == 1 else f"by {abs(tm - tc)} tokens (prefix tokens)"
            else:
                why = "by grid size (resample it to the model's image size)"
            return [Diagnosis(kind="pos_embed", level="warning", message=(
                f"position embedding differs {why}: checkpoint {uk} has {tc} tokens, model {mk} {tm}"))]
    return []
