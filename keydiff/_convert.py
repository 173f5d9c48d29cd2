"""Write a converted checkpoint: every entry's target tensor, produced one at a time, into safetensors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from keydiff._keys import KeySet, TensorInfo
from keydiff._mapping import Entry, KeyMap

if TYPE_CHECKING:
    import torch

__all__ = ["write_converted"]


def _producer(entry: Entry, source: Any, tick: Callable[[], None]) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        tensor = entry.op.apply([source.tensor(k) for k in entry.source], entry.target_shape)
        tick()
        return tensor

    return produce


def write_converted(mapping: KeyMap, source: Any, keys: KeySet, path: str | os.PathLike[str], *,
                    inputs: Iterable[str | os.PathLike[str]] = (), max_shard_size: int | None = None,
                    tick: Callable[[], None] = lambda: None) -> list[str]:
    """Write ``mapping`` applied to ``source``'s tensors as safetensors at ``path``, atomically.

    Args:
        mapping: the mapping to apply (its entries, in order, become the file's tensors).
        source: loads checkpoint tensors by stored name (``.tensor(key)``).
        keys: the checkpoint's key set (dtypes of the outputs).
        path: the output file (with ``max_shard_size``: the index file; shards go beside it).
        inputs: paths the output must not overwrite.
        max_shard_size: bytes per shard, for a sharded output in the Hugging Face layout.
        tick: called after each tensor (progress).

    Returns:
        The files written.
    """
    from keydiff._writer import write_safetensors

    items = [
        (e.target, TensorInfo(e.target_shape, keys[e.source[0]].dtype if e.source else e.op.dtype or "float32"),
         _producer(e, source, tick))
        for e in mapping.entries
    ]
    return write_safetensors(path, items, inputs=inputs, metadata={"format": "pt", "converted_by": "keydiff"},
                             max_shard_size=max_shard_size)
