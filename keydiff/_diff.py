"""``diff()``: read both sides, unwrap, match exactly, cluster, match the rest, and return a frozen ``Diff``.

The engine never prints or logs; a ``Diff`` renders itself (rich in a terminal, HTML in Jupyter) and exports
frames, JSON and converted checkpoints on demand.
"""

from __future__ import annotations

import heapq
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import chain
from typing import TYPE_CHECKING, Any

from keydiff._account import account_unused
from keydiff._diagnose import Diagnosis, diagnose
from keydiff._fold import (
    FOLD_MIN_KEYS,
    FOLD_MIN_SHARE,
    Folding,
    align_folds,
    can_pair,
    expand_entries,
    fold_keys,
    fold_labels,
)
from keydiff._keys import KeySet, natural_key
from keydiff._layouts import layout_conventions
from keydiff._mapping import Entry, Evidence, KeyMap, Leftover, Unwrap, compress_rules
from keydiff._match import STRONG_NAME, Pairing, match_units, name_similarity, shape_relation
from keydiff._model import keyset_of, read_model
from keydiff._normalize import Prefix, find_prefix
from keydiff._ops import Op
from keydiff._patterns import Cluster, Unit, build_clusters, build_units, structural_order, template_of
from keydiff._stacking import gather_pieces
from keydiff._ties import explain_copies, explain_held, fill_twins, hide_twins, one_of_copies
from keydiff._weightnorm import explain_refused, fold_entries, plan_weight_norm, split_plain

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from rich.console import Console, ConsoleOptions, RenderResult

__all__ = ["DEFAULT_MIN_CONFIDENCE", "Diff", "diff"]

DEFAULT_MIN_CONFIDENCE = 0.5
"""Proposals below this confidence are reported but not applied."""


class _InMemory:
    """Tensors already in memory, behind the same lazy interface as a checkpoint file."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self._tensors = tensors

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def tensors(self, keys: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return ((k, self._tensors[k]) for k in keys)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Diff:
    """The result of comparing a model's keys with a checkpoint's: facts, a mapping, and the causes.

    Example:
        >>> import torch
        >>> d = diff({"blocks.0.w": torch.zeros(2)}, {"module.blocks.0.w": torch.ones(2)})
        >>> d.ok, d.mapping.unwrap.strip_prefix
        (True, 'module.')
    """

    model: KeySet
    """The model's keys."""
    checkpoint: KeySet
    """The checkpoint's keys, as stored."""
    mapping: KeyMap
    """The applied mapping: entries at or above ``min_confidence``."""
    proposals: tuple[Entry, ...]
    """Every proposed entry, applied or not (below ``min_confidence``)."""
    diagnoses: tuple[Diagnosis, ...]
    """Causes in plain words."""
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    """The threshold used."""
    checkpoint_format: str = ""
    """How the checkpoint was stored (``safetensors``, ``torch-zip``...)."""
    source: Any = field(default=None, repr=False, compare=False)
    """Loads the checkpoint's tensors lazily."""

    @property
    def ok(self) -> bool:
        """True when every model key is filled and every unused checkpoint tensor has an expected reason (another
        tower, a head the model lacks, training state, a buffer): the CLI's exit 0."""
        return self.mapping.accounted

    @property
    def problem(self) -> str:
        """Why ``ok`` is False, in a few words (empty when it is True)."""
        parts = []
        if self.mapping.missing:
            parts.append(f"{len(self.mapping.missing)} model keys are unresolved")
        unexplained = self.mapping.unexplained
        if unexplained:
            depth = sum(u.kind == "depth" for u in unexplained)
            what = f" ({depth} in blocks the model does not have)" if depth else ""
            parts.append(f"{len(unexplained)} checkpoint tensors are left unused without a reason{what}")
        return " and ".join(parts)

    @property
    def exact(self) -> int:
        """Model keys filled by the same name (after unwrapping)."""
        return sum(e.evidence.method in ("exact", "prefix") for e in self.mapping.entries)

    @property
    def clusters(self) -> ClusterTable:
        """Clusters of both sides with their status and counterpart."""
        return _cluster_table(self)

    def tensor(self, key: str) -> torch.Tensor:
        """Load one checkpoint tensor (by its stored name)."""
        return self.source.tensor(key)

    def stats(self, *, progress: bool | None = None) -> pd.DataFrame:
        """Per-tensor statistics of the checkpoint, one tensor at a time (see ``keydiff.stats``)."""
        from keydiff._stats import tensor_stats

        return tensor_stats(self.source, self.checkpoint, progress=progress)

    def to_markdown(self, *, show_exact: bool = False) -> str:
        """The report as GitHub-flavoured markdown, to paste into an issue."""
        from keydiff._render import _markdown, _rich

        return _markdown.render_markdown(_rich.render_diff(self, show_exact=show_exact))

    def to_html(self, *, show_exact: bool = False) -> str:
        """The report as one standalone HTML file (no network assets)."""
        from keydiff._render import _html, _rich

        return _html.render_html(_rich.render_diff(self, show_exact=show_exact))

    def to_python(self) -> str:
        """The mapping as a self-contained ``checkpoint_filter_fn(state_dict, model=None)`` that needs only torch."""
        from keydiff import __version__
        from keydiff._render._python import emit_python

        return emit_python(self.mapping, version=__version__)

    def apply(self, *, partial: bool = False) -> dict[str, torch.Tensor]:
        """The converted state dict, ready for ``model.load_state_dict(sd, strict=True)``.

        Raises:
            MappingMismatch: some model keys are unresolved and ``partial`` is False.
        """
        from keydiff._errors import MappingMismatch

        if not self.ok and not partial:
            raise MappingMismatch(f"{self.problem}; apply(partial=True) converts the rest")
        needed = sorted({k for e in self.mapping.entries for k in e.source}, key=natural_key)
        return self.mapping.apply(dict(self.source.tensors(needed)))

    def with_entries(self, entries: Iterable[Entry]) -> Diff:
        """The same comparison with another applied set (what running the models proved): the mapping's rules and
        leftovers and the diagnoses that depend on them are worked out again; proposals for keys ``entries`` leaves
        empty stay as they were."""
        prefix = Prefix(strip=self.mapping.unwrap.strip_prefix, add=self.mapping.unwrap.add_prefix)
        order_of = {k: i for i, k in enumerate(self.model)}
        applied = tuple(sorted(entries, key=lambda e: order_of[e.target]))
        filled = {e.target for e in applied}
        proposed = [*applied, *(e for e in self.proposals if e.target not in filled)]
        named = {prefix.apply(raw): raw for raw in self.checkpoint}
        mismatched = {k: self.checkpoint[named[k]].shape for k in self.model if k in named and k not in filled}
        mapping = _keymap(self.model, self.checkpoint, applied, proposed, mismatched, prefix,
                          self.mapping.unwrap.container, self.min_confidence)
        # the prefix counts, the container choice and the matcher's notes are facts of reading, not of the mapping
        kept = {k: [g for g in self.diagnoses if g.kind == k] for k in ("prefix", "container", "non_tensor", "note")}
        fresh = [g for g in diagnose(self.model, self.checkpoint, mapping, prefix, container="", alternatives=(),
                                     non_tensor=(), notes=()) if g.kind != "prefix"]
        lead = [g for g in fresh if g.kind == "coverage"]
        diagnoses = (*lead, *kept["prefix"], *kept["container"], *kept["non_tensor"],
                     *(g for g in fresh if g.kind != "coverage"), *kept["note"])
        return replace(self, mapping=mapping, proposals=tuple(proposed), diagnoses=diagnoses)

    def to_frame(self) -> pd.DataFrame:
        """One row per key of both sides: ``side, key, shape, status, counterpart, op, confidence, cluster``."""
        from keydiff._render import _frame

        return _frame.diff_frame(self)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from keydiff._render import _rich

        yield from _rich.render_diff(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from keydiff._render import _rich

        return _rich.mimebundle(self)

    def __repr__(self) -> str:
        """The verdict and the counts, for a plain interpreter; rich and Jupyter show the whole report."""
        from keydiff._render import _rich

        m = self.mapping
        return (f"Diff({_rich.verdict(self).plain}; model {self.model.origin!r} ({len(self.model)} keys), "
                f"checkpoint {self.checkpoint.origin!r} ({len(self.checkpoint)} keys): {len(m.entries)} entries, "
                f"{len(m.missing)} missing, {len(m.unused)} unused, {len(self.diagnoses)} diagnoses)")


@dataclass(frozen=True, slots=True)
class ClusterRow:
    """One cluster of one side."""

    side: str
    label: str
    keys: int
    status: str
    counterpart: str
    confidence: float | None


@dataclass(frozen=True, slots=True)
class ClusterTable:
    """Clusters of both sides: what each became."""

    rows: tuple[ClusterRow, ...]

    def to_frame(self) -> pd.DataFrame:
        """One row per cluster: ``side, cluster, keys, status, counterpart, confidence``."""
        import pandas as pd

        return pd.DataFrame([(r.side, r.label, r.keys, r.status, r.counterpart, r.confidence) for r in self.rows],
                            columns=["side", "cluster", "keys", "status", "counterpart", "confidence"])

    def _repr_html_(self) -> str:
        return self.to_frame()._repr_html_()


def _cluster_table(d: Diff) -> ClusterTable:
    by_target = {e.target: e for e in d.mapping.entries}
    by_source = {k: e for e in d.mapping.entries for k in e.source}
    rows = []
    for side, keys, lookup in (("model", d.model, by_target), ("checkpoint", d.checkpoint, by_source)):
        for c in build_clusters(build_units(keys, keys)):
            found = [lookup.get(k) for u in c.units for k in u.keys]
            hits = [e for e in found if e is not None]
            methods = {e.evidence.method for e in hits}
            status = ("unresolved" if side == "model" else "unused") if not hits else (
                "exact" if methods <= {"exact", "prefix"} else "mapped")
            if hits and len(hits) < len(found):
                status = "partial"
            other = sorted({k for e in hits for k in (e.source if side == "model" else (e.target,))},
                           key=natural_key)
            counterpart = _summarise(other)
            conf = min((e.confidence for e in hits), default=None)
            rows.append(ClusterRow(side, c.label, len(found), status, counterpart, conf))
    return ClusterTable(tuple(rows))


def _summarise(keys: list[str]) -> str:
    if not keys:
        return ""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for k in keys:
        tpl, ix = template_of(k)
        groups.setdefault(tpl, []).append(ix)
    from keydiff._patterns import fill_template

    return ", ".join(fill_template(t, ix) for t, ix in groups.items())


# ------------------------------------------------------------------------------------------------ the engine

def _model_side(model: Any, model_args: Mapping[str, Any], unsafe_pickle: bool) -> KeySet:
    if isinstance(model, KeySet):
        return model
    if isinstance(model, (str, os.PathLike)):
        from keydiff._sources import is_checkpoint_path, read_checkpoint

        spec = os.fspath(model)
        from keydiff._hub import model_folder

        if is_checkpoint_path(spec) and model_folder(spec) is None:
            ks = read_checkpoint(spec, unsafe_pickle=unsafe_pickle).keys
            return ks if ks.order_is_evidence else _reorder(ks)
        return read_model(spec, model_args)
    return keyset_of(model, origin=type(model).__name__)


def _large_safetensors(spec: Any) -> bool:
    """Whether ``spec`` is a single safetensors file whose header is large enough to read on another core."""
    from keydiff._background import MIN_BYTES

    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec).endswith(".safetensors"):
        return False
    try:
        with open(spec, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and int.from_bytes(head, "little") >= MIN_BYTES


def _reorder(ks: KeySet) -> KeySet:
    return KeySet.from_items(((k, ks[k]) for k in structural_order(ks)), origin=ks.origin, order_is_evidence=False)


def diff(model: Any, checkpoint: Any, *, key: str | None = None, unsafe_pickle: bool = False,
         min_confidence: float = DEFAULT_MIN_CONFIDENCE, **model_args: Any) -> Diff:
    """Compare a model's keys with a checkpoint's and propose a mapping.

    Args:
        model: a timm model name, ``package.module:callable``, a checkpoint path (checkpoint vs checkpoint), an
            ``nn.Module``, a state dict, or a ``KeySet``.
        checkpoint: a checkpoint path (safetensors, sharded, PyTorch) or a state dict.
        key: which tensor dict inside a training checkpoint to use (``model_ema``); default: chosen and reported.
        unsafe_pickle: allow pickled code (only for files you trust).
        min_confidence: proposals below this are reported but not applied.
        **model_args: keyword arguments for ``timm.create_model`` or the callable.

    Returns:
        A ``Diff``; ``diff.ok`` tells whether every model key is filled.

    Raises:
        InputError: an input cannot be read (see ``keydiff.InputError``'s subclasses).
    """
    background = None
    if isinstance(checkpoint, (str, os.PathLike)) and _large_safetensors(model):
        from keydiff._background import BackgroundKeys

        # two large headers: the model's is parsed on the other core while this process parses the checkpoint's
        background = BackgroundKeys(lambda: _model_side(model, model_args, unsafe_pickle))
    else:
        model_keys = _model_side(model, model_args, unsafe_pickle)
    if isinstance(checkpoint, (str, os.PathLike)):
        from keydiff._sources import read_checkpoint

        try:
            ckpt = read_checkpoint(checkpoint, key=key, unsafe_pickle=unsafe_pickle)
        except BaseException:
            if background is not None:
                background.close()
            raise
        ahead = None
        if background is not None:
            # while the child reads the model's header: fold the checkpoint's keys, which the engine will want if
            # no name matches and no prefix is stripped (it checks, and folds again otherwise)
            if len(ckpt.keys) >= FOLD_MIN_KEYS // 2:
                ahead = fold_keys(list(ckpt.keys), ckpt.keys)
            model_keys = background.result() or _model_side(model, model_args, unsafe_pickle)
        facts = dict(container=ckpt.container, alternatives=ckpt.alternatives, non_tensor=ckpt.non_tensor_keys)
        return compare_keys(model_keys, ckpt.keys, source=ckpt, min_confidence=min_confidence,
                            checkpoint_format=ckpt.fmt, _folded_checkpoint=ahead,
                            depth_hint=_depth_hint(model, model_args), classifier=_classifier(model), **facts)
    tensors = checkpoint.state_dict() if hasattr(checkpoint, "state_dict") else checkpoint
    return compare_keys(model_keys, keyset_of(tensors, origin="state dict"), source=_InMemory(tensors),
                        min_confidence=min_confidence, checkpoint_format="memory", classifier=_classifier(model))


def _classifier(model: Any) -> Any:
    """The model's classifier module names (timm's ``pretrained_cfg['classifier']``), looked up only when asked."""
    def names() -> tuple[str, ...]:
        cfg: Any = getattr(model, "pretrained_cfg", None)
        if isinstance(model, str):
            from keydiff._sources import is_checkpoint_path

            if is_checkpoint_path(model) or ":" in model:
                return ()
            try:
                from timm.models import get_pretrained_cfg

                cfg = get_pretrained_cfg(model)
            except Exception:  # no timm, or a name timm has no configuration for
                return ()
        value = cfg.get("classifier") if isinstance(cfg, Mapping) else getattr(cfg, "classifier", None)
        return (value,) if isinstance(value, str) else tuple(value or ())

    return names


def _depth_hint(model: Any, model_args: Mapping[str, Any]) -> Any:
    """Block counts -> the model argument that builds that depth, for a model given by its spec."""
    if not isinstance(model, str):
        return None
    from keydiff._sources import is_checkpoint_path

    if is_checkpoint_path(model):
        return None
    from keydiff._model import depth_argument

    return lambda counts: depth_argument(model, model_args, counts)


def compare_keys(model: KeySet, checkpoint: KeySet, *, source: Any = None,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE, container: str = "",
                 alternatives: tuple[str, ...] = (), non_tensor: tuple[str, ...] = (),
                 checkpoint_format: str = "", _folded_checkpoint: Folding | None = None,
                 depth_hint: Any = None, classifier: Any = None) -> Diff:
    """The engine: compare two key sets; no file is read."""
    prefix = find_prefix(list(checkpoint), model.keys(), checkpoint.origin)
    if prefix.strip or prefix.add:
        to_model = {raw: prefix.apply(raw) for raw in checkpoint}
        to_raw = {n: raw for raw, n in to_model.items()}
    else:
        to_model = to_raw = {k: k for k in checkpoint}
    hidden: frozenset[str] = frozenset()
    weight_norm = plan_weight_norm(model, checkpoint, to_model)
    if weight_norm is not None:
        # the checkpoint's g/v pairs as the model names them, or folded into the plain weight the model has
        hidden = weight_norm.hidden
        to_model = {**to_model, **weight_norm.names}
        to_raw = {n: raw for raw, n in to_model.items() if raw not in hidden}
    entries: list[Entry] = []
    mismatched: dict[str, tuple[int, ...]] = {}
    method = "prefix" if prefix.strip or prefix.add else "exact"
    have_info = checkpoint.infos
    for k, info in model.items_:
        raw = to_raw.get(k)
        if raw is None:
            continue
        have = have_info[raw]
        rel = shape_relation(have.shape, info.shape)
        if rel in ("same", "reshape") and have.dtype.startswith("int") == info.dtype.startswith("int"):
            op = Op(kind="rename" if rel == "same" else "reshape")
            entries.append(Entry(source=(raw,), target=k, op=op, confidence=1.0 if rel == "same" else 0.95,
                                 evidence=Evidence(method=method if raw != k else "exact", shape=rel),
                                 source_shapes=(have.shape,), target_shape=info.shape))
        else:
            mismatched[k] = have.shape
    filled = {e.target for e in entries}
    used = {e.source[0] for e in entries}
    norm_keys = checkpoint if to_model is to_raw else KeySet.from_items(
        ((to_model[r], info) for r, info in checkpoint.items_ if r not in hidden), origin=checkpoint.origin,
        order_is_evidence=checkpoint.order_is_evidence)
    src_rest = [to_model[r] for r in checkpoint if r not in used and r not in hidden]
    dst_rest, twin_of = hide_twins(model.ties, filled, [k for k in model if k not in filled])
    gathered, gather_notes = gather_pieces(model, norm_keys, src_rest, dst_rest, to_raw)
    copied, copies, held = one_of_copies(model, norm_keys, src_rest, dst_rest, to_raw, getattr(source, "tensor", None))
    split = split_plain(model, norm_keys, src_rest, dst_rest, to_raw)
    gathered += split
    if gathered or copied or held:
        # pieces and their whole, or copies and their one tensor, are placed; the matcher's order step would fill a
        # one-row tensor from the first piece, or the one tensor from any copy, equal or not
        entries.extend([*gathered, *copied])
        placed = {to_model[k] for e in [*gathered, *copied] for k in e.source} | {e.target for e in gathered}
        placed |= {e.target for e in copied} | set(held) | {to_model[k] for k in copies}
        src_rest = [k for k in src_rest if k not in placed]
        dst_rest = [k for k in dst_rest if k not in placed]
    found = None
    if len(src_rest) + len(dst_rest) >= FOLD_MIN_KEYS:
        ahead = _folded_checkpoint if norm_keys is checkpoint and len(src_rest) == len(checkpoint) else None
        found = _match_folded(norm_keys, model, src_rest, dst_rest, to_model, to_raw, min_confidence, ahead)
    if found is None:
        found = _match(norm_keys, model, src_rest, dst_rest, to_raw)
    found, tower = _one_tower(found, norm_keys, model, src_rest, dst_rest, to_model, to_raw, min_confidence)
    entries.extend(found[0])
    notes = [*found[1], *gather_notes]
    entries = _orphan_subtrees(entries, norm_keys, to_model, min_confidence)
    entries = _sequential_positions(entries, model, to_model)
    entries = layout_conventions(entries, model, norm_keys, to_model)  # exact-name matches included
    if weight_norm is not None:
        entries = fold_entries(entries, weight_norm)
        notes = [*notes, weight_norm.note] if weight_norm.note else notes
    twins = fill_twins(entries, twin_of)
    entries.extend(twins)
    notes = [*notes, *_tie_notes(twins)]
    order_of = {k: i for i, k in enumerate(model)}
    entries.sort(key=lambda e: order_of[e.target])
    applied = tuple(e for e in entries if e.confidence >= min_confidence)
    mapping = _keymap(model, checkpoint, applied, entries, mismatched, prefix, container, min_confidence)
    if tower:
        mapping = _other_towers(mapping, tower, to_model)
    if weight_norm is not None:
        mapping = explain_refused(mapping, weight_norm)
    mapping = explain_held(explain_copies(mapping, copies), held)
    diagnoses = diagnose(model, checkpoint, mapping, prefix, container=container, alternatives=alternatives,
                         non_tensor=non_tensor, notes=notes, depth_hint=depth_hint, classifier=classifier)
    return Diff(model=model, checkpoint=checkpoint, mapping=mapping, proposals=tuple(entries), diagnoses=diagnoses,
                min_confidence=min_confidence, checkpoint_format=checkpoint_format, source=source)


def _tie_notes(twins: list[Entry]) -> list[str]:
    if not twins:
        return []
    shown = ", ".join(f"{e.target} = {e.evidence.note.rpartition('tied to ')[2].removesuffix(' in the model')}"
                      for e in twins[:3])
    more = f" and {len(twins) - 3} more" if len(twins) > 3 else ""
    return [f"{len(twins)} model key{'s' if len(twins) > 1 else ''} tied to another in the model ({shown}{more}): "
            "filled from the twin's checkpoint tensor, as the model shares it"]


def _match(checkpoint: KeySet, model: KeySet, src_rest: list[str], dst_rest: list[str],
           to_raw: Mapping[str, str]) -> tuple[list[Entry], list[str]]:
    """The engine proper on the keys no name matched: units, clusters, matching; ``checkpoint`` normalised.

    Where both sides hold the same named subtrees (``encoder`` and ``decoder``), each is matched with its
    namesake only, and what lies outside them with what lies outside them: the order of two subtrees in a file
    (sorted names put the decoder first) says nothing about which is which, and parts of a decoder must never
    fill an encoder.
    """
    entries: list[Entry] = []
    notes: list[str] = []
    for src_keys, dst_keys in _subtrees(src_rest, dst_rest):
        found, said = _match_part(checkpoint, model, src_keys, dst_keys, to_raw)
        entries += found
        notes += said
    return entries, notes


def _match_part(checkpoint: KeySet, model: KeySet, src_rest: list[str], dst_rest: list[str],
                to_raw: Mapping[str, str]) -> tuple[list[Entry], list[str]]:
    wanted = set(src_rest)
    order = [k for k in checkpoint if k in wanted]  # the key set's order: a set's would vary from run to run
    if not checkpoint.order_is_evidence:
        order = structural_order(order)
    src_units = build_units(checkpoint, order, order=order)
    dst_units = build_units(model, dst_rest, order=_run_order(model, dst_rest))
    pairings, _, _, notes = match_units(src_units, dst_units, file_order=checkpoint.order_is_evidence)
    return [e for p in pairings for e in _entries(p, to_raw)], notes


SUBTREE_DEPTH = 3
"""A named subtree is matched on its own only when it holds keys at least this many tokens below its name."""


def _subtrees(src: list[str], dst: list[str]) -> list[tuple[list[str], list[str]]]:
    """The two sides' keys split by the subtrees both name alike, plus the rest of each side as one more part.

    A side's subtrees are the children where its keys first branch (below wrappers every key shares, such as
    ``model.``); two or more names shared by both sides, each a deep subtree on both, split the matching.

    Example:
        >>> src = ["model.encoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.weight"]
        >>> dst = ["encoder.blocks.0.mlp.0.weight", "decoder.blocks.0.mlp.0.weight", "proj.weight"]
        >>> [(len(a), len(b)) for a, b in _subtrees(src, dst)]
        [(1, 1), (1, 1), (0, 1)]
    """
    if not src or not dst:
        return [(src, dst)]
    sides = [_branches(keys) for keys in (src, dst)]
    shared = sorted((set(sides[0]) & set(sides[1])) - {""})
    if len(shared) < 2:
        return [(src, dst)]
    parts = [(sides[0][name], sides[1][name]) for name in shared]
    rest = tuple([k for name, keys in side.items() if name not in shared for k in keys] for side in sides)
    return [*parts, rest] if any(rest) else parts


def _branches(keys: list[str], depth: int | None = None) -> dict[str, list[str]]:
    """A side's keys by the child they fall under where the keys first branch (``depth``: ``_branch_depth``, worked
    out when not given); only deep, named children count (a bare index is a repeat, not a subtree; a child holding
    no key ``SUBTREE_DEPTH`` tokens down is a part)."""
    split = [k.split(".") for k in keys]
    depth = _branch_depth(keys) if depth is None else depth
    out: dict[str, list[str]] = {}
    deep: set[str] = set()
    for key, tokens in zip(keys, split, strict=True):
        name = tokens[depth] if len(tokens) > depth + 1 else ""
        out.setdefault(name, []).append(key)
        if len(tokens) > depth + SUBTREE_DEPTH:
            deep.add(name)
    return {name: ks for name, ks in out.items() if name in deep and not name.isdigit()} | (
        {"": [k for name, ks in out.items() if name not in deep or name.isdigit() for k in ks]})


def _run_order(model: KeySet, keys: list[str]) -> list[str] | None:
    """The model's keys in the order its forward first uses them (``KeySet.flow``), when the forward ran: the
    order step aligns the checkpoint's structure against what runs after what, not against how the code declares
    its modules (a norm declared far from the conv it follows)."""
    flow = model.flow
    if flow is None or not flow.ran:
        return None
    def rank(key: str) -> int:
        try:
            return flow.position(key)
        except KeyError:  # a key the trace did not see: after the others, in registration order (sort is stable)
            return len(model)

    return sorted(keys, key=rank)


def _match_folded(checkpoint: KeySet, model: KeySet, src_rest: list[str], dst_rest: list[str],
                  to_model: Mapping[str, str], to_raw: Mapping[str, str],
                  min_confidence: float, src: Folding | None = None) -> tuple[list[Entry], list[str]] | None:
    """The engine on both sides' folds (identical repeats kept once), its entries repeated over the folds; None
    when folding cannot give the full engine's answer.

    Folds of one kind that hold other index sets (a tensor missing from one expert) are first cut, on both sides,
    to the indices all of them hold (``align_folds``): the odd children come back as plain keys with their true
    indices, so a hole shows where it is. The folded answer is then used when every fold's representative is
    filled or used by a confident entry between paired folds; only plain keys may be left over. Anything else (a
    fold left unpaired or weakly paired, folds whose counts differ) goes to the full engine, which sees every key:
    a fold pair that looks clean beside one that is not may owe its look to the folding.
    """
    src = src if src is not None else fold_keys(src_rest, checkpoint)  # given: folded ahead, of these keys
    dst = fold_keys(dst_rest, model)
    if not src.folds or not dst.folds:
        return None
    aligned = None
    if not can_pair(src, dst):
        aligned = align_folds(src, dst, src_rest, dst_rest, checkpoint, model)
        if aligned is None or not can_pair(*aligned):
            return None
        src, dst = aligned
    if src.dropped + dst.dropped < FOLD_MIN_SHARE * (len(src_rest) + len(dst_rest)):
        return None
    entries, notes = _match(checkpoint, model, list(src.keys), list(dst.keys), to_raw)
    folded = [e for e in entries if e.target in dst.fold_of or any(to_model[s] in src.fold_of for s in e.source)]
    if any(e.confidence < min_confidence for e in folded):
        return None
    if {e.target for e in folded} != dst.fold_of.keys():
        return None
    if {to_model[s] for e in folded for s in e.source} != src.fold_of.keys():
        return None
    labels = None
    if aligned is not None:
        used = {to_model[k] for e in entries for k in e.source}
        filled = {e.target for e in entries}
        labels = fold_labels(entries, src, dst, to_model, (k for k in src.keys if k not in used),
                             (k for k in dst.keys if k not in filled))
    expanded = expand_entries(entries, src, dst, to_model, to_raw, labels)
    if expanded is None:
        return None
    if len({e.target for e in expanded}) != len(expanded):
        return None
    return expanded, notes


def _top(key: str) -> str:
    """The top-level subtree a (normalised) key sits in; empty for a bare top-level tensor."""
    head, dot, _ = key.partition(".")
    return head if dot else ""


TOWER_MIN_SHARE = 0.1
"""Another tower holds at least this share of the unmatched checkpoint tensors (a whole text tower, not a head)."""


def _one_tower(found: tuple[list[Entry], list[str]], checkpoint: KeySet, model: KeySet, src_rest: list[str],
               dst_rest: list[str], to_model: Mapping[str, str], to_raw: Mapping[str, str],
               min_confidence: float) -> tuple[tuple[list[Entry], list[str]], str]:
    """Match again inside one top-level subtree of the checkpoint when the model is one tower of it.

    A whole CLIP checkpoint holds a vision tower (``visual.*``) beside a text tower (``transformer.*``,
    ``token_embedding``...). When most of the model's matched keys come from one subtree, and from more than one
    part of the model there (not only its blocks: a tower, not an encoder), tensors outside it are implausible
    for the rest: a text block of the same width would tie with a vision block, a text projection with the
    visual one. An open match that filled every model key from the subtree alone stands; else the subtree's match
    is kept when it fills at least as many model keys as the open match, so a checkpoint whose head lives beside
    its backbone (``backbone.*`` + ``head.*``) keeps its head, and a tower the model lacks feeds nothing.

    Returns:
        The match to use, and the subtree (``""`` when there is none).
    """
    if len({_top(k) for k in src_rest}) < 2:
        return found, ""  # one subtree (or none): no tower to choose (and no pass over 100,000 entries)
    entries = found[0]
    sourced = [e for e in entries if e.source]  # a tensor made as zeros comes from no subtree
    tops: dict[str, list[Entry]] = defaultdict(list)
    for e in sourced:
        sources = {_top(to_model[k]) for k in e.source}
        tops[sources.pop() if len(sources) == 1 else ""].append(e)
    tower, inside = max(((t, es) for t, es in tops.items() if t), key=lambda te: (len(te[1]), te[0]),
                        default=("", []))
    depth = _branch_depth(list(model))  # a model wrapped whole (``vision_encoder.*``) has its parts one level down
    parts = {".".join(e.target.split(".")[: depth + 1]) for e in inside}
    if 2 * len(inside) < len(sourced) or len(parts) < 2:
        return found, ""
    within = [k for k in src_rest if _top(k) == tower]
    if len(src_rest) - len(within) < TOWER_MIN_SHARE * len(src_rest):
        return found, ""  # nothing outside but a few tensors (a head beside a backbone): no other tower to avoid

    def filled(es: list[Entry]) -> int:
        return sum(e.confidence >= min_confidence for e in es)

    note = (f"the model is one tower of this checkpoint: it matches inside `{tower}.`; the "
            f"{len(src_rest) - len(within)} tensors outside it were not considered")
    if filled(entries) == len(dst_rest) and len(inside) == len(sourced):
        return (found[0], [*found[1], note]), tower  # nothing left to find, and nothing taken from outside
    # a complete open match that took a few tensors from another tower (a decoder's norm of the same width) is
    # matched again inside the tower: if that fills as much, the other tower feeds nothing
    again = _match(checkpoint, model, within, dst_rest, to_raw)
    if filled(again[0]) < filled(entries):
        # the open match fills more from outside the tower: a stem or head beside the blocks is the model's own;
        # tensors of another deep subtree that fit by position or shape only (a VAE's norms in a UNet) are not
        weak = f"unproven: from outside `{tower}.`, the tower this model is, and paired by position or shape only"
        towers = {_top(k) for k in src_rest if k.count(".") >= SUBTREE_DEPTH}  # deep subtrees, not a stem's conv
        kept = [e if not e.source or not any(_top(to_model[k]) in towers - {tower} for k in e.source)
                or _named_entry(e)
                else replace(e, confidence=min(e.confidence, 0.35), evidence=replace(e.evidence, note=weak))
                for e in entries]
        return (kept, found[1]), ""
    return (again[0], [*again[1], note]), tower


def _branch_depth(keys: list[str]) -> int:
    """How many leading tokens every key shares (``vision_encoder.`` of a wrapped model): where the keys branch."""
    if not keys:
        return 0
    shared = os.path.commonprefix(keys).rpartition(".")[0]  # noqa: RUF071 (by character, then cut to whole tokens)
    tokens = shared.count(".") + 1 if shared else 0
    return min(tokens, min(k.count(".") for k in keys))


def _other_towers(mapping: KeyMap, tower: str, to_model: Mapping[str, str]) -> KeyMap:
    """Unused checkpoint tensors outside the tower the model matched, with that as their reason (an expected
    leftover, kind ``tower``: single tensors such as ``logit_scale`` included)."""
    def reason(key: str) -> str:
        name = to_model.get(key, key)
        where = f"{_top(name)}.*" if _top(name) else name
        return f"another tower: `{where}` is outside `{tower}.`, which the model matches"

    unused = tuple(replace(u, reason=reason(u.key), kind="tower") if _top(to_model.get(u.key, u.key)) != tower
                   else u for u in mapping.unused)
    return replace(mapping, unused=unused)


def _entries(p: Pairing, to_raw: Mapping[str, str]) -> list[Entry]:
    out = []
    for i, (sl, tl) in enumerate(zip(p.source.leaves, p.target.leaves, strict=True)):
        ev = dict(method=p.method, name_score=p.name_score, cluster=p.cluster, note=p.note)
        if p.target.stack:
            out.extend(_unstack_entries(p, i, sl, to_raw, ev))
        elif p.source.stack:
            sizes, rest = _stack_layout(p.source, i)
            shapes = tuple((sizes[j % len(sizes)], *rest) for j in range(len(sl.keys)))
            out.append(Entry(source=tuple(to_raw[k] for k in sl.keys), target=tl.keys[0],
                             op=Op(kind="stack", dim=0, sizes=sizes), confidence=p.confidence,
                             evidence=Evidence(shape="stacked", **ev), source_shapes=shapes, target_shape=tl.shape))
        elif p.target.parts:
            sizes = tuple(part.leaves[i].shape[0] for part in p.target.parts)
            for j, part in enumerate(p.target.parts):
                pl = part.leaves[i]
                out.append(Entry(source=(to_raw[sl.keys[0]],), target=pl.keys[0],
                                 op=Op(kind="split", dim=0, index=j, sizes=sizes), confidence=p.confidence,
                                 evidence=Evidence(shape="split", **ev), source_shapes=(sl.shape,),
                                 target_shape=pl.shape))
        elif p.source.parts:
            shapes = tuple(part.leaves[i].shape for part in p.source.parts)
            out.append(Entry(source=tuple(to_raw[k] for k in sl.keys), target=tl.keys[0],
                             op=Op(kind="concat", dim=0, sizes=tuple(s[0] for s in shapes)),
                             confidence=p.confidence, evidence=Evidence(shape="fused", **ev), source_shapes=shapes,
                             target_shape=tl.shape))
        else:
            rel = shape_relation(sl.shape, tl.shape) or "same"
            kind = {"same": "rename"}.get(rel, rel)
            out.append(Entry(source=(to_raw[sl.keys[0]],), target=tl.keys[0], op=_op(kind=kind),
                             confidence=p.confidence * (0.8 if rel == "transpose" else 1.0),
                             evidence=_evidence(shape=rel, **ev), source_shapes=(sl.shape,), target_shape=tl.shape))
    # a tensor made as zeros (a Linear's bias beside a bare matrix) is as sure as the weight it goes with
    out += [Entry(source=(), target=lf.keys[0], op=Op(kind="zeros", dtype=p.source.leaves[0].dtype),
                  confidence=min(e.confidence for e in out), source_shapes=(), target_shape=lf.shape,
                  evidence=Evidence(method=p.method, name_score=p.name_score, shape="zeros", note=p.note))
            for lf in p.zeros]
    return out


# frozen values shared by every entry that has the same ones (a cluster pair gives thousands of renames)
_op, _evidence = lru_cache(maxsize=256)(Op), lru_cache(maxsize=4096)(Evidence)


def _stack_layout(unit: Unit, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Of leaf ``i`` of a stacked unit: each expert's part sizes along dim 0, and the shape after that dim."""
    if unit.parts and unit.parts[0].stack:  # fused over stacked parts (gate + up): each part is itself stacked
        return tuple(part.leaves[i].shape[1] for part in unit.parts), unit.parts[0].leaves[i].shape[2:]
    leaf = unit.leaves[i]
    return (leaf.shape[1],), leaf.shape[2:]


def _unstack_entries(p: Pairing, i: int, sl: Any, to_raw: Mapping[str, str], ev: dict) -> list[Entry]:
    sizes, rest = _stack_layout(p.target, i)
    tl = p.target.leaves[i]
    n = len(sizes)
    out = []
    for j, key in enumerate(tl.keys):
        shape = (sizes[j % n], *rest)
        out.append(Entry(source=(to_raw[sl.keys[0]],), target=key, op=Op(kind="unstack", dim=0, index=j, sizes=sizes),
                         confidence=p.confidence, evidence=Evidence(shape="unstacked", **ev),
                         source_shapes=(sl.shape,), target_shape=shape))
    return out


def _named_entry(e: Entry) -> bool:
    """Whether names carry an entry: the same name, or canonical names scoring ``STRONG_NAME`` or more."""
    return e.evidence.method in ("exact", "prefix") or e.evidence.name_score >= STRONG_NAME


ORPHAN_SHARE = 0.25
"""A checkpoint subtree of which less than this share finds a place, by weak evidence only, has no counterpart."""


def _orphan_subtrees(entries: list[Entry], checkpoint: KeySet, to_model: Mapping[str, str],
                     min_confidence: float) -> list[Entry]:
    """A subtree the model lacks feeds nothing: when few of a checkpoint subtree's tensors find a place, and only
    by position or shape (a video model's memory encoder, whose norm fits a prompt encoder's), those few are
    coincidences, not a counterpart: they are unproven, and the subtree is left unused whole.

    Subtrees are the children where the checkpoint's keys branch (below wrappers every key shares); one with
    fewer than four tensors is a part, not a subtree.
    """
    if all(_named_entry(e) for e in entries):
        return entries  # names carry every entry: no coincidence to find
    keys = list(checkpoint)
    depth = _branch_depth(keys)
    sizes = {name: len(ks) for name, ks in _branches(keys, depth).items() if name and len(ks) >= 4}
    if len(sizes) < 2:
        return entries

    def subtree(raw: str) -> str:
        tokens = to_model.get(raw, raw).split(".")
        return tokens[depth] if len(tokens) > depth + 1 else ""

    used: dict[str, list[int]] = defaultdict(list)
    for n, e in enumerate(entries):
        if e.confidence >= min_confidence:
            for name in {subtree(k) for k in e.source} & sizes.keys():
                used[name].append(n)
    out = list(entries)
    for name, ns in used.items():
        tensors = {k for n in ns for k in entries[n].source if subtree(k) == name}
        if len(tensors) >= ORPHAN_SHARE * sizes[name]:
            continue
        if any(_named_entry(entries[n]) for n in ns):
            continue
        note = (f"unproven: `{name}` has no counterpart in the model ({len(tensors)} of its {sizes[name]} tensors "
                "found a place, by position or shape only): a part the model lacks feeds nothing")
        for n in ns:
            e = entries[n]
            out[n] = replace(e, confidence=min(e.confidence, 0.35), evidence=replace(e.evidence, note=note))
    return out


def _sequential_positions(entries: list[Entry], model: KeySet, to_model: Mapping[str, str]) -> list[Entry]:
    """A sequence's positional names are positions, not roles: ``layers.{0,1,2}`` of an ``nn.Sequential`` MLP
    against ``proj_in``, ``layers.0``, ``proj_out`` go in the order the model runs them.

    Exact names come first and are final elsewhere; but where a checkpoint's layers are named by index only and
    some of that sequence's siblings were renamed, the shared name (``layers.0``) says nothing about the role: when
    the sequence's pairings cross the model's run order, and pairing it in order fits every tensor, it is paired
    in order, the exact name included, with the reason.
    """
    flow = model.flow
    if flow is None or not flow.ran:
        return entries
    groups: dict[str, dict[int, list[int]]] = {}
    for n, e in enumerate(entries):
        if len(e.source) != 1:
            continue
        unit = to_model.get(e.source[0], e.source[0]).rpartition(".")[0]
        container, _, index = unit.rpartition(".")
        if index.isdigit() and container:
            groups.setdefault(container, {}).setdefault(int(index), []).append(n)
    out = list(entries)
    for members in groups.values():
        if len(members) < 2:
            continue
        ns = [n for i in sorted(members) for n in members[i]]
        if {entries[n].evidence.method in ("exact", "prefix") for n in ns} != {True, False}:
            continue  # all renamed or all by name: nothing singles out a shared positional name
        units = {entries[n].target.rpartition(".")[0] for n in ns}
        try:
            ranked = sorted(units, key=lambda u: min(flow.position(entries[n].target) for n in ns
                                                      if entries[n].target.startswith(u + ".")))
        except KeyError:
            continue
        if len(ranked) != len(members):
            continue
        wanted = dict(zip(sorted(members), ranked, strict=True))
        current = [entries[members[i][0]].target.rpartition(".")[0] for i in sorted(members)]
        if current == [wanted[i] for i in sorted(members)]:
            continue
        moved = [(n, wanted[i] + "." + entries[n].target.rpartition(".")[2]) for i in sorted(members)
                 for n in members[i]]
        if any(t not in model or shape_relation(entries[n].source_shapes[0], model[t].shape) is None
               for n, t in moved) or len({t for _, t in moved}) != len(moved):
            continue
        note = ("positional names (a sequence's index) are positions, not roles: paired in the order the model runs "
                "its layers; a shared name here means another layer")
        for n, target in moved:
            e = entries[n]
            shape = model[target].shape
            rel = shape_relation(e.source_shapes[0], shape)
            op = e.op if rel == e.evidence.shape else Op(kind="rename" if rel == "same" else rel)
            out[n] = replace(e, target=target, target_shape=shape, op=op, confidence=min(e.confidence, 0.8),
                             evidence=replace(e.evidence, method="order", name_score=0.5, shape=rel, note=note))
    return out


def _keymap(model: KeySet, checkpoint: KeySet, applied: tuple[Entry, ...], proposed: list[Entry],
            mismatched: Mapping[str, tuple[int, ...]], prefix: Prefix, container: str,
            min_confidence: float) -> KeyMap:
    filled = {e.target for e in applied}
    used = set(chain.from_iterable(e.source for e in applied))
    weak = {e.target: e for e in proposed if e.confidence < min_confidence}
    weak_src = {k: e for e in weak.values() for k in e.source}
    missing_keys = [k for k in model if k not in filled]
    unused_keys = [k for k in checkpoint if k not in used]
    pool = _Pool(unused_keys, checkpoint, prefix)
    # a twin of a group left empty waits for the group's first empty key, whose own reason is the one that matters
    tied = {k: anchor for group in model.ties for anchor in [next((t for t in group if t not in filled), "")]
            for k in group if k not in filled and k != anchor}
    missing = []
    for k in missing_keys:
        shape = model[k].shape
        cands = _candidates(k, shape, pool)
        if k in weak:
            e = weak[k]
            why = f" ({e.evidence.note})" if e.evidence.note.startswith(("unproven", "ambiguous")) else ""
            reason = (f"proposed {', '.join(e.source)} with confidence {e.confidence:.2f}, below "
                      f"--min-confidence {min_confidence}{why}")
        elif k in tied:
            reason = f"tied to {tied[k]} in the model, which is unresolved: it is filled when that is"
        elif k in mismatched:
            reason = f"the checkpoint has this name with shape {list(mismatched[k])}, the model wants {list(shape)}"
        elif sum(c[1] for c in cands) >= 2:
            reason = f"ambiguous: {sum(c[1] for c in cands)} unused checkpoint tensors fit and names do not decide"
        elif any(c[1] for c in cands):
            reason = "a checkpoint tensor fits by shape but nothing else supports the pairing"
        else:
            reason = "no unused checkpoint tensor has a compatible shape"
        missing.append(Leftover(key=k, shape=shape, reason=reason, candidates=tuple(c[0] for c in cands)))
    unused = []
    # a few distinct shapes stand for thousands of missing keys: whether any fits is decided once per shape
    missing_shapes = list(dict.fromkeys(model[m].shape for m in missing_keys[:5000]))
    fits_any: dict[tuple[int, ...], bool] = {}
    explained = account_unused(unused_keys, checkpoint, used, rename=prefix.apply, model=model)
    for k in unused_keys:
        shape = checkpoint[k].shape
        name = prefix.apply(k)
        if k in weak_src:
            kind = "weak"
            reason = f"proposed for {weak_src[k].target} with confidence {weak_src[k].confidence:.2f}, not applied"
        elif name in model:
            kind, reason = "shape", f"the model's {name} has shape {list(model[name].shape)}, this has {list(shape)}"
        elif k in explained:
            kind, reason = explained[k].kind, explained[k].reason
        else:
            if shape not in fits_any:
                fits_any[shape] = any(shape_relation(shape, s) for s in missing_shapes)
            kind = "unexplained"
            reason = ("no counterpart in the model that names, shapes and order agree on" if fits_any[shape] else
                      "no model key left with a compatible shape, and nothing says why the model would not take it")
        unused.append(Leftover(key=k, shape=shape, reason=reason, kind=kind))
    unwrap = Unwrap(container=container, strip_prefix=prefix.strip, add_prefix=prefix.add)
    return KeyMap(entries=applied, rules=compress_rules(applied), missing=tuple(missing), unused=tuple(unused),
                  unwrap=unwrap, model=model.origin, checkpoint=checkpoint.origin)


class _Pool:
    """The unused checkpoint keys that leftovers draw candidates from, with each key's facts worked out once."""

    def __init__(self, unused: list[str], checkpoint: KeySet, prefix: Prefix) -> None:
        self.keys = unused
        self.by_shape: dict[tuple[int, ...], list[str]] = {}
        for k in unused:
            self.by_shape.setdefault(checkpoint[k].shape, []).append(k)
        self._checkpoint, self._prefix = checkpoint, prefix
        self._facts: dict[str, tuple[tuple[int, ...], str, tuple]] = {}
        self._fits: dict[tuple[tuple[int, ...], tuple[int, ...]], bool] = {}
        self._groups: dict[tuple[int, ...] | None, dict] = {}

    def facts(self, k: str) -> tuple[tuple[int, ...], str, tuple]:
        """Shape, template of the module path, and natural sort key of an unused key."""
        found = self._facts.get(k)
        if found is None:
            tpl = template_of(self._prefix.apply(k).rpartition(".")[0] or k)[0]
            found = self._facts[k] = (self._checkpoint[k].shape, tpl, natural_key(k))
        return found

    def groups(self, shape: tuple[int, ...] | None) -> dict[tuple[tuple[int, ...], str], list[tuple[tuple, str]]]:
        """The candidate pool (every unused key, or the first 2,000 of one shape) grouped by (shape, template),
        each group as ``(natural key, key)`` in sorted order; built once per pool."""
        found = self._groups.get(shape)
        if found is None:
            keys = self.keys if shape is None else self.by_shape.get(shape, [])[:2000]
            found = {}
            for k in keys:
                have, k_tpl, k_natural = self.facts(k)
                found.setdefault((have, k_tpl), []).append((k_natural, k))
            for members in found.values():
                members.sort()
            self._groups[shape] = found
        return found

    def fits(self, have: tuple[int, ...], want: tuple[int, ...]) -> bool:
        """Whether a tensor of shape ``have`` can become one of shape ``want`` (memoised: shapes repeat)."""
        found = self._fits.get((have, want))
        if found is None:
            found = self._fits[have, want] = shape_relation(have, want) is not None
        return found


def _candidates(key: str, shape: tuple[int, ...], pool: _Pool) -> list[tuple[str, bool]]:
    """Up to three nearest unused checkpoint keys: shape-compatible first, then by name."""
    if not pool.keys:
        return []
    groups = pool.groups(None if len(pool.keys) <= 2000 else shape)
    tpl = template_of(key.rpartition(".")[0] or key)[0]
    # keys rank by (not fits, -name similarity, natural order); the first two depend only on a key's shape and
    # template, so whole groups are ranked and only the best groups' (already sorted) members are read
    ranked: dict[tuple[bool, float], list[list[tuple[tuple, str]]]] = {}
    for (have, k_tpl), members in groups.items():
        fits = pool.fits(have, shape)
        ranked.setdefault((not fits, -name_similarity(tpl, k_tpl)), []).append(members)
    out: list[tuple[str, bool]] = []
    for (unfit, _), lists in sorted(ranked.items()):
        for _, k in heapq.merge(*lists):
            out.append((k, not unfit))
            if len(out) == 3:
                return out
    return out


__all__ += ["Cluster", "ClusterRow", "ClusterTable", "Unit"]
