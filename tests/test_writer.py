"""The streaming, atomic safetensors writer: round trips, refusals, cleanup, sharding."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from keydiff._errors import KeydiffError, OutputError, UsageError
from keydiff._keys import TensorInfo
from keydiff._sources import read_checkpoint, read_safetensors_header
from keydiff._writer import write_safetensors

Item = tuple[str, TensorInfo, Callable[[], torch.Tensor]]


def _items(tensors: dict[str, torch.Tensor]) -> list[Item]:
    return [(k, TensorInfo(tuple(t.shape), str(t.dtype)[len("torch."):]), lambda t=t: t) for k, t in tensors.items()]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z.float32": torch.randn(3, 5, generator=g),
        "a.int8": torch.arange(3, dtype=torch.int8),  # odd size: the tensors after it start unaligned
        "m.bfloat16": torch.randn(2, 3, generator=g).bfloat16(),
        "b.int64": torch.arange(4, dtype=torch.int64) - 2,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 7),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, generator=g).half(),
    }


def _only(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_round_trip_equals_safetensors_load_file(tmp_path: Path) -> None:
    tensors = _tensors()
    out = tmp_path / "out.safetensors"
    assert write_safetensors(out, _items(tensors), metadata={"format": "pt"}) == [str(out)]
    loaded = load_file(out)
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert _only(tmp_path) == ["out.safetensors"]


def test_key_order_is_kept(tmp_path: Path) -> None:
    tensors = _tensors()
    write_safetensors(tmp_path / "o.safetensors", _items(tensors))
    header = read_safetensors_header(tmp_path / "o.safetensors")
    assert [k for k, _, _ in header.tensors] == list(tensors)
    assert [k for k in read_checkpoint(tmp_path / "o.safetensors").keys] == list(tensors)


def test_tensors_are_produced_one_at_a_time_in_order(tmp_path: Path) -> None:
    calls: list[str] = []

    def producer(key: str) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            calls.append(key)
            return torch.full((2,), float(len(calls)))
        return make

    items = [(k, TensorInfo((2,), "float32"), producer(k)) for k in ["c", "a", "b"]]
    write_safetensors(tmp_path / "o.safetensors", items)
    assert calls == ["c", "a", "b"]
    assert load_file(tmp_path / "o.safetensors")["b"].tolist() == [3.0, 3.0]


def test_non_contiguous_and_mmapped_sources(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"w": base}, tmp_path / "src.pt")
    ckpt = read_checkpoint(tmp_path / "src.pt")
    items: list[Item] = [
        ("t", TensorInfo((4, 3), "float32"), lambda: base.t()),
        ("w", ckpt.keys["w"], lambda: ckpt.tensor("w")),
    ]
    write_safetensors(tmp_path / "o.safetensors", items, inputs=[tmp_path / "src.pt"])
    loaded = load_file(tmp_path / "o.safetensors")
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["w"], base)


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "o.safetensors", _items({"w": torch.zeros(1)}))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "o.safetensors").stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------- refusals


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    write_safetensors(src, _items({"w": torch.ones(2)}))
    before = src.read_bytes()
    with pytest.raises(OutputError, match="it is the input"):
        write_safetensors(src, _items({"w": torch.zeros(2)}), inputs=[src])
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match="it is the input"):  # the same file, spelled another way
        write_safetensors(tmp_path / "sub" / ".." / "m.safetensors", _items({"w": torch.zeros(2)}), inputs=[str(src)])
    os.link(src, tmp_path / "hard.safetensors")
    with pytest.raises(OutputError, match="it is the input"):
        write_safetensors(tmp_path / "hard.safetensors", _items({"w": torch.zeros(2)}), inputs=[src])
    assert src.read_bytes() == before
    assert _only(tmp_path) == ["hard.safetensors", "m.safetensors", "sub"]


def test_shards_of_an_input_are_protected(tmp_path: Path) -> None:
    written = write_safetensors(tmp_path / "model.safetensors.index.json", _items(_tensors()), max_shard_size=64)
    listing = _only(tmp_path)
    for inputs in ([tmp_path], [tmp_path / "model.safetensors.index.json"]):
        with pytest.raises(OutputError, match="it is the input"):
            write_safetensors(written[0], _items({"w": torch.zeros(1)}), inputs=inputs)
    assert _only(tmp_path) == listing


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        write_safetensors(tmp_path / "nope" / "o.safetensors", _items({"w": torch.zeros(1)}))
    with pytest.raises(OutputError, match="is a directory"):
        write_safetensors(tmp_path, _items({"w": torch.zeros(1)}))
    assert _only(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("source unreadable"), KeyboardInterrupt()])
def test_failing_producer_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    def explode() -> torch.Tensor:
        raise error

    items = [*_items({"a": torch.zeros(1000)}), ("b", TensorInfo((1,), "float32"), explode)]
    with pytest.raises(type(error)):
        write_safetensors(tmp_path / "o.safetensors", items)
    assert _only(tmp_path) == []
    with pytest.raises(type(error)):
        write_safetensors(tmp_path / "model.safetensors.index.json", items, max_shard_size=10)
    assert _only(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    write_safetensors(out, _items({"w": torch.ones(3)}))
    with pytest.raises(OutputError):
        write_safetensors(out, [("w", TensorInfo((3,), "float32"), lambda: torch.ones(4))])
    assert torch.equal(load_file(out)["w"], torch.ones(3))
    assert _only(tmp_path) == ["o.safetensors"]


@pytest.mark.parametrize(
    ("made", "match"),
    [(torch.zeros(2, 3), r"came out as \[2, 3\] float32 but the plan says \[3, 2\] float32"),
     (torch.zeros(3, 2, dtype=torch.float16), r"came out as \[3, 2\] float16"),
     ([[0.0] * 2] * 3, "produced as a list")],
)
def test_wrong_tensor_is_refused(tmp_path: Path, made: object, match: str) -> None:
    items = [("w", TensorInfo((3, 2), "float32"), lambda: made)]
    with pytest.raises(OutputError, match=match):
        write_safetensors(tmp_path / "o.safetensors", items)  # type: ignore[arg-type]
    assert _only(tmp_path) == []


def test_bad_plans_are_refused_before_writing(tmp_path: Path) -> None:
    one = _items({"w": torch.zeros(1)})
    with pytest.raises(OutputError, match="appears twice"):
        write_safetensors(tmp_path / "o.safetensors", one + one)
    with pytest.raises(OutputError, match="reserved"):
        write_safetensors(tmp_path / "o.safetensors", [("__metadata__", *one[0][1:])])
    with pytest.raises(OutputError, match="no safetensors code"):
        write_safetensors(tmp_path / "o.safetensors", [("w", TensorInfo((1,), "qint8"), one[0][2])])
    with pytest.raises(UsageError, match="strings to strings"):
        write_safetensors(tmp_path / "o.safetensors", one, metadata={"epoch": 3})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="positive"):
        write_safetensors(tmp_path / "o.safetensors", one, max_shard_size=0)
    with pytest.raises(OutputError, match="name the index file"):
        write_safetensors(tmp_path / "o.bin", one, max_shard_size=10)
    assert _only(tmp_path) == []
    assert all(issubclass(e, KeydiffError) for e in (OutputError, UsageError))


# ---------------------------------------------------------------------------------------------------- sharding


def test_sharding_writes_a_hugging_face_index(tmp_path: Path) -> None:
    tensors = _tensors()
    index = tmp_path / "model.safetensors.index.json"
    written = write_safetensors(index, _items(tensors), max_shard_size=48, metadata={"format": "pt"})
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert written == [str(tmp_path / s) for s in shards] + [str(index)]
    assert list(data["weight_map"]) == list(tensors)
    assert data["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # follow the index as transformers does: each shard loads and holds its keys
        loaded = load_file(tmp_path / shard)
        assert sorted(loaded) == sorted(k for k, s in data["weight_map"].items() if s == shard)
        assert all(torch.equal(v, tensors[k]) for k, v in loaded.items())
        assert sum(v.numel() * v.element_size() for v in loaded.values()) <= 48 or len(loaded) == 1
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.fmt == "safetensors-sharded" and set(ckpt.keys) == set(tensors)


def test_sharded_output_loads_with_huggingface_hub(tmp_path: Path) -> None:
    hub = pytest.importorskip("huggingface_hub")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_safetensors(tmp_path, _items(sd), max_shard_size=100)  # a directory gets model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").exists()
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    hub.load_torch_model(fresh, tmp_path, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())


def test_one_shard_when_everything_fits(tmp_path: Path) -> None:
    written = write_safetensors(tmp_path / "w.safetensors", _items(_tensors()), max_shard_size=1 << 30)
    assert [Path(p).name for p in written] == ["w-00001-of-00001.safetensors", "w.safetensors.index.json"]
    assert read_checkpoint(written[-1]).fmt == "safetensors-sharded"
