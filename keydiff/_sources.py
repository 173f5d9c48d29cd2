"""Reading checkpoints: safetensors headers, sharded indexes, torch zip and legacy files, plain pickles.

``read_checkpoint`` sniffs the format, reads as little as it can (a safetensors header, a memory-mapped torch
archive), finds the tensor dict inside a training checkpoint and returns a ``Checkpoint``: the keys with their shapes
and dtypes, where they were found, and lazy access to the tensors. Every failure on a bad file is a
``CheckpointError``; nothing else escapes for a bad input.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter, sub
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, BinaryIO

from keydiff._errors import CheckpointError, CheckpointNotFound, KeydiffError, UnsafePickle, UsageError
from keydiff._hub import local_path
from keydiff._keys import KeySet, TensorInfo, natural_key
from keydiff._parallel import plan_merge
from keydiff._plain import plain_data, plain_globals

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "SAFETENSORS_DTYPES",
    "Checkpoint",
    "SafetensorsHeader",
    "is_checkpoint_path",
    "read_checkpoint",
    "read_safetensors_header",
]

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".th", ".index.json")
_TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".th")
# Meta's model-parallel checkpoints: one file per rank, consolidated.00.pth .. consolidated.NN.pth, beside params.json
_CONSOLIDATED = re.compile(r"^consolidated\.(\d+)\.pth$")
# params.json fields that give a full size of the model (its width, the MLP's hidden width, the vocabulary)
_PARAMS_SIZES = ("dim", "hidden_dim", "vocab_size")

SAFETENSORS_DTYPES: Mapping[str, tuple[str, int]] = MappingProxyType({
    "F64": ("float64", 64), "F32": ("float32", 32), "F16": ("float16", 16), "BF16": ("bfloat16", 16),
    "I64": ("int64", 64), "I32": ("int32", 32), "I16": ("int16", 16), "I8": ("int8", 8),
    "U64": ("uint64", 64), "U32": ("uint32", 32), "U16": ("uint16", 16), "U8": ("uint8", 8), "BOOL": ("bool", 8),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8), "F8_E8M0": ("float8_e8m0fnu", 8), "C64": ("complex64", 64),
    # Sub-byte formats: torch has no per-element dtype for them, but their keys and shapes still diff.
    "F4": ("float4_e2m1fn", 4), "F6_E2M3": ("float6_e2m3fn", 6), "F6_E3M2": ("float6_e3m2fn", 6),
})
"""safetensors dtype code -> (torch dtype name, bits per element)."""

# safetensors itself refuses larger headers; checking first keeps a hostile length from allocating gigabytes.
_MAX_HEADER = 100_000_000
_REDOWNLOAD = "Re-download or re-export the file."
_UNREADABLE = "not a readable PyTorch or safetensors file"
_UNREADABLE_REMEDY = "Check that it is a checkpoint (safetensors, torch.save output) and that it downloaded fully."
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy format starts with this pickled integer (torch.serialization.MAGIC_NUMBER).
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Globals a plain pickle may name and still be loaded without running code.
_PLAIN_PICKLE_GLOBALS = frozenset({
    "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.complex",
    "builtins.slice", "_codecs.encode",
})
_STRING_OPS = frozenset({
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
})
_LIVE_NAMES = ("state_dict", "model", "module", "net", "params")
_EMA_TOKENS = frozenset({"ema", "swa", "averaged", "average"})


# --------------------------------------------------------------------------------------------------- safetensors


_HeaderEntry = tuple[str, TensorInfo, tuple[int, int]]


@dataclass(frozen=True, slots=True, kw_only=True)
class SafetensorsHeader:
    """A parsed and validated safetensors header."""

    tensors: tuple[_HeaderEntry, ...]
    """``(key, info, (begin, end))`` in header order; offsets are relative to the data section."""
    metadata: Mapping[str, str]
    """The ``__metadata__`` entry (empty if absent)."""
    data_start: int
    """Byte offset of the data section: 8 plus the header length."""
    file_size: int
    """Size of the file in bytes."""


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse a safetensors header, reading no tensor data.

    Args:
        path: A ``.safetensors`` file.

    Returns:
        The header, validated against the file's size.

    Raises:
        CheckpointNotFound: The path does not exist.
        CheckpointError: The file is not a valid safetensors file (too short, truncated, malformed header).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        >>> head = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
        >>> _ = open(p, "wb").write(len(head).to_bytes(8, "little") + head + bytes(8))
        >>> read_safetensors_header(p).tensors[0][1]
        TensorInfo(shape=(2,), dtype='float32')
    """
    with _open_binary(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            what = "empty" if size == 0 else f"only {size} bytes long"
            raise CheckpointError(path, f"is {what}, too short to be a safetensors file", _REDOWNLOAD)
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise CheckpointError(
                path, f"safetensors header length {length} is larger than the file ({size} bytes)",
                f"The file is truncated or not a safetensors file. {_REDOWNLOAD}",
            )
        if length > _MAX_HEADER:
            raise CheckpointError(path, f"safetensors header of {length} bytes exceeds the 100 MB limit", _REDOWNLOAD)
        raw = f.read(length)
    return _parse_header(path, raw, data_start=8 + length, file_size=size)


def _parse_header(path: str | os.PathLike[str], raw: bytes, *, data_start: int, file_size: int) -> SafetensorsHeader:
    fast = _parse_header_fast(raw, file_size - data_start)
    if fast is not None:
        return SafetensorsHeader(
            tensors=fast[0], metadata=MappingProxyType(fast[1]), data_start=data_start, file_size=file_size
        )
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"safetensors header is not UTF-8 text ({exc.reason})", _REDOWNLOAD) from exc
    except (ValueError, RecursionError) as exc:
        reason = f"{exc.msg} at byte {exc.pos}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise CheckpointError(path, f"safetensors header is not valid JSON ({reason})", _REDOWNLOAD) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"safetensors header is not a JSON object (found {_describe(obj)})", _REDOWNLOAD)
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "safetensors __metadata__ is not a mapping of strings", _REDOWNLOAD)
    data_size = file_size - data_start
    tensors = tuple(_parse_entry(path, key, entry, data_size) for key, entry in obj.items())
    return SafetensorsHeader(
        tensors=tensors, metadata=MappingProxyType(metadata), data_start=data_start, file_size=file_size
    )


def _parse_header_fast(raw: bytes, data_size: int) -> tuple[tuple[_HeaderEntry, ...], dict[str, str]] | None:
    """The common, valid header at C speed (100,000 entries in a fraction of a second); None for anything unusual,
    which the full parser then judges exactly as before.

    Without a hook, ``json.loads`` keeps the last of duplicate keys. Every key-value pair in JSON text has a colon
    of its own, so a header with exactly as many colons as its parsed pairs names no key twice.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except Exception:
        return None
    if type(obj) is not dict:
        return None
    pairs = len(obj)
    metadata = obj.pop("__metadata__", {})
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        return None
    pairs += len(metadata) + 3 * len(obj)
    # each check is one pass over every entry at C speed (map, set, chain), not one interpreted step per entry
    entries = list(obj.values())
    if entries and (set(map(type, entries)) != {dict} or set(map(len, entries)) != {3}):
        return None
    try:
        dtypes = list(map(itemgetter("dtype"), entries))
        shapes = list(map(itemgetter("shape"), entries))
        offsets = list(map(itemgetter("data_offsets"), entries))
    except KeyError:
        return None
    if entries and not (set(map(type, shapes)) == set(map(type, offsets)) == {list}
                        and set(map(len, offsets)) == {2} and set(map(type, chain.from_iterable(shapes))) <= {int}):
        return None
    bounds = list(chain.from_iterable(offsets))
    if bounds and (set(map(type, bounds)) != {int} or min(bounds) < 0 or max(bounds) > data_size):
        return None
    # (dtype, shape) -> (info, bytes needed): a few distinct kinds serve every entry; infos are shared values
    signatures = list(zip(dtypes, map(tuple, shapes), strict=True))
    kinds: dict[tuple, tuple[TensorInfo, int]] = {}
    try:
        distinct = set(signatures)
    except TypeError:  # an unhashable dtype
        return None
    for sig in distinct:
        dtype, shape = sig
        if type(dtype) is not str or dtype not in SAFETENSORS_DTYPES or any(d < 0 for d in shape):
            return None
        name, bits = SAFETENSORS_DTYPES[dtype]
        kinds[sig] = (TensorInfo(shape, name), -(-math.prod(shape) * bits // 8))
    found = list(map(kinds.__getitem__, signatures))
    if list(map(sub, bounds[1::2], bounds[0::2])) != list(map(itemgetter(1), found)):  # sizes; also begin <= end
        return None
    tensors = list(zip(obj, map(itemgetter(0), found), map(tuple, offsets), strict=True))
    if raw.count(b":") != pairs:
        return None
    return tuple(tensors), metadata


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys; a header that names a tensor twice is ambiguous, so refuse it.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_entry(path: str | os.PathLike[str], key: str, entry: object, data_size: int) -> _HeaderEntry:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(path, f"safetensors entry {key!r} {problem}", _REDOWNLOAD)

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            path, f"safetensors entry {key!r} has unknown dtype {dtype!r}",
            "Upgrade keydiff, or re-export the file with a standard dtype.",
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)) or (
        offsets[0] > offsets[1]
    ):
        raise bad(f"has invalid data_offsets {offsets!r}")
    if offsets[1] > data_size:
        raise bad(f"ends at byte {offsets[1]} of the data section, which holds only {data_size} (truncated file?)")
    name, bits = SAFETENSORS_DTYPES[dtype]
    need = -(-math.prod(shape) * bits // 8)
    if offsets[1] - offsets[0] != need:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} needs {need}")
    return key, TensorInfo(tuple(shape), name), (offsets[0], offsets[1])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True, slots=True)
class _SafetensorsStore:
    """Tensors read on demand from safetensors files."""

    shard_of: Mapping[str, str]

    def iter(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        with ExitStack() as stack:
            handles: dict[str, Any] = {}
            for key in keys:
                shard = self.shard_of[key]
                with _translating(shard):
                    if shard not in handles:
                        # safe_open maps the file: holding one handle per shard costs no memory.
                        handles[shard] = stack.enter_context(safe_open(shard, "pt"))
                    tensor = handles[shard].get_tensor(key)
                yield key, tensor


@dataclass(frozen=True, slots=True)
class _ObjectStore:
    """Tensors already unpickled (memory-mapped for zip archives)."""

    tensors: Mapping[str, torch.Tensor]

    def iter(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self.tensors[key]


@dataclass(frozen=True, slots=True)
class _MergedStore:
    """Tensors of model-parallel shards, merged on demand: one copy of a replicated tensor, else the shards'
    slices concatenated along the split dim."""

    parts: Mapping[str, tuple[tuple[torch.Tensor, ...], int | None]]

    def iter(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        for key in keys:
            slices, dim = self.parts[key]
            yield key, slices[0] if dim is None else torch.cat(slices, dim)


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A checkpoint's tensor keys, where they were found, and lazy access to the tensors.

    Example:
        >>> ckpt = read_checkpoint("model.safetensors")  # doctest: +SKIP
        >>> ckpt.fmt, ckpt.container, len(ckpt.keys)  # doctest: +SKIP
        ('safetensors', '', 212)
    """

    path: str
    """The path as given."""
    fmt: str
    """``safetensors``, ``safetensors-sharded``, ``torch-zip``, ``torch-legacy``, ``torch-sharded``, ``pickle``, or
    ``torch-consolidated (N model-parallel shards merged)``."""
    keys: KeySet
    """Key -> shape and dtype of the chosen tensor dict, raw names, in file order."""
    container: str
    """Dotted path of the chosen dict inside the file (``""`` is the top level, ``"state_dict"``, ``"model_ema"``)."""
    alternatives: tuple[str, ...] = ()
    """Other containers that also hold tensor dicts, naturally sorted."""
    other_entries: tuple[str, ...] = ()
    """Entries outside the chosen dict (``epoch``, ``optimizer_states``...), dotted below the top level."""
    non_tensor_keys: tuple[str, ...] = ()
    """Entries inside the chosen dict that are not tensors: reported, not part of ``keys``."""
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """safetensors ``__metadata__`` (of the first shard); empty for torch files."""
    _store: _SafetensorsStore | _ObjectStore | _MergedStore = field(repr=False, compare=False)

    def tensor(self, key: str) -> torch.Tensor:
        """Load one tensor.

        Raises:
            KeyError: ``key`` is not in ``keys``.
        """
        return next(self.tensors([key]))[1]

    def tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time, in the order asked; safetensors holds one tensor at a time.

        Raises:
            KeyError: A key is not in ``keys``.
        """
        keys = list(keys)
        unknown = [k for k in keys if k not in self.keys]
        if unknown:
            raise KeyError(f"{self.path} holds no tensor {unknown[0]!r}")
        return self._store.iter(keys)


def is_checkpoint_path(spec: str) -> bool:
    """True if ``spec`` names an existing file or directory, or ends with a checkpoint suffix.

    Example:
        >>> is_checkpoint_path("out/model.safetensors"), is_checkpoint_path("resnet50")
        (True, False)
    """
    return os.path.exists(spec) or spec.lower().endswith(CHECKPOINT_SUFFIXES)


def read_checkpoint(
    path: str | os.PathLike[str], *, key: str | None = None, unsafe_pickle: bool = False
) -> Checkpoint:
    """Read a checkpoint's keys, shapes and dtypes, and find its tensor dict.

    Args:
        path: A ``.safetensors`` file, a sharded ``*.index.json``, a directory holding either, or a torch file; a
            Hugging Face repo id or cache folder (``models--org--name``) is read from the local cache's snapshot.
        key: Dotted path of the tensor dict to use (``"model_ema"``); by default the live weights are chosen.
        unsafe_pickle: Let pickles run code while loading. Only for trusted files.

    Returns:
        The checkpoint.

    Raises:
        CheckpointNotFound: The path does not exist.
        UnsafePickle: The file needs code execution to load and ``unsafe_pickle`` is off; nothing was executed.
        CheckpointError: The file cannot be read, or holds no tensors.
        UsageError: ``key`` names no tensor dict.

    Example:
        >>> ckpt = read_checkpoint("last.ckpt")  # doctest: +SKIP
        >>> ckpt.container, ckpt.other_entries  # doctest: +SKIP
        ('state_dict', ('epoch', 'global_step', 'optimizer_states'))
    """
    shown = local_path(os.fspath(path))  # a Hugging Face repo id or cache folder: its snapshot, offline
    if not os.path.exists(shown):
        raise CheckpointNotFound(shown)
    ranks = _consolidated_shards(shown)
    if len(ranks) > 1:
        return _read_consolidated(shown, ranks, key, unsafe_pickle=unsafe_pickle)
    if os.path.isdir(shown):
        files = _files_in_directory(shown)
    elif shown.lower().endswith(".index.json"):
        files = _files_in_index(shown)
    else:
        files = [(shown, None)]
    if all(_is_safetensors(f) for f, _ in files):
        return _read_safetensors(shown, files, key)
    return _read_torch(shown, files, key, unsafe_pickle=unsafe_pickle)


# ------------------------------------------------------------------------------------------------------- layouts


def _files_in_directory(directory: str) -> list[tuple[str, frozenset[str] | None]]:
    try:
        names = sorted(os.listdir(directory), key=natural_key)
    except OSError as exc:
        raise CheckpointError(directory, f"cannot be listed ({exc.strerror or exc})", "Check its permissions.") from exc
    indexes = [n for n in names if n.lower().endswith(".index.json")]
    if len(indexes) > 1:
        # Hugging Face repositories often ship both; the safetensors one reads without unpickling.
        indexes = [n for n in indexes if n.lower().endswith(".safetensors.index.json")] or indexes
    if len(indexes) == 1:
        return _files_in_index(os.path.join(directory, indexes[0]))
    shards = [n for n in names if n.lower().endswith(".safetensors")]
    if shards:
        return [(os.path.join(directory, n), None) for n in shards]
    torch_files = [n for n in names if n.lower().endswith(_TORCH_SUFFIXES)]
    if len(torch_files) == 1:
        return [(os.path.join(directory, torch_files[0]), None)]
    found = f"found {len(names)} entries" if names else "it is empty"
    if len(indexes) > 1 or len(torch_files) > 1:
        found = f"found {', '.join(indexes or torch_files)}, and cannot tell which to use"
    raise CheckpointError(
        directory, f"no checkpoint found in directory ({found})",
        "Give the checkpoint file (or its *.index.json) instead of the directory.",
    )


def _files_in_index(index_path: str) -> list[tuple[str, frozenset[str] | None]]:
    """Shard files of a Hugging Face index, each with the keys the index says it holds."""
    try:
        with _open_binary(index_path) as f:
            index = json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(index_path, f"index is not valid JSON ({exc})", _REDOWNLOAD) from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(index_path, "index has no weight_map of key -> shard file", _REDOWNLOAD)
    directory = os.path.dirname(index_path)
    by_shard: dict[str, set[str]] = {}
    for tensor_key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(tensor_key)
    files = []
    for shard in sorted(by_shard, key=natural_key):
        # Shard names come from the file: keep them inside the index's directory.
        if os.path.isabs(shard) or ".." in re.split(r"[\\/]", shard):
            raise CheckpointError(index_path, f"index names a shard outside its directory ({shard!r})", _REDOWNLOAD)
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(
                index_path, f"shard {shard!r} listed in the index is missing",
                "Download every shard next to the index.",
            )
        files.append((shard_path, frozenset(by_shard[shard])))
    if not files:
        raise CheckpointError(index_path, "index lists no tensors", _REDOWNLOAD)
    return files


def _is_safetensors(path: str) -> bool:
    if path.lower().endswith(".safetensors"):
        return True
    if path.lower().endswith(_TORCH_SUFFIXES):
        return False
    # Any other name: a safetensors file opens with a little-endian length and then a JSON object.
    with _open_binary(path) as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _check_index_keys(shard: str, found: Iterable[str], listed: frozenset[str] | None) -> None:
    if listed is None:
        return
    missing = listed.difference(found)
    if missing:
        first = min(missing, key=natural_key)
        raise CheckpointError(
            shard, f"does not hold {len(missing)} key(s) the index assigns to it (first: {first!r})",
            "The index and its shards do not match; re-download them together.",
        )


def _read_safetensors(shown: str, files: list[tuple[str, frozenset[str] | None]], key: str | None) -> Checkpoint:
    if key not in (None, ""):
        raise UsageError(f"{shown}: no tensor dict at {key!r}; a safetensors file has one, at the top level ('')")
    items: list[tuple[str, TensorInfo]] = []
    shard_of: dict[str, str] = {}
    metadata: Mapping[str, str] = MappingProxyType({})
    for n, (shard, listed) in enumerate(files):
        header = read_safetensors_header(shard)
        metadata = header.metadata if n == 0 else metadata
        names = [k for k, _, _ in header.tensors]
        _check_index_keys(shard, names, listed)
        if shard_of and not shard_of.keys().isdisjoint(names):
            name = next(k for k in names if k in shard_of)
            raise _duplicate(shown, name, shard_of[name], shard)
        shard_of.update(dict.fromkeys(names, shard))  # a header names each key once (checked when parsed)
        items.extend((name, info) for name, info, _ in header.tensors)
    return Checkpoint(
        path=shown,
        fmt="safetensors-sharded" if _is_sharded(files) else "safetensors",
        # safetensors sorts keys on save, so the header order says nothing about the model.
        keys=KeySet.from_items(items, origin=shown, order_is_evidence=False),
        container="",
        metadata=metadata,
        _store=_SafetensorsStore(shard_of),
    )


def _is_sharded(files: list[tuple[str, frozenset[str] | None]]) -> bool:
    # An index makes a sharded checkpoint even when it lists a single shard.
    return len(files) > 1 or files[0][1] is not None


def _duplicate(shown: str, name: str, first: str, second: str) -> CheckpointError:
    return CheckpointError(
        shown, f"key {name!r} is in two shards ({os.path.basename(first)} and {os.path.basename(second)})",
        "Give one of the files, or remove the stray shard from the directory.",
    )


# ------------------------------------------------------------------------------------------ model-parallel shards


def _consolidated_shards(path: str) -> list[str]:
    """The model-parallel shards a path stands for: a folder's ``consolidated.NN.pth`` files, or a
    ``consolidated.NN.pth`` file's siblings with it, in rank order; empty when the path is neither.

    Raises:
        CheckpointError: a rank between the first and the last is missing.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.isdir(path) and not _CONSOLIDATED.match(os.path.basename(path)):
        return []
    try:
        names = os.listdir(folder)
    except OSError:
        return []  # the ordinary readers report an unreadable folder
    ranks = {int(m.group(1)): name for name in names if (m := _CONSOLIDATED.match(name))}
    gaps = [r for r in range(max(ranks, default=-1) + 1) if r not in ranks]
    if gaps:
        shown = ", ".join(f"consolidated.{r:02d}.pth" for r in gaps)
        raise CheckpointError(path, f"model-parallel shard {shown} is missing (found {len(ranks)} of "
                                    f"{max(ranks) + 1})", "Download every consolidated.NN.pth shard into one folder.")
    return [os.path.join(folder, ranks[r]) for r in sorted(ranks)]


def _read_consolidated(shown: str, shards: list[str], key: str | None, *, unsafe_pickle: bool) -> Checkpoint:
    """Merge N model-parallel shards into the one model they are slices of (``keydiff._parallel`` decides how)."""
    found = [_choose(shard, _load_pickled(shard, unsafe_pickle=unsafe_pickle)[0], key) for shard in shards]
    tensors = [part.tensors for part in found]
    shapes = [{k: tuple(t.shape) for k, t in part.items()} for part in tensors]
    plan = plan_merge([os.path.basename(s) for s in shards], shapes, where=shown,
                      identical=lambda k: _same_everywhere([part[k] for part in tensors]),
                      sizes=_params_sizes(os.path.dirname(shards[0])))
    items = []
    for name, dim in plan.items():
        shape = list(shapes[0][name])
        if dim is not None:
            shape[dim] *= len(shards)
        items.append((name, TensorInfo(tuple(shape), str(tensors[0][name].dtype).removeprefix("torch."))))
    first = found[0]
    return Checkpoint(
        path=shown,
        fmt=f"torch-consolidated ({len(shards)} model-parallel shards merged)",
        keys=KeySet.from_items(items, origin=shown, order_is_evidence=True),
        container=first.container,
        alternatives=first.alternatives,
        other_entries=first.other_entries,
        non_tensor_keys=first.non_tensor_keys,
        _store=_MergedStore({k: (tuple(part[k] for part in tensors), dim) for k, dim in plan.items()}),
    )


def _same_everywhere(slices: list[torch.Tensor]) -> bool:
    """True when every shard holds the same values (a replicated tensor). A few leading values are compared
    first, so a split tensor costs one page of each memory-mapped file, not its data."""
    import torch

    heads = [t.reshape(-1)[:64] for t in slices]
    if not all(torch.equal(heads[0], h) for h in heads[1:]):
        return False
    return all(torch.equal(slices[0], t) for t in slices[1:])


def _params_sizes(folder: str) -> list[int]:
    """Full sizes ``params.json`` beside the shards states (its width, hidden width, vocabulary); optional
    evidence, so an unreadable file gives none."""
    try:
        with open(os.path.join(folder, "params.json"), encoding="utf-8") as f:
            params = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(params, dict):
        return []
    return [v for k in _PARAMS_SIZES if isinstance(v := params.get(k), int) and not isinstance(v, bool) and v > 0]


# ---------------------------------------------------------------------------------------------------------- torch


@dataclass(frozen=True, slots=True, kw_only=True)
class _Found:
    """The chosen tensor dict of one loaded object."""

    container: str
    tensors: dict[str, Any]
    alternatives: tuple[str, ...]
    other_entries: tuple[str, ...]
    non_tensor_keys: tuple[str, ...]


def _read_torch(
    shown: str, files: list[tuple[str, frozenset[str] | None]], key: str | None, *, unsafe_pickle: bool
) -> Checkpoint:
    found: list[_Found] = []
    fmts: list[str] = []
    for shard, listed in files:
        obj, fmt = _load_pickled(shard, unsafe_pickle=unsafe_pickle)
        found.append(_choose(shard, obj, key))
        fmts.append(fmt)
        _check_index_keys(shard, found[-1].tensors, listed)
    tensors: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for (shard, _), part in zip(files, found, strict=True):
        for name, tensor in part.tensors.items():
            if name in origin:
                raise _duplicate(shown, name, origin[name], shard)
            origin[name] = shard
            tensors[name] = tensor
    first = found[0]
    return Checkpoint(
        path=shown,
        fmt="torch-sharded" if _is_sharded(files) else fmts[0],
        keys=KeySet.from_items(
            ((k, TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."))) for k, t in tensors.items()),
            origin=shown, order_is_evidence=True,
        ),
        container=first.container,
        alternatives=first.alternatives,
        other_entries=first.other_entries,
        non_tensor_keys=tuple(dict.fromkeys(k for part in found for k in part.non_tensor_keys)),
        _store=_ObjectStore(tensors),
    )


def _load_pickled(path: str, *, unsafe_pickle: bool) -> tuple[object, str]:
    """Unpickle a torch file or a plain pickle; return the object and its format name."""
    with _open_binary(path) as f:
        head = f.read(4)
        if not head:
            raise CheckpointError(path, "is empty", _REDOWNLOAD)
        f.seek(0)
        kind = "torch-zip" if head == _ZIP_MAGIC else _sniff_pickle(f)
    if kind is None:
        raise CheckpointError(path, f"{_UNREADABLE} (neither a zip archive nor a pickle)", _UNREADABLE_REMEDY)
    if kind == "pickle":
        return _load_plain_pickle(path, unsafe_pickle=unsafe_pickle), kind
    import torch

    with _translating(path), warnings.catch_warnings(), ExitStack() as stack:
        # torch warns about pickle protocols it did not write; the outcome is reported through our errors instead.
        warnings.simplefilter("ignore")
        if not unsafe_pickle:
            # argparse.Namespace, numpy scalars, datetime...: plain data trainers save beside the weights
            stack.enter_context(plain_data())
        # mmap leaves zip storages on disk until a tensor is touched; the legacy format cannot be mapped.
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=kind == "torch-zip")
    return obj, kind


def _sniff_pickle(f: BinaryIO) -> str | None:
    """``torch-legacy`` when the file opens with torch's pickled magic number, ``pickle`` for another pickle."""
    try:
        # Only the first pickle is parsed; torch's legacy files go on with more pickles and raw storage bytes.
        magic = [arg == _TORCH_LEGACY_MAGIC for op, arg, _ in pickletools.genops(f) if op.name.startswith("LONG")]
    except Exception:  # pickletools raises assorted errors on garbage; all mean "not a pickle"
        return None
    return "torch-legacy" if any(magic) else "pickle"


def _load_plain_pickle(path: str, *, unsafe_pickle: bool) -> object:
    with _open_binary(path) as f:
        if unsafe_pickle:
            with _translating(path):
                return pickle.load(f)  # the caller vouched for this file
        globals_ = _pickle_globals(f)
        unsafe = sorted(set(globals_).difference(_PLAIN_PICKLE_GLOBALS, plain_globals()), key=natural_key)
        if unsafe:
            # Name the globals torch would refuse too (a tensor's own rebuild function is not news), if any.
            worst = [g for g in unsafe if g not in _torch_allowed_globals()] or unsafe
            raise UnsafePickle(path, ", ".join(worst))
        f.seek(0)
        with _translating(path):
            return _RestrictedUnpickler(f).load()


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads pickles of plain data; every other global is refused, so no pickled code can run."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _PLAIN_PICKLE_GLOBALS:
            return super().find_class(module, name)
        if full in plain_globals():
            return plain_globals()[full]
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def _pickle_globals(f: BinaryIO, *, pickles: int = 1) -> list[str]:
    """Names of the globals a pickle stream references, found without executing it.

    ``STACK_GLOBAL`` takes its module and name from the two strings pushed before it; memo lookups are followed so
    memoised names are found too. ``EXT*`` opcodes (the copyreg registry) are reported as ``copyreg extension``.
    """
    found: list[str] = []
    for _ in range(pickles):
        strings: list[object] = []
        memo: dict[int, object] = {}
        for op, arg, _pos in pickletools.genops(f):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                found.append(".".join(str(s) for s in strings[-2:]))
            elif op.name.startswith("EXT"):
                found.append("copyreg extension")
            elif op.name in _STRING_OPS:
                strings.append(arg)
            elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = strings[-1] if strings else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(int(arg)))
    return found


# ------------------------------------------------------------------------------------------------------ translate


@contextmanager
def _translating(path: str) -> Iterator[None]:
    """Turn whatever a loader raises on a bad file into a ``CheckpointError`` (``UnsafePickle`` for code)."""
    try:
        yield
    except KeydiffError:
        raise
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, str(exc)) from exc
    except FileNotFoundError as exc:
        raise CheckpointNotFound(path) from exc
    except Exception as exc:  # the boundary: a bad file must never surface as a raw error
        raise CheckpointError(path, f"{_UNREADABLE} ({_short_reason(exc)})", _UNREADABLE_REMEDY) from exc


def _unpickling_error(path: str, message: str) -> CheckpointError:
    names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if names:
        return UnsafePickle(path, ", ".join(dict.fromkeys(names)))
    if "weights only" not in message.lower() and "weights_only" not in message.lower():
        return CheckpointError(path, f"{_UNREADABLE} (corrupt pickle: {_first_line(message)})", _UNREADABLE_REMEDY)
    detail = message.split("WeightsUnpickler error:", 1)[-1].strip()
    globals_ = _torch_pickle_globals(path)
    if globals_ is None:
        # torch's safe loader choked on data that is not even a well-formed pickle: corruption, not code.
        return CheckpointError(path, f"{_UNREADABLE} (corrupt pickle data)", _UNREADABLE_REMEDY)
    unsafe = [g for g in globals_ if g not in _torch_allowed_globals() and not g.endswith("Storage")]
    if unsafe:
        return UnsafePickle(path, ", ".join(sorted(set(unsafe), key=natural_key)))
    reason = f"torch's safe loader refuses it: {_first_line(detail)}"
    opcode = re.search(r"Unsupported operand (\d+)", detail)
    if opcode and int(opcode.group(1)) >= 0x94:  # FRAME, MEMOIZE...: the opcodes pickle protocol 4 added
        reason = f"pickle opcode {opcode.group(1)} of protocol 4 or later, which torch's safe loader does not read"
    return UnsafePickle(path, reason)


def _torch_pickle_globals(path: str) -> list[str] | None:
    """Globals of a torch file's pickle, or None when the pickle is malformed."""
    try:
        with _open_binary(path) as f:
            if f.read(4) != _ZIP_MAGIC:
                f.seek(0)
                # Legacy layout: magic number, protocol version, system info, then the object.
                return _pickle_globals(f, pickles=4)
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            return _pickle_globals(io.BytesIO(archive.read(name)))
    except Exception:  # any failure to parse means a malformed pickle
        return None


def _torch_allowed_globals() -> frozenset[str]:
    try:
        from torch import serialization
        from torch._weights_only_unpickler import _get_allowed_globals

        extra = serialization.get_safe_globals()
        safe = {f"{g.__module__}.{g.__qualname__}" for g in extra if hasattr(g, "__qualname__")}
        return frozenset(_get_allowed_globals()) | safe | frozenset(plain_globals())
    except (ImportError, AttributeError, TypeError):
        # A private torch API: without it every global is reported, which only makes the message longer.
        return frozenset()


def _short_reason(exc: BaseException) -> str:
    text = _first_line(str(exc))
    # torch appends paragraphs of advice after the first sentence; keep the sentence.
    text = text.split(". ")[0].rstrip(".")
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


@contextmanager
def _open_binary(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the open itself is what is translated
    except FileNotFoundError as exc:
        raise CheckpointNotFound(path) from exc
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
        raise CheckpointError(path, problem, "Check the path and its permissions.") from exc
    with f:
        yield f


# ------------------------------------------------------------------------------------------------------ container


def _choose(path: str, obj: object, key: str | None) -> _Found:
    """Pick the tensor dict of a loaded object: ``key`` if given, else the best candidate."""
    root = _as_mapping(obj)
    if root is None or not all(isinstance(k, str) for k in root):
        raise _no_tensors(path, obj)
    candidates = [p for p, m in _walk(root) if _is_tensor_dict(m)]
    if key is None and not candidates:
        raise _no_tensors(path, obj)
    container = min(candidates, key=_preference) if key is None else key
    chosen = _resolve(root, container)
    if chosen is None:  # only an explicit key can miss: every candidate holds tensors
        shown = ", ".join(repr(c) for c in sorted(candidates, key=natural_key)) or "none"
        raise UsageError(f"{path}: no tensor dict at {key!r}; available containers: {shown}")
    tensors = {k: v for k, v in chosen.items() if _is_tensor(v)}
    return _Found(
        container=container,
        tensors=tensors,
        alternatives=tuple(sorted((c for c in candidates if c != container), key=natural_key)),
        other_entries=_other_entries(root, container),
        non_tensor_keys=tuple(str(k) for k, v in chosen.items() if not _is_tensor(v)),
    )


def _walk(mapping: Mapping[str, Any], prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every string-keyed dict down to depth 2, skipping optimizer state."""
    yield prefix, mapping
    if depth == 2:
        return
    for name, value in mapping.items():
        if "optim" in name.lower():
            continue
        child = _as_mapping(value)
        if child is not None and all(isinstance(k, str) for k in child):
            yield from _walk(child, f"{prefix}.{name}" if prefix else name, depth + 1)


def _resolve(root: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """The dict at a dotted path, if it holds at least one tensor."""
    node: Mapping[str, Any] | None = root
    for part in key.split(".") if key else []:
        node = _as_mapping(node.get(part)) if node is not None else None
    if node is None or not any(_is_tensor(v) for v in node.values()):
        return None
    return node


def _preference(path: str) -> tuple[int, int, tuple[tuple[int, int | str], ...]]:
    """Top level, then live weights (state_dict, model, module, net, params), then EMA copies, then the rest."""
    parts = path.split(".") if path else []
    if not parts:
        tier = 0
    elif any(_EMA_TOKENS.intersection(re.split(r"[_\-]", p.lower())) for p in parts):
        tier = len(_LIVE_NAMES) + 1
    elif parts[-1] in _LIVE_NAMES:
        tier = 1 + _LIVE_NAMES.index(parts[-1])
    else:
        tier = len(_LIVE_NAMES) + 2
    return tier, len(parts), natural_key(path)


def _other_entries(root: Mapping[str, Any], container: str) -> tuple[str, ...]:
    out: list[str] = []
    node: Mapping[str, Any] | None = root
    prefix = ""
    for part in container.split(".") if container else []:
        if node is None:
            break
        out.extend(f"{prefix}{k}" for k in node if k != part)
        prefix += f"{part}."
        node = _as_mapping(node.get(part))
    return tuple(out)


def _is_tensor_dict(mapping: Mapping[str, Any]) -> bool:
    # "Mostly tensors": stray entries such as ``_metadata`` or ``epoch`` do not disqualify a state dict.
    count = sum(1 for v in mapping.values() if _is_tensor(v))
    return count > 0 and count >= len(mapping) - count


def _is_tensor(value: object) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _as_mapping(value: object) -> Mapping[Any, Any] | None:
    if isinstance(value, Mapping):
        return value
    import torch

    # A whole nn.Module (only unpickled with unsafe_pickle): its state dict is the tensor dict.
    if isinstance(value, torch.nn.Module):
        return value.state_dict()
    return None


def _no_tensors(path: str, obj: object) -> CheckpointError:
    return CheckpointError(
        path, f"holds no tensors (found {_describe(obj)})",
        "Give the file that holds the model weights (a state dict or a training checkpoint).",
    )


def _describe(obj: object) -> str:
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(obj, Mapping):
        if not obj:
            return f"an empty {name}"
        shown = ", ".join(str(k) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
        return f"{article} {name} with {len(obj)} {'entry' if len(obj) == 1 else 'entries'}: {shown}"
    return f"{article} {name}"

