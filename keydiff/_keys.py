"""Leaf values: tensor facts, key sets, a model's dataflow, natural sort and exact index-set formatting."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["Dataflow", "KeySet", "Layout", "TensorInfo", "format_indices", "natural_key", "owner_of"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``blocks.2`` before ``blocks.10``.

    Example:
        >>> sorted(["b.10", "b.2", "a"], key=natural_key)
        ['a', 'b.2', 'b.10']
    """
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in _DIGITS.split(text) if t)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What is known of a tensor without reading it."""

    shape: tuple[int, ...]
    """Its shape."""
    dtype: str
    """Its dtype name as torch spells it (``float32``, ``bfloat16``...)."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size in bytes (0 for an unknown dtype)."""
        return self.numel * _DTYPE_BYTES.get(self.dtype, 0)

    def __str__(self) -> str:
        return f"[{', '.join(map(str, self.shape))}] {self.dtype}"


_DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "complex64": 8, "uint16": 2, "uint32": 4,
    "uint64": 8,
}


@dataclass(frozen=True, slots=True, repr=False)
class KeySet(Mapping[str, TensorInfo]):
    """An ordered, immutable ``key -> TensorInfo`` table: one side of a diff.

    Example:
        >>> ks = KeySet.from_items([("w", TensorInfo((2, 3), "float32"))], origin="demo")
        >>> ks["w"].numel, len(ks)
        (6, 1)
    """

    items_: tuple[tuple[str, TensorInfo], ...]
    """The keys in their order."""
    origin: str = ""
    """Where the keys come from (a path or a model spec)."""
    order_is_evidence: bool = True
    """False when the order was made up (safetensors sorts its keys), so it says nothing of the model."""
    flow: Dataflow | None = None
    """The order the model uses these tensors in and which module feeds which (models only; None: not traced)."""
    layout: Layout | None = None
    """How the model lays out tensors where its keys do not say (models only; None: not read)."""
    ties: tuple[tuple[str, ...], ...] = ()
    """Groups of keys that name one tensor of the model (a language model's head tied to its token embedding),
    each in key-set order (models only)."""
    _index: dict[str, TensorInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", dict(self.items_))

    def __repr__(self) -> str:
        first = ", ".join(k for k, _ in self.items_[:3]) + (", ..." if len(self.items_) > 3 else "")
        return f"KeySet(origin={self.origin!r}, {len(self.items_)} keys: {first})"

    @classmethod
    def from_items(
        cls, items: Iterable[tuple[str, TensorInfo]], *, origin: str = "", order_is_evidence: bool = True,
        flow: Dataflow | None = None, ties: tuple[tuple[str, ...], ...] = (),
    ) -> KeySet:
        """Build a key set from ``(key, info)`` pairs, in that order."""
        return cls(tuple(items), origin=origin, order_is_evidence=order_is_evidence, flow=flow, ties=ties)

    @property
    def infos(self) -> Mapping[str, TensorInfo]:
        """A read-only ``key -> TensorInfo`` view for hot loops (C-speed lookups, no method call per key)."""
        return MappingProxyType(self._index)

    def __getitem__(self, key: str) -> TensorInfo:
        return self._index[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)  # insertion-ordered: the key set's order

    def __len__(self) -> int:
        return len(self.items_)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def nbytes(self) -> int:
        """Total tensor bytes."""
        return sum(info.nbytes for _, info in self.items_)

    def to_frame(self):  # -> pandas.DataFrame, imported lazily
        """One row per key: ``key, shape, dtype, numel``."""
        import pandas as pd

        return pd.DataFrame(
            [(k, v.shape, v.dtype, v.numel) for k, v in self.items_], columns=["key", "shape", "dtype", "numel"]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """What a model's keys do not show of how it lays out its tensors, read from the built model
    (``keydiff._layouts.read_layout``): how it uses its 2-D weights, and how it rotates its queries and keys.

    Example:
        >>> lay = Layout(weights=(("fc.weight", "out_in"),), rotary=(("attn.q.weight", "half", 8),))
        >>> lay.weight("fc.weight"), lay.weight("other.weight"), lay.rotary_of("attn.q.weight")
        ('out_in', '', ('half', 8))
    """

    weights: tuple[tuple[str, str], ...] = ()
    """2-D weight key -> ``out_in`` (the weight of ``F.linear``, as ``nn.Linear`` stores it) or ``in_out``
    (multiplied as ``x @ w``, as GPT-2's ``Conv1D`` stores it); keys whose use is not known are absent."""
    rotary: tuple[tuple[str, str, int], ...] = ()
    """Query and key projection weights (and biases) a rotary embedding rotates: ``(key, layout, dims)``, the layout
    ``half`` or ``interleaved`` (``""``: rotary, layout not known) over ``dims`` rows per head."""
    ran: bool = False
    """Whether the forward pass ran: then ``rotary`` holds every rotation the model applies."""
    reason: str = ""
    """In words: where the facts come from (the forward pass traced, the config), or why some are missing."""
    _weights: dict[str, str] = field(init=False, repr=False, compare=False)
    _rotary: dict[str, tuple[str, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_weights", dict(self.weights))
        object.__setattr__(self, "_rotary", {k: (lay, dims) for k, lay, dims in self.rotary})

    def weight(self, key: str) -> str:
        """``out_in``, ``in_out``, or ``""`` when the use of this weight is not known."""
        return self._weights.get(key, "")

    def rotary_of(self, key: str) -> tuple[str, int] | None:
        """``(layout, dims per head)`` of a rotated query or key tensor; None for any other key."""
        return self._rotary.get(key)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dataflow:
    """How a model uses its tensors, from one forward pass on the meta device: evidence of order and adjacency.

    Keys are state-dict keys; modules are the paths that own them (``blocks.0.attn.qkv``; ``""`` is the root, the
    owner of ``cls_token``). ``trace_dataflow`` in ``keydiff._dataflow`` builds it.

    Example:
        >>> flow = Dataflow(ran=True, reason="ran", param_order=("a.weight", "b.weight", "b.bias"),
        ...                 order=("a", "b"), feeds=(("a", "b"),))
        >>> flow.position("b.bias"), flow.follows("a"), flow.fed_by("b")
        (2, ('b',), ('a',))
    """

    ran: bool
    """Whether the forward pass ran; when False every order below is registration (state-dict) order."""
    reason: str
    """In words: the input the forward ran on, or why it did not run."""
    param_order: tuple[str, ...]
    """Every key, in the order the forward first consumed it; a key never consumed follows the key registered
    before it (``bn.num_batches_tracked`` stays after ``bn.running_var``)."""
    order: tuple[str, ...]
    """Every tensor-owning module, in the order its first tensor is consumed."""
    feeds: tuple[tuple[str, str], ...] = ()
    """``(producer, consumer)``: the consumer's input was computed from the producer's output directly or through
    parameter-free ops (activations, reshapes, ``cat``, residual adds, pooling). Grouped by consumer in ``order``;
    each consumer's producers most recent first, so the first is the one that ran just before it."""
    unused: tuple[str, ...] = ()
    """Keys the forward pass never consumed (``num_batches_tracked`` in eval mode, an unused head)."""
    _rank: dict[str, int] = field(init=False, repr=False, compare=False)
    _module_rank: dict[str, int] = field(init=False, repr=False, compare=False)
    _out: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _in: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out: dict[str, list[str]] = {}
        into: dict[str, list[str]] = {}
        for producer, consumer in self.feeds:
            out.setdefault(producer, []).append(consumer)
            into.setdefault(consumer, []).append(producer)
        object.__setattr__(self, "_rank", {k: i for i, k in enumerate(self.param_order)})
        object.__setattr__(self, "_module_rank", {m: i for i, m in enumerate(self.order)})
        object.__setattr__(self, "_out", {m: tuple(v) for m, v in out.items()})
        object.__setattr__(self, "_in", {m: tuple(v) for m, v in into.items()})

    @classmethod
    def from_registration(cls, keys: Iterable[str], *, reason: str) -> Dataflow:
        """The dataflow known without running the model: registration order, no edges, ``ran=False``.

        Example:
            >>> Dataflow.from_registration(["b.weight", "a.weight"], reason="not run").order
            ('b', 'a')
        """
        keys = tuple(keys)
        return cls(ran=False, reason=reason, param_order=keys, order=tuple(dict.fromkeys(map(owner_of, keys))))

    def position(self, key: str) -> int:
        """First-use rank of a tensor key (0 is consumed first): its index in ``param_order``, so a key never
        consumed ranks right after the key registered before it, and every key has its registration rank when the
        forward did not run.

        Raises:
            KeyError: ``key`` is not one of the model's keys.
        """
        return self._rank[key]

    def module_position(self, module: str) -> int:
        """Rank of a tensor-owning module in ``order``.

        Raises:
            KeyError: ``module`` owns no tensor of the model.
        """
        return self._module_rank[module]

    def follows(self, module: str) -> tuple[str, ...]:
        """The modules ``module`` feeds, in the order they run (empty for an unknown module)."""
        return self._out.get(module, ())

    def fed_by(self, module: str) -> tuple[str, ...]:
        """The modules that feed ``module``, the most recent first (empty for an unknown module)."""
        return self._in.get(module, ())


def owner_of(key: str) -> str:
    """The module path that owns a tensor key (``""`` for a tensor of the root module).

    Example:
        >>> owner_of("blocks.0.attn.qkv.weight"), owner_of("cls_token")
        ('blocks.0.attn.qkv', '')
    """
    return key.rpartition(".")[0]


def format_indices(values: Iterable[int]) -> str:
    """Exact, compact index set: runs of consecutive values fold, gaps show.

    Example:
        >>> format_indices([0, 1, 2, 3, 5, 20])
        '{0..3,5,20}'
        >>> format_indices([7])
        '7'
    """
    vals = sorted(set(values))
    if len(vals) == 1:
        return str(vals[0])
    parts: list[str] = []
    start = prev = vals[0]
    for v in [*vals[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start},{prev}" if prev == start + 1 else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return "{" + ",".join(parts) + "}"
