"""Layout conventions the keys do not show: ``[in, out]`` weights, rotary pairings, and the evidence that decides them.

Two libraries can name a tensor alike, give it the same shape, and lay its values out otherwise:

- **Weight storage.** ``nn.Linear`` stores ``[out, in]`` and computes ``F.linear(x, w)``; GPT-2's ``Conv1D`` stores
  ``[in, out]`` and computes ``x @ w``. A non-square weight shows the difference in its shape; a square one does
  not. What the model does with each 2-D weight is read from one forward pass on the meta device (``read_layout``),
  so the model's side is known; the checkpoint's side is known from its non-square weights of the same family
  (the same block), and the square ones follow them, exact-name matches included (``weight_family``).
- **Rotary pairing.** A rotary embedding rotates pairs of a head's dims: code that multiplies complex numbers or
  slices ``[..., ::2]`` pairs dims ``2i, 2i+1`` (*interleaved*); code that calls a ``rotate_half`` pairs ``i`` with
  ``i + d/2`` (*half*). The two compute the same attention when each head's query and key rows are reordered
  (``Op(kind="rotary")``). The model's pairing is read from the same forward pass (the ops applied to the query and
  key projections' outputs before they meet); the checkpoint's from its naming convention where one is known to
  fix it (``keydiff._conventions.ROTARY_VOCABULARIES``), or from exact names (the checkpoint was written by code that
  names every tensor as the model does). Where nothing decides, the query and key entries are left unproven, with
  the reason and the way to decide (``--source``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from keydiff._conventions import PER_HEAD_FUSED, ROTARY_VOCABULARIES, canonical_token
from keydiff._keys import KeySet, Layout, owner_of
from keydiff._mapping import Entry
from keydiff._ops import Op

if TYPE_CHECKING:
    from torch import nn

__all__ = ["UNPROVEN_CONFIDENCE", "checkpoint_rotary", "layout_conventions", "parallel_by_order", "read_layout",
           "rotary_role"]

UNPROVEN_CONFIDENCE = 0.4
"""An entry whose layout nothing decides: below the default ``--min-confidence``, so it is reported, not applied."""
_ROLES = ("q", "k", "qkv")


# ------------------------------------------------------------------------------------------------ naming

def rotary_role(key: str) -> str:
    """``q``, ``k`` or ``qkv`` when the module owning ``key`` projects queries, keys or both (by canonical name),
    else ``""``.

    Example:
        >>> rotary_role("layers.0.attention.wq.weight"), rotary_role("model.layers.0.self_attn.v_proj.weight")
        ('q', '')
    """
    parent, canon = "", ""
    for token in owner_of(key).split("."):
        canon = canonical_token(token, parent)
        parent = canon
    return canon if canon in _ROLES else ""


def checkpoint_rotary(keys: Iterable[str]) -> tuple[str, str]:
    """The rotary pairing a checkpoint's naming convention is known to store, and the convention; ``("", "")``
    when its names fix none.

    Example:
        >>> names = [f"layers.0.{m}.weight" for m in ("attention.wq", "attention.wk", "attention.wv",
        ...          "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm",
        ...          "ffn_norm")]
        >>> checkpoint_rotary(names)[0]
        'interleaved'
    """
    # one text of every key, searched per vocabulary entry (a module path ending in it, then one leaf token): a
    # C-speed scan instead of splitting 100,000 keys
    blob = "\n" + "\n".join(keys) + "\n"
    for name, vocabulary, layout in ROTARY_VOCABULARIES:
        if all(re.search(rf"[\n.]{re.escape(tail)}\.[^.\n]+\n", blob) for tail in sorted(vocabulary)):
            return layout, name
    return "", ""


# ------------------------------------------------------------------------------------------------ the model

def read_layout(model: nn.Module, *, budget: float | None = None) -> Layout:
    """How ``model`` uses its 2-D weights and rotates its queries and keys: its module types, then one forward
    pass on the meta device watched op by op (only when the module types leave something open).

    Never raises: what cannot be read is left out, and ``Layout.reason`` says why.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> read_layout(net).weights
        (('0.weight', 'out_in'), ('2.weight', 'out_in'))
    """
    import torch
    from torch import nn

    try:
        state = model.state_dict(keep_vars=True)
    except Exception as exc:  # a user's state_dict hook may raise anything
        return Layout(reason=f"not read: no state dict ({type(exc).__name__})")
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    weights = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and isinstance(getattr(module, "weight", None), torch.Tensor):
            weights[f"{path}.weight" if path else "weight"] = "out_in"
    open_weights = [k for k in keys if state[k].dim() == 2 and k not in weights and k.endswith("weight")
                    and not isinstance(_owner(model, k), nn.Embedding)]
    roles = {k: r for k in keys if (r := rotary_role(k))}
    if not open_weights and not roles:
        return Layout(weights=_ordered(weights, keys), ran=True, reason="module types (nothing else to read)")
    seen, rotary, reason = _trace(model, state, keys, roles, budget)
    for k, use in seen.items():
        weights.setdefault(k, use)
    for k, (pairing, dims) in list(rotary.items()):
        head = _head_dim(model, k)
        if pairing and head and head != dims:  # partial rotary: only the first dims of each head are rotated
            rotary[k] = ("", dims)
    for k, found in list(rotary.items()):  # a projection's bias is rotated with its weight's rows
        bias = k.removesuffix("weight") + "bias"
        if k.endswith("weight") and bias in state:
            rotary.setdefault(bias, found)
    if not rotary and roles and reason != "ran" and _config_rotary(model):
        dims = _config_head_dim(model)
        rotary = {k: ("", dims) for k in roles}  # rotary by its configuration, pairing not seen
    said = "module types and a forward pass on the meta device" if reason == "ran" else (
        f"module types; the forward pass {reason}")
    return Layout(weights=_ordered(weights, keys), rotary=tuple((k, *rotary[k]) for k in keys if k in rotary),
                  ran=reason == "ran", reason=said)


def _ordered(weights: Mapping[str, str], keys: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, weights[k]) for k in keys if k in weights)


def _owner(model: nn.Module, key: str) -> Any:
    try:
        return model.get_submodule(owner_of(key))
    except AttributeError:
        return None


def _head_dim(model: nn.Module, key: str) -> int:
    """Dims per head of the attention a projection key belongs to: an attribute of the nearest module that has one
    (``head_dim``, ``head_size``, ``attention_head_size``), else the configuration's; 0 when none says."""
    path = owner_of(key)
    while path:
        path = owner_of(path)
        module = _owner(model, f"{path}.x") if path else model
        for name in ("head_dim", "head_size", "attention_head_size"):
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return _config_head_dim(model)


def _config_rotary(model: nn.Module) -> bool:
    """Whether the model's configuration sets a rotary embedding (a ``rope``/``rotary`` setting with a value)."""
    config = getattr(model, "config", None)
    fields = vars(config) if config is not None and hasattr(config, "__dict__") else {}
    return any(("rope" in name or "rotary" in name) and value for name, value in fields.items())


def _config_head_dim(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    dims = getattr(config, "head_dim", None)
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not isinstance(dims, int) and isinstance(heads, int) and isinstance(width, int) and heads:
        dims = width // heads
    return dims if isinstance(dims, int) else 0


def _trace(model: nn.Module, state: Mapping[str, Any], keys: list[str], roles: Mapping[str, str],
           budget: float | None) -> tuple[dict[str, str], dict[str, tuple[str, int]], str]:
    """One forward pass on the meta device: each 2-D weight's use, and each rotated projection's pairing."""
    from keydiff._dataflow import TRACE_BUDGET, _no_meta_left_in_caches, _watching, example_inputs, meta_copy

    if any(state[k].device.type != "meta" for k in keys):
        model = meta_copy(model)
        if model is None:
            return {}, {}, "did not run: the model cannot be copied to the meta device"
        state = model.state_dict(keep_vars=True)
    params: dict[int, str] = {}
    for k in keys:
        params.setdefault(id(state[k]), k)
    failures = []
    with _no_meta_left_in_caches(model):
        for label, args, kwargs in example_inputs(model)[:2]:
            watch = _Watch(params, roles, time.thread_time() + (budget or TRACE_BUDGET))
            try:
                with _watching(model, []), watch.mode():
                    model(*args, **kwargs)
            except _Budget:
                return watch.uses, {}, "did not run to the end (budget)"
            except Exception as exc:  # the model's own code fails on this input, or on the meta device
                failures.append(f"{label}: {type(exc).__name__}")
                continue
            return watch.uses, watch.pairings(), "ran"
    return {}, {}, "did not run (" + ("; ".join(failures) or "no example input") + ")"


class _Budget(BaseException):
    """The trace ran out of CPU time (a ``BaseException``: model code's ``except Exception`` must not swallow it)."""


_MATMULS = frozenset({"matmul", "mm", "__matmul__", "__rmatmul__"})
_TRANSPOSES = frozenset({"t", "transpose", "permute", "swapaxes", "swapdims"})


class _Watch:
    """The op-by-op bookkeeping of ``read_layout``'s forward pass."""

    def __init__(self, params: Mapping[int, str], roles: Mapping[str, str], deadline: float) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        self.params, self.roles, self.deadline = params, roles, deadline
        self.uses: dict[str, str] = {}
        """2-D weight key -> ``out_in`` / ``in_out``, by its first use."""
        self.views: dict[int, tuple[str, bool]] = {}
        """A 2-D weight seen through an op of it alone (``w.t()``, ``w.T``, ``w.to(x)``) -> its key, and whether
        the view is transposed."""
        self.tags: dict[int, str] = {}
        """Activation computed from a query/key projection's output -> the projection's weight key."""
        self.seen: dict[str, set[tuple[str, int]]] = {}
        """Projection key -> the pairings its rotation showed, with the dims rotated per head."""
        self.keep: list[Any] = []  # every tagged tensor stays alive, so no id() is reused during the pass
        self._leaves, self._tensor = tree_leaves, torch.Tensor
        self._flip_properties = {torch.Tensor.T, torch.Tensor.mT}  # read as ``__get__`` of these descriptors

    def mode(self) -> Any:
        from torch.overrides import TorchFunctionMode

        watch = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if time.thread_time() > watch.deadline:
                    raise _Budget
                out = func(*args, **(kwargs or {}))
                watch.op(func, args, kwargs or {}, out)
                return out

        return Mode()

    def _tensors(self, tree: Any) -> list[Any]:
        return [x for x in self._leaves(tree) if isinstance(x, self._tensor)]

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Follow weights through their views, record their uses, and tag and watch the projections' outputs."""
        name = getattr(func, "__name__", "")
        ins = self._tensors((args, kwargs))
        weights = [self.params[id(t)] for t in ins if id(t) in self.params and t.dim() == 2]
        if len(ins) == 1 and ((ins[0].dim() == 2 and id(ins[0]) in self.params) or id(ins[0]) in self.views):
            self._view(func, name, ins[0], out)
            return
        self._use(name, args, kwargs)
        tagged = {self.tags[id(t)] for t in ins if id(t) in self.tags}
        source = [k for k in weights if k in self.roles]
        if source and not tagged:
            self._tag(out, source[0])  # the projection itself: its output is what gets rotated
            return
        if len(tagged) != 1 or any(k not in self.roles for k in weights):
            return  # queries meet keys (the scores), or another weight consumes them: the rotation is over
        (key,) = tagged
        x = next(t for t in ins if self.tags.get(id(t)) == key)
        pairing = _pairing(name, args, kwargs, x, out)
        if pairing is not None:
            self.seen.setdefault(key, set()).add(pairing)
        self._tag(out, key)

    def _view(self, func: Any, name: str, x: Any, out: Any) -> None:
        """Follow a 2-D weight through an op of it alone: a transpose flips it, a same-shaped op keeps it."""
        key, flipped = self.views.get(id(x)) or (self.params[id(x)], False)
        flips = name in _TRANSPOSES or getattr(func, "__self__", None) in self._flip_properties
        for t in self._tensors(out):
            if t.dim() == 2 and (flips or tuple(t.shape) == tuple(x.shape)):
                self.views[id(t)] = (key, flipped != flips)
                self.keep.append(t)

    def _use(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record how a 2-D weight meets the data: ``F.linear``'s weight, or a matrix product's left or right."""
        def key(t: Any) -> tuple[str, bool] | None:
            if id(t) in self.params and getattr(t, "dim", lambda: 0)() == 2:
                return self.params[id(t)], False
            return self.views.get(id(t))

        pairs: list[tuple[Any, str]] = []
        if name == "linear":
            pairs = [(kwargs.get("weight", args[1] if len(args) > 1 else None), "out_in")]
        elif name in _MATMULS and len(args) >= 2:
            pairs = [(args[1], "in_out"), (args[0], "out_in")]
        elif name == "addmm" and len(args) >= 3:
            pairs = [(args[2], "in_out"), (args[1], "out_in")]
        for t, use in pairs:
            found = key(t)
            if found is not None:
                k, flipped = found
                self.uses.setdefault(k, {"out_in": "in_out", "in_out": "out_in"}[use] if flipped else use)

    def _tag(self, out: Any, key: str) -> None:
        for t in self._tensors(out):
            self.tags[id(t)] = key
            self.keep.append(t)

    def pairings(self) -> dict[str, tuple[str, int]]:
        """Projection key -> (pairing, dims per head), for projections whose rotation showed one pairing only
        (both seen: ``""``, not known)."""
        out = {}
        for key, seen in self.seen.items():
            out[key] = next(iter(seen)) if len(seen) == 1 else ("", 0)
        return out


def _pairing(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], x: Any, out: Any) -> tuple[str, int] | None:
    """The rotary pairing an op on a projection's activation ``x`` shows, with the dims it rotates; or None."""
    import torch

    if x.dim() == 0:
        return None
    d = x.shape[-1]
    if name == "view_as_complex":
        return "interleaved", 2 * x.shape[-2]
    if name == "__getitem__" and len(args) > 1:
        last = _last_dim_slice(args[1], x.dim())
        if last is None:
            return None
        start, stop, step = last.indices(d)
        if step == 2 and stop - start >= d - 1:
            return "interleaved", d
        if step == 1 and (start, stop) in ((0, d // 2), (d // 2, d)) and d % 2 == 0:
            return "half", d
        return None
    if name in ("chunk", "split", "tensor_split", "unbind") or name in ("view", "reshape", "unflatten"):
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        if name == "unbind" and outs and outs[0].dim() == x.dim() - 1 and _dim_arg(args, kwargs) in (-1, x.dim() - 1):
            return ("interleaved", 2 * x.shape[-2]) if x.shape[-1] == 2 else None
        if name in ("chunk", "split", "tensor_split") and len(outs) == 2 and _dim_arg(args, kwargs, 2) in (
                -1, x.dim() - 1) and outs[0].shape[-1] * 2 == d:
            return "half", d
        if name in ("view", "reshape", "unflatten") and len(outs) == 1 and outs[0].dim() == x.dim() + 1 and (
                tuple(outs[0].shape[:-2]) == tuple(x.shape[:-1])):
            # only pairs (..., d/2, 2) count: a split into (2, d/2) is also how two heads are split apart
            a, b = outs[0].shape[-2:]
            return ("interleaved", d) if b == 2 and a * 2 == d and a > 1 else None
    return None


def _dim_arg(args: tuple[Any, ...], kwargs: dict[str, Any], at: int = 1) -> Any:
    return kwargs.get("dim", args[at] if len(args) > at else 0)


def _last_dim_slice(index: Any, ndim: int) -> slice | None:
    """The slice an index applies to the last dim (``x[..., :d // 2]``), or None when it slices no last dim."""
    items = index if isinstance(index, tuple) else (index,)
    if not items or not isinstance(items[-1], slice):
        return None
    if Ellipsis in items or len(items) == ndim:
        return items[-1]
    return None


# ------------------------------------------------------------------------------------------------ the conventions

def layout_conventions(entries: list[Entry], model: KeySet, checkpoint: KeySet,
                       to_model: Mapping[str, str]) -> list[Entry]:
    """The entries with the layout conventions applied: square weights follow their family's storage, rotary query
    and key rows are reordered into the model's pairing (or left unproven where nothing decides).

    Args:
        entries: every entry, exact-name matches included.
        model: the model's keys (``KeySet.layout`` when it was read from a built model).
        checkpoint: the checkpoint's keys, normalised (wrapper prefix removed).
        to_model: raw checkpoint key -> normalised key.
    """
    entries = weight_family(entries, model, checkpoint, to_model)
    entries = rotary_pairing(entries, model, checkpoint, to_model)
    entries = per_head_fusion(entries, to_model)
    return parallel_by_order(entries, model)


def per_head_fusion(entries: list[Entry], to_model: Mapping[str, str]) -> list[Entry]:
    """A fused q/k/v grouped per head (``PER_HEAD_FUSED``) into one stacked whole, or back, is unproven: the rows
    need reordering per head, with a head count and an order the names do not give (no op does it yet).

    Example:
        >>> from keydiff._mapping import Entry, Evidence
        >>> e = Entry(source=("h.0.attention.query_key_value.weight",), target="h.0.attn.c_attn.weight",
        ...           op=Op(kind="transpose"), confidence=0.9, evidence=Evidence(method="cluster"),
        ...           source_shapes=((96, 32),), target_shape=(32, 96))
        >>> per_head_fusion([e], {})[0].confidence
        0.4
    """
    out = []
    for e in entries:
        if len(e.source) == 1:
            mine = _module_name(to_model.get(e.source[0], e.source[0])) in PER_HEAD_FUSED
            theirs = _module_name(e.target) in PER_HEAD_FUSED
            if mine != theirs:
                note = ("unproven: one side fuses q/k/v per head ([heads, 3, head_dim], as `query_key_value` is "
                        "stored), the other stacks them whole: each head's rows would need reordering, which the "
                        "names do not pin down")
                e = replace(e, confidence=min(e.confidence, UNPROVEN_CONFIDENCE),
                            evidence=replace(e.evidence, note=note))
        out.append(e)
    return out


def _module_name(key: str) -> str:
    """The name of the module a key's tensor belongs to (``query_key_value`` for ``...query_key_value.bias``)."""
    return owner_of(key).rpartition(".")[2]


NAMES_DECIDE = 0.75
"""An order pairing whose names score this high (``query`` -> ``q_proj``) was told apart by its names."""


def parallel_by_order(entries: list[Entry], model: KeySet) -> list[Entry]:
    """Entries that fill parallel same-shaped modules by order alone, unproven.

    Modules under one parent with the same shapes, fed by the same modules and feeding none of each other (the
    query, key and value projections of an attention, 1x1 convolutions or linear layers alike) are parallel: the
    order they run in is how their code is written, not what they compute. When names do not tell them apart (the
    entries came from the order step, ``convs.0/1/2`` into ``q/k/v``, with names scoring below ``NAMES_DECIDE``),
    their roles are not known.
    """
    flow = model.flow
    if flow is None or not flow.ran:
        return entries
    by_order: dict[str, list[Entry]] = {}
    for e in entries:
        if e.evidence.method == "order" and e.evidence.name_score < NAMES_DECIDE:
            by_order.setdefault(owner_of(e.target), []).append(e)
    groups: dict[tuple, list[str]] = {}
    for module, es in by_order.items():
        shapes = tuple(sorted((e.target[len(module):], e.target_shape) for e in es))
        feeders = flow.fed_by(module)
        if feeders:
            groups.setdefault((owner_of(module), shapes, frozenset(feeders)), []).append(module)
    doubt: dict[str, list[str]] = {}
    for members in groups.values():
        if len(members) > 1 and not any(m in flow.fed_by(o) for m in members for o in members):
            doubt.update({m: [o for o in members if o != m] for m in members})
    if not doubt:
        return entries
    out = []
    for e in entries:
        weak = e.evidence.method == "order" and e.evidence.name_score < NAMES_DECIDE
        others = doubt.get(owner_of(e.target)) if weak else None
        if others:
            note = (f"unproven: parallel to {', '.join(others)} (same shapes, fed by the same input), and names do "
                    "not say which is which: the order modules run in is how their code is written (--source "
                    "checks it by running both models)")
            e = replace(e, confidence=min(e.confidence, UNPROVEN_CONFIDENCE), evidence=replace(e.evidence, note=note))
        out.append(e)
    return out


def _family(key: str) -> str:
    """The block a key sits in (its path up to the first index: ``h.3``), or ``""`` outside any block."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def _flip(use: str) -> str:
    return {"out_in": "in_out", "in_out": "out_in"}[use]


def weight_family(entries: list[Entry], model: KeySet, checkpoint: KeySet, to_model: Mapping[str, str]) -> list[Entry]:
    """Square 2-D weights stored like their family's non-square ones.

    With the model's layout known (``out_in`` for ``F.linear``, ``in_out`` for ``x @ w``), a non-square weight
    shows how the checkpoint stores it: as the model uses it when it is renamed, the other way when it is
    transposed. A square weight is stored like the non-square ones of its family, so it is transposed when the
    model uses it the other way, exact-name matches included. Its family is its parent module (``h.3.attn``); when
    that has no non-square weight, its block (``h.3``), then the whole checkpoint, each with at least two. Where
    the family's non-square weights disagree, the square ones are ambiguous: their confidence drops below the
    default threshold and the note says why.

    Without the model's layout (a checkpoint or a state dict as the model), the same decision is made relatively,
    among weights with a bias beside them: a square one is transposed when the non-square ones of its family are.
    """
    layout = model.layout
    absolute = layout is not None and bool(layout.weights)
    if not absolute and not any(e.op.kind == "transpose" for e in entries):
        return entries  # relatively, a square weight follows transposed siblings: there are none

    def name(e: Entry) -> str:
        return to_model.get(e.source[0], e.source[0])

    def candidate(e: Entry) -> bool:
        if len(e.source) != 1 or len(e.target_shape) != 2 or len(e.source_shapes[0]) != 2:
            return False
        if e.op.kind not in ("rename", "transpose"):
            return False
        if absolute:
            return bool(layout.weight(e.target))
        key = name(e)
        return key.endswith(".weight") and key[: -len("weight")] + "bias" in checkpoint

    linear = [e for e in entries if candidate(e)]
    if not linear:
        return entries

    def stored(e: Entry) -> str:
        """How the checkpoint stores a weight: absolutely (``out_in``/``in_out``), or relatively to the model."""
        if absolute:
            use = layout.weight(e.target)
            return use if e.op.kind == "rename" else _flip(use)
        return "kept" if e.op.kind == "rename" else "flipped"

    # votes per family, from the nearest (the weight's parent module) to the widest (the whole checkpoint)
    votes: list[dict[str, list[str]]] = [{}, {}, {}]
    for e in linear:
        if e.target_shape[0] != e.target_shape[1]:
            for level, family in enumerate(_families(name(e))):
                votes[level].setdefault(family, []).append(stored(e))
    if not absolute and not any("flipped" in v for v in votes[2].get("", [])):
        return entries  # relatively, nothing to follow: no weight needed a transpose
    ids = {id(e) for e in linear}  # membership by identity: a list scan per entry is quadratic
    out = []
    for e in entries:
        if id(e) in ids and e.target_shape[0] == e.target_shape[1]:
            decided, where = _vote(votes, _families(name(e)))
            if where:
                e = _square(e, decided, layout.weight(e.target) if absolute else "kept", where)
        out.append(e)
    return out


_LEVELS = ("its module", "its block", "this checkpoint")


def _families(key: str) -> tuple[str, str, str]:
    """The families of a weight, nearest first: its parent module, its block (``h.3``), the whole checkpoint."""
    module = owner_of(owner_of(key))
    return module, _family(key), ""


def _vote(votes: list[dict[str, list[str]]], families: tuple[str, str, str]) -> tuple[str, str]:
    """How the nearest family with non-square weights stores them (``""``: they disagree), and that family in
    words; ``("", "")`` when none decides. A wider family than a module (a block, the root, the checkpoint)
    decides only with two or more weights: one bare matrix used as ``x @ proj`` is no convention of the rest."""
    for level, family in enumerate(families):
        found = votes[level].get(family, [])
        if not found or ((level or not family) and len(found) < 2):
            continue
        kinds = set(found)
        return (found[0] if len(kinds) == 1 else ""), _LEVELS[level]
    return "", ""


def _square(e: Entry, stored: str, use: str, where: str) -> Entry:
    """A square weight stored as ``stored`` in a model that uses it as ``use`` (``""``: not decided)."""
    if not stored:
        note = (f"ambiguous: the non-square weights of {where} are stored both [out, in] and [in, out], so the "
                "layout of this square one is not known (--source decides by running both models)")
        return replace(e, confidence=min(e.confidence, UNPROVEN_CONFIDENCE), evidence=replace(e.evidence, note=note))
    want = "transpose" if stored != use else "rename"
    if e.op.kind == want:
        return e
    how = {"out_in": "[out, in]", "in_out": "[in, out]"}
    layout_words = (f"stored {how[stored]} like every non-square weight of {where}, used {how[use]} by the model"
                    if stored in how else f"transposed like every non-square weight of {where}")
    note = f"{'transposed' if want == 'transpose' else 'kept'}: {layout_words}"
    return replace(e, op=Op(kind=want), evidence=replace(e.evidence, shape="transpose" if want == "transpose"
                                                         else "same", note=note))


def rotary_pairing(entries: list[Entry], model: KeySet, checkpoint: KeySet,
                   to_model: Mapping[str, str]) -> list[Entry]:
    """Query and key rows in the model's rotary pairing.

    The model's pairing is read from its forward pass (``KeySet.layout``); for a checkpoint as the model, from
    its naming convention. The checkpoint's pairing: the same as the model's for a tensor named exactly as the
    model names it; else from its naming convention. When the two differ, each head's rows are reordered (the head
    count is the tensor's rows over the dims per head the model rotates); when the pairing of either side is not
    known, or the rows cannot be reordered (fused into one tensor, no head count), the entry is unproven.
    """
    layout = model.layout
    ckpt_pairing, ckpt_vocab = checkpoint_rotary(checkpoint)
    if layout is not None and layout.rotary:
        def of(key: str) -> tuple[str, int] | None:
            return layout.rotary_of(key)
        model_words = "the model (its forward pass) rotates"
    else:
        # a model that did not run, or a checkpoint as the model: its names may say, and a rotary checkpoint's
        # queries and keys must not go into a model of unknown pairing unnoticed
        pairing, vocab = checkpoint_rotary(model) if layout is None else ("", "")
        if not pairing and (not ckpt_pairing or (layout is not None and layout.ran)):
            return entries
        model_words = f"the model's names ({vocab}) store" if pairing else "the model"

        def of(key: str) -> tuple[str, int] | None:
            return (pairing, 0) if rotary_role(key) in ("q", "k") else None
    out = []
    for e in entries:
        found = of(e.target)
        if found is None or not e.source or e.evidence.method in ("exact", "prefix"):
            out.append(e)
            continue
        want, dims = found
        if want and want == ckpt_pairing:
            out.append(e)
            continue
        rows = e.target_shape[0] if e.target_shape else 0
        can = (want and ckpt_pairing and len(e.source) == 1 and e.op.kind == "rename" and dims and rows % dims == 0
               and dims % 2 == 0)
        if can:
            note = (f"rotary rows to {want}: {model_words} {want} pairs of {dims} dims per head; the checkpoint's "
                    f"names ({ckpt_vocab}) store {ckpt_pairing} pairs")
            out.append(replace(e, op=Op(kind="rotary", heads=rows // dims, to=want),
                               evidence=replace(e.evidence, shape="rotary", note=note)))
            continue
        if not want and dims and layout is not None and not layout.ran:
            why = ("the model's forward pass did not run on the meta device, so which dims it pairs was not seen "
                   f"({layout.reason})")
        elif not want and dims:
            why = (f"the model rotates {dims} dims of each head, not all of them (partial rotary): how the "
                   "checkpoint's rows would be reordered is not decided")
        elif not want:
            why = (f"the checkpoint's names ({ckpt_vocab}) store {ckpt_pairing} pairs of rotary query/key dims, and "
                   "nothing says how the model pairs them" if ckpt_pairing else
                   "the model is rotary but its forward pass did not show which dims it pairs")
        elif not ckpt_pairing:
            why = (f"{model_words} {want} pairs of query/key dims, and nothing says how the checkpoint stores "
                   "them (interleaved pairs need each head's rows reordered)")
        elif not dims:
            why = (f"{model_words} {want} pairs, the checkpoint's names ({ckpt_vocab}) {ckpt_pairing} pairs, and "
                   "the head count is not known (build the model instead of naming a checkpoint)")
        else:
            why = (f"{model_words} {want} pairs, the checkpoint's names ({ckpt_vocab}) {ckpt_pairing} pairs, and "
                   f"this entry ({e.op.describe()}) cannot reorder each head's rows")
        note = f"unproven rotary layout: {why}; --source proves it by running both models"
        out.append(replace(e, confidence=min(e.confidence, UNPROVEN_CONFIDENCE),
                           evidence=replace(e.evidence, note=note)))
    return out
