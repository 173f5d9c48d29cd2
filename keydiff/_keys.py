"""Leaf values: tensor facts, key sets, natural sort and exact index-set formatting."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["KeySet", "TensorInfo", "format_indices", "natural_key"]

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
    _index: dict[str, TensorInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", dict(self.items_))

    def __repr__(self) -> str:
        first = ", ".join(k for k, _ in self.items_[:3]) + (", ..." if len(self.items_) > 3 else "")
        return f"KeySet(origin={self.origin!r}, {len(self.items_)} keys: {first})"

    @classmethod
    def from_items(
        cls, items: Iterable[tuple[str, TensorInfo]], *, origin: str = "", order_is_evidence: bool = True
    ) -> KeySet:
        """Build a key set from ``(key, info)`` pairs, in that order."""
        return cls(tuple(items), origin=origin, order_is_evidence=order_is_evidence)

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
