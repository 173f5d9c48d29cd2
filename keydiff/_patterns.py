"""Structure of a key set: keys grouped into units (one module's tensors) and units into clusters (one pattern).

``blocks.3.attn.qkv.weight`` and ``.bias`` form the unit ``blocks.3.attn.qkv``; the units ``blocks.{0..23}.attn.qkv``
form one cluster whose template is ``blocks.{}.attn.qkv``. Indices are found in whole tokens (``blocks.3``) and
inside tokens that name a repeat (``encoder_layer_3``, ``layer1``, ``block1-0``). An inner index that takes the same
values under every outer index and holds different kinds of tensors at each (``mlp.0``/``mlp.3``) names a part,
not a repeat, so it stays in the template.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from keydiff._conventions import BLOCK_STEMS, LEAVES, NOISE, canonical_token, split_leaf
from keydiff._keys import KeySet, format_indices, natural_key

__all__ = ["Cluster", "Leaf", "Unit", "build_clusters", "build_units", "structural_order", "template_of"]

_RUNS = re.compile(r"([0-9]+)")
_IN_TOKEN = re.compile(r"([A-Za-z][A-Za-z_]*?)([_-]?)(\d+)((?:-\d+)*)")
SLOT = "{}"
_WORD = re.compile(r"[A-Za-z_]+")  # a token with no digits: never an index


@dataclass(frozen=True, slots=True)
class Leaf:
    """One parameter of a unit; several keys when it stands for separate tensors fused along dim 0."""

    name: str
    """Canonical parameter name (``weight``, ``bias``, ``running_mean``...)."""
    keys: tuple[str, ...]
    """The key, or the keys concatenated in this order."""
    shape: tuple[int, ...]
    """The shape (of the concatenation, for fused keys)."""
    dtype: str
    """The dtype."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class Unit:
    """The tensors of one module (or one bare parameter), matched as a whole."""

    path: str
    """Module path as in the keys (``encoder.layers.3.mlp.0``); a virtual fused unit ends in ``.<qkv>``."""
    leaves: tuple[Leaf, ...]
    """Its parameters, sorted by canonical name."""
    template: str
    """The path with its repeat indices replaced by ``{}``."""
    indices: tuple[int, ...]
    """The values of those indices."""
    position: int
    """Rank in the side's structural order."""
    parts: tuple[Unit, ...] = ()
    """For a virtual fused or stacked unit: the units it concatenates (or stacks), in order."""
    stack: int = 0
    """For a virtual stacked unit: how many per-expert units it stacks along a new first dimension."""

    @property
    def signature(self) -> tuple[tuple[str, int], ...]:
        """Canonical leaf names with element counts: units can only match when these agree."""
        return tuple((leaf.name, leaf.numel) for leaf in self.leaves)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key the unit covers."""
        return tuple(k for leaf in self.leaves for k in leaf.keys)


@dataclass(frozen=True, slots=True)
class Cluster:
    """Units that share a template and parameter names: ``blocks.{0..23}.attn.qkv`` with weight and bias."""

    template: str
    """The template, ``{}`` where indices stand."""
    units: tuple[Unit, ...]
    """Members, in natural index order."""

    @property
    def leaf_names(self) -> tuple[str, ...]:
        """Canonical parameter names shared by every member."""
        return tuple(leaf.name for leaf in self.units[0].leaves)

    @property
    def label(self) -> str:
        """The template with its index sets filled in: ``blocks.{0..23}.attn.qkv``."""
        return fill_template(self.template, [u.indices for u in self.units])


def fill_template(template: str, indices: Sequence[tuple[int, ...]]) -> str:
    """Write the index set of each slot into a template; ragged sets (not a product) are marked with ``*``."""
    slots = template.count(SLOT)
    if not slots or not indices:
        return template
    per_slot = [sorted({ix[i] for ix in indices}) for i in range(slots)]
    product = 1
    for values in per_slot:
        product *= len(values)
    parts = template.split(SLOT)
    out = parts[0]
    for i, values in enumerate(per_slot):
        out += format_indices(values) + parts[i + 1]
    return out if product == len(set(indices)) else out + f" ({len(indices)} of {product})"


def structural_order(keys: Iterable[str]) -> list[str]:
    """Order keys as ``state_dict()`` would list them when the file's own order says nothing.

    A module's own parameters come before its children, children in natural order; this rebuilds the depth-first
    order that ``nn.Module.state_dict`` uses, except that siblings are sorted by name.

    Example:
        >>> structural_order(["b.10.w", "b.2.w", "b.bias", "a.w"])
        ['a.w', 'b.bias', 'b.2.w', 'b.10.w']
    """
    return sorted(keys, key=_structural_key)


def _structural_key(key: str) -> str:
    """A string whose plain order is the structural order: per token, a mark that puts a module's own parameter
    (the last token) before its children, then the token with each number written so that it sorts by value,
    and before any text at the same place (as ``natural_key`` does). Tokens repeat across keys; each is written
    once."""
    tokens = key.split(".")
    last = tokens.pop()
    inner = _INNER.get
    return "".join([inner(t) or _token_key(t, "\x02", "\x00") for t in tokens]) + (
        _LAST.get(last) or _token_key(last, "\x01", ""))


_DECIMALS = re.compile(r"(\d+)")  # any decimal digits, as natural_key reads them
_INNER: dict[str, str] = {}
_LAST: dict[str, str] = {}


def _token_key(token: str, mark: str, end: str) -> str:
    pieces = _DECIMALS.split(token)
    pieces[1::2] = [f"\x03{len(digits):04d}{digits}" for digits in map(str, map(int, pieces[1::2]))]
    found = mark + "".join(pieces) + end
    table = _LAST if mark == "\x01" else _INNER
    if len(table) < 1 << 16:
        table[token] = found
    return found


_TEMPLATES: dict[str, tuple[str, tuple[int, ...]]] = {}
_MAX_TEMPLATES = 1 << 19


def template_of(path: str) -> tuple[str, tuple[int, ...]]:
    """Abstract the repeat indices of a module path (memoised: rules and reports ask for the same paths again).

    Keys differ in their numbers far more than in their text: which digit runs are indices is decided once per
    text skeleton (the key with its runs taken out), and each key only fills the runs in.

    Example:
        >>> template_of("encoder.layer1.0.fc2.weight")
        ('encoder.layer{}.{}.fc2.weight', (1, 0))
    """
    found = _TEMPLATES.get(path)
    if found is None:
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        found = _TEMPLATES[path] = _parse_template(path)
    return found


def remember_templates(known: Iterable[tuple[str, tuple[str, tuple[int, ...]]]]) -> None:
    """Record ``(path, (template, indices))`` pairs worked out without parsing, as ``template_of`` would give them
    (the copies of a fold differ from their representative in one index only)."""
    if len(_TEMPLATES) >= _MAX_TEMPLATES:
        _TEMPLATES.clear()
    _TEMPLATES.update(known)


def _parse_template(path: str) -> tuple[str, tuple[int, ...]]:
    pieces = _RUNS.split(path)
    if len(pieces) == 1 and path.isascii():
        return path, ()
    skeleton = "\0".join(pieces[0::2])
    layout = _layout(skeleton)
    if layout is None:
        return _template_by_token(path)
    slots, kept, templates = layout
    runs = pieces[1::2]
    # the template is the skeleton with each run that is not an index written back: one per such digit set
    digits = tuple([runs[n] for n in kept])
    template = templates.get(digits)
    if template is None:
        template = templates[digits] = _fill_skeleton(skeleton, slots, runs)
    return template, tuple([int(runs[n]) for n in slots])


def _fill_skeleton(skeleton: str, slots: tuple[int, ...], runs: list[str]) -> str:
    texts = skeleton.split("\0")
    out = texts[0]
    for n, run in enumerate(runs):
        out += (SLOT if n in slots else run) + texts[n + 1]
    return out


@lru_cache(maxsize=1 << 14)
def _layout(skeleton: str) -> tuple[tuple[int, ...], tuple[int, ...], dict[tuple[str, ...], str]] | None:
    """Of a skeleton's digit runs: which are indices, which are text; and its templates by the text runs' digits
    (filled as they are met; the cache holds a few per skeleton: ``w1``, ``w2``, ``w3``)."""
    plan = _plan(skeleton)
    if plan is None:
        return None
    return (tuple(n for n, slot in enumerate(plan) if slot), tuple(n for n, slot in enumerate(plan) if not slot),
            {})


@lru_cache(maxsize=1 << 14)
def _plan(skeleton: str) -> tuple[bool, ...] | None:
    """Which digit runs of a skeleton (``\\0`` where runs were) are indices; None if a token's digits are not all
    ASCII runs (the token-by-token reading then decides)."""
    plan: list[bool] = []
    for token in skeleton.split("."):
        runs = token.count("\0")
        if not token.replace("\0", "").isascii():
            return None
        slots = len(_token_template(token.replace("\0", "0"))[1])
        if slots not in (0, runs):
            return None
        plan.extend([slots > 0] * runs)
    return tuple(plan)


def _template_by_token(path: str) -> tuple[str, tuple[int, ...]]:
    out: list[str] = []
    indices: list[int] = []
    for token in path.split("."):
        piece, ix = _token_template(token)
        out.append(piece)
        if ix:
            indices.extend(ix)
    return ".".join(out), tuple(indices)


@lru_cache(maxsize=1 << 16)
def _token_template(token: str) -> tuple[str, tuple[int, ...]]:
    if token.isdigit():
        return SLOT, (int(token),)
    m = _IN_TOKEN.fullmatch(token)
    if m and m.group(1).lower().rstrip("_") in BLOCK_STEMS:
        nums = [m.group(3), *filter(None, m.group(4).split("-"))]
        return m.group(1) + m.group(2) + "-".join(SLOT for _ in nums), tuple(int(n) for n in nums)
    return token, ()


def _fix_parts(template: str, members: list[tuple[str, tuple[int, ...]]],
               kinds: dict[str, tuple]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Turn inner slots that name parts back into text; returns the members it changes.

    An inner slot names parts when it takes the same value set under every outer index and the values hold
    different kinds of tensors (``layer.0`` a 1x1 conv, ``layer.1`` a 3x3 one; ``mlp.0`` and ``mlp.3``). When every
    value holds the same kinds (``experts.{0..127}``, uniform depth) it is a repeat and stays a slot.
    """
    slots = template.count(SLOT)
    fixed: set[int] = set()
    for j in range(1, slots):
        by_outer: dict[tuple[int, ...], set[int]] = defaultdict(set)
        by_value: dict[int, set[tuple]] = defaultdict(set)
        for path, ix in members:
            by_outer[ix[:j]].add(ix[j])
            by_value[ix[j]].add(kinds[path])
        sets = {frozenset(v) for v in by_outer.values()}
        if len(sets) != 1:
            continue
        if len(next(iter(sets))) == 1 or len({frozenset(k) for k in by_value.values()}) > 1:
            fixed.add(j)
    if not fixed:
        return {}
    out = {}
    pieces = template.split(SLOT)
    for path, ix in members:
        text, kept = pieces[0], []
        for j, value in enumerate(ix):
            text += (str(value) if j in fixed else SLOT) + pieces[j + 1]
            if j not in fixed:
                kept.append(value)
        out[path] = (text, tuple(kept))
    return out


def build_units(keyset: KeySet, keys: Iterable[str], *, order: Sequence[str] | None = None) -> list[Unit]:
    """Group keys into units, in the given key order (default: the key set's own order)."""
    wanted = set(keys)
    ordered = [k for k in (order if order is not None else keyset) if k in wanted]
    grouped: dict[str, dict[str, str]] = {}
    canonical = LEAVES.get
    for key in ordered:
        head, _, last = key.rpartition(".")
        leaf = canonical(last)
        path, leaf = (head, leaf) if leaf is not None and head else split_leaf(key)  # split_leaf's common case
        leaves = grouped.get(path)
        if leaves is None:
            grouped[path] = {leaf: key}
        else:
            leaves[leaf if leaf not in leaves else last] = key
    raw = {path: template_of(path) for path in grouped}
    _remember_key_templates(grouped, raw)
    by_template: dict[str, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
    for path, (tpl, ix) in raw.items():
        by_template[tpl].append((path, ix))
    info = keyset.infos
    final = raw  # templates as parsed, but for inner slots that name parts
    for tpl, members in by_template.items():
        if tpl.count(SLOT) > 1:
            kinds = {p: tuple((name, info[key].shape) for name, key in sorted(grouped[p].items())) for p, _ in members}
            final.update(_fix_parts(tpl, members, kinds))
    units = []
    for position, (path, leaves) in enumerate(grouped.items()):
        tpl, ix = final[path]
        if len(leaves) == 1:
            ((name, key),) = leaves.items()
            facts = info[key]
            found: tuple[Leaf, ...] = (Leaf(name, (key,), facts.shape, facts.dtype),)
        else:  # leaves sorted by name
            found = tuple(Leaf(name, (key,), info[key].shape, info[key].dtype) for name, key in sorted(leaves.items()))
        units.append(Unit(path, found, tpl, ix, position))
    return units


def _remember_key_templates(grouped: dict[str, dict[str, str]],
                            paths: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Record the templates of the keys under each path without parsing them: a key that is its path plus a last
    token without digits (``.weight``) has the path's template plus that token (templates are decided token by
    token). Rules, diagnoses and reports ask for the keys' templates next."""
    known = []
    for path, leaves in grouped.items():
        tpl, ix = paths[path]
        if not ix:
            continue
        cut = len(path) + 1
        for key in leaves.values():
            last = key[cut:]
            if key.startswith(".", cut - 1) and key.startswith(path) and _WORD.fullmatch(last):
                known.append((key, (f"{tpl}.{last}", ix)))
    remember_templates(known)


def build_clusters(units: Iterable[Unit]) -> list[Cluster]:
    """Group units by template and parameter names; clusters and members in natural order."""
    groups: dict[tuple[str, tuple[str, ...]], list[Unit]] = defaultdict(list)
    for unit in units:
        groups[unit.template, tuple(leaf.name for leaf in unit.leaves)].append(unit)
    clusters = [
        Cluster(template=tpl, units=tuple(sorted(members, key=lambda u: u.indices)))
        for (tpl, _), members in groups.items()
    ]
    return sorted(clusters, key=lambda c: (natural_key(c.template), c.leaf_names))


@lru_cache(maxsize=1 << 14)
def name_tokens(template: str) -> tuple[str, ...]:
    """Canonical tokens of a template, slots and location-only tokens left out; the last one names the part."""
    out: list[str] = []
    parent = ""
    for token in template.split("."):
        token = token.replace(SLOT, "").rstrip("_-")
        if not token or token.isdigit():
            continue  # an index names no part
        canon = canonical_token(token, parent)
        parent = canon
        if canon not in NOISE:
            out.append(canon)
    return tuple(out)
