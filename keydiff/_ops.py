"""Tensor operations a mapping entry applies: rename, reshape, transpose, concat, split, stack, unstack, zeros,
rotary, weight_norm, norm.

``stack`` builds a tensor packed over experts from per-expert tensors (each element the concatenation of ``sizes``
parts along ``dim``); ``unstack`` takes part ``index`` (expert ``index // len(sizes)``, part ``index % len(sizes)``)
back out of one. ``zeros`` has no source: it fills a tensor the checkpoint does not hold with zeros of ``dtype``
(the bias of a ``Linear`` whose weight came from a bare matrix used as ``x @ proj``, which has none); an entry
with it always says why in its evidence.

``rotary`` reorders the rows of each of ``heads`` heads (the projection of the queries or keys of a rotary
attention): code that rotates interleaved pairs (dims 0-1, 2-3, ... of a head, complex multiplication) and code that
rotates halves (dim i with dim i + d/2, ``rotate_half``) compute the same attention when each head's rows are
reordered. ``to="half"``: rows ``[0, 2, 4, ..., 1, 3, 5, ...]`` of each head; ``to="interleaved"``: the inverse.

Two ops compute values, for weight normalisation (``w = g * v / ||v||``, the norm taken over every dimension but
``dim``, the one ``g`` keeps): ``weight_norm`` makes the plain weight from its two sources ``(g, v)``, and ``norm``
makes ``g = ||w||`` from a plain weight (with ``v = w`` beside it, an exact inverse: ``||w|| * w / ||w|| = w``).

An op is a value: it describes itself, serialises to JSON, and applies to tensors. ``out_shape`` lets the planner
know the result's shape before any tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from keydiff._errors import MappingFileError

if TYPE_CHECKING:
    import torch

__all__ = ["OP_KINDS", "ROTARY_LAYOUTS", "Op", "OpKind", "rotary_rows", "weight_norm_fits"]

OpKind = Literal["rename", "reshape", "transpose", "concat", "split", "stack", "unstack", "zeros", "rotary",
                 "weight_norm", "norm"]
OP_KINDS: tuple[str, ...] = ("rename", "reshape", "transpose", "concat", "split", "stack", "unstack", "zeros",
                             "rotary", "weight_norm", "norm")
ROTARY_LAYOUTS = ("half", "interleaved")
"""How code pairs the dims a rotary embedding rotates together: ``i`` with ``i + d/2``, or ``2i`` with ``2i + 1``."""
_DTYPES = ("float32", "float16", "bfloat16", "float64")
"""Dtypes a ``zeros`` op may fill with."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """How the source tensor(s) of an entry become its target tensor.

    Example:
        >>> Op(kind="split", index=1, sizes=(4, 4, 4)).describe()
        'split dim 0 into (4, 4, 4), part 1'
    """

    kind: OpKind
    """One of ``rename reshape transpose concat split stack unstack zeros rotary weight_norm norm``."""
    dim: int = 0
    """Dimension concatenated or split along (within each expert, for ``stack``/``unstack``); for ``weight_norm``
    and ``norm``, the dimension the norm keeps (every other one is reduced)."""
    index: int = 0
    """For ``split`` and ``unstack``: which part this target is."""
    sizes: tuple[int, ...] = ()
    """For ``split``, ``concat``, ``stack``, ``unstack``: size of each part along ``dim``."""
    dtype: str = ""
    """For ``zeros``: the dtype of the tensor it makes (that of the tensors beside it), ``float32`` if empty."""
    heads: int = 0
    """For ``rotary``: how many heads the rows hold (each ``rows / heads`` long)."""
    to: str = ""
    """For ``rotary``: the layout the rows are put in, ``half`` or ``interleaved`` (see ``ROTARY_LAYOUTS``)."""

    def describe(self) -> str:
        """A short human description."""
        if self.kind == "split":
            return f"split dim {self.dim} into {self.sizes}, part {self.index}"
        if self.kind == "concat":
            return f"concat {len(self.sizes)} along dim {self.dim}"
        if self.kind == "stack":
            return "stack experts" + (f" (concat {len(self.sizes)} each)" if len(self.sizes) > 1 else "")
        if self.kind == "unstack":
            n = len(self.sizes)
            return f"unstack expert {self.index // n}" + (f", part {self.index % n}" if n > 1 else "")
        if self.kind == "zeros":
            return "zeros (no source)"
        if self.kind == "rotary":
            return f"rotary rows to {self.to} ({self.heads} heads)"
        if self.kind == "weight_norm":
            return f"weight norm g * v / ||v|| (dim {self.dim})"
        if self.kind == "norm":
            return f"norm ||w|| (dim {self.dim})"
        return self.kind

    def inverse(self) -> Op:
        """The op that undoes this one on its output, for the ops of one source and one target.

        Example:
            >>> Op(kind="rotary", heads=4, to="half").inverse().to
            'interleaved'
        """
        if self.kind == "rotary":
            return Op(kind="rotary", heads=self.heads, to=ROTARY_LAYOUTS[self.to == "half"])
        if self.kind in ("transpose", "reshape"):
            return self
        return Op(kind="rename")

    def apply(self, tensors: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
        """Compute the target tensor of the given shape from the source tensors."""
        import torch

        if self.kind == "zeros":
            return torch.zeros(tuple(shape), dtype=getattr(torch, self.dtype or "float32"))
        if self.kind == "concat":
            out = torch.cat(list(tensors), self.dim)
        elif self.kind == "stack":
            n = len(self.sizes)
            out = torch.stack([torch.cat(list(tensors[i: i + n]), self.dim) for i in range(0, len(tensors), n)])
        elif self.kind == "unstack":
            n = len(self.sizes)
            out = tensors[0][self.index // n].split(list(self.sizes), self.dim)[self.index % n]
        elif self.kind == "split":
            out = tensors[0].split(list(self.sizes), self.dim)[self.index]
        elif self.kind == "weight_norm":
            g, v = tensors
            # torch's own kernel: bit for bit what its weight-norm forward and remove_weight_norm compute
            out = torch._weight_norm(v, g, self.dim)
        elif self.kind == "norm":
            out = _norm_except(tensors[0], self.dim)
        elif self.kind == "transpose":
            out = tensors[0].t()
        elif self.kind == "rotary":
            out = rotary_rows(tensors[0], self.heads, self.to)
        else:
            out = tensors[0]
        return out.reshape(tuple(shape))

    def to_json(self) -> dict[str, Any]:
        """JSON form: ``{"kind": ...}`` plus the fields the kind uses."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("concat", "split", "stack", "unstack"):
            out.update(dim=self.dim, sizes=list(self.sizes))
        if self.kind in ("weight_norm", "norm"):
            out["dim"] = self.dim
        if self.kind in ("split", "unstack"):
            out["index"] = self.index
        if self.kind == "zeros":
            out["dtype"] = self.dtype or "float32"
        if self.kind == "rotary":
            out.update(heads=self.heads, to=self.to)
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
        dtype = data.get("dtype", "float32") if data["kind"] == "zeros" else ""
        if data["kind"] == "zeros" and dtype not in _DTYPES:
            raise MappingFileError(f"{where}.dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
        heads, to = (data.get("heads"), data.get("to")) if data["kind"] == "rotary" else (0, "")
        if data["kind"] == "rotary" and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1
                                         or to not in ROTARY_LAYOUTS):
            raise MappingFileError(f"{where}: a rotary op needs heads (a positive integer) and to (one of "
                                   f"{', '.join(ROTARY_LAYOUTS)}), got heads={heads!r}, to={to!r}")
        return cls(kind=data["kind"], dim=dim, index=index, sizes=tuple(sizes), dtype=dtype, heads=heads, to=to)


def rotary_rows(tensor: torch.Tensor, heads: int, to: str) -> torch.Tensor:
    """The rows of each head of ``tensor`` (dim 0: ``heads`` heads of ``d`` rows) reordered into layout ``to``.

    ``half``: a head's rows ``[0, 2, 4, ..., 1, 3, 5, ...]`` (interleaved pairs become halves); ``interleaved``: the
    inverse. A 1-D tensor (a bias) is reordered the same way.

    Example:
        >>> import torch
        >>> rotary_rows(torch.arange(8), 2, "half").tolist()
        [0, 2, 1, 3, 4, 6, 5, 7]
    """
    rows = tensor.shape[0]
    if heads < 1 or rows % (2 * heads):
        raise ValueError(f"cannot reorder {rows} rows as {heads} rotary heads of an even size")
    half = rows // heads // 2
    # interleaved -> half: view a head's rows as (pairs, 2) and read them pair-member first
    grid = (heads, half, 2, -1) if to == "half" else (heads, 2, half, -1)
    return tensor.reshape(grid).transpose(1, 2).reshape(tensor.shape)


def weight_norm_fits(g: tuple[int, ...], v: tuple[int, ...], dim: int) -> bool:
    """Whether ``g`` is the shape of ``v``'s norm over every dimension but ``dim`` (-1: over all of them; torch's
    ``weight_norm(dim=None)``, whose ``g`` is a scalar).

    Example:
        >>> weight_norm_fits((8, 1, 1), (8, 4, 3), 0), weight_norm_fits((1, 1, 3), (8, 4, 3), 2)
        (True, True)
        >>> weight_norm_fits((4, 1, 1), (8, 4, 3), 0)
        False
    """
    if dim == -1:
        return math.prod(g) == 1
    if not 0 <= dim < len(v) or len(g) != len(v):
        return False
    return all(n == (v[d] if d == dim else 1) for d, n in enumerate(g))


def _norm_except(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2-norm over every dimension of ``t`` but ``dim``, keeping all dimensions (the shape of ``g``)."""
    dims = [d for d in range(t.dim()) if d != dim]
    return t.norm(2, dim=dims, keepdim=True) if dims else t.abs()  # an empty dim list would reduce them all


RENAME = Op(kind="rename")
RESHAPE = Op(kind="reshape")
TRANSPOSE = Op(kind="transpose")
