"""Tensor values: per-tensor statistics of a checkpoint, and what changed between two checkpoints.

    stats(checkpoint)     one row per tensor (see ``keydiff._stats``) of a path, a state dict, a module or a Diff
    compare(a, b)         a ``ValueDiff``: per matched tensor (through the proposed mapping when names differ) the
                          max abs diff, relative L2 change, cosine similarity and bit-identity, summarised per cluster

Memory stays bounded: tensors are read one at a time (safetensors maps them, torch zip files are memory-mapped) and
every sum accumulates in float64 over slices of ``CHUNK`` elements, so no float64 copy of a whole tensor is ever
made. A rich progress bar (on stderr) shows on long runs.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keydiff._diff import DEFAULT_MIN_CONFIDENCE, Diff, _InMemory, diff
from keydiff._errors import UsageError
from keydiff._keys import KeySet, natural_key
from keydiff._patterns import fill_template, template_of
from keydiff._stats import CHUNK, _as_float, _ticker, tensor_stats

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["ClusterChange", "TensorChange", "ValueDiff", "compare", "compare_values", "stats"]


# ------------------------------------------------------------------------------------------------------ stats


def stats(checkpoint: Any, *, key: str | None = None, unsafe_pickle: bool = False,
          progress: bool | None = None) -> pd.DataFrame:
    """Per-tensor statistics of a checkpoint, computed tensor by tensor with bounded memory.

    Args:
        checkpoint: a checkpoint path, a state dict, an ``nn.Module`` or a ``Diff`` (its checkpoint side).
        key: which tensor dict inside a training checkpoint to use; default: chosen as ``diff`` does.
        unsafe_pickle: allow pickled code (only for files you trust).
        progress: show a progress bar: True, False, or None for long runs on a terminal only.

    Returns:
        A DataFrame, one row per tensor: ``key, shape, dtype, numel, mean, std, min, max, abs_max, zero_frac, nan,
        inf, flag`` (moments over the finite elements; ``flag`` names NaN, Inf and all-zero tensors).

    Example:
        >>> import torch
        >>> df = stats({"w": torch.tensor([1.0, float("nan"), 0.0]), "b": torch.zeros(2)})
        >>> df[["key", "mean", "nan", "flag"]].values.tolist()
        [['w', 0.5, 1, 'nan'], ['b', 0.0, 0, 'all zero']]
    """
    if isinstance(checkpoint, Diff):
        return tensor_stats(checkpoint.source, checkpoint.checkpoint, progress=progress)
    source, keys = _values_of(checkpoint, key=key, unsafe_pickle=unsafe_pickle, what="stats")
    return tensor_stats(source, keys, progress=progress)


def _values_of(obj: Any, *, key: str | None, unsafe_pickle: bool, what: str) -> tuple[Any, KeySet]:
    """A lazy tensor source and its keys, for a checkpoint path, a state dict or a module."""
    from keydiff._model import keyset_of

    if isinstance(obj, (str, os.PathLike)):
        from keydiff._sources import is_checkpoint_path, read_checkpoint

        if not is_checkpoint_path(os.fspath(obj)):
            raise UsageError(f"{what} needs tensor values: {os.fspath(obj)!r} is not a checkpoint file (a model "
                             "name has no trained values; give a checkpoint, a state dict or an nn.Module)")
        ckpt = read_checkpoint(obj, key=key, unsafe_pickle=unsafe_pickle)
        return ckpt, ckpt.keys
    tensors = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else obj
    if not isinstance(tensors, Mapping):
        raise UsageError(f"{what} needs a checkpoint path, a state dict or an nn.Module, got {type(obj).__name__}")
    return _InMemory(tensors), keyset_of(tensors, origin=type(obj).__name__)


# ---------------------------------------------------------------------------------------------------- compare


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorChange:
    """How one tensor of A differs from its counterpart in B (B converted through the mapping)."""

    key: str
    """A's key (the "model" side)."""
    source: tuple[str, ...]
    """B's keys it was made from."""
    op: str
    """The op that turned B's tensors into A's layout (``rename``, ``concat 3 along dim 0``...)."""
    shape: tuple[int, ...]
    """The tensor's shape."""
    dtype_a: str
    """A's dtype."""
    dtype_b: str
    """B's dtype."""
    max_abs_diff: float
    """``max |b - a|``."""
    rel_change: float
    """``||b - a|| / ||a||`` (L2); 0 when equal, inf when A is all zero and B is not."""
    cosine: float
    """Cosine similarity of the flattened tensors; NaN when exactly one of them is all zero."""
    identical: bool
    """Bit-exact: same dtype and the same bytes."""

    a_all_zero: bool = False
    """A's tensor is all zero (then ``rel_change`` and ``cosine`` say nothing about B's)."""

    @property
    def was_zero(self) -> bool:
        """A is all zero and B is not (and finite): no relative change or cosine exists (reported as "was
        zero"); NaN or Inf in B stays a non-finite change."""
        return self.a_all_zero and self.rel_change != 0 and math.isfinite(self.max_abs_diff)

    @property
    def cluster(self) -> str:
        """The key's template, ``blocks.{}.attn.qkv.weight``."""
        return template_of(self.key)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterChange:
    """The changes of one cluster of tensors (``blocks.{0..11}.attn.qkv.weight``), summarised."""

    cluster: str
    """The template with its index set filled in."""
    tensors: int
    """How many tensors."""
    identical: int
    """How many of them are bit-identical."""
    median_rel_change: float
    """Median of ``rel_change``."""
    max_rel_change: float
    """Largest ``rel_change``."""
    min_cosine: float
    """Smallest cosine similarity."""
    max_abs_diff: float
    """Largest ``max_abs_diff``."""
    was_zero: int = 0
    """How many tensors are all zero in A and not in B; the relative changes and cosine are of the others (NaN
    when there are none)."""

    def __str__(self) -> str:
        if self.was_zero == self.tensors:
            return f"{self.cluster}: was zero in A"
        return f"{self.cluster}: median rel. change {format_change(self.median_rel_change)}"


def format_change(x: float) -> str:
    """A relative change as a percentage, readable from 1e-9 to 1e3.

    Example:
        >>> format_change(0.031), format_change(0.0), format_change(2e-9)
        ('3.1%', '0%', '2.0e-07%')
    """
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0:
        return "0%"
    pct = x * 100
    return f"{pct:.1e}%" if pct < 0.01 else f"{pct:.3g}%"


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _nan_first(x: float) -> float:
    return -math.inf if math.isnan(x) else x


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ValueDiff:
    """What changed between the values of two checkpoints, tensor by tensor and per cluster.

    Example:
        >>> import torch
        >>> a = {"blocks.0.w": torch.ones(4), "blocks.1.w": torch.ones(4)}
        >>> vd = compare(a, {"module.blocks.0.w": torch.ones(4), "module.blocks.1.w": torch.full((4,), 1.1)})
        >>> vd.identical, [str(c) for c in vd.clusters]
        (False, ['blocks.{0,1}.w: median rel. change 5%'])
    """

    a: str
    """Where A came from (the reference: the "model" side of the mapping)."""
    b: str
    """Where B came from (converted into A's names and layout before comparing)."""
    changes: tuple[TensorChange, ...]
    """One per matched tensor, in A's order."""
    missing: tuple[str, ...] = ()
    """A's keys with no counterpart in B: not compared."""
    unused: tuple[str, ...] = ()
    """B's tensors no entry uses: not compared."""

    @property
    def identical(self) -> bool:
        """True when every compared tensor is bit-identical and every tensor of both sides was compared."""
        return all(c.identical for c in self.changes) and not self.missing and not self.unused

    @property
    def clusters(self) -> tuple[ClusterChange, ...]:
        """Per cluster, the most changed first (NaN, from non-finite values, before everything)."""
        groups: dict[str, list[TensorChange]] = {}
        for c in self.changes:
            groups.setdefault(c.cluster, []).append(c)
        out = []
        for tpl, members in groups.items():
            # a tensor that was zero in A has no relative change or cosine: the others' are summarised
            measured = [c for c in members if not c.was_zero]
            rel = [c.rel_change for c in measured]
            out.append(ClusterChange(
                cluster=fill_template(tpl, [template_of(c.key)[1] for c in members]), tensors=len(members),
                identical=sum(c.identical for c in members),
                median_rel_change=math.nan if not rel or any(map(math.isnan, rel)) else statistics.median(rel),
                max_rel_change=max(rel, key=_nan_last, default=math.nan),
                min_cosine=min((c.cosine for c in measured), key=_nan_first, default=math.nan),
                max_abs_diff=max((c.max_abs_diff for c in members), key=_nan_last),
                was_zero=len(members) - len(measured)))
        # most changed first: NaN (non-finite values), then clusters that were zero in A, then by change
        out.sort(key=lambda g: (-_nan_last(g.median_rel_change) if g.was_zero < g.tensors else -math.inf,
                                -_nan_last(g.max_rel_change), natural_key(g.cluster)))
        return tuple(out)

    def to_frame(self) -> pd.DataFrame:
        """One row per compared tensor, in A's order: ``key, source, op, cluster, layer, shape, dtype_a, dtype_b,
        max_abs_diff, rel_change, cosine, identical`` (``layer`` is the key's first index, for per-layer plots)."""
        import pandas as pd

        rows = [(c.key, ", ".join(c.source), c.op, c.cluster, next(iter(template_of(c.key)[1]), None), c.shape,
                 c.dtype_a, c.dtype_b, c.max_abs_diff, c.rel_change, c.cosine, c.identical) for c in self.changes]
        cols = ["key", "source", "op", "cluster", "layer", "shape", "dtype_a", "dtype_b", "max_abs_diff",
                "rel_change", "cosine", "identical"]
        return pd.DataFrame(rows, columns=cols).astype({"layer": "Int64"})

    def by_cluster(self) -> pd.DataFrame:
        """One row per cluster, the most changed first: ``cluster, tensors, identical, median_rel_change,
        max_rel_change, min_cosine, max_abs_diff``."""
        import pandas as pd

        cols = ["cluster", "tensors", "identical", "median_rel_change", "max_rel_change", "min_cosine",
                "max_abs_diff"]
        return pd.DataFrame([[getattr(g, c) for c in cols] for g in self.clusters], columns=cols)

    def to_markdown(self) -> str:
        """The report as GitHub-flavoured markdown."""
        from keydiff._render import _markdown, _values

        return _markdown.render_markdown(_values.render_values(self))

    def to_html(self) -> str:
        """The report as one standalone HTML file."""
        from keydiff._render import _html, _values

        return _html.render_html(_values.render_values(self), title=f"keydiff: {self.a} vs {self.b}")

    def __repr__(self) -> str:
        same = sum(c.identical for c in self.changes)
        return (f"ValueDiff(a={self.a!r}, b={self.b!r}, changes=<{len(self.changes)} tensors, {same} identical>, "
                f"missing={len(self.missing)}, unused={len(self.unused)})")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from keydiff._render import _values

        yield from _values.render_values(self)

    def _repr_html_(self) -> str:
        from keydiff._render import _html, _values

        return _html.html_fragment(_values.render_values(self))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        import io

        from rich.console import Console

        console = Console(file=io.StringIO(), width=120)
        console.print(self)
        return {"text/plain": console.file.getvalue(), "text/html": self._repr_html_()}


def _change(key: str, source: tuple[str, ...], op: str, a: torch.Tensor, b: torch.Tensor) -> TensorChange:
    import torch

    fa, fb = _as_float(a), _as_float(b)
    same_dtype = a.dtype == b.dtype
    identical = same_dtype
    ssd = ssa = ssb = dot = 0.0
    max_abs = 0.0
    for start in range(0, fa.numel(), CHUNK):
        ca, cb = fa[start:start + CHUNK], fb[start:start + CHUNK]
        if identical:
            # bytes, not values: NaN payloads and the sign of zero count, as they would in the file
            identical = _same_bytes(ca, cb)
        xa, xb = ca.to(torch.float64), cb.to(torch.float64)
        d = xb - xa
        ssd += float((d * d).sum())
        ssa += float((xa * xa).sum())
        ssb += float((xb * xb).sum())
        dot += float((xa * xb).sum())
        if d.numel():
            max_abs = max(max_abs, float(d.abs().max()), key=_nan_last)
    # relative to A's norm; an all-zero A leaves only "unchanged" (0) or "anything" (inf)
    rel = math.sqrt(ssd / ssa) if ssa > 0 else 0.0 if ssd == 0 else math.nan if math.isnan(ssd) else math.inf
    cosine = dot / math.sqrt(ssa * ssb) if ssa > 0 and ssb > 0 else 1.0 if ssa == ssb == 0 else math.nan
    return TensorChange(key=key, source=source, op=op, shape=tuple(a.shape),
                        dtype_a=str(a.dtype).removeprefix("torch."), dtype_b=str(b.dtype).removeprefix("torch."),
                        max_abs_diff=max_abs, rel_change=rel, cosine=cosine, identical=identical,
                        a_all_zero=ssa == 0)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    try:
        return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    except RuntimeError:  # a dtype that cannot be viewed as bytes: fall back to value equality
        return torch.equal(a, b)


def compare_values(d: Diff, reference: Any, *, progress: bool | None = None) -> ValueDiff:
    """Compare the tensors of ``reference`` (the model side of ``d``) with ``d``'s checkpoint, through the mapping.

    Args:
        d: a diff whose model side is a checkpoint, state dict or module with values.
        reference: loads the model side's tensors by key (``tensors(keys)``).
        progress: show a progress bar: True, False, or None for long runs on a terminal only.
    """
    entries = d.mapping.entries
    a_tensors = reference.tensors([e.target for e in entries])
    b_tensors = d.source.tensors([k for e in entries for k in e.source])
    nbytes = sum(d.model[e.target].nbytes for e in entries)
    changes = []
    with _ticker(len(entries), nbytes, progress, "comparing") as tick:
        for e in entries:
            _, a = next(a_tensors)
            b = e.op.apply([next(b_tensors)[1] for _ in e.source], e.target_shape)
            changes.append(_change(e.target, e.source, e.op.describe(), a, b))
            tick()
    return ValueDiff(a=d.model.origin, b=d.checkpoint.origin, changes=tuple(changes),
                     missing=tuple(m.key for m in d.mapping.missing), unused=tuple(u.key for u in d.mapping.unused))


def compare(a: Any, b: Any, *, key: str | None = None, unsafe_pickle: bool = False,
            min_confidence: float = DEFAULT_MIN_CONFIDENCE, progress: bool | None = None) -> ValueDiff:
    """What changed between two checkpoints' values: fine-tuning's footprint, or proof a conversion is bit-exact.

    B's tensors are matched to A's by ``keydiff.diff(a, b)`` (so names may differ: the proposed mapping renames,
    fuses and reshapes B into A's layout first), then compared tensor by tensor with bounded memory.

    Args:
        a: the reference: a checkpoint path, a state dict or an ``nn.Module``.
        b: the other checkpoint: a path or a state dict.
        key: which tensor dict inside B, if B is a training checkpoint.
        unsafe_pickle: allow pickled code (only for files you trust).
        min_confidence: proposals below this are not used (their tensors are reported as not compared).
        progress: show a progress bar: True, False, or None for long runs on a terminal only.

    Returns:
        A ``ValueDiff``: ``.to_frame()`` per tensor, ``.by_cluster()`` per cluster, and a report when displayed.

    Raises:
        UsageError: ``a`` has no values (a model name).
        InputError: an input cannot be read.

    Example:
        >>> vd = keydiff.compare("base.safetensors", "finetuned.safetensors")  # doctest: +SKIP
        >>> vd.by_cluster().head(3)  # doctest: +SKIP
    """
    reference, _ = _values_of(a, key=None, unsafe_pickle=unsafe_pickle, what="compare")
    d = diff(a, b, key=key, unsafe_pickle=unsafe_pickle, min_confidence=min_confidence)
    return compare_values(d, reference, progress=progress)
