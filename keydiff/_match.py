"""Matching: pair the checkpoint's unmatched units with the model's, as whole clusters first, then by order.

1. Fusion. Separate q/k/v units become one virtual ``qkv`` unit when the other side keeps them fused (and the
   reverse, for a split); the order of the parts comes from the names, never from the file.
2. Clusters. Every compatible pair of clusters (same number of members, same grouping, every member's tensors
   shape-compatible) gets a score from canonical names and shapes; one global assignment picks the pairs. A pair
   whose runner-up scores within ``AMBIGUITY_MARGIN`` is not trusted and is left to the next step.
3. Order. What is left is aligned as two sequences (the checkpoint's structural order against the model's run
   order, or its registration order when its forward could not run) by dynamic programming over shape-compatible
   units; never the same part of another block, never across the matched blocks' boundary into a head.
4. Uniqueness. A leftover unit with exactly one compatible partner, which has no other, is paired.
5. Dataflow and roles. A norm goes with the module it runs after, as its checkpoint siblings say (``_Followers``);
   a weakly named pairing that could trade targets with a same-shaped sibling's, and that no evidence decides, is
   unproven (``_role_ambiguous``): reported, not applied.

Compatibility is a hard constraint: nothing is paired whose tensors cannot become each other.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import pairwise

from rapidfuzz import fuzz

from keydiff._conventions import EXPERT_STEMS, FUSIONS
from keydiff._patterns import SLOT, Cluster, Leaf, Unit, build_clusters, name_tokens, template_of

__all__ = ["AMBIGUITY_MARGIN", "Pairing", "match_units", "name_similarity", "shape_relation"]

AMBIGUITY_MARGIN = 0.08
"""A cluster pair is trusted only if no other compatible pair comes this close to its score."""
MIN_CLUSTER_SCORE = 0.3
"""Below this a cluster pair is not taken on names and shapes alone."""
STRONG_NAME = 0.75
"""A cluster pair with rivals of the same shape is taken on names only from this name score up."""
SPARSE_ORDER = 0.5
"""An order alignment that reaches fewer than this share of the model's leftover parts is not evidence."""
MAX_ORDER_CELLS = 4_000_000
"""Largest alignment table the order step builds (units x units)."""

_SHAPE_QUALITY = {"same": 1.0, "reshape": 0.9, "transpose": 0.6}


@dataclass(frozen=True, slots=True)
class Pairing:
    """A checkpoint unit paired with a model unit, and why."""

    source: Unit
    target: Unit
    method: str
    """``cluster``, ``order`` or ``unique``."""
    confidence: float
    name_score: float
    cluster: str = ""
    note: str = ""
    zeros: tuple[Leaf, ...] = ()
    """Model tensors beside ``target`` that no checkpoint tensor fills and that are made as zeros (a ``Linear``'s
    bias, when its weight comes from a bare matrix)."""


def shape_relation(src: Sequence[int], dst: Sequence[int]) -> str | None:
    """How a tensor of shape ``src`` can become one of shape ``dst``, or None.

    Example:
        >>> shape_relation((64,), (1, 1, 64)), shape_relation((8, 4), (4, 8)), shape_relation((8, 4), (32,))
        ('reshape', 'transpose', None)
    """
    src, dst = tuple(src), tuple(dst)
    if src == dst:
        return "same"
    if _numel(src) != _numel(dst):
        return None
    if tuple(d for d in src if d != 1) == tuple(d for d in dst if d != 1):
        return "reshape"
    if len(src) == len(dst) == 2 and src == dst[::-1]:
        return "transpose"
    if src and dst and src[0] == dst[0] and len(src) != len(dst) and min(len(src), len(dst)) >= 2:
        return "reshape"  # a flattened kernel: conv [O, C, k, k] <-> linear [O, C*k*k]
    return None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def unit_relation(src: Unit, dst: Unit) -> float | None:
    """Quality (0-1) of turning ``src``'s tensors into ``dst``'s, or None when they cannot be."""
    if len(src.leaves) == len(dst.leaves):
        # the common case, checked without building signatures: the same names, shapes and dtypes
        for a, b in zip(src.leaves, dst.leaves, strict=True):
            if a.shape != b.shape or a.name != b.name or a.dtype != b.dtype:
                break
        else:
            return 1.0
    if src.signature != dst.signature:
        return None
    quality = 1.0
    for a, b in zip(src.leaves, dst.leaves, strict=True):
        rel = shape_relation(a.shape, b.shape)
        if rel is None or a.dtype.startswith("int") != b.dtype.startswith("int"):
            return None
        quality = min(quality, _SHAPE_QUALITY[rel])
    return quality


def _token_similarity(a: str, b: str) -> float:
    if a == b:
        return 1.0
    sa, sb = a.rstrip("0123456789"), b.rstrip("0123456789")
    if sa == sb:
        # the same kind of part, another instance (norm1 vs norm2) or an unnumbered one (norm vs norm1)
        return 0.5 if a != sa and b != sb else 0.7
    return 0.6 * fuzz.ratio(a, b) / 100


def _anonymous(template: str) -> bool:
    """True when the last token is a bare index (``mlp.0``): the part is named by position only."""
    last = template.rpartition(".")[2].replace(SLOT, "")
    return not last or last.isdigit()


@lru_cache(maxsize=65536)
def name_similarity(a: str, b: str) -> float:
    """Similarity (0-1) of two templates' canonical names; the last token (what the part is) weighs most.

    A last token that is a bare index counts as unknown (0.5). The rest is compared as sets (Jaccard), so a
    distinctive shared token (``downsample``) counts and an unshared one costs.

    Example:
        >>> name_similarity("layers.{}.layernorm_before", "blocks.{}.norm1")
        1.0
    """
    ta, tb = name_tokens(a), name_tokens(b)
    if not ta or not tb:
        return 0.3 if not ta and not tb else 0.1
    if _anonymous(a) or _anonymous(b):
        last, ca, cb = 0.5, set(ta), set(tb)
    else:
        last, ca, cb = _token_similarity(ta[-1], tb[-1]), set(ta[:-1]), set(tb[:-1])
        if last < 0.8 and (ta[-1] in cb or tb[-1] in ca):
            last = 0.8  # one names the module, the other its inner part (patch_embed vs patch_embed.proj)
    context = len(ca & cb) / len(ca | cb) if ca or cb else 1.0
    return round(0.65 * last + 0.35 * context, 4)


# ----------------------------------------------------------------------------------------------------- fusion

def _last_token(unit: Unit) -> str:
    return _last_token_of(unit.template)


def _last_token_of(template: str) -> str:
    tokens = name_tokens(template)
    return tokens[-1] if tokens else ""


_EXPANSIONS = {fused: parts for fused, parts in FUSIONS}


def _tiling(found: dict[str, Unit], fused: str, parts: tuple[str, ...]) -> list[Unit] | None:
    """Sibling units whose parts, in the order the names give, are exactly ``parts``: ``q, k, v`` or ``q, kv`` for
    ``qkv``; None when they are not (a part missing or held twice)."""
    members = sorted((u for t, u in found.items() if t != fused),
                     key=lambda u: parts.index(_EXPANSIONS.get(_last_token(u), (_last_token(u),))[0]))
    laid = [p for u in members for p in _EXPANSIONS.get(_last_token(u), (_last_token(u),))]
    return members if len(members) >= 2 and tuple(laid) == parts else None


def _part_tokens(fused: str, parts: tuple[str, ...]) -> set[str]:
    """The tokens that can stand for some of ``parts``: the parts themselves and smaller fusions of them (``kv``)."""
    known = [*((p, (p,)) for p in parts), *_EXPANSIONS.items()]
    return {t for t, exp in known if t != fused and set(exp) <= set(parts)}


def _siblings(units: list[Unit], tokens: set[str]) -> dict[str, dict[str, Unit]]:
    by_parent: dict[str, dict[str, Unit]] = defaultdict(dict)
    for u in units:
        last = _last_token(u)
        if last in tokens:
            by_parent[u.path.rpartition(".")[0]][last] = u
    return by_parent


def _repeated(unit: Unit) -> bool:
    """Whether a unit sits in a repeated container (its template has an index slot): the blocks, not the head."""
    return SLOT in unit.template


def _fusion_sites(units: list[Unit], fused: str, parts: tuple[str, ...]) -> tuple[set[bool], set[bool]]:
    """Where a side keeps ``fused`` whole and where it keeps its parts apart, as two sets of ``_repeated`` values."""
    whole = {_repeated(u) for u in units if _last_token(u) == fused}
    apart = {_repeated(next(iter(found.values())))
             for found in _siblings(units, _part_tokens(fused, parts)).values() if _tiling(found, fused, parts)}
    return whole, apart


def _fuse(units: list[Unit], fused: str, parts: tuple[str, ...], repeated: bool) -> list[Unit]:
    """Replace each set of sibling units that tile ``parts`` (q, k, v; or q, kv) by one virtual unit concatenating
    the tensors they all hold; only in repeated containers, or only outside them.

    Parts may hold different tensors: q and v with a bias, k without (BEiT). The tensors every part has (the
    weights) are fused; the others stay behind as units of their own (``query`` holding its bias), which the
    other side's per-part tensors (``q_bias``) pair with by name.
    """
    consumed: set[str] = set()
    made: list[Unit] = []
    for parent, found in _siblings(units, _part_tokens(fused, parts)).items():
        members = _tiling(found, fused, parts)
        if members is None or _repeated(members[0]) != repeated:
            continue
        common = set.intersection(*({lf.name for lf in m.leaves} for m in members))
        pieces = [tuple(lf for lf in m.leaves if lf.name in common) for m in members]
        trailing = {tuple(lf.shape[2:] if m.stack else lf.shape[1:] for lf in ls)
                    for m, ls in zip(members, pieces, strict=True)}
        if not common or len(trailing) != 1 or any(not lf.shape for ls in pieces for lf in ls):
            continue
        # what only some parts hold (q and v biases) stays behind, as a unit of that part's own
        made.extend(replace(m, leaves=tuple(lf for lf in m.leaves if lf.name not in common))
                    for m, ls in zip(members, pieces, strict=True) if len(ls) < len(m.leaves))
        consumed.update(m.path for m in members)
        members = [replace(m, leaves=ls) for m, ls in zip(members, pieces, strict=True)]
        stack = members[0].stack
        if stack:
            # stacked parts concatenate inside each expert: keys interleave expert by expert (g0, u0, g1, u1...)
            leaves = tuple(
                Leaf(lf.name, tuple(m.leaves[i].keys[e] for e in range(stack) for m in members),
                     (stack, sum(m.leaves[i].shape[1] for m in members), *lf.shape[2:]), lf.dtype)
                for i, lf in enumerate(members[0].leaves)
            )
        else:
            leaves = tuple(
                Leaf(lf.name, tuple(m.leaves[i].keys[0] for m in members),
                     (sum(m.leaves[i].shape[0] for m in members), *lf.shape[1:]), lf.dtype)
                for i, lf in enumerate(members[0].leaves)
            )
        tpl = members[0].template.rpartition(".")[0] + "." + fused
        path = f"{parent}.{{{','.join(m.path.rpartition('.')[2] for m in members)}}}"
        made.append(Unit(path=path, leaves=leaves, template=tpl, indices=members[0].indices,
                         position=min(m.position for m in members), parts=tuple(members), stack=stack))
    kept = [u for u in units if u.path not in consumed]
    return sorted(kept + made, key=lambda u: u.position)


def _expert_split(path: str) -> tuple[str, int, str] | None:
    """``a.experts.7.w1`` -> ``("a.experts", 7, "w1")``; None for a path without a per-expert index."""
    tokens = path.split(".")
    for n in range(len(tokens) - 2):
        if tokens[n].lower() in EXPERT_STEMS and tokens[n + 1].isdigit():
            return ".".join(tokens[: n + 1]), int(tokens[n + 1]), ".".join(tokens[n + 2:])
    return None


def _packs_experts(units: list[Unit]) -> bool:
    """Whether a side keeps tensors stacked over experts (``experts.gate_up_proj``)."""
    for u in units:
        tokens = u.path.rsplit(".", 2)  # the last two tokens are all it looks at
        if len(tokens) >= 2 and tokens[-2].lower() in EXPERT_STEMS and not tokens[-1].isdigit():
            return True
    return False


def _stack(units: list[Unit]) -> list[Unit]:
    """Replace each complete run of per-expert units (``experts.{0..E-1}.w1``) by one virtual unit stacking them."""
    groups: dict[tuple[str, str], dict[int, Unit]] = defaultdict(dict)
    for u in units:
        split = _expert_split(u.path)
        if split:
            groups[split[0], split[2]][split[1]] = u
    consumed: set[int] = set()
    virtual: list[Unit] = []
    for (parent, part), members in groups.items():
        order = sorted(members)
        if order != list(range(len(order))) or len(order) < 2:
            continue
        ms = [members[e] for e in order]
        if len({tuple((lf.name, lf.shape) for lf in m.leaves) for m in ms}) != 1:
            continue
        path = f"{parent}.{part}"
        tpl, ix = template_of(path)
        leaves = tuple(Leaf(lf.name, tuple(m.leaves[i].keys[0] for m in ms), (len(ms), *lf.shape), lf.dtype)
                       for i, lf in enumerate(ms[0].leaves))
        virtual.append(Unit(path=path, leaves=leaves, template=tpl, indices=ix,
                            position=min(m.position for m in ms), parts=tuple(ms), stack=len(ms)))
        consumed.update(id(m) for m in ms)
    return sorted([u for u in units if id(u) not in consumed] + virtual, key=lambda u: u.position)


def apply_stacking(src: list[Unit], dst: list[Unit]) -> tuple[list[Unit], list[Unit]]:
    """Stack per-expert tensors on whichever side keeps them apart while the other side packs them."""
    if _packs_experts(dst) and not _packs_experts(src):
        return _stack(src), dst
    if _packs_experts(src) and not _packs_experts(dst):
        return src, _stack(dst)
    return src, dst


def apply_fusions(src: list[Unit], dst: list[Unit]) -> tuple[list[Unit], list[Unit]]:
    """Fuse separate parts on whichever side keeps them separate while the other side keeps them fused.

    Decided apart for repeated containers (the blocks) and for the rest (a pooling head): an encoder may keep q, k
    and v apart while its attention-pooling head holds one ``in_proj``, and the other library the reverse.
    """
    for fused, parts in FUSIONS:
        if fused not in _last_tokens(src) | _last_tokens(dst):
            continue  # the common case, read per template: nothing is fused on either side
        src_whole, src_apart = _fusion_sites(src, fused, parts)
        dst_whole, dst_apart = _fusion_sites(dst, fused, parts)
        for repeated in (True, False):
            if repeated in dst_whole - src_whole and repeated in src_apart - dst_apart:
                src = _fuse(src, fused, parts, repeated)
            elif repeated in src_whole - dst_whole and repeated in dst_apart - src_apart:
                dst = _fuse(dst, fused, parts, repeated)
    return src, dst


def _last_tokens(units: list[Unit]) -> set[str]:
    """The last name tokens of the units (read per template: units share a few)."""
    return {_last_token_of(t) for t in {u.template for u in units}}


# --------------------------------------------------------------------------------------------------- clusters

def _grouping(cluster: Cluster) -> tuple[int, ...]:
    """Members per value of the first index: (1, 1, 2, 1) for a 4-stage net with depths 1, 1, 2, 1."""
    counts: dict[int, int] = defaultdict(int)
    for u in cluster.units:
        counts[u.indices[0] if u.indices else 0] += 1
    return tuple(counts[k] for k in sorted(counts))


def _members(a: Cluster, b: Cluster) -> list[tuple[Unit, Unit]] | None:
    """Member pairs of two clusters.

    In index order when they have as many members, the same grouping, and the order relabels each index
    consistently (``features.{1,3,5}`` -> ``stages.{0,1,2}``); by equal index values when one's index set holds
    the other's (a shallower or deeper variant), or when the order would relabel an index two ways (a hole at
    another place on each side: experts 0-4,6,7 against 0-2,4-7) and most indices are shared; else None.
    """
    if len(a.units) == len(b.units):
        if a.template.count(SLOT) > 1 and b.template.count(SLOT) > 1 and _grouping(a) != _grouping(b):
            return None
        pairs = list(zip(a.units, b.units, strict=True))
        if _relabels_consistently(pairs):
            return pairs
    ia, ib = {u.indices: u for u in a.units}, {u.indices: u for u in b.units}
    if a.template.count(SLOT) != b.template.count(SLOT):
        return None
    common = ia.keys() & ib.keys()
    nested = ia.keys() <= ib.keys() or ib.keys() <= ia.keys()
    if not nested and (len(a.units) != len(b.units) or 2 * len(common) < len(a.units)):
        return None
    return [(ia[ix], ib[ix]) for ix in sorted(common)] or None


def _relabels_consistently(pairs: list[tuple[Unit, Unit]]) -> bool:
    """Whether pairing in order maps each index value of one side to a single value of the other, per slot."""
    maps: dict[tuple[int, int], int] = {}
    back: dict[tuple[int, int], int] = {}
    for su, tu in pairs:
        if len(su.indices) != len(tu.indices):
            return True  # different index structures: nothing to compare slot by slot
        for slot, (x, y) in enumerate(zip(su.indices, tu.indices, strict=True)):
            if maps.setdefault((slot, x), y) != y or back.setdefault((slot, y), x) != x:
                return False
    return True


def _cluster_quality(pairs: list[tuple[Unit, Unit]]) -> float | None:
    quality = 1.0
    for su, tu in pairs:
        q = unit_relation(su, tu)
        if q is None:
            return None
        quality = min(quality, q)
    return quality


class _PairCache:
    """``_members`` and ``_cluster_quality`` worked out once per distinct case.

    The clusters of a large key set repeat themselves: ``w1``, ``w2`` and ``w3`` of every expert share one index
    set, and all their members one leaf profile. ``_members`` depends only on the two clusters' slot counts and
    member indices (in member order), so its answer is kept as member positions per such case; a cluster pair
    whose members each share a single profile has the quality of any one member pair (``unit_relation`` looks at
    leaf names, shapes and dtypes only).
    """

    def __init__(self) -> None:
        self._indices: dict[int, tuple[tuple[int, ...], ...]] = {}  # id(cluster) -> member indices
        self._profiles: dict[int, tuple | None] = {}  # id(cluster) -> the profile every member has, or None
        self._members: dict[tuple, list[tuple[int, int]] | None] = {}

    def _index_tuple(self, c: Cluster) -> tuple[tuple[int, ...], ...]:
        found = self._indices.get(id(c))
        if found is None:
            found = self._indices[id(c)] = tuple(u.indices for u in c.units)
        return found

    def positions(self, a: Cluster, b: Cluster) -> list[tuple[int, int]] | None:
        """``_members(a, b)`` as positions in ``a.units`` and ``b.units``."""
        case = (a.template.count(SLOT), b.template.count(SLOT), self._index_tuple(a), self._index_tuple(b))
        if case not in self._members:
            pairs = _members(a, b)
            if pairs is None:
                self._members[case] = None
            else:
                where_a = {id(u): n for n, u in enumerate(a.units)}
                where_b = {id(u): n for n, u in enumerate(b.units)}
                self._members[case] = [(where_a[id(x)], where_b[id(y)]) for x, y in pairs]
        return self._members[case]

    @staticmethod
    def pairs(a: Cluster, b: Cluster, positions: list[tuple[int, int]]) -> list[tuple[Unit, Unit]]:
        """The member pairs at ``positions``."""
        ua, ub = a.units, b.units
        return [(ua[x], ub[y]) for x, y in positions]

    def members(self, a: Cluster, b: Cluster) -> list[tuple[Unit, Unit]] | None:
        """``_members(a, b)``."""
        positions = self.positions(a, b)
        return None if positions is None else self.pairs(a, b, positions)

    def _profile_of(self, c: Cluster) -> tuple | None:
        if id(c) not in self._profiles:
            profiles = {_profile(u) for u in c.units}
            self._profiles[id(c)] = next(iter(profiles)) if len(profiles) == 1 else None
        return self._profiles[id(c)]

    def quality(self, a: Cluster, b: Cluster, positions: list[tuple[int, int]]) -> float | None:
        """``_cluster_quality`` of the member pairs at ``positions`` (not empty)."""
        if self._profile_of(a) is not None and self._profile_of(b) is not None:
            return _cluster_quality(self.pairs(a, b, positions[:1]))
        return _cluster_quality(self.pairs(a, b, positions))


SMALL_ASSIGNMENT = 10_000
"""Score matrices up to this many cells are assigned in pure Python: importing scipy.optimize takes longer."""


def _assign(profit: Sequence[Sequence[float]]) -> tuple[list[int], list[int]]:
    """``scipy.optimize.linear_sum_assignment(profit, maximize=True)``, pair for pair.

    Small matrices go through a line-by-line port of scipy's shortest augmenting path (Crouse 2016,
    ``rectangular_lsap.cpp``), ties broken the same way; tests check it against scipy. Large ones go to scipy.
    """
    nr, nc = len(profit), len(profit[0]) if len(profit) else 0
    if nr * nc > SMALL_ASSIGNMENT:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(profit, maximize=True)
        return [int(i) for i in rows], [int(j) for j in cols]
    if not nr or not nc:
        return [], []
    transpose = nc < nr
    cost = [[-float(profit[i][j]) for i in range(nr)] for j in range(nc)] if transpose else \
        [[-float(x) for x in row] for row in profit]
    if transpose:
        nr, nc = nc, nr
    u, v = [0.0] * nr, [0.0] * nc
    path, col4row, row4col = [-1] * nc, [-1] * nr, [-1] * nc
    for cur in range(nr):
        # invariant: rows before ``cur`` are assigned and the duals u, v are feasible for them
        remaining = list(range(nc - 1, -1, -1))  # reversed, as scipy fills it
        seen_rows, seen_cols, spc = [False] * nr, [False] * nc, [math.inf] * nc
        min_val, i, sink = 0.0, cur, -1
        while sink == -1:
            index, lowest = -1, math.inf
            seen_rows[i] = True
            row, ui = cost[i], u[i]
            for it, j in enumerate(remaining):
                r = min_val + row[j] - ui - v[j]
                if r < spc[j]:
                    path[j] = i
                    spc[j] = r
                if spc[j] < lowest or (spc[j] == lowest and row4col[j] == -1):
                    lowest, index = spc[j], it
            min_val = lowest
            j = remaining[index]
            if row4col[j] == -1:
                sink = j
            else:
                i = row4col[j]
            seen_cols[j] = True
            remaining[index] = remaining[-1]
            remaining.pop()
        u[cur] += min_val
        for i in range(nr):
            if seen_rows[i] and i != cur:
                u[i] += min_val - spc[col4row[i]]
        for j in range(nc):
            if seen_cols[j]:
                v[j] -= min_val - spc[j]
        j = sink
        while True:
            i = path[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur:
                break
    if transpose:
        order = sorted(range(nr), key=lambda k: col4row[k])
        return [col4row[k] for k in order], order
    return list(range(nr)), col4row


def _match_clusters(src: list[Cluster], dst: list[Cluster]) -> tuple[list[Pairing], list[Unit]]:
    import numpy as np

    if not src or not dst:
        return [], []
    reserved: list[Unit] = []
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for j, c in enumerate(dst):
        by_sig[c.units[0].signature].append(j)
    score = np.full((len(src), len(dst)), -1.0)
    names = np.zeros_like(score)
    members: dict[tuple[int, int], list[tuple[int, int]]] = {}  # member positions: pairs are made when taken
    cache = _PairCache()
    for i, a in enumerate(src):
        for j in by_sig.get(a.units[0].signature, ()):
            pairs = cache.positions(a, dst[j])
            quality = cache.quality(a, dst[j], pairs) if pairs else None
            if quality is None:
                continue
            members[i, j] = pairs
            names[i, j] = name_similarity(a.template, dst[j].template)
            # a partial pair (shallower variant) needs its names to carry it
            coverage = len(pairs) / max(len(a.units), len(dst[j].units))
            score[i, j] = (0.75 * names[i, j] + 0.25 * quality) * (1.0 if coverage == 1 else 0.9)
            if coverage < 1 and names[i, j] < STRONG_NAME:
                score[i, j] = -1.0
    rows, cols = _assign(np.where(score < 0, 0.0, score + 1.0).tolist())
    pairings: list[Pairing] = []
    for i, j in zip(rows, cols, strict=True):
        s = score[i, j]
        if s < 0:
            continue
        rivals = max(np.delete(score[i], j).max(initial=-1.0), np.delete(score[:, j], i).max(initial=-1.0))
        unique = rivals < 0
        if s < MIN_CLUSTER_SCORE or rivals >= s - AMBIGUITY_MARGIN or not (unique or names[i, j] >= STRONG_NAME):
            continue  # not trusted on names and shapes: the order step decides, or it stays unresolved
        confidence = min(0.99, 0.45 + 0.5 * names[i, j] + (0.05 if unique else 0.0))
        label = f"{src[i].label} -> {dst[j].label}"
        note = "the only shape-compatible pair" if unique and names[i, j] < 0.5 else ""
        if len(src[i].units) != len(dst[j].units):
            note = f"index sets differ: {len(src[i].units)} in the checkpoint, {len(dst[j].units)} in the model"
        taken = cache.pairs(src[i], dst[j], members[i, j])
        for su, tu in taken:
            pairings.append(Pairing(su, tu, "cluster", confidence, float(names[i, j]), label, note))
        # the rest of a partially paired cluster belongs to its partner: no other tensor may fill those slots
        paired = {id(x) for pair in taken for x in pair}
        reserved.extend(u for u in (*src[i].units, *dst[j].units) if id(u) not in paired)
    return pairings, reserved


# ------------------------------------------------------------------------------------------------------ order

def _blocks_of(unit: Unit) -> list[str]:
    """The repeated blocks a unit sits in, outermost first: its path cut after each index (``stages.1``,
    ``stages.1.blocks.0``); none for a unit outside every repeat (a head, the embeddings)."""
    path = unit.path.split(".")
    return [".".join(path[: n + 1]) for n, token in enumerate(unit.template.split(".")) if SLOT in token]


class _Blocks:
    """The repeated blocks that whole clusters were matched in, on each side (``encoder.layers.{0..11}`` and
    ``blocks.{0..11}``): a pairing made on order or uniqueness does not cross between such a block and a part of
    the model that is not repeated at all, so that no tensor of the encoder's blocks goes into a head, a pooler or
    the embeddings, nor the other way. Repeated parts that no cluster pairing reached (torchvision's stem kept as
    ``features.0``, its downsampling as ``features.2``) are free to pair with either. So is a part of the model
    that runs before every matched block (a stem or patch embedding, which a checkpoint may keep as its first
    block's: ``encoder.layers.0.patch_embedding`` -> ``patch_embed``); a head runs after them."""

    INSIDE, LOOSE, SINGLE, LEAD = "inside", "loose", "single", "lead"

    def __init__(self, pairings: Sequence[Pairing]) -> None:
        self.blocks: tuple[set[str], set[str]] = (set(), set())
        self._states: dict[tuple[int, int], str] = {}  # (id(unit), side) -> state: asked once per compatible pair
        self.first = None  # the model's run position where its matched blocks start
        for p in pairings:
            a, b = _blocks_of(p.source), _blocks_of(p.target)
            if a and b:
                self.blocks[0].update(a)
                self.blocks[1].update(b)
                self.first = p.target.position if self.first is None else min(self.first, p.target.position)

    def state(self, unit: Unit, side: int) -> str:
        """``inside`` a matched block, ``loose`` (repeated, in no matched block) or ``single`` (not repeated), for
        a unit of the checkpoint (side 0) or the model (side 1)."""
        found = self._states.get((id(unit), side))
        if found is None:
            blocks = _blocks_of(unit)
            found = self.SINGLE if not blocks else self.INSIDE if any(b in self.blocks[side] for b in blocks) \
                else self.LOOSE
            if found == self.SINGLE and side == 1 and self.first is not None and unit.position < self.first:
                found = self.LEAD
            self._states[id(unit), side] = found
        return found

    @classmethod
    def allowed(cls, a: str, b: str) -> bool:
        """Whether units in these states may be paired."""
        return {a, b} != {cls.INSIDE, cls.SINGLE}

    def states(self, s: Unit, t: Unit) -> tuple[str, str]:
        """The states of a checkpoint unit and a model unit."""
        return self.state(s, 0), self.state(t, 1)

    def same_side(self, s: Unit, t: Unit) -> bool:
        """Whether a checkpoint unit and a model unit may be paired on order or uniqueness."""
        return self.allowed(self.state(s, 0), self.state(t, 1))


def _align(src: list[Unit], dst: list[Unit], blocks: _Blocks | None = None
           ) -> tuple[list[tuple[int, int, float]], dict[tuple[int, int], float]]:
    """Best monotone alignment of two unit sequences; pairs must be compatible (and, given ``blocks``, on the same
    side of the matched blocks' boundary).

    Returns:
        ``(i, j, gain)`` for each aligned pair, and the gain of every compatible pair.
    """
    n, m = len(src), len(dst)
    gain: dict[tuple[int, int], float] = {}
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for j, t in enumerate(dst):
        by_sig[t.signature].append(j)
    for i, s in enumerate(src):
        for j in by_sig.get(s.signature, ()):
            if blocks is not None and not blocks.same_side(s, dst[j]):
                continue
            if s.template == dst[j].template and s.indices != dst[j].indices:
                continue  # the same part of another block: renumbering is the cluster step's, never position's
            if unit_relation(s, dst[j]) is not None:
                # the same index values are evidence too: block 3 goes to block 3 when nothing else decides
                same_index = 0.2 if s.indices and s.indices == dst[j].indices else 0.0
                gain[i, j] = name_similarity(s.template, dst[j].template) + same_index
    # best[i][j]: best total aligning src[:i] with dst[:j]; each pair adds 1 plus half its name score
    best = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev = best[i], best[i - 1]
        for j in range(1, m + 1):
            v = prev[j] if prev[j] >= row[j - 1] else row[j - 1]
            g = gain.get((i - 1, j - 1))
            if g is not None and prev[j - 1] + 1 + 0.5 * g > v:
                v = prev[j - 1] + 1 + 0.5 * g
            row[j] = v
    out = []
    i, j = n, m
    while i and j:
        g = gain.get((i - 1, j - 1))
        if g is not None and abs(best[i][j] - (best[i - 1][j - 1] + 1 + 0.5 * g)) < 1e-9:
            out.append((i - 1, j - 1, g))
            i, j = i - 1, j - 1
        elif best[i][j] == best[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return out[::-1], gain


def _order_is_evidence(a: Unit, b: Unit, file_order: bool) -> bool:
    """Whether the relative order of two source units says anything: file order does; so does a numeric index
    where their paths first differ (natural sort); an alphabetical sort of names does not."""
    if file_order:
        return True
    for x, y in zip(a.path.split("."), b.path.split("."), strict=False):
        if x != y:
            return _ordinal(x, y)
    return False


def _ordinal(x: str, y: str) -> bool:
    """Names whose sort order is their meaning: indices (``3``/``10``), letters (``a``/``b``/``c``), and one stem
    with different numbers (``conv1``/``conv2``)."""
    if x.isdigit() and y.isdigit():
        return True
    if len(x) == len(y) == 1 and x.isalpha() and y.isalpha():
        return True
    sx, sy = x.rstrip("0123456789"), y.rstrip("0123456789")
    return sx == sy and sx != x and sy != y


def _parent(unit: Unit) -> str:
    return unit.path.rpartition(".")[0]


def _gain(s: Unit, t: Unit) -> float:
    return name_similarity(s.template, t.template) + (0.2 if s.indices and s.indices == t.indices else 0.0)


@dataclass
class _Soft:
    """A pairing made on order or uniqueness: open to repair until the evidence is weighed."""

    source: Unit
    target: Unit
    method: str
    states: tuple[str, str] = ("", "")
    """Where the two units sit against the matched blocks (``_Blocks.state``); swaps keep to pairs alike."""


def _ancestors(unit: Unit) -> list[str]:
    tokens = unit.path.split(".")
    return [".".join(tokens[:n]) for n in range(1, len(tokens))]


class _Structure:
    """Where the rest of each checkpoint module went: parts that share an ancestor in the checkpoint should share
    one in the model (``f.c.0`` -> ``conv3.conv`` puts ``f.c.1`` at ``conv3.bn``, not ``downsample.bn``; the parts
    of ``block2-0`` stay together in ``s2.b1``)."""

    def __init__(self, fixed: Sequence[Pairing], soft: Sequence[_Soft]) -> None:
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.anchors: dict[str, list[int]] = defaultdict(list)
        for p in fixed:
            self.add(p.source, p.target, 1)
            self.anchors[_parent(p.source)].append(p.target.position)
        for p in soft:
            self.add(p.source, p.target, 1)

    def add(self, s: Unit, t: Unit, n: int) -> None:
        for a in _ancestors(s):
            for b in _ancestors(t):
                self.counts[a, b] += n

    def score(self, s: Unit, t: Unit) -> int:
        return sum(self.counts.get((a, b), 0) for a in _ancestors(s) for b in _ancestors(t))

    def consistency(self, a: _Soft, b: _Soft, swapped: bool) -> int:
        """Agreement of the two pairs (as they are, or swapped) with every other pairing."""
        self.add(a.source, a.target, -1)
        self.add(b.source, b.target, -1)
        if swapped:
            total = self.score(a.source, b.target) + self.score(b.source, a.target)
        else:
            total = self.score(a.source, a.target) + self.score(b.source, b.target)
        self.add(a.source, a.target, 1)
        self.add(b.source, b.target, 1)
        return total

    def anchor_distance(self, s: Unit, t: Unit) -> int:
        return min((abs(p - t.position) for p in self.anchors.get(_parent(s), ())), default=0)


def _swaps(soft: list[_Soft]) -> list[tuple[int, int]]:
    """Pairs of same-shaped soft pairings, near each other in source order, whose units could trade partners."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for n in sorted(range(len(soft)), key=lambda n: soft[n].source.position):
        groups[soft[n].source.signature, soft[n].states].append(n)
    out = []
    for members in groups.values():
        for x, a in enumerate(members):
            for b in members[x + 1: x + 17]:
                pa, pb = soft[a], soft[b]
                if unit_relation(pa.source, pb.target) is not None and unit_relation(pb.source, pa.target) is not None:
                    out.append((a, b))
    return out


def _names_prefer_trade(pa: _Soft, pb: _Soft) -> bool:
    """Whether the parts' own names (last tokens) say the two pairings are crossed: each source's part name is
    the other target's (``layernorm_before`` is ``norm1``), and the trade gains by a margin."""
    kept = _gain(pa.source, pa.target) + _gain(pb.source, pb.target)
    swapped = _gain(pa.source, pb.target) + _gain(pb.source, pa.target)
    return swapped - kept >= AMBIGUITY_MARGIN and all(
        _token_similarity(_last_token(s), _last_token(t)) >= 0.8 for s, t in ((pa.source, pb.target),
                                                                             (pb.source, pa.target)))


def _repair(fixed: Sequence[Pairing], soft: list[_Soft], file_order: bool) -> None:
    """Trade partners between same-shaped pairs where that puts more checkpoint siblings under one model module, or
    where names clearly prefer the trade and structure does not object (an alphabetical file puts
    ``layernorm_after`` before ``layernorm_before``, so the order step pairs them crosswise)."""
    structure = _Structure(fixed, soft)
    for _ in range(3):
        changed = False
        for a, b in _swaps(soft):
            pa, pb = soft[a], soft[b]
            swapped, kept = structure.consistency(pa, pb, True), structure.consistency(pa, pb, False)
            if swapped > kept or (swapped == kept and _names_prefer_trade(pa, pb) and not (
                    pa.method == pb.method == "order" and _order_is_evidence(pa.source, pb.source, file_order))):
                structure.add(pa.source, pa.target, -1)
                structure.add(pb.source, pb.target, -1)
                pa.target, pb.target = pb.target, pa.target
                structure.add(pa.source, pa.target, 1)
                structure.add(pb.source, pb.target, 1)
                changed = True
        if not changed:
            return


def _undecided(fixed: Sequence[Pairing], soft: list[_Soft], file_order: bool) -> set[int]:
    """Soft pairs whose swap with a same-shaped neighbour no evidence rules out."""
    structure = _Structure(fixed, soft)
    out: set[int] = set()
    for a, b in _swaps(soft):
        pa, pb = soft[a], soft[b]
        if pa.method == pb.method == "order" and _order_is_evidence(pa.source, pb.source, file_order):
            continue
        kept = _gain(pa.source, pa.target) + _gain(pb.source, pb.target)
        swapped = _gain(pa.source, pb.target) + _gain(pb.source, pa.target)
        if kept - swapped >= AMBIGUITY_MARGIN:
            continue
        if structure.consistency(pa, pb, False) > structure.consistency(pa, pb, True):
            continue
        near = structure.anchor_distance(pa.source, pa.target) + structure.anchor_distance(pb.source, pb.target)
        far = structure.anchor_distance(pa.source, pb.target) + structure.anchor_distance(pb.source, pa.target)
        if near < far:
            continue
        out.update((a, b))
    return out


def _profile(unit: Unit) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """Names, shapes and dtypes of a unit's leaves: all that ``unit_relation`` looks at."""
    return tuple((lf.name, lf.shape, lf.dtype) for lf in unit.leaves)


def _unique_pairs(src: list[Unit], dst: list[Unit], blocks: _Blocks | None = None) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` where ``dst[j]`` is the only unit ``src[i]`` fits and ``src[i]`` the only one fitting it.

    Compatibility depends on leaf profiles (and the side of the matched blocks' boundary) only, so it is decided
    once per pair of distinct profiles and the partners are counted per profile: linear in the units (100,000
    experts share a handful of profiles).
    """
    def profile(u: Unit, side: int) -> tuple:
        return (*_profile(u), blocks.state(u, side) if blocks is not None else "")

    src_of, dst_groups = [profile(s, 0) for s in src], defaultdict(list)
    for j, t in enumerate(dst):
        dst_groups[profile(t, 1)].append(j)
    src_count: dict[tuple, int] = defaultdict(int)
    first: dict[tuple, int] = {}
    for i, p in enumerate(src_of):
        src_count[p] += 1
        first.setdefault(p, i)
    fits = {p: [q for q, js in dst_groups.items()
                if _Blocks.allowed(p[-1], q[-1]) and unit_relation(src[first[p]], dst[js[0]]) is not None]
            for p in first}
    back: dict[tuple, int] = defaultdict(int)
    for p, qs in fits.items():
        for q in qs:
            back[q] += src_count[p]
    forward = {p: sum(len(dst_groups[q]) for q in qs) for p, qs in fits.items()}
    out = []
    for i, p in enumerate(src_of):
        if forward[p] == 1:
            (q,) = fits[p]
            s, t = src[i], dst[dst_groups[q][0]]
            if back[q] == 1 and not (s.template == t.template and s.indices != t.indices):
                out.append((i, dst_groups[q][0]))  # (never the same part of another block: see _align)
    return out


# ---------------------------------------------------------------------------------------------- dataflow

def _is_follower(unit: Unit) -> bool:
    """A unit of 1-D tensors only (a norm, a bias, a layer scale): it acts on what the module before it made."""
    dims = [len(lf.shape) for lf in unit.leaves]  # a norm's step counter is 0-D
    return not unit.parts and not unit.stack and max(dims, default=0) == 1


def _anchors(dst: Sequence[Unit], *, before: bool = False) -> dict[int, Unit]:
    """For each follower unit of the model, the module whose output it acts on: the nearest tensor-owning
    non-follower that runs before it (``conv_pw`` for ``bn1``, ``conv_dw`` for ``bn2``).

    A module's own tensors come before its children's in a state dict whatever the order they run in (a block's
    layer scale), so a unit that contains other units has no place in this order and no anchor. ``before``: the
    nearest such module that runs after it instead (what a pre-norm feeds: ``conv1`` for a residual block's
    ``norm1``).
    """
    paths = {u.path for u in dst}
    parents = {a for u in dst for a in _ancestors(u)} & paths
    out: dict[int, Unit] = {}
    last: Unit | None = None
    for u in sorted(dst, key=lambda u: u.position, reverse=before):
        if u.path in parents:
            continue
        if _is_follower(u):
            if last is not None:
                out[id(u)] = last
        else:
            last = u
    return out


class _Followers:
    """Which model norm each checkpoint norm should take: the one that runs after the module its checkpoint
    siblings (the units under the same parent) map to. ``expansion.expand_bn`` goes with ``expansion.expand_conv``:
    when that became ``conv_pw``, it becomes the norm that runs after ``conv_pw``, not another same-shaped one."""

    def __init__(self, pairings: list[Pairing], dst: Sequence[Unit]) -> None:
        self.pairings = pairings
        self.anchor = _anchors(dst)
        self.feeds = _anchors(dst, before=True)
        self.after: dict[int, list[Unit]] = defaultdict(list)
        for u in sorted(dst, key=lambda u: u.position):
            a = self.anchor.get(id(u))
            if a is not None:
                self.after[id(a)].append(u)
        self.siblings: dict[str, list[Unit]] = defaultdict(list)
        # a parent that also holds deeper modules (an encoder's blocks beside its embedding) may run its norm after
        # those (a final norm): its direct children say nothing about what the norm acts on
        nested = {a for p in pairings for a in _ancestors(p.source)[:-1]}
        for p in pairings:
            if not _is_follower(p.source) and _parent(p.source) not in nested:
                self.siblings[_parent(p.source)].append(p.source)
        self._reindex()

    def _reindex(self) -> None:
        self.by_source = {id(p.source): n for n, p in enumerate(self.pairings)}
        self.by_target = {id(p.target): n for n, p in enumerate(self.pairings)}

    def sibling_targets(self, source: Unit) -> list[Unit]:
        return [self.pairings[self.by_source[id(s)]].target for s in self.siblings.get(_parent(source), ())
                if id(s) in self.by_source]

    def coherent(self, source: Unit, target: Unit) -> bool:
        """Whether ``target`` runs right after, or right before, a module that ``source``'s siblings map to: a
        norm acts on what one of its block's modules made (a post-norm) or makes what one of them takes (a
        pre-norm); the checkpoint's names do not say which, so either is coherent."""
        targets = self.sibling_targets(source)
        a, b = self.anchor.get(id(target)), self.feeds.get(id(target))
        return any(t is a or t is b for t in targets if t is not None)

    def repair(self) -> int:
        """Swap weakly named norms to the targets their siblings say; returns how many pairings moved."""
        moved = 0
        for _ in range(3):
            changed = False
            for n, p in enumerate(self.pairings):
                if not _is_follower(p.source) or _named(p) or self.coherent(p.source, p.target):
                    continue
                for want in (t for a in self.sibling_targets(p.source) for t in self.after.get(id(a), ())):
                    if want is p.target or unit_relation(p.source, want) is None:
                        continue
                    m = self.by_target.get(id(want))
                    if m is None:
                        continue  # a free target: left to the order step, which sees everything else too
                    q = self.pairings[m]
                    if _named(q) or unit_relation(q.source, p.target) is None:
                        continue
                    before = self.coherent(p.source, p.target) + self.coherent(q.source, q.target)
                    after = self.coherent(p.source, want) + self.coherent(q.source, p.target)
                    if after > before:
                        note = "moved with its checkpoint siblings: runs after the module they map to"
                        self.pairings[n] = _moved(p, want, note)
                        self.pairings[m] = _moved(q, p.target, note)
                        self._reindex()
                        moved += 2
                        changed = True
                        break
            if not changed:
                break
        return moved


    def decide(self, below: float) -> None:
        """Raise a weak norm pairing (below ``below``: ambiguous among same-shaped siblings) when dataflow decides
        it: it runs after the module its checkpoint siblings map to, and no other fitting norm does."""
        for n, p in enumerate(self.pairings):
            if p.confidence >= below or not _is_follower(p.source) or not self.coherent(p.source, p.target):
                continue
            rivals = [t for a in self.sibling_targets(p.source) for t in self.after.get(id(a), ())
                      if t is not p.target and unit_relation(p.source, t) is not None]
            if not rivals:
                anchor = self.anchor[id(p.target)]
                note = f"dataflow: runs after {anchor.path}, which its checkpoint siblings map to"
                self.pairings[n] = Pairing(p.source, p.target, p.method, 0.75, p.name_score, p.cluster, note)


def _index_order(pairings: list[Pairing]) -> list[Pairing]:
    """Unproven: weakly named pairings whose repeats map onto the other side's in no order.

    Between two repeated containers (``up.{i}`` and ``up_blocks.{j}``) the pairings say which index becomes which.
    Libraries number alike, shift by one, flatten stages into one run or number a decoder's levels backwards:
    every such correspondence keeps or reverses the order of the indices, and a side numbered by one index only
    sends each of its blocks to one block. One that does neither (0 -> 2, 1 -> 0, 2 -> 1; block 0's norms into
    blocks 0 and 1 of the other side) is position pairing gone astray among same-shaped repeats, and the pairings
    that only position or shape carried are not applied.
    """
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for n, p in enumerate(pairings):
        if p.source.indices and p.target.indices:
            groups[p.source.template.partition(SLOT)[0], p.target.template.partition(SLOT)[0]].append(n)
    flagged: set[int] = set()
    for members in groups.values():
        pairs = sorted({(pairings[n].source.indices[0], pairings[n].target.indices[0]) for n in members})
        if len({a for a, _ in pairs}) < 2:
            continue
        rising = all(b <= d for (a, b), (c, d) in _ordered_pairs(pairs))
        falling = all(b >= d for (a, b), (c, d) in _ordered_pairs(pairs))
        # a side numbered by one index only (blocks.{i}) holds whole blocks: each of its blocks goes to one block of
        # the other side (stages flattened into one run map many to one, never one block into two)
        single_source = all(len(pairings[n].source.indices) == 1 for n in members)
        single_target = all(len(pairings[n].target.indices) == 1 for n in members)
        split = single_source and len({a for a, _ in pairs}) < len(pairs)
        merged = single_target and len({b for _, b in pairs}) < len(pairs)
        if not (rising or falling) or split or merged:
            flagged.update(n for n in members if not _named(pairings[n]))
    out = list(pairings)
    for n in flagged:
        p = pairings[n]
        note = ("unproven: the repeats this pairing belongs to map onto the model's in no order (neither kept, "
                "shifted nor reversed): position among same-shaped repeats does not decide")
        out[n] = Pairing(p.source, p.target, p.method, min(p.confidence, 0.35), p.name_score, p.cluster, note)
    return out


def _ordered_pairs(pairs: list[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every two index pairs whose source indices differ, the smaller source first."""
    return [(x, y) for i, x in enumerate(pairs) for y in pairs[i + 1:] if x[0] < y[0]]


def _sibling_order(followers: _Followers, file_order: bool) -> None:
    """Same-shaped norms of one block, paired by position, keep the order the checkpoint lists them in.

    The order step places a norm among the other modules of its block, and there the file can mislead: a block
    may declare a norm after the module it runs before (``attn``, ``attn_ln``, ``mlp``, ``mlp_ln`` running
    ``attn_ln`` first), which shifts every norm by one place. The order of the norms among themselves does not
    depend on where each is declared: when the pairings cross it, they are put back in that order, unless names
    (by a margin) or dataflow (a norm running after the module its checkpoint siblings map to) say otherwise.
    """
    pairings = followers.pairings
    groups: dict[tuple, list[int]] = defaultdict(list)
    for n, p in enumerate(pairings):
        if p.method == "order" and _is_follower(p.source) and not _named(p):
            groups[_parent(p.source), _parent(p.target), p.source.signature].append(n)
    changed = False
    for members in groups.values():
        if len(members) < 2 or any(followers.coherent(pairings[n].source, pairings[n].target) for n in members):
            continue
        sources = sorted(members, key=lambda n: pairings[n].source.position)
        if not all(_order_is_evidence(pairings[a].source, pairings[b].source, file_order)
                   for a, b in pairwise(sources)):
            continue
        targets = sorted((pairings[n].target for n in members), key=lambda u: u.position)
        if all(pairings[n].target is t for n, t in zip(sources, targets, strict=True)):
            continue
        if any(unit_relation(pairings[n].source, t) is None for n, t in zip(sources, targets, strict=True)):
            continue
        kept = sum(_gain(pairings[n].source, pairings[n].target) for n in members)
        ordered = sum(_gain(pairings[n].source, t) for n, t in zip(sources, targets, strict=True))
        if kept - ordered >= AMBIGUITY_MARGIN:
            continue
        note = ("the order the checkpoint lists these same-shaped norms in, which is the order they run in "
                "(their places among the other modules differ)")
        for n, t in zip(sources, targets, strict=True):
            p = pairings[n]
            if t is not p.target:
                pairings[n] = Pairing(p.source, t, p.method, min(p.confidence, 0.7),
                                      name_similarity(p.source.template, t.template), p.cluster, note)
        changed = True
    if changed:
        followers._reindex()


def _role_ambiguous(pairings: list[Pairing], followers: _Followers, file_order: bool) -> list[Pairing]:
    """Mark unproven the weakly named cluster pairings that could trade targets with a sibling's pairing.

    Two model units under one parent with the same shapes (a block's ``bn1`` and ``bn2``) are role-ambiguous: a
    cluster pairing that names do not carry (``the only shape-compatible pair`` at the cluster level) is proven
    only when something tells the two apart: names (by a margin), the order of the checkpoint's units where that
    order means something, dataflow (a norm runs after the module its checkpoint siblings map to), or where the
    rest of each checkpoint module went. Otherwise both pairings drop below any threshold, with the reason.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for n, p in enumerate(pairings):
        if not _named(p) and p.confidence >= 0.5:
            groups[_parent(p.target), p.source.signature].append(n)
    built: list[_Structure] = []

    def structure() -> _Structure:  # counted over every pairing: built only when a pair gets that far
        if not built:
            built.append(_Structure(pairings, []))
        return built[0]

    flagged: dict[int, int] = {}
    for members in groups.values():
        for x, a in enumerate(members):
            for b in members[x + 1:]:
                pa, pb = pairings[a], pairings[b]
                if "cluster" not in (pa.method, pb.method):
                    continue  # two order/unique pairings: the order step weighed them already
                if unit_relation(pa.source, pb.target) is None or unit_relation(pb.source, pa.target) is None:
                    continue
                if _decided(pa, pb, structure, followers, file_order):
                    continue
                flagged.setdefault(a, b)
                flagged.setdefault(b, a)
    out = list(pairings)
    for n, m in flagged.items():
        p = pairings[n]
        note = (f"unproven: could trade places with {pairings[m].target.path} (same shapes; names, order and "
                "dataflow do not decide)")
        out[n] = Pairing(p.source, p.target, p.method, min(p.confidence, 0.35), p.name_score, p.cluster, note)
    return out


def _decided(pa: Pairing, pb: Pairing, structure: Callable[[], _Structure], followers: _Followers,
             file_order: bool) -> bool:
    """Whether any evidence prefers the two pairings as they are over the two swapped."""
    kept = _gain(pa.source, pa.target) + _gain(pb.source, pb.target)
    swapped = _gain(pa.source, pb.target) + _gain(pb.source, pa.target)
    if kept - swapped >= AMBIGUITY_MARGIN:
        return True
    if _order_is_evidence(pa.source, pb.source, file_order) and \
            (pa.source.position < pb.source.position) == (pa.target.position < pb.target.position):
        return True
    coherent = followers.coherent(pa.source, pa.target) + followers.coherent(pb.source, pb.target)
    if coherent > followers.coherent(pa.source, pb.target) + followers.coherent(pb.source, pa.target):
        return True
    return structure().consistency(pa, pb, False) > structure().consistency(pa, pb, True)


def _named(p: Pairing) -> bool:
    """Whether names alone carry a pairing (dataflow does not overrule them)."""
    return p.name_score >= STRONG_NAME


def _moved(p: Pairing, target: Unit, note: str) -> Pairing:
    return Pairing(p.source, target, p.method, min(p.confidence, 0.8), name_similarity(p.source.template,
                   target.template), p.cluster, note)


def match_units(src: list[Unit], dst: list[Unit], *, file_order: bool = True
                ) -> tuple[list[Pairing], list[Unit], list[Unit], list[str]]:
    """Pair checkpoint units with model units.

    Args:
        src: the checkpoint's unmatched units, in its structural order.
        dst: the model's unmatched units, in registration order.
        file_order: whether ``src``'s order is the file's own (evidence) rather than a sort by name.

    Returns:
        ``(pairings, unpaired checkpoint units, unpaired model units, notes)``.
    """
    notes: list[str] = []
    src, dst = apply_stacking(src, dst)
    src, dst = apply_fusions(src, dst)
    src_clusters, dst_clusters = build_clusters(src), build_clusters(dst)
    pairings, reserved = _match_clusters(src_clusters, dst_clusters)
    paired = {id(p.source) for p in pairings} | {id(p.target) for p in pairings} | {id(u) for u in reserved}
    left_src = [u for u in src if id(u) not in paired]
    left_dst = [u for u in dst if id(u) not in paired]
    bare: list[Pairing] = []
    if left_src and left_dst:
        blocks = _Blocks(pairings)
        soft: list[_Soft] = []
        clean = False
        wanted = len(left_dst)
        if len(left_src) * len(left_dst) <= MAX_ORDER_CELLS:
            # a sort by name can put one part after its sibling where the model has it before (``f.c`` < ``f.se``
            # but conv3 follows se): a second alignment of what the first left over picks those parts up in order
            for round_ in range(3):
                aligned, _ = _align(left_src, left_dst, blocks)
                if not aligned:
                    break
                clean = clean or (round_ == 0 and len(aligned) == len(left_src) == len(left_dst))
                soft += [_Soft(left_src[i], left_dst[j], "order", blocks.states(left_src[i], left_dst[j]))
                         for i, j, _ in aligned]
                taken_s, taken_d = {i for i, _, _ in aligned}, {j for _, j, _ in aligned}
                left_src = [u for i, u in enumerate(left_src) if i not in taken_s]
                left_dst = [u for j, u in enumerate(left_dst) if j not in taken_d]
        else:
            notes.append(f"{len(left_src)} x {len(left_dst)} unmatched units: too many to align by order")
        soft += [_Soft(left_src[i], left_dst[j], "unique", blocks.states(left_src[i], left_dst[j]))
                 for i, j in _unique_pairs(left_src, left_dst, blocks)]
        _repair(pairings, soft, file_order)
        undecided = _undecided(pairings, soft, file_order)
        ordered = sum(p.method == "order" for p in soft)
        sparse = ordered < SPARSE_ORDER * wanted
        for n, p in enumerate(soft):
            g = name_similarity(p.source.template, p.target.template)
            if n in undecided:
                confidence = 0.35
                note = "ambiguous: a same-shaped neighbour could take its place and nothing decides which"
            elif p.method == "order" and sparse and g < STRONG_NAME:
                confidence = 0.45
                note = (f"unproven: paired by position, but only {ordered} of the {wanted} model parts left could "
                        "be aligned: scattered shape coincidences, not a structure")
            elif p.method == "order":
                confidence = min(0.9, 0.55 + 0.3 * g + (0.1 if clean else 0.0))
                note = "names differ; paired by position in the module structure and by shape"
            else:
                confidence = 0.5 + 0.3 * g
                note = "the only shape-compatible pair left"
            pairings.append(Pairing(p.source, p.target, p.method, confidence, g, "", note))
        taken = {id(p.source) for p in pairings} | {id(p.target) for p in pairings}
        left_src = [u for u in left_src if id(u) not in taken]
        left_dst = [u for u in left_dst if id(u) not in taken]
        bare = _bare_matrices(left_src, left_dst, blocks)
        notes += [f"{lf.keys[0]} has no tensor in the checkpoint: made as zeros beside {p.source.path}, a bare matrix "
                  f"(used as x @ {p.source.path.rpartition('.')[2]}, no bias)" for p in bare for lf in p.zeros]
        left_src = [u for u in left_src if all(u is not p.source for p in bare)]
        left_dst = [u for u in left_dst if all(u.path != p.target.path for p in bare)]
    if any(not _named(p) for p in pairings):  # names carry every pairing (100,000 experts): nothing to weigh
        followers = _Followers(pairings, dst)
        followers.repair()
        _sibling_order(followers, file_order)
        followers.decide(0.5)
        pairings = _role_ambiguous(followers.pairings, followers, file_order)
        pairings = _index_order(pairings)
    # a bare matrix's pairing carries the zeros beside it; dataflow and role checks are about other pairings
    return pairings + bare, left_src, left_dst, notes


def _linear(unit: Unit) -> tuple[Leaf, Leaf] | None:
    """``(weight, bias)`` of a model unit that is a ``Linear`` (a 2-D weight, a bias of its output size)."""
    if [lf.name for lf in unit.leaves] != ["bias", "weight"]:
        return None
    bias, weight = unit.leaves
    return (weight, bias) if len(weight.shape) == 2 and bias.shape == weight.shape[:1] else None


def _bare_matrix(unit: Unit) -> Leaf | None:
    """The tensor of a checkpoint unit that is one bare 2-D parameter (``visual.proj``, used as ``x @ proj``)."""
    if len(unit.leaves) != 1 or unit.stack or unit.parts:
        return None
    (leaf,) = unit.leaves
    return leaf if len(leaf.shape) == 2 and leaf.keys == (unit.path,) else None


def _bare_matrices(src: list[Unit], dst: list[Unit], blocks: _Blocks) -> list[Pairing]:
    """A model ``Linear`` whose only counterpart is a bare matrix of the checkpoint: the matrix becomes the weight
    (transposed when its shape says so) and the bias is made as zeros, which is what ``x @ proj`` computes.

    Only one to one (the matrix fits no other ``Linear``, the ``Linear`` no other matrix), on one side of the
    matched blocks' boundary, and only when no tensor left in the checkpoint could be the bias. A square matrix
    cannot show whether it is stored ``[in, out]``: such a pairing is proposed as ambiguous, not applied.
    """
    linears = [(u, lin) for u in dst if (lin := _linear(u)) is not None]
    matrices = [(u, m) for u in src if (m := _bare_matrix(u)) is not None]
    fits = [(s, m, t, lin) for s, m in matrices for t, lin in linears
            if shape_relation(m.shape, lin[0].shape) in ("same", "transpose") and blocks.same_side(s, t)]
    out = []
    for s, m, t, (weight, bias) in fits:
        if sum(x[0] is s for x in fits) != 1 or sum(x[2] is t for x in fits) != 1:
            continue
        if any(shape_relation(lf.shape, bias.shape) for u in src if u is not s for lf in u.leaves):
            continue  # a checkpoint tensor could be the bias: not made up
        square = weight.shape[0] == weight.shape[1]
        note = (f"bias made as zeros: {m.keys[0]} is a bare matrix (used as x @ {m.keys[0].rpartition('.')[2]}, "
                "no bias) and no checkpoint tensor fits the bias")
        if square:
            note = f"ambiguous: {m.keys[0]} is square, so its shape cannot show whether it is stored [in, out]; {note}"
        # the model unit's weight alone is the target; its bias is listed to be made as zeros
        target = replace(t, leaves=(weight,))
        g = name_similarity(s.template, t.template)
        out.append(Pairing(s, target, "unique", 0.35 if square else 0.75, g, "", note, zeros=(bias,)))
    return out
