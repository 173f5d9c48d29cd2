"""Tensor operations a mapping entry applies: rename, reshape, transpose, concat, split.

An op is a value: it describes itself, serialises to JSON, and applies to tensors. ``out_shape`` lets the planner
know the result's shape before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from keydiff._errors import MappingFileError

if TYPE_CHECKING:
    import torch

__all__ = ["OP_KINDS", "Op", "OpKind"]

OpKind = Literal["rename", "reshape", "transpose", "concat", "split"]
OP_KINDS: tuple[str, ...] = ("rename", "reshape", "transpose", "concat", "split")


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """How the source tensor(s) of an entry become its target tensor.

    Example:
        >>> Op(kind="split", index=1, sizes=(4, 4, 4)).describe()
        'split dim 0 into (4, 4, 4), part 1'
    """

    kind: OpKind
    """One of ``rename reshape transpose concat split``."""
    dim: int = 0
    """Dimension concatenated or split along."""
    index: int = 0
    """For ``split``: which part this target is."""
    sizes: tuple[int, ...] = ()
    """For ``split`` and ``concat``: size of each part along ``dim``."""

    def describe(self) -> str:
        """A short human description."""
        if self.kind == "split":
            return f"split dim {self.dim} into {self.sizes}, part {self.index}"
        if self.kind == "concat":
            return f"concat {len(self.sizes)} along dim {self.dim}"
        return self.kind

    def apply(self, tensors: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        """Compute the target tensor of the given shape from the source tensors."""
        import torch

        if self.kind == "concat":
            out = torch.cat(list(tensors), self.dim)
        elif self.kind == "split":
            out = tensors[0].split(list(self.sizes), self.dim)[self.index]
        elif self.kind == "transpose":
            out = tensors[0].t()
        else:
            out = tensors[0]
        return out.reshape(tuple(shape))

    def to_json(self) -> dict[str, Any]:
        """JSON form: ``{"kind": ...}`` plus the fields the kind uses."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("concat", "split"):
            out.update(dim=self.dim, sizes=list(self.sizes))
        if self.kind == "split":
            out["index"] = self.index
        return out

    @classmethod
    def from_json(cls, data: object, where: str) -> Op:
        """Read the JSON form; ``where`` locates it in error messages."""
        if not isinstance(data, Mapping) or data.get("kind") not in OP_KINDS:
            raise MappingFileError(f"{where}.kind: expected one of {', '.join(OP_KINDS)}, got {data!r}")
        sizes = data.get("sizes", [])
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise MappingFileError(f"{where}.sizes: expected a list of sizes, got {sizes!r}")
        dim, index = data.get("dim", 0), data.get("index", 0)
        if not isinstance(dim, int) or not isinstance(index, int):
            raise MappingFileError(f"{where}: dim and index must be integers, got {dim!r}, {index!r}")
        if data["kind"] == "split" and not 0 <= index < len(sizes):
            raise MappingFileError(f"{where}.index: {index} is not a part of sizes {sizes}")
        return cls(kind=data["kind"], dim=dim, index=index, sizes=tuple(sizes))


RENAME = Op(kind="rename")
RESHAPE = Op(kind="reshape")
TRANSPOSE = Op(kind="transpose")
