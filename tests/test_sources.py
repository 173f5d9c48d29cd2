"""Reading checkpoints: safetensors headers, shards, torch zip/legacy files, containers, and the broken-input corpus."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from keydiff._errors import CheckpointError, CheckpointNotFound, KeydiffError, UnsafePickle, UsageError
from keydiff._keys import TensorInfo
from keydiff._sources import is_checkpoint_path, read_checkpoint, read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


def _sd() -> dict[str, torch.Tensor]:
    """A tiny state dict in non-alphabetical (model) order."""
    g = torch.Generator().manual_seed(0)
    return {
        "patch_embed.proj.weight": torch.randn(4, 3, 2, 2, generator=g),
        "blocks.10.attn.qkv.weight": torch.randn(12, 4, generator=g),
        "blocks.2.norm.bias": torch.randn(4, generator=g).bfloat16(),
        "head.step": torch.tensor(7, dtype=torch.int64),
    }


def _raw_safetensors(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a safetensors file by hand: the header exactly as given, in its own key order."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


class Payload:
    """Creates a file when unpickled: the stand-in for any malicious checkpoint."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.target, "w")


# --------------------------------------------------------------------------------------------------- safetensors


def test_flat_safetensors_keys_shapes_dtypes(tmp_path: Path) -> None:
    sd = _sd()
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    ckpt = read_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.fmt == "safetensors" and ckpt.container == "" and ckpt.alternatives == ()
    assert ckpt.keys.order_is_evidence is False
    assert dict(ckpt.keys) == {k: TensorInfo(tuple(v.shape), str(v.dtype)[6:]) for k, v in sd.items()}
    assert ckpt.keys["blocks.2.norm.bias"].dtype == "bfloat16"
    assert ckpt.keys["head.step"] == TensorInfo((), "int64")
    assert dict(ckpt.metadata) == {"format": "pt"}
    assert ckpt.path == str(tmp_path / "m.safetensors")


def test_safetensors_tensors_load_lazily_and_equal(tmp_path: Path) -> None:
    sd = _sd()
    save_file(sd, tmp_path / "m.safetensors")
    ckpt = read_checkpoint(str(tmp_path / "m.safetensors"))
    assert torch.equal(ckpt.tensor("blocks.2.norm.bias"), sd["blocks.2.norm.bias"])
    wanted = ["head.step", "patch_embed.proj.weight"]
    stream = ckpt.tensors(wanted)
    assert [k for k, _ in stream] == wanted
    for key, tensor in ckpt.tensors(sd):
        assert torch.equal(tensor, sd[key])
    with pytest.raises(KeyError, match="nope"):
        ckpt.tensor("nope")


def test_header_order_is_kept_as_written(tmp_path: Path) -> None:
    header = {
        "z.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "__metadata__": {"note": "x"},
        "a.weight": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [4, 6]},
        "m.weight": {"dtype": "BOOL", "shape": [0, 3], "data_offsets": [6, 6]},
    }
    ckpt = read_checkpoint(_raw_safetensors(tmp_path / "o.safetensors", header, bytes(6)))
    assert list(ckpt.keys) == ["z.weight", "a.weight", "m.weight"]
    assert [i.dtype for i in ckpt.keys.values()] == ["float32", "float8_e4m3fn", "bool"]


@pytest.mark.parametrize(
    ("code", "name", "size"),
    [("F64", "float64", 8), ("F16", "float16", 2), ("BF16", "bfloat16", 2), ("I64", "int64", 8),
     ("I32", "int32", 4), ("I16", "int16", 2), ("I8", "int8", 1), ("U8", "uint8", 1),
     ("F8_E5M2", "float8_e5m2", 1)],
)
def test_dtype_codes(tmp_path: Path, code: str, name: str, size: int) -> None:
    header = {"t": {"dtype": code, "shape": [3], "data_offsets": [0, 3 * size]}}
    ckpt = read_checkpoint(_raw_safetensors(tmp_path / "d.safetensors", header, bytes(3 * size)))
    assert ckpt.keys["t"] == TensorInfo((3,), name)


def test_header_only_read_of_a_huge_sparse_file(tmp_path: Path) -> None:
    """A 64 GiB (sparse) data section reads instantly, so no tensor bytes are touched, and torch is not imported."""
    n = 1 << 17
    header = json.dumps({"huge": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n * n)
    start = time.perf_counter()
    assert read_checkpoint(path).keys["huge"].shape == (n, n)
    assert time.perf_counter() - start < 1.0
    code = (
        "import sys; from keydiff._sources import read_checkpoint; "
        f"read_checkpoint({str(path)!r}); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------------------------ sharded


def _shards(tmp_path: Path, index: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _sd()
    keys = list(sd)
    parts = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
    for name, part in parts.items():
        save_file({k: sd[k] for k in part}, tmp_path / name)
    if index:
        weight_map = {k: name for name, part in parts.items() for k in part}
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        )
    return tmp_path, sd


@pytest.mark.parametrize("spec", ["model.safetensors.index.json", "."])
def test_sharded_index_and_directory(tmp_path: Path, spec: str) -> None:
    directory, sd = _shards(tmp_path)
    ckpt = read_checkpoint(directory / spec)
    assert ckpt.fmt == "safetensors-sharded"
    assert set(ckpt.keys) == set(sd) and ckpt.keys.order_is_evidence is False
    assert all(torch.equal(t, sd[k]) for k, t in ckpt.tensors(sd))


def test_directory_of_shards_without_index(tmp_path: Path) -> None:
    directory, sd = _shards(tmp_path, index=False)
    assert set(read_checkpoint(directory).keys) == set(sd)


def test_index_with_missing_shard_or_key(tmp_path: Path) -> None:
    directory, _ = _shards(tmp_path)
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"does not hold 1 key.*'ghost.weight'"):
        read_checkpoint(index)
    data["weight_map"]["ghost.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"shard 'model-00009-of-00009\.safetensors' listed in the index is"):
        read_checkpoint(index)


def test_index_of_torch_bin_shards(tmp_path: Path) -> None:
    sd = _sd()
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 + (i >= 2)}-of-00002.bin" for i, k in enumerate(keys)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.fmt == "torch-sharded"
    assert list(ckpt.keys) == keys and ckpt.keys.order_is_evidence is True
    assert torch.equal(ckpt.tensor(keys[3]), sd[keys[3]])


def test_directory_with_one_torch_file(tmp_path: Path) -> None:
    torch.save(_sd(), tmp_path / "weights.pth")
    assert read_checkpoint(tmp_path).fmt == "torch-zip"
    torch.save(_sd(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot tell which to use"):
        read_checkpoint(tmp_path)


# -------------------------------------------------------------------------------------------------------- torch


@pytest.mark.parametrize(("legacy", "fmt"), [(False, "torch-zip"), (True, "torch-legacy")])
def test_torch_formats(tmp_path: Path, legacy: bool, fmt: str) -> None:
    sd = _sd()
    path = tmp_path / "m.pth"
    torch.save(OrderedDict(sd), path, _use_new_zipfile_serialization=not legacy)
    ckpt = read_checkpoint(path)
    assert ckpt.fmt == fmt and ckpt.container == ""
    assert list(ckpt.keys) == list(sd) and ckpt.keys.order_is_evidence is True
    assert ckpt.keys["blocks.2.norm.bias"] == TensorInfo((4,), "bfloat16")
    assert all(torch.equal(t, sd[k]) for k, t in ckpt.tensors(sd))


def test_lightning_checkpoint(tmp_path: Path) -> None:
    sd = _sd()
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "state_dict": sd, "optimizer_states": [{"state": {}}],
                "hyper_parameters": {"lr": 0.1}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.container == "state_dict" and list(ckpt.keys) == list(sd)
    assert ckpt.other_entries == ("epoch", "global_step", "optimizer_states", "hyper_parameters")
    assert ckpt.alternatives == ()


@pytest.mark.parametrize("reverse", [False, True])
def test_live_weights_win_over_ema_whatever_the_order(tmp_path: Path, reverse: bool) -> None:
    live, ema = _sd(), {k: v + 1 for k, v in _sd().items()}
    entries = [("model_ema", ema), ("optimizer", {"exp_avg": torch.zeros(1)}), ("model", live)]
    torch.save(dict(reversed(entries) if reverse else entries), tmp_path / "c.pt")
    ckpt = read_checkpoint(tmp_path / "c.pt")
    assert ckpt.container == "model" and ckpt.alternatives == ("model_ema",)
    assert torch.equal(ckpt.tensor("patch_embed.proj.weight"), live["patch_embed.proj.weight"])
    picked = read_checkpoint(tmp_path / "c.pt", key="model_ema")
    assert picked.container == "model_ema" and picked.alternatives == ("model",)
    assert torch.equal(picked.tensor("patch_embed.proj.weight"), ema["patch_embed.proj.weight"])


def test_preference_order(tmp_path: Path) -> None:
    t = {"w": torch.zeros(1)}
    torch.save({"state_dict_ema": t, "teacher": t, "module": t, "state_dict": t}, tmp_path / "a.pt")
    ckpt = read_checkpoint(tmp_path / "a.pt")
    assert ckpt.container == "state_dict"
    assert ckpt.alternatives == ("module", "state_dict_ema", "teacher")
    torch.save({"teacher": t, "ema": t}, tmp_path / "b.pt")
    assert read_checkpoint(tmp_path / "b.pt").container == "ema"


def test_nested_container_and_dotted_key(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({"checkpoint": {"step": 1, "model": sd, "model_ema": sd}, "version": 2}, tmp_path / "n.pt")
    ckpt = read_checkpoint(tmp_path / "n.pt")
    assert ckpt.container == "checkpoint.model"
    assert ckpt.alternatives == ("checkpoint.model_ema",)
    assert ckpt.other_entries == ("version", "checkpoint.step", "checkpoint.model_ema")
    assert read_checkpoint(tmp_path / "n.pt", key="checkpoint.model_ema").container == "checkpoint.model_ema"


def test_unknown_key_lists_containers(tmp_path: Path) -> None:
    torch.save({"model": _sd(), "model_ema": _sd(), "epoch": 1}, tmp_path / "c.pt")
    with pytest.raises(UsageError, match=r"no tensor dict at 'ema'.*'model', 'model_ema'"):
        read_checkpoint(tmp_path / "c.pt", key="ema")
    save_file(_sd(), tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match="top level"):
        read_checkpoint(tmp_path / "m.safetensors", key="model")


def test_non_tensor_entries_are_reported(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({**sd, "_metadata": {"": {"version": 1}}, "n_averaged": 3}, tmp_path / "m.pt")
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt.container == "" and list(ckpt.keys) == list(sd)
    assert ckpt.non_tensor_keys == ("_metadata", "n_averaged")


def test_whole_module_needs_unsafe_pickle(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(UnsafePickle, match=r"torch\.nn\.modules.*nothing was executed"):
        read_checkpoint(tmp_path / "model.pt")
    ckpt = read_checkpoint(tmp_path / "model.pt", unsafe_pickle=True)
    assert list(ckpt.keys) == list(model.state_dict())


class TrainConfig:
    """A class of the training script's own: code, as far as the loader knows."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_unsafe_pickle_names_the_global(tmp_path: Path) -> None:
    # an argparse.Namespace is plain data and loads (issue 13.1); a class of the script's own does not
    torch.save({"state_dict": _sd(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "timm.pth.tar")
    assert read_checkpoint(tmp_path / "timm.pth.tar").container == "state_dict"
    torch.save({"state_dict": _sd(), "args": TrainConfig(lr=0.1)}, tmp_path / "own.pth.tar")
    with pytest.raises(UnsafePickle, match=r"test_sources\.TrainConfig.*--unsafe-pickle"):
        read_checkpoint(tmp_path / "own.pth.tar")
    assert read_checkpoint(tmp_path / "own.pth.tar", unsafe_pickle=True).container == "state_dict"


@pytest.mark.parametrize("form", ["torch-zip", "torch-legacy", "pickle-2", "pickle-5"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, form: str) -> None:
    target = tmp_path / "pwned"
    obj = {"w": torch.zeros(1), "x": Payload(str(target))}
    path = tmp_path / "evil.pt"
    if form.startswith("torch"):
        torch.save(obj, path, _use_new_zipfile_serialization=form == "torch-zip")
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(str(target)), f, protocol=int(form[-1]))
    with pytest.raises(UnsafePickle, match=r"open.*nothing was executed"):
        read_checkpoint(path)
    assert not target.exists()


def test_plain_pickle_of_data(tmp_path: Path) -> None:
    with open(tmp_path / "data.pkl", "wb") as f:
        pickle.dump(OrderedDict(epoch=1, step=2), f)
    with pytest.raises(CheckpointError, match=r"holds no tensors \(found an OrderedDict with 2 entries: epoch, step\)"):
        read_checkpoint(tmp_path / "data.pkl")


# ---------------------------------------------------------------------------------------------- broken corpus


def _truncated_zip(p: Path) -> None:
    torch.save(_sd(), p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _corrupt_zip(p: Path) -> None:
    torch.save(_sd(), p)
    data = bytearray(p.read_bytes())
    data[100:400] = bytes(range(256)) + bytes(44)
    p.write_bytes(bytes(data))


def _foreign_zip(p: Path) -> None:
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")


def _truncated_safetensors(p: Path) -> None:
    save_file(_sd(), p)
    p.write_bytes(p.read_bytes()[:-10])


BROKEN = {
    "empty.pt": (lambda p: p.write_bytes(b""), CheckpointError, "is empty"),
    "empty.safetensors": (lambda p: p.write_bytes(b""), CheckpointError, "is empty, too short"),
    "random.pt": (lambda p: p.write_bytes(bytes(range(7, 250)) * 4), CheckpointError, "not a readable PyTorch"),
    "random.bin": (lambda p: p.write_bytes(b"\x00\x01garbage" * 50), CheckpointError, "not a readable PyTorch"),
    "short.safetensors": (lambda p: p.write_bytes(b"\x01\x02"), CheckpointError, "only 2 bytes long"),
    "long_header.safetensors": (
        lambda p: _raw_safetensors(p, {}, length=10_000), CheckpointError, "header length 10000 is larger than the file"
    ),
    "not_json.safetensors": (lambda p: _raw_safetensors(p, b"{nope"), CheckpointError, "header is not valid JSON"),
    "not_utf8.safetensors": (lambda p: _raw_safetensors(p, b"\xff\xfe"), CheckpointError, "not UTF-8"),
    "list_header.safetensors": (lambda p: _raw_safetensors(p, [1]), CheckpointError, "not a JSON object"),
    "no_dtype.safetensors": (
        lambda p: _raw_safetensors(p, {"w": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        CheckpointError, "'w' lacks dtype, shape or data_offsets",
    ),
    "unknown_dtype.safetensors": (
        lambda p: _raw_safetensors(p, {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        CheckpointError, "unknown dtype 'F128'",
    ),
    "bad_size.safetensors": (
        lambda p: _raw_safetensors(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
        CheckpointError, "spans 8 bytes but shape",
    ),
    "truncated.safetensors": (_truncated_safetensors, CheckpointError, r"truncated file\?"),
    "truncated_zip.pt": (_truncated_zip, CheckpointError, "not a readable PyTorch.*central directory"),
    "corrupt_zip.pt": (_corrupt_zip, CheckpointError, "not a readable PyTorch"),
    "foreign_zip.pt": (_foreign_zip, CheckpointError, "not a readable PyTorch"),
    "list.pt": (lambda p: torch.save([1, 2], p), CheckpointError, r"holds no tensors \(found a list\)"),
    "string.pt": (lambda p: torch.save("weights", p), CheckpointError, r"holds no tensors \(found a str\)"),
    "ints.pt": (lambda p: torch.save({"epoch": 3}, p), CheckpointError, r"found a dict with 1 entry: epoch"),
    "list.pkl": (lambda p: p.write_bytes(pickle.dumps([1, 2])), CheckpointError, r"found a list"),
    "string.pkl": (lambda p: p.write_bytes(pickle.dumps("x", protocol=2)), CheckpointError, r"found a str"),
    "emptydir": (lambda p: p.mkdir(), CheckpointError, r"no checkpoint found in directory \(it is empty\)"),
    "missing.pt": (lambda p: None, CheckpointNotFound, "no such file or directory"),
    "bad.index.json": (lambda p: p.write_text("[]"), CheckpointError, "no weight_map"),
    "escape.index.json": (
        lambda p: p.write_text(json.dumps({"weight_map": {"w": "../other/x.safetensors"}})),
        CheckpointError, "shard outside its directory",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_inputs_raise_checkpoint_errors(tmp_path: Path, name: str) -> None:
    make, error, match = BROKEN[name]
    path = tmp_path / name
    make(path)
    before = _digest(path) if path.exists() else None
    with pytest.raises(error, match=match) as info:
        read_checkpoint(path)
    assert info.value.remedy, "every refusal says what to do next"
    assert (_digest(path) if path.exists() else None) == before


def test_reading_leaves_inputs_unchanged(tmp_path: Path) -> None:
    _shards(tmp_path)
    torch.save(_sd(), tmp_path / "z.pt")
    torch.save(_sd(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    before = _digest(tmp_path)
    for spec in ["", "z.pt", "legacy.pt", "model-00001-of-00002.safetensors"]:
        ckpt = read_checkpoint(tmp_path / spec)
        list(ckpt.tensors(ckpt.keys))
    assert _digest(tmp_path) == before


def test_is_checkpoint_path(tmp_path: Path) -> None:
    assert is_checkpoint_path("a/b/model.safetensors") and is_checkpoint_path("x.CKPT")
    assert is_checkpoint_path("m.safetensors.index.json") and is_checkpoint_path(str(tmp_path))
    assert not is_checkpoint_path("vit_base_patch16_224") and not is_checkpoint_path("timm/resnet50.a1_in1k")


# ------------------------------------------------------------------------------------------------- properties

DTYPE_CODES = ["F32", "BF16", "I8", "BOOL", "F8_E4M3", "U64", "F4", "X9", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(DTYPE_CODES), "shape": st.lists(st.integers(-1, 4), max_size=3),
     "data_offsets": st.lists(st.integers(-1, 80), min_size=0, max_size=3)},
    optional={"extra": json_values},
) | json_values
headers = st.dictionaries(st.text(max_size=8) | st.just("__metadata__"), entries, max_size=5)


def _parses_or_refuses(path: Path) -> None:
    try:
        header = read_safetensors_header(path)
    except KeydiffError:
        return
    for _, info, (begin, end) in header.tensors:
        assert begin <= end <= header.file_size - header.data_start
        assert all(d >= 0 for d in info.shape)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_refuse(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(data)
    _parses_or_refuses(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data=st.binary(max_size=64), slack=st.integers(-3, 3))
def test_arbitrary_json_headers_parse_or_refuse(
    tmp_path_factory: pytest.TempPathFactory, header: dict[str, object], data: bytes, slack: int
) -> None:
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("fuzz") / "h.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + slack)) + raw + data)
    _parses_or_refuses(path)
    with contextlib.suppress(KeydiffError):
        read_checkpoint(path)


SIZES = {"F32": 4, "BF16": 2, "I8": 1, "I64": 8, "BOOL": 1}


@st.composite
def valid_files(draw: st.DrawFn) -> tuple[dict[str, dict[str, object]], int]:
    """A consistent header (contiguous offsets) and the size of its data section."""
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for key in draw(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=5)):
        code = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = SIZES[code] * math.prod(shape)
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    made=valid_files(),
    field=st.sampled_from(["", "dtype", "shape", "data_offsets", "drop", "truncate"]),
    value=json_values,
)
def test_valid_headers_parse_and_any_single_change_is_refused_or_parsed(
    tmp_path_factory: pytest.TempPathFactory, made: tuple[dict[str, dict[str, object]], int], field: str,
    value: object,
) -> None:
    header, size = made
    data_size = size
    if header and field:
        entry = header[next(iter(header))]
        if field == "drop":
            del entry["dtype"]
        elif field == "truncate":
            data_size = max(0, size - 1)
        else:
            entry[field] = value
    path = _raw_safetensors(tmp_path_factory.mktemp("fuzz") / "v.safetensors", header, bytes(data_size))
    if not field or not header:
        parsed = read_safetensors_header(path)
        assert [k for k, _, _ in parsed.tensors] == list(header)
        assert [list(info.shape) for _, info, _ in parsed.tensors] == [e["shape"] for e in header.values()]
    else:
        _parses_or_refuses(path)


@settings(max_examples=200, deadline=None)
@given(header=headers | valid_files().map(lambda made: made[0]), data_size=st.integers(0, 200))
def test_fast_header_parser_agrees_with_the_full_one(header: dict[str, object], data_size: int) -> None:
    """Whatever the C-speed path accepts, the entry-by-entry parser reads the same way."""
    from unittest import mock

    from keydiff import _sources

    raw = json.dumps(header).encode()
    fast = _sources._parse_header_fast(raw, data_size)
    if fast is None:
        return
    with mock.patch.object(_sources, "_parse_header_fast", return_value=None):
        full = _sources._parse_header("h", raw, data_start=0, file_size=data_size)
    assert fast[0] == full.tensors
    assert fast[1] == dict(full.metadata)
