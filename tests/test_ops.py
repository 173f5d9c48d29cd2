"""Ops: the ``zeros`` op (issue 10), which makes a tensor the checkpoint does not hold, and says so everywhere."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keydiff import KeyMap
from keydiff._errors import MappingFileError
from keydiff._mapping import Entry, Evidence
from keydiff._ops import Op

WHY = "bias made as zeros: proj is a bare matrix (used as x @ proj, no bias)"


def _keymap(dtype: str = "bfloat16") -> KeyMap:
    ev = Evidence(method="unique", shape="transpose", note=WHY)
    return KeyMap(entries=(
        Entry(source=("proj",), target="head.weight", op=Op(kind="transpose"), confidence=0.6, evidence=ev,
              source_shapes=((4, 3),), target_shape=(3, 4)),
        Entry(source=(), target="head.bias", op=Op(kind="zeros", dtype=dtype), confidence=0.6,
              evidence=Evidence(method="unique", shape="zeros", note=WHY), source_shapes=(), target_shape=(3,)),
    ))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=3), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_zeros_makes_zeros_of_the_shape_and_dtype_and_round_trips(shape, dtype):
    op = Op(kind="zeros", dtype=dtype)
    out = op.apply([], shape)
    assert out.shape == tuple(shape) and out.dtype == getattr(torch, dtype) and not out.any()
    assert op.to_json() == {"kind": "zeros", "dtype": dtype}
    assert Op.from_json(op.to_json(), "op") == op
    assert op.describe() == "zeros (no source)"


def test_keymap_applies_inverts_and_round_trips_a_zeros_entry():
    km = _keymap()
    sd = {"proj": torch.randn(4, 3, dtype=torch.bfloat16)}
    out = km.apply(sd)
    assert torch.equal(out["head.weight"], sd["proj"].t()) and out["head.bias"].dtype == torch.bfloat16
    assert not out["head.bias"].any()
    doc = json.loads(km.dumps())
    assert doc["entries"][1]["source"] == [] and doc["entries"][1]["op"] == {"kind": "zeros", "dtype": "bfloat16"}
    assert doc["entries"][1]["evidence"]["note"] == WHY
    again = KeyMap.from_json(doc)
    assert again.dumps() == km.dumps()
    # the inverse gives back what came from the checkpoint; the made-up tensor is listed, with the reason
    inv = km.inverse()
    back = inv.apply(out)
    assert set(back) == {"proj"} and torch.equal(back["proj"], sd["proj"])
    (made,) = inv.unused
    assert made.key == "head.bias" and "zeros" in made.reason


@pytest.mark.parametrize(("patch", "message"), [
    ({"source": ["proj"]}, r"entries.1.source: a zeros entry takes no source"),
    ({"op": {"kind": "zeros", "dtype": "int8"}}, r"entries.1.op.dtype: expected one of"),
    ({"source_shapes": [[3]]}, r"entries.1.source_shapes: expected one shape per source key"),
])
def test_malformed_zeros_entries_are_refused_where_they_are(patch, message):
    doc = json.loads(_keymap().dumps())
    doc["entries"][1].update(patch)
    with pytest.raises(MappingFileError, match=message):
        KeyMap.from_json(doc)


def test_the_writer_and_the_generated_code_make_the_zeros(tmp_path):
    from safetensors.torch import load_file

    from keydiff._convert import write_converted
    from keydiff._diff import _InMemory
    from keydiff._keys import KeySet, TensorInfo
    from keydiff._render._python import emit_python

    km = _keymap("float32")
    sd = {"proj": torch.randn(4, 3)}
    keys = KeySet.from_items([("proj", TensorInfo((4, 3), "float32"))])
    out = tmp_path / "out.safetensors"
    write_converted(km, _InMemory(sd), keys, out)
    written = load_file(str(out))
    assert torch.equal(written["head.bias"], torch.zeros(3)) and torch.equal(written["head.weight"], sd["proj"].t())
    code = emit_python(km)
    assert "ZEROS = {" in code and WHY in code
    ns: dict = {}
    exec(code, ns)
    got = ns["checkpoint_filter_fn"](dict(sd))
    assert set(got) == {"head.weight", "head.bias"} and torch.equal(got["head.bias"], torch.zeros(3))
