"""``keydiff find``: which timm architecture a checkpoint belongs to, with the ``create_model`` arguments its shapes
imply.

Three steps, cheap to expensive (difflib's ``get_close_matches`` idea):

1. **Fingerprints.** Every architecture in the index (``keydiff._index``) is scored by how much of its weight, counted
   in elements, comes in tensors of the same sizes as the checkpoint's. Tensor sizes do not depend on names, so a
   torchvision, transformers or open_clip checkpoint scores high against its timm architecture; a fused ``qkv``
   against split ``q``, ``k``, ``v`` loses only the attention's share. The best ``SHORTLIST`` key tables go on.
2. **Arguments from shapes.** The matcher (``keydiff.compare_keys``) runs against the architecture's default keys;
   the model keys it leaves empty that an argument reshapes (the index's probes say which dimension follows
   ``num_classes``, ``in_chans`` or ``img_size``, and how) are fitted to the checkpoint tensors left unused. An
   argument is proposed only when one value fits every such key; ``num_classes=0`` when the head has no tensor
   to take. Arguments the shapes cannot decide (the number of attention heads) are listed as open.
3. **The real match.** The matcher runs again against the keys with those arguments; candidates are ranked by how
   completely they fit. Architectures whose keys and shapes are then identical are one candidate. The best are
   verified by building them with the arguments on the meta device (``keydiff._model.read_model``, cached).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keydiff._diff import compare_keys
from keydiff._errors import UsageError
from keydiff._index import PROBE_CHANS, PROBE_CLASSES, Index, ModelRow, load_index
from keydiff._keys import KeySet, TensorInfo, natural_key

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console, ConsoleOptions, RenderResult

    from keydiff._diff import Diff

__all__ = ["SHORTLIST", "Candidate", "Found", "find", "fingerprint_scores"]

SHORTLIST = 24
"""How many key tables the fingerprint step keeps for the matcher."""
MATCHED = 6
"""How many of the shortlist the matcher runs on at least (more when more candidates are asked for)."""
NEAR = 0.02
"""Key tables this close to the best fingerprint score are matched even beyond ``MATCHED`` (many variants of one
architecture differ in a norm or a token, a fraction of a percent of the weight), until one fits completely."""
RESEMBLANCE = 0.5
"""The matcher runs only on key tables whose fingerprint score is at least this share of the best one's: the rest
resemble the checkpoint less than half as much as the best does."""

# Arguments whose value a tensor shape can show, as timm names them. ``img_size`` is read through the probes' three
# points (a position table grows with the square of the side); the others are linear in the argument.
_ARG_PROBES = (("num_classes", f"num_classes={PROBE_CLASSES}", PROBE_CLASSES), ("in_chans", f"in_chans={PROBE_CHANS}",
                                                                                PROBE_CHANS))
# Keyword arguments that change the computation but no tensor shape: the report says the shapes leave them open.
_SHAPE_FREE = ("num_heads", "heads", "head_dim", "attn_head_dim", "window_size", "mlp_ratio_ffn")


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One answer: architectures with the same keys and shapes once their arguments are applied."""

    names: tuple[str, ...]
    """timm names, the one needing the fewest arguments first."""
    args: Mapping[str, Mapping[str, Any]]
    """Per name, the ``create_model`` arguments the checkpoint's shapes imply (defaults left out)."""
    open_args: tuple[str, ...]
    """Arguments of the architecture that change no shape, so the checkpoint cannot tell them (defaults used)."""
    filled: int
    """Model keys the checkpoint fills."""
    model_keys: int
    """Model keys in all."""
    used: int
    """Checkpoint tensors the mapping uses."""
    tensors: int
    """Checkpoint tensors in all."""
    by_name: int
    """Model keys filled by the same name (after unwrapping a prefix); the rest through a mapping."""
    fits: bool
    """True when every model key is filled and every unused tensor is explained (``keydiff`` would exit 0)."""
    cause: str
    """The first reason it does not fit, in words ('' when it fits)."""
    similarity: float
    """The fingerprint score: share of the weight in tensors of sizes both sides have (0 to 1)."""
    verified: bool | None = None
    """True when building the first name with its arguments gave the keys and shapes that were matched; None: not
    built."""

    @property
    def name(self) -> str:
        """The first timm name."""
        return self.names[0]

    def model_args(self, name: str | None = None) -> dict[str, Any]:
        """The ``create_model`` arguments of one of the names (default: the first)."""
        return dict(self.args.get(name or self.name, {}))

    def command(self, checkpoint: str) -> str:
        """The ``keydiff MODEL CKPT -m ...`` line that converts the checkpoint for this candidate."""
        args = "".join(f" -m {k}={v!r}" if isinstance(v, str) else f" -m {k}={_literal(v)}"
                       for k, v in self.model_args().items())
        return f"keydiff {self.name} {_quote(checkpoint)}{args} -o converted.safetensors"

    @property
    def rank_key(self) -> tuple:
        """Sort key, best first: fits, share of both sides accounted for, names matched, fingerprint."""
        share = (self.filled + self.used) / max(1, self.model_keys + self.tensors)
        return (not self.fits, -round(share, 6), -self.by_name, -self.similarity, natural_key(self.name))

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"names": list(self.names), "args": {n: dict(a) for n, a in self.args.items()},
                "open_args": list(self.open_args), "filled": self.filled, "model_keys": self.model_keys,
                "used": self.used, "tensors": self.tensors, "by_name": self.by_name, "fits": self.fits,
                "cause": self.cause, "similarity": round(self.similarity, 4), "verified": self.verified}


def _literal(value: Any) -> str:
    return str(list(value)).replace(" ", "") if isinstance(value, (list, tuple)) else str(value)


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


@dataclass(frozen=True, slots=True, kw_only=True)
class Found:
    """The answer of ``keydiff.find``: candidates, best first.

    Example:
        >>> found = keydiff.find("model.safetensors")  # doctest: +SKIP
        >>> found.best.name, found.best.model_args()   # doctest: +SKIP
        ('vit_base_patch16_224', {'num_classes': 10})
    """

    checkpoint: str
    """The checkpoint searched for."""
    candidates: tuple[Candidate, ...]
    """Ranked, best first."""
    searched: int
    """Architectures in the index searched."""
    shortlisted: int
    """Key tables the fingerprint step kept."""
    timm: str = ""
    """The timm version of the index."""
    diffs: Mapping[str, Diff] = field(default_factory=dict, repr=False, compare=False)
    """The matcher's result per candidate (by its first name)."""

    @property
    def best(self) -> Candidate | None:
        """The first candidate, or None."""
        return self.candidates[0] if self.candidates else None

    def to_frame(self) -> pd.DataFrame:
        """One row per candidate: ``rank, name, same_as, args, fits, filled, model_keys, used, tensors, by_name,
        similarity, verified, open_args, cause, command``."""
        import pandas as pd

        rows = [(i, c.name, ", ".join(c.names[1:]), c.model_args(), c.fits, c.filled, c.model_keys, c.used,
                 c.tensors, c.by_name, round(c.similarity, 4), c.verified, ", ".join(c.open_args), c.cause,
                 c.command(self.checkpoint)) for i, c in enumerate(self.candidates, 1)]
        cols = ["rank", "name", "same_as", "args", "fits", "filled", "model_keys", "used", "tensors", "by_name",
                "similarity", "verified", "open_args", "cause", "command"]
        return pd.DataFrame(rows, columns=cols)

    def to_json(self) -> dict[str, Any]:
        """JSON form (``keydiff find --json``)."""
        return {"schema": "keydiff/find", "version": 1, "checkpoint": self.checkpoint, "timm": self.timm,
                "searched": self.searched, "shortlisted": self.shortlisted,
                "candidates": [c.to_json() | {"command": c.command(self.checkpoint)} for c in self.candidates]}

    def dumps(self) -> str:
        """The JSON form as text."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from keydiff._render import _find

        yield from _find.render_found(self)

    def _repr_html_(self) -> str:
        from keydiff._render import _find, _html

        return _html.html_fragment(_find.render_found(self))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        import io

        from rich.console import Console

        console = Console(file=io.StringIO(), width=120)
        console.print(self)
        return {"text/plain": console.file.getvalue(), "text/html": self._repr_html_()}


# --- step 1: fingerprints -----------------------------------------------------------------------------------------


def _sizes(keys: Iterable[tuple[str, TensorInfo]]) -> Counter[int]:
    return Counter(info.numel for _, info in keys if info.shape and info.dtype.startswith(("float", "bfloat")))


def fingerprint_scores(checkpoint: KeySet, rows: Iterable[ModelRow], *, whole: bool = False) -> dict[int, float]:
    """Per key table, the share of weight (in elements) held in tensors of sizes both sides have, over the larger
    side's weight: 1.0 when the sizes are the same multiset, whatever the names. The model's side leaves out what an
    argument reshapes (its head, position table, stem) unless ``whole``: the defaults' exact sizes break ties.

    Example:
        >>> ck = KeySet.from_items([("a", TensorInfo((4, 4), "float32")), ("b", TensorInfo((4,), "float32"))])
        >>> row = ModelRow(name="m", table=0, num_classes=None, input_size=(), classifier=None, probes={},
        ...                fingerprint={16: 1, 8: 1})
        >>> round(fingerprint_scores(ck, [row])[0], 3)
        0.667
    """
    have = _sizes(checkpoint.items())
    total = sum(n * c for n, c in have.items())
    out: dict[int, float] = {}
    for row in rows:
        if row.table in out:
            continue
        theirs = Counter(row.fingerprint) + Counter(row.moved) if whole else row.fingerprint
        common = sum(n * min(c, theirs.get(n, 0)) for n, c in have.items())
        left_a = Counter({n: c - theirs.get(n, 0) for n, c in have.items() if c > theirs.get(n, 0)})
        left_b = Counter({n: c - have.get(n, 0) for n, c in theirs.items() if c > have.get(n, 0)})
        common += _split(left_a, left_b) + _split(left_b, left_a)
        out[row.table] = common / max(1, total, sum(n * c for n, c in theirs.items()))
    return out


def _split(whole: Counter[int], parts: Counter[int]) -> int:
    """Elements of ``whole``'s tensors that ``parts`` holds as 2 to 4 equal pieces (a fused ``qkv`` against
    separate ``q``, ``k``, ``v``); both counters lose what is paired."""
    common = 0
    for n in sorted(whole, reverse=True):
        for k in (3, 2, 4):
            if n % k:
                continue
            pairs = min(whole[n], parts.get(n // k, 0) // k)
            if pairs:
                whole[n] -= pairs
                parts[n // k] -= k * pairs
                common += n * pairs
    return common


# --- step 2: arguments from shapes --------------------------------------------------------------------------------


def _free_dims(base: tuple[int, ...], probe: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(base) != len(probe):
        return None
    return tuple(i for i, (a, b) in enumerate(zip(base, probe, strict=True)) if a != b)


def _linear(value_at: tuple[int, int], dims_at: tuple[int, int], dim: int) -> int | None:
    """The argument value that gives a dimension ``dim``, for a dimension linear in the argument through two points."""
    (v0, v1), (d0, d1) = value_at, dims_at
    if d1 == d0:
        return None
    v = v0 + (dim - d0) * (v1 - v0) / (d1 - d0)
    return round(v) if v >= 0 and abs(v - round(v)) < 1e-9 else None


def _quadratic(sides: tuple[int, int, int], dims: tuple[int, int, int], dim: int) -> int | None:
    """The side that gives a dimension ``dim``, for a dimension quadratic in the side through three points (a
    position table: prefix tokens plus a grid of side over patch, squared; or linear when the table is 2-D)."""
    (h0, h1, h2), (d0, d1, d2) = sides, dims
    # Newton's divided differences: d(h) = d0 + b (h - h0) + c (h - h0)(h - h1)
    b01 = (d1 - d0) / (h1 - h0)
    b12 = (d2 - d1) / (h2 - h1)
    c = (b12 - b01) / (h2 - h0)
    # d(h) = c h^2 + B h + C
    big_b = b01 - c * (h0 + h1)
    big_c = d0 - b01 * h0 + c * h0 * h1
    if abs(c) < 1e-12:
        h = (dim - big_c) / big_b if big_b else -1.0
    else:
        disc = big_b * big_b - 4 * c * (big_c - dim)
        if disc < 0:
            return None
        h = (-big_b + math.sqrt(disc)) / (2 * c)
    return round(h) if h > 0 and abs(h - round(h)) < 1e-6 else None


def _fit(missing: Mapping[str, tuple[tuple[int, ...], tuple[str, ...]]], unused: Mapping[str, tuple[int, ...]],
         reshaped: Mapping[str, list[int]], solve: Any) -> set[int] | None:
    """Values of one argument under which every missing key it reshapes finds an unused tensor of its new shape.

    None when the argument reshapes none of the missing keys (the default is not contradicted)."""
    keys = [k for k in reshaped if k in missing]
    if not keys:
        return None
    values: set[int] | None = None
    for k in keys:
        (base, near), probe = missing[k], tuple(reshaped[k])
        free = _free_dims(base, probe)
        if not free:
            return set()
        found = set()
        # the tensors the matcher names as this key's nearest, when it names any: a class token must not pass
        # for a one-token position table
        for shape in ([unused[c] for c in near if c in unused] or unused.values()):
            if len(shape) != len(base) or any(shape[i] != base[i] for i in range(len(base)) if i not in free):
                continue
            got = {solve(base[i], probe[i], shape[i], k, i) for i in free}
            if len(got) == 1 and None not in got:
                found |= got
        values = found if values is None else values & found
    return values


def _img_dims(row: ModelRow) -> Mapping[str, tuple[tuple[int, ...], ...]] | None:
    """Per key the img_size probes reshape, its shapes at the default side and the two probed sides."""
    side = int(row.input_size[-2]) if len(row.input_size) >= 2 else 224
    two, three = row.probes.get(f"img_size={2 * side}"), row.probes.get(f"img_size={3 * side}")
    if not two or not three or "error" in two or "error" in three:
        return None
    if two.get("added") or two.get("removed"):
        return None
    return {k: (tuple(two["reshaped"][k]), tuple(three["reshaped"].get(k, two["reshaped"][k])))
            for k in two["reshaped"]}


def infer_args(row: ModelRow, model: KeySet, d: Diff) -> tuple[dict[str, Any], list[str]]:
    """The arguments the checkpoint's shapes decide for one architecture, from a diff against its default keys.

    Returns:
        The arguments (defaults left out), and the arguments some missing key depends on that no single value fits.
    """
    missing = {m.key: (m.shape, m.candidates) for m in d.mapping.missing}
    unused = {u.key: u.shape for u in d.mapping.unused}
    args: dict[str, Any] = {}
    undecided: list[str] = []
    defaults = {"num_classes": row.num_classes, "in_chans": int(row.input_size[0]) if row.input_size else 3}
    reshaping = {k for name, p in row.probes.items() if name.startswith(("in_chans", "img_size")) and "error" not in p
                 for k in p.get("reshaped", {})}
    for arg, probe_name, probe_value in _ARG_PROBES:
        probe = row.probes.get(probe_name)
        default = defaults[arg]
        if not probe or "error" in probe or default is None:
            continue

        def solve(d0: int, d1: int, dim: int, key: str, i: int, v0: int = default, v1: int = probe_value) -> Any:
            return _linear((v0, v1), (d0, d1), dim)

        values = _fit(missing, unused, probe.get("reshaped", {}), solve)
        if values is None:
            continue
        if len(values) == 1:
            value = values.pop()
            if value != default:  # the default fits those keys: something else keeps them empty
                args[arg] = value
        elif not values and arg == "num_classes" and _headless(row, missing, reshaping):
            args[arg] = 0
        else:
            undecided.append(arg)
    img = _img_dims(row)
    if img:
        side = int(row.input_size[-2])

        def solve_img(d0: int, d1: int, dim: int, key: str, i: int) -> Any:
            return _quadratic((side, 2 * side, 3 * side), (d0, d1, img[key][1][i]), dim)

        values = _fit(missing, unused, {k: list(v[0]) for k, v in img.items()}, solve_img)
        if values is not None and len(values) == 1:
            value = values.pop()
            if value != side:
                args["img_size"] = value
        elif values is not None:
            undecided.append("img_size")
    return args, undecided


def _headless(row: ModelRow, missing: Mapping[str, Any], reshaping: set[str]) -> bool:
    """True when the checkpoint has no head: the keys ``num_classes=0`` removes are missing, and they are all that
    is missing but for keys another argument reshapes (otherwise the head is one of many gaps, which says nothing)."""
    probe = row.probes.get("num_classes=0")
    if not probe or "error" in probe or not probe["removed"]:
        return False
    removed = set(probe["removed"])
    return removed <= set(missing) and set(missing) <= removed | reshaping


def with_args(row: ModelRow, model: KeySet, args: Mapping[str, Any]) -> KeySet | None:
    """The architecture's keys under ``args``, extrapolated from the probes (None when they cannot say)."""
    items = dict(model.items())
    order = list(model)
    if args.get("num_classes") == 0:
        probe = row.probes.get("num_classes=0") or {}
        if "error" in probe:
            return None
        for k in probe["removed"]:
            items.pop(k, None)
        for k, shape in probe["reshaped"].items():
            items[k] = TensorInfo(tuple(shape), items[k].dtype)
        for k, shape, dtype in probe["added"]:
            items[k] = TensorInfo(tuple(shape), dtype)
            order.append(k)
    for arg, probe_name, probe_value in _ARG_PROBES:
        if arg not in args or args[arg] == 0:
            continue
        probe = row.probes.get(probe_name) or {}
        default = row.num_classes if arg == "num_classes" else int(row.input_size[0])
        for k, shape in probe.get("reshaped", {}).items():
            base = items[k].shape
            new = tuple(b + (args[arg] - default) * (p - b) // (probe_value - default)
                        for b, p in zip(base, shape, strict=True))
            items[k] = TensorInfo(new, items[k].dtype)
    if "img_size" in args:
        img = _img_dims(row)
        if img is None:
            return None
        side = int(row.input_size[-2])
        for k, (two, three) in img.items():
            base = model[k].shape
            items[k] = TensorInfo(tuple(_at_side((side, 2 * side, 3 * side), (b, t, h), args["img_size"])
                                        for b, t, h in zip(base, two, three, strict=True)), items[k].dtype)
    return KeySet.from_items([(k, items[k]) for k in order if k in items], origin=model.origin,
                             order_is_evidence=True)


def _at_side(sides: tuple[int, int, int], dims: tuple[int, int, int], side: int) -> int:
    (h0, h1, h2), (d0, d1, d2) = sides, dims
    b01 = (d1 - d0) / (h1 - h0)
    c = ((d2 - d1) / (h2 - h1) - b01) / (h2 - h0)
    return round(d0 + b01 * (side - h0) + c * (side - h0) * (side - h1))


# --- step 3: the real match ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scored:
    row: ModelRow
    args: dict[str, Any]
    undecided: tuple[str, ...]
    keys: KeySet
    diff: Diff
    similarity: float


def _score_table(rows: list[ModelRow], model: KeySet, ckpt: KeySet, similarity: float) -> list[_Scored]:
    """Each architecture of one key table, matched with the arguments the checkpoint implies for it."""
    def classifier(row: ModelRow) -> Any:
        return lambda: (row.classifier,) if isinstance(row.classifier, str) else tuple(row.classifier or ())

    first = compare_keys(model, ckpt, classifier=classifier(rows[0]))
    seen: dict[str, tuple[KeySet, Diff]] = {}  # architectures of one table mostly probe alike: match once
    out = []
    for row in rows:
        args: dict[str, Any] = {}
        undecided: list[str] = []
        keys, d = model, first
        if not first.ok:
            args, undecided = infer_args(row, model, first)
            adjusted = with_args(row, model, args) if args else None
            if adjusted is not None:
                ident = json.dumps([row.probes, sorted(args.items()), row.num_classes, row.input_size], default=str)
                if ident not in seen:
                    seen[ident] = adjusted, compare_keys(adjusted, ckpt, classifier=classifier(row))
                if seen[ident][1].ok:
                    keys, d = seen[ident]
                else:  # arguments that do not make it fit are a guess: the defaults and their diff stand
                    undecided += [a for a in args if a not in undecided]
                    args = {}
        out.append(_Scored(row, args, tuple(undecided), keys, d, similarity))
    return out


def _candidate(group: list[_Scored], ckpt: KeySet) -> Candidate:
    first = group[0]
    d = first.diff
    used = len({s for e in d.mapping.entries for s in e.source})
    cause = "" if d.ok else next((g.message for g in d.diagnoses if g.level == "warning"), d.problem)
    open_args = tuple(a for a in _SHAPE_FREE if a in first.row.params) + first.undecided
    if not first.row.probes and not d.ok:
        open_args += ("num_classes, in_chans, img_size (not probed in this index)",)
    return Candidate(names=tuple(s.row.name for s in group), args={s.row.name: s.args for s in group},
                     open_args=open_args, filled=len(d.mapping.entries), model_keys=len(first.keys), used=used,
                     tensors=len(ckpt), by_name=d.exact, fits=d.ok, cause=cause,
                     similarity=max(s.similarity for s in group))


def _group(scored: list[_Scored]) -> list[list[_Scored]]:
    """Scored architectures grouped by identical keys and shapes (under their arguments), fewest arguments first."""
    groups: dict[tuple, list[_Scored]] = {}
    for s in scored:
        ident = tuple((k, info.shape) for k, info in s.keys.items())
        groups.setdefault(ident, []).append(s)
    return [sorted(g, key=lambda s: (len(s.args), natural_key(s.row.name))) for g in groups.values()]


def _verify(c: Candidate, keys: KeySet) -> bool:
    from keydiff._errors import KeydiffError
    from keydiff._model import read_model

    try:
        built = read_model(c.name, c.model_args())
    except KeydiffError:
        return False
    return [(k, i.shape) for k, i in built.items()] == [(k, i.shape) for k, i in keys.items()]


def find(checkpoint: Any, *, top: int = 5, names: Iterable[str] | None = None, index: Index | None = None,
         verify: int = 1, key: str | None = None, unsafe_pickle: bool = False) -> Found:
    """Which timm architecture a checkpoint belongs to, with the arguments its shapes imply.

    Args:
        checkpoint: a checkpoint path (any format ``keydiff`` reads) or a ``KeySet``.
        top: how many candidates to return.
        names: search only these timm names (default: every architecture in the index).
        index: the index to search (default: the packaged one for this timm version, else the cached one, built
            on first use).
        verify: build this many of the best candidates with their arguments on the meta device and check their
            keys and shapes against what was matched (imports timm; 0: trust the index).
        key: which tensor dict inside a training checkpoint to use.
        unsafe_pickle: allow pickled code (only for files you trust).

    Returns:
        A ``Found``: ranked candidates, their arguments and how completely each fits.

    Raises:
        InputError: the checkpoint cannot be read, or it holds no floating-point tensor to compare.

    Example:
        >>> found = keydiff.find("resnet50_a1.pth")  # doctest: +SKIP
        >>> found.best.name, found.best.fits          # doctest: +SKIP
        ('resnet50', True)
    """
    if top < 1:
        raise UsageError(f"top must be at least 1: {top!r}")
    if isinstance(checkpoint, KeySet):
        ckpt, shown = checkpoint, checkpoint.origin
    else:
        from keydiff._sources import read_checkpoint

        ckpt, shown = read_checkpoint(checkpoint, key=key, unsafe_pickle=unsafe_pickle).keys, str(checkpoint)
    if not _sizes(ckpt.items()):
        raise UsageError(f"{shown}: holds no floating-point tensor, so no architecture can be recognised in it")
    index = index or load_index()
    if index is None:
        raise UsageError("no timm index: caching is off (KEYDIFF_NO_CACHE) and the packaged index is for another "
                         "timm; build one with python -m keydiff._index OUT.zip")
    if names is not None:
        index = index.restrict(names)
    exact = fingerprint_scores(ckpt, index.rows, whole=True)
    # the body alone is fair to another head or image size; the whole, to a checkpoint with the defaults (against
    # models whose heads the index could not tell apart, which are scored whole either way)
    scores = {t: max(v, exact[t]) for t, v in fingerprint_scores(ckpt, index.rows).items()}
    # variants of one architecture tie on the body: the sizes of the head and position table at the defaults decide
    tables = sorted(scores, key=lambda t: (-round(scores[t], 2), -exact[t]))[:SHORTLIST]
    rows_of: dict[int, list[ModelRow]] = {}
    for row in index.rows:
        rows_of.setdefault(row.table, []).append(row)
    scored: list[_Scored] = []
    best = max((scores[t] for t in tables), default=0.0)
    fitted_at = None
    for i, table in enumerate(tables):
        near = scores[table] >= best - NEAR
        if scores[table] < RESEMBLANCE * best or scores[table] <= 0 or (i >= max(MATCHED, top) and not near):
            break
        if fitted_at is not None and i > fitted_at + 2:
            break  # a complete fit is found: two tables more for ties, not the whole near-tie tail
        model = index.keys(table, origin=rows_of[table][0].name)
        found = _score_table(rows_of[table], model, ckpt, scores[table])
        scored += found
        if fitted_at is None and any(s.diff.ok and not s.diff.mapping.unused for s in found):
            fitted_at = i
    groups = _group(scored)
    candidates = sorted((_candidate(g, ckpt) for g in groups), key=lambda c: c.rank_key)[:top]
    keys_of = {g[0].row.name: g[0].keys for g in groups}
    diffs = {g[0].row.name: g[0].diff for g in groups}
    out = [c if i >= verify else _with_verified(c, _verify(c, keys_of[c.name])) for i, c in enumerate(candidates)]
    return Found(checkpoint=shown, candidates=tuple(out), searched=len(index.rows), shortlisted=len(tables),
                 timm=index.timm, diffs={c.name: diffs[c.name] for c in out})


def _with_verified(c: Candidate, ok: bool) -> Candidate:
    from dataclasses import replace

    return replace(c, verified=ok)
