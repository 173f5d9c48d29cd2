"""Streaming, atomic safetensors writer: the header first, then one tensor in memory at a time.

The header is computed from the planned ``TensorInfo``s, so tensors can be produced lazily and written as they come.
Files appear under their final names only after every byte is written, synced and re-read: an interrupted or failed
write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from keydiff._errors import CheckpointError, OutputError, UsageError
from keydiff._keys import TensorInfo, natural_key
from keydiff._sources import SAFETENSORS_DTYPES, read_safetensors_header

if TYPE_CHECKING:
    import torch

__all__ = ["write_safetensors"]

Producer = Callable[[], "torch.Tensor"]

# Sub-byte formats have no per-element torch dtype to write from, so only whole-byte codes are writable.
_CODES = {name: (code, bits // 8) for code, (name, bits) in SAFETENSORS_DTYPES.items() if bits % 8 == 0}
_DEFAULT_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class _Planned:
    """One tensor of one file: where its bytes go and how to make them."""

    key: str
    info: TensorInfo
    produce: Producer
    begin: int
    end: int


def write_safetensors(
    path: str | os.PathLike[str],
    items: Iterable[tuple[str, TensorInfo, Producer]],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    metadata: dict[str, str] | None = None,
    max_shard_size: int | None = None,
) -> list[str]:
    """Write tensors as safetensors, streaming and atomically.

    Args:
        path: The output file; with ``max_shard_size``, the index file (``*.index.json``; a ``*.safetensors`` path
            gets ``.index.json`` appended, a directory gets ``model.safetensors.index.json``), shards beside it.
        items: ``(key, info, producer)`` in file order; ``producer()`` returns the tensor, which must match ``info``.
        inputs: Paths that must not be overwritten (the checkpoint being converted, the mapping...).
        metadata: String pairs for the ``__metadata__`` entry (of every shard).
        max_shard_size: Bytes per shard: write Hugging Face style ``model-00001-of-0000N.safetensors`` shards and
            an index. A tensor larger than this gets a shard of its own.

    Returns:
        The files written: the shards in order, then the index.

    Raises:
        OutputError: The output would overwrite an input, its directory does not exist, it cannot be written, a
            produced tensor does not match its plan, or the file read back differs from the plan. Nothing is left
            under the output name(s).
        UsageError: ``max_shard_size`` is not positive or ``metadata`` holds non-strings.

    Example:
        >>> import tempfile, os, torch
        >>> out = os.path.join(tempfile.mkdtemp(), "out.safetensors")
        >>> t = torch.arange(6.0).reshape(2, 3)
        >>> write_safetensors(out, [("w", TensorInfo((2, 3), "float32"), lambda: t)]) == [out]
        True
    """
    plan = list(items)
    metadata = dict(metadata or {})
    _check_plan(plan, metadata)
    files = _layout(os.fspath(path), plan, max_shard_size)
    _refuse_inputs([final for final, _ in files], inputs)
    staged: list[tuple[str, str]] = []
    try:
        for final, content in files:
            if isinstance(content, bytes):
                staged.append((_stage_bytes(final, content), final))
            else:
                staged.append((_stage_tensors(final, content, metadata), final))
        _commit(staged)
    except BaseException:
        # KeyboardInterrupt included: a half-written temp file must not outlive the run.
        for temp, _ in staged:
            _remove(temp)
        raise
    return [final for final, _ in files]


# -------------------------------------------------------------------------------------------------------- planning


def _check_plan(plan: list[tuple[str, TensorInfo, Producer]], metadata: Mapping[str, object]) -> None:
    if sys.byteorder != "little":
        raise OutputError("writing safetensors on a big-endian host is not supported; nothing was written")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UsageError("safetensors metadata must map strings to strings")
    seen: set[str] = set()
    for key, info, _ in plan:
        if key in seen or key == "__metadata__":
            why = "appears twice" if key in seen else "is reserved by the format"
            raise OutputError(f"cannot write tensor {key!r}: the name {why}; nothing was written")
        if info.dtype not in _CODES:
            raise OutputError(f"cannot write tensor {key!r}: dtype {info.dtype} has no safetensors code")
        seen.add(key)


def _nbytes(info: TensorInfo) -> int:
    return info.numel * _CODES[info.dtype][1]


def _offsets(plan: list[tuple[str, TensorInfo, Producer]]) -> list[_Planned]:
    out: list[_Planned] = []
    begin = 0
    for key, info, produce in plan:
        end = begin + _nbytes(info)
        out.append(_Planned(key, info, produce, begin, end))
        begin = end
    return out


def _layout(
    path: str, plan: list[tuple[str, TensorInfo, Producer]], max_shard_size: int | None
) -> list[tuple[str, list[_Planned] | bytes]]:
    """The files to write, each with its tensors (or, for the index, its bytes)."""
    if max_shard_size is None:
        _check_directory(path)
        if os.path.isdir(path):
            raise OutputError(f"cannot write {path}: it is a directory; give a file name such as model.safetensors")
        return [(path, _offsets(plan))]
    if max_shard_size <= 0:
        raise UsageError(f"max_shard_size must be a positive number of bytes: {max_shard_size!r}")
    index = _index_path(path)
    _check_directory(index)
    groups: list[list[tuple[str, TensorInfo, Producer]]] = [[]]
    size = 0
    for item in plan:
        n = _nbytes(item[1])
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    stem = os.path.basename(index).removesuffix(".index.json").removesuffix(".safetensors") or "model"
    names = [f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    weight_map = {key: name for name, group in zip(names, groups, strict=True) for key, _, _ in group}
    body = {"metadata": {"total_size": sum(_nbytes(info) for _, info, _ in plan)}, "weight_map": weight_map}
    directory = os.path.dirname(index)
    files: list[tuple[str, list[_Planned] | bytes]] = [
        (os.path.join(directory, name), _offsets(group)) for name, group in zip(names, groups, strict=True)
    ]
    files.append((index, (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))
    return files


def _index_path(path: str) -> str:
    if os.path.isdir(path):
        return os.path.join(path, _DEFAULT_INDEX)
    if path.endswith(".index.json"):
        return path
    if path.endswith(".safetensors"):
        return path + ".index.json"
    raise OutputError(f"cannot write a sharded checkpoint to {path}: name the index file (*.safetensors.index.json)")


def _check_directory(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {path}: directory {directory} does not exist; create it first")


def _refuse_inputs(outputs: list[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    protected = [p for given in inputs for p in _input_files(os.fspath(given))]
    for out in outputs:
        for given in protected:
            if _same_file(out, given):
                raise OutputError(
                    f"refusing to write {out}: it is the input {given}; nothing was written. Choose another path."
                )


def _input_files(path: str) -> Iterator[str]:
    """An input and the files it stands for: a directory's entries, an index's shards."""
    yield path
    if os.path.isdir(path):
        yield from (os.path.join(path, name) for name in sorted(os.listdir(path), key=natural_key))
    elif path.endswith(".index.json") and os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                weight_map = json.load(f).get("weight_map", {})
            yield from (os.path.join(os.path.dirname(path), shard) for shard in set(weight_map.values()))
        except (OSError, ValueError, AttributeError, TypeError):
            # A broken index is the reader's to report; the index file itself is still protected.
            return


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


# --------------------------------------------------------------------------------------------------------- writing


def _header(planned: list[_Planned], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    for p in planned:
        code = _CODES[p.info.dtype][0]
        header[p.key] = {"dtype": code, "shape": list(p.info.shape), "data_offsets": [p.begin, p.end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad with spaces (valid JSON whitespace) so the data section starts 8-byte aligned, as safetensors does.
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _stage_tensors(final: str, planned: list[_Planned], metadata: Mapping[str, str]) -> str:
    """Write one safetensors file to a temp file beside ``final``; return the verified temp path."""
    header = _header(planned, metadata)
    temp, f = _create_temp(final)
    try:
        with f:
            with _writing(final):
                f.write(header)
            for p in planned:
                _write_tensor(f, p, final)
            with _writing(final):
                f.flush()
                os.fsync(f.fileno())
        _verify(temp, final, planned, metadata, size=len(header) + (planned[-1].end if planned else 0))
    except BaseException:
        _remove(temp)
        raise
    return temp


def _write_tensor(f: BinaryIO, p: _Planned, final: str) -> None:
    import torch

    tensor = p.produce()
    if not isinstance(tensor, torch.Tensor):
        raise OutputError(f"cannot write {final}: tensor {p.key!r} was produced as a {type(tensor).__name__}")
    got = TensorInfo(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    if got != p.info:
        raise OutputError(
            f"cannot write {final}: tensor {p.key!r} came out as {got} but the plan says {p.info}; nothing was written"
        )
    # Flatten first: a 0-d tensor cannot be viewed as bytes. Views keep an mmapped source on disk until written.
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel():
        # Only the write is translated: whatever the producer raised above propagates as it is.
        with _writing(final):
            f.write(memoryview(flat.view(torch.uint8).numpy()))


def _stage_bytes(final: str, content: bytes) -> str:
    temp, f = _create_temp(final)
    try:
        with f, _writing(final):
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove(temp)
        raise
    return temp


def _verify(temp: str, final: str, planned: list[_Planned], metadata: Mapping[str, str], *, size: int) -> None:
    """Read the written header back: keys, shapes, dtypes, offsets and size must be what was planned."""
    try:
        header = read_safetensors_header(temp)
    except CheckpointError as exc:
        raise OutputError(f"cannot write {final}: the written file does not read back ({exc.problem})") from exc
    expected = [(p.key, p.info, (p.begin, p.end)) for p in planned]
    if list(header.tensors) != expected or dict(header.metadata) != dict(metadata) or header.file_size != size:
        raise OutputError(f"cannot write {final}: the written file does not match the plan; nothing was written")


def _create_temp(final: str) -> tuple[str, BinaryIO]:
    """A new temp file in ``final``'s directory (same file system, so the rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(final))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    with _writing(final):
        while True:
            temp = os.path.join(directory, f".{name}.tmp{secrets.token_hex(4)}")
            try:
                # 0o666 under the umask: the result gets the permissions a plain open() would give.
                fd = os.open(temp, flags, 0o666)
            except FileExistsError:
                continue
            return temp, os.fdopen(fd, "wb")


def _commit(staged: list[tuple[str, str]]) -> None:
    """Move every temp file into place, the index last, so a reader never sees an index without its shards."""
    placed: list[str] = []
    try:
        for temp, final in staged:
            with _writing(final):
                os.replace(temp, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            _remove(final)
        raise
    for directory in {os.path.dirname(os.path.abspath(final)) for _, final in staged}:
        _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    # Makes the renames durable on POSIX; directories cannot be opened this way on Windows, and it is optional there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _writing(final: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}; nothing was written") from exc


def _remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.remove(path)
