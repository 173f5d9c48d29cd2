"""Write a converted checkpoint: every entry's target tensor, produced one at a time, into safetensors (or a
torch file, when the output's suffix asks for one)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from keydiff._keys import KeySet, TensorInfo
from keydiff._mapping import Entry, KeyMap

if TYPE_CHECKING:
    import torch

__all__ = ["TORCH_OUTPUT_SUFFIXES", "write_converted"]

TORCH_OUTPUT_SUFFIXES = (".pt", ".pth", ".bin")
"""Output suffixes written with ``torch.save`` (what ``torch.load(path, weights_only=True)`` reads)."""


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
    if os.fspath(path).lower().endswith(TORCH_OUTPUT_SUFFIXES):
        return [_write_torch(os.fspath(path), mapping, source, inputs, tick)]
    from keydiff._writer import write_safetensors

    items = [
        (e.target, TensorInfo(e.target_shape, keys[e.source[0]].dtype if e.source else e.op.dtype or "float32"),
         _producer(e, source, tick))
        for e in mapping.entries
    ]
    return write_safetensors(path, items, inputs=inputs, metadata={"format": "pt", "converted_by": "keydiff"},
                             max_shard_size=max_shard_size)


def _write_torch(path: str, mapping: KeyMap, source: Any, inputs: Iterable[str | os.PathLike[str]],
                 tick: Callable[[], None]) -> str:
    """``torch.save`` of the converted state dict, atomically (a temp file renamed into place). The whole state
    dict is held in memory: torch's format is one pickle, it cannot be streamed tensor by tensor."""
    import torch

    from keydiff._writer import _commit, _create_temp, _refuse_inputs, _remove

    _refuse_inputs([path], inputs)
    # clone: a tensor read through mmap or a view of a shared storage would save its whole storage
    state = {e.target: _producer(e, source, tick)().contiguous().clone() for e in mapping.entries}
    temp, f = _create_temp(path)
    try:
        with f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _commit([(temp, path)])
    except BaseException:
        _remove(temp)
        raise
    return path
