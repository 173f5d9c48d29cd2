"""Both sides accounted: why each unused checkpoint tensor is unused, and where depth differs.

A model key left empty is always a problem. An unused checkpoint tensor is one only when it should have gone
somewhere: a conversion rightly leaves behind another tower of a multi-tower checkpoint, a classifier or pooler the
model does not have, training state and buffers the model recomputes; it must not leave behind extra repeats of a
block the model has (a deeper checkpoint), or a tensor nothing explains. Reasons are read off the keys' structure
(templates, index sets, top-level subtrees) and a short vocabulary of head and training-state names.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from keydiff._keys import KeySet, natural_key
from keydiff._patterns import name_tokens, template_of

__all__ = ["Depth", "Unused", "account_unused", "depth_differences"]

_DIGITS = re.compile(r"\.\d+(?=\.|$)")

HEAD_TOKENS = frozenset({
    "head", "heads", "classifier", "pooler", "pool", "pre_logits", "logits", "lm_head", "head_dist", "dist_head",
    "text_projection", "visual_projection", "image_projection",
})
"""Tokens naming an output head, a pooler or a projection after the trunk, anywhere outside a repeated block."""
TOP_HEAD_TOKENS = frozenset({"proj", "projection", "fc", "fc_norm", "score", "output"})
"""Generic words that name a head only as the first token of a key (``fc.weight``, ``proj``)."""
TRAINING_LEAVES = frozenset({"num_batches_tracked", "n_averaged", "mask_token", "mask_embed", "logit_scale",
                             "logit_bias", "temp", "temperature"})
"""Leaf names of training-time state: counters, masked-modelling tokens, contrastive loss scales."""
BUFFER_LEAVES = frozenset({"position_ids", "relative_position_index", "attn_mask", "attention_mask", "inv_freq",
                           "masked_bias", "token_type_ids", "_float_tensor"})
"""Leaf names of buffers models recompute (index tables, masks, rotary frequencies)."""


@dataclass(frozen=True, slots=True)
class Unused:
    """What an unused checkpoint tensor is, and why, in words."""

    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class Depth:
    """Repeats of one block container that one side has and the other lacks."""

    container: str
    """The container path, as the model names it (``blocks``, ``layer3``)."""
    checkpoint: tuple[int, ...]
    """Index values the checkpoint has under it."""
    model: tuple[int, ...]
    """Index values the model has under it."""


def _block_path(key: str, known: Collection[str]) -> str | None:
    """The shortest prefix of ``key`` ending in an index token that no key of ``known`` has: ``blocks.3``."""
    tokens = key.split(".")
    for n in range(1, len(tokens)):
        if tokens[n].isdigit() and ".".join(tokens[: n + 1]) not in known:
            return ".".join(tokens[: n + 1]) if ".".join(tokens[:n]) in known else None
    return None


def _first_index(key: str) -> tuple[str, int, str] | None:
    """A key split at its first index token: ``blocks.3.attn.qkv.weight`` -> ``("blocks", 3, "attn.qkv.weight")``;
    None for a key without one (the first and last tokens are never indices)."""
    tokens = key.split(".")
    for n in range(1, len(tokens) - 1):
        if tokens[n].isdigit():
            return ".".join(tokens[:n]), int(tokens[n]), ".".join(tokens[n + 1:])
    return None


def _container(key: str) -> str | None:
    """The path before a key's first index token (``blocks`` for ``blocks.3.attn.qkv.weight``), or None."""
    split = _first_index(key)
    return split[0] if split else None


def _indices(keys: Iterable[str]) -> dict[str, set[int]]:
    """Index values under each container (the first index token of each key)."""
    out: dict[str, set[int]] = defaultdict(set)
    for container, index, _ in filter(None, map(_first_index, keys)):
        out[container].add(index)
    return out


class _Known:
    """Whether some key lies under a path (``blocks.3`` for ``blocks.3.attn.qkv.weight``): a sorted list and a
    binary search per question, not a set of every prefix of every key (100,000 keys, a few questions)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = sorted(keys)

    def __contains__(self, path: object) -> bool:
        head = f"{path}."
        i = bisect.bisect_left(self.keys, head)
        return i < len(self.keys) and self.keys[i].startswith(head)


def depth_differences(model: Sequence[str], checkpoint: Sequence[str]) -> list[Depth]:
    """Block containers whose repeats differ between the two sides, checkpoint keys named as the model's.

    A container differs when both sides have it and one side has index values under it that the other lacks while
    the blocks they share have the same structure (their keys' templates agree). Its siblings of the same name
    pattern (the other stages) come along, so that a per-stage depth can be given whole.

    Example:
        >>> depth_differences(["b.0.w", "b.1.w"], ["b.0.w", "b.1.w", "b.2.w", "b.3.w"])
        [Depth(container='b', checkpoint=(0, 1, 2, 3), model=(0, 1))]
    """
    def blocks(keys: Sequence[str]) -> dict[str, dict[int, frozenset[str]]]:
        out: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for container, index, rest in filter(None, map(_first_index, keys)):
            out[container][index].add(_DIGITS.sub(".{}", "." + rest))  # inner indices as slots
        return {c: {i: frozenset(s) for i, s in ix.items()} for c, ix in out.items()}

    # index sets first (one split per key); structures only under containers whose index sets differ
    mi, ci = _indices(model), _indices(checkpoint)
    differing = {c for c in mi.keys() & ci.keys() if mi[c] != ci[c]}
    if not differing:
        return []
    mb = blocks([k for k in model if _container(k) in differing])
    cb = blocks([k for k in checkpoint if _container(k) in differing])
    differ = set()
    for container in mb.keys() & cb.keys():
        m, c = mb[container], cb[container]
        shared = m.keys() & c.keys()
        if m.keys() != c.keys() and shared and all(m[i] == c[i] for i in shared):
            differ.add(template_of(container)[0])
    # every container of a differing family (``layer1``..``layer4``): a per-stage depth argument lists them all
    family = [c for c in sorted(mi.keys() & ci.keys(), key=natural_key) if template_of(c)[0] in differ]
    return [Depth(c, tuple(sorted(ci[c])), tuple(sorted(mi[c]))) for c in family]


def account_unused(unused: Sequence[str], checkpoint: KeySet, used: Collection[str], *,
                   rename: Callable[[str], str], model: Collection[str]) -> dict[str, Unused]:
    """A kind and a reason for each unused checkpoint key that structure or vocabulary explains.

    Args:
        unused: unused checkpoint keys, as stored.
        checkpoint: the checkpoint's keys, as stored.
        used: checkpoint keys an applied entry uses, as stored.
        rename: a stored key as the model would name it (the wrapper prefix handled).
        model: the model's keys.

    Returns:
        ``key -> Unused`` for the keys explained here (``depth``, ``buffer``, ``training``, ``head``, ``tower``);
        the caller words the rest.
    """
    out: dict[str, Unused] = {}
    if not unused:
        return out
    used_names = [rename(k) for k in used]
    known = _Known([*used_names, *model])
    used_tops = {k.split(".", 1)[0] for k in used_names}
    unused_set = set(unused)
    whole_tops = _unused_subtrees(checkpoint, unused_set, rename)
    blocks = {k: _block_path(rename(k), known) for k in unused}
    repeats = _repeats(checkpoint, rename, used, {b for b in blocks.values() if b})
    for key in unused:
        name = rename(key)
        info = checkpoint[key]
        leaf = name.rpartition(".")[2]
        block = blocks[key]
        if block is not None and block in repeats:
            out[key] = Unused("depth", f"`{block}` is a repeat of a block the model has fewer of")
        elif leaf in BUFFER_LEAVES or info.dtype.startswith(("int", "uint", "bool")):
            out[key] = Unused("buffer", f"a {info.dtype} buffer (an index table, mask or counter) the model "
                                        "recomputes or does not keep")
        elif leaf in TRAINING_LEAVES:
            out[key] = Unused("training", "training-time state (a counter, a masked-modelling token or a loss "
                                          "scale) that inference does not use")
        elif _is_head(name):
            out[key] = Unused("head", "a head, pooler or output projection the model does not have")
        elif (top := name.split(".", 1)[0]) in whole_tops and used_tops and top not in used_tops:
            where = ", ".join(f"`{t}.*`" for t in sorted(used_tops)[:3])
            out[key] = Unused("tower", f"another part of the checkpoint: nothing under `{top}.*` is used, the "
                                       f"model matches {where}")
    return out


def _repeats(checkpoint: KeySet, rename: Callable[[str], str], used: Collection[str], paths: set[str]) -> set[str]:
    """Of the block paths ``paths`` (``blocks.3``), those holding the same tensors (names below the block, shapes)
    as a sibling block that is used: more repeats of a block, not another module under a numbered container."""
    if not paths:
        return set()
    containers = {p.rpartition(".")[0] for p in paths}
    contents: dict[str, set[tuple[str, tuple[int, ...]]]] = defaultdict(set)
    active: set[str] = set()
    for k, info in checkpoint.items():
        name = rename(k)
        tokens = name.split(".")
        for n in range(1, len(tokens) - 1):
            if tokens[n].isdigit() and ".".join(tokens[:n]) in containers:
                block = ".".join(tokens[: n + 1])
                contents[block].add((template_of(".".join(tokens[n + 1:]))[0], info.shape))
                if k in used:
                    active.add(block)
                break
    shapes_used: dict[str, set[frozenset]] = defaultdict(set)
    for block in active:
        shapes_used[block.rpartition(".")[0]].add(frozenset(contents[block]))
    return {p for p in paths if frozenset(contents[p]) in shapes_used[p.rpartition(".")[0]]}


def _is_head(name: str) -> bool:
    """Whether a key lies in a head: a head word before any index token (``classifier.2.weight``,
    ``heads.head.bias``), or a generic one as its first token (``fc.weight``, ``proj``)."""
    raw = name.split(".")
    path = raw[:-1] or raw
    if path[0].lower() in TOP_HEAD_TOKENS:
        return True
    for token in path:
        if token.isdigit():
            return False
        if token.lower() in HEAD_TOKENS or set(name_tokens(token)) & HEAD_TOKENS:
            return True
    return False


def _unused_subtrees(checkpoint: KeySet, unused: Collection[str], rename: Callable[[str], str]) -> set[str]:
    """Top-level names none of whose tensors is used and that hold several tensors (a whole tower)."""
    total: dict[str, int] = defaultdict(int)
    idle: dict[str, int] = defaultdict(int)
    for k in checkpoint:
        top = rename(k).split(".", 1)[0]
        total[top] += 1
        idle[top] += k in unused
    return {t for t, n in total.items() if n >= 2 and idle[t] == n}
