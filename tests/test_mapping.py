"""KeyMap: apply, inverse, JSON schema, rules."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keydiff import KeyMap, load_mapping
from keydiff._errors import MappingFileError, MappingMismatch
from keydiff._mapping import Entry, Evidence, compress_rules
from keydiff._ops import Op

EV = Evidence(method="cluster")


def _entry(source, target, op, source_shapes, target_shape):
    return Entry(source=tuple(source), target=target, op=op, confidence=0.9, evidence=EV,
                 source_shapes=tuple(tuple(s) for s in source_shapes), target_shape=tuple(target_shape))


@st.composite
def mappings(draw):
    """A random state dict and a mapping over part of it: renames, reshapes, transposes, fusions and splits."""
    sd: dict[str, torch.Tensor] = {}
    entries = []
    n = draw(st.integers(1, 6))
    for i in range(n):
        kind = draw(st.sampled_from(["rename", "reshape", "transpose", "concat", "split", "zeros"]))
        rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        g = torch.Generator().manual_seed(i)
        if kind in ("rename", "reshape", "transpose"):
            src = f"src.{i}.w"
            sd[src] = torch.randn(rows, cols, generator=g).to(dtype)
            target_shape = {"rename": (rows, cols), "reshape": (1, rows * cols), "transpose": (cols, rows)}[kind]
            entries.append(_entry([src], f"dst.{i}.w", Op(kind=kind), [(rows, cols)], target_shape))
        elif kind == "zeros":
            name = str(dtype).removeprefix("torch.")
            entries.append(_entry([], f"dst.{i}.bias", Op(kind="zeros", dtype=name), [], (rows,)))
        elif kind == "concat":
            parts = draw(st.integers(2, 3))
            keys = [f"src.{i}.{p}.w" for p in range(parts)]
            for k in keys:
                sd[k] = torch.randn(rows, cols, generator=g).to(dtype)
            entries.append(_entry(keys, f"dst.{i}.qkv.w", Op(kind="concat", sizes=(rows,) * parts),
                                  [(rows, cols)] * parts, (rows * parts, cols)))
        else:
            parts = draw(st.integers(2, 3))
            src = f"src.{i}.in_proj"
            sd[src] = torch.randn(rows * parts, cols, generator=g).to(dtype)
            for p in range(parts):
                entries.append(_entry([src], f"dst.{i}.{p}.w", Op(kind="split", index=p, sizes=(rows,) * parts),
                                      [(rows * parts, cols)], (rows, cols)))
    sd["unused.extra"] = torch.zeros(3)
    return sd, KeyMap(entries=tuple(entries))


@settings(max_examples=60, deadline=None)
@given(mappings())
def test_apply_then_inverse_gives_back_the_mapped_part_bit_for_bit(case):
    sd, km = case
    converted = km.apply(sd)
    back = km.inverse().apply(converted)
    mapped = {k for e in km.entries for k in e.source}
    assert set(back) == mapped
    for k in mapped:
        assert back[k].dtype == sd[k].dtype
        assert torch.equal(back[k], sd[k]), k


@settings(max_examples=60, deadline=None)
@given(mappings())
def test_json_round_trip_is_lossless(case):
    sd, km = case
    again = KeyMap.from_json(json.loads(km.dumps()))
    assert again.dumps() == km.dumps()
    for a, b in zip(km.apply(sd).values(), again.apply(sd).values(), strict=True):
        assert torch.equal(a, b)


def test_split_and_concat_use_name_order_and_exact_ops():
    q, k, v = torch.full((2, 3), 1.0), torch.full((2, 3), 2.0), torch.full((2, 3), 3.0)
    fuse = _entry(["q", "k", "v"], "qkv", Op(kind="concat", sizes=(2, 2, 2)), [(2, 3)] * 3, (6, 3))
    out = KeyMap(entries=(fuse,)).apply({"v": v, "q": q, "k": k})
    torch.testing.assert_close(out["qkv"], torch.cat([q, k, v]))
    split = [_entry(["in"], n, Op(kind="split", index=i, sizes=(2, 2, 2)), [(6, 3)], (2, 3))
             for i, n in enumerate("qkv")]
    parts = KeyMap(entries=tuple(split)).apply({"in": torch.cat([q, k, v])})
    torch.testing.assert_close(parts["k"], k)


def test_apply_refuses_a_checkpoint_it_was_not_made_for():
    km = KeyMap(entries=(_entry(["a"], "b", Op(kind="rename"), [(2,)], (2,)),))
    with pytest.raises(MappingMismatch, match="lacks: a"):
        km.apply({"x": torch.zeros(2)})
    with pytest.raises(MappingMismatch, match=r"expects shape \[2\]"):
        km.apply({"a": torch.zeros(3)})


def test_training_checkpoint_container_is_entered():
    from keydiff._mapping import Unwrap

    km = KeyMap(entries=(_entry(["a"], "b", Op(kind="rename"), [(2,)], (2,)),), unwrap=Unwrap(container="state_dict"))
    assert list(km.apply({"state_dict": {"a": torch.zeros(2)}, "epoch": 1})) == ["b"]


@pytest.mark.parametrize(("doc", "message"), [
    ({"schema": "other"}, "not a keydiff mapping"),
    ({"schema": "keydiff/mapping", "version": 99, "entries": []}, "version 99 is not supported"),
    ({"schema": "keydiff/mapping", "version": 1, "entries": {}}, "entries: expected a list"),
    ({"schema": "keydiff/mapping", "version": 1, "entries": [{"source": [], "target": "x"}]}, r"entries\.0\.source"),
    ({"schema": "keydiff/mapping", "version": 1, "entries": [
        {"source": ["a"], "target": "b", "op": {"kind": "melt"}, "source_shapes": [[1]], "target_shape": [1]}]},
     r"entries\.0\.op\.kind"),
    ({"schema": "keydiff/mapping", "version": 1, "entries": [
        {"source": ["a"], "target": "b", "op": {"kind": "rename"}, "source_shapes": [[2]], "target_shape": [3]}]},
     "cannot turn shapes"),
])
def test_malformed_mapping_documents_say_where(doc, message):
    with pytest.raises(MappingFileError, match=message):
        KeyMap.from_json(doc)


def test_load_mapping_reports_bad_files(tmp_path):
    with pytest.raises(MappingFileError, match="cannot read"):
        load_mapping(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MappingFileError, match="not valid JSON"):
        load_mapping(bad)


def test_rules_are_prefix_rewrites_that_never_contradict_an_entry():
    entries = []
    for i in range(3):
        for part in ("attn.qkv", "mlp.fc1"):
            for leaf in ("weight", "bias"):
                entries.append(_entry([f"encoder.layers.{i}.{part}.{leaf}"], f"blocks.{i}.{part}.{leaf}",
                                      Op(kind="rename"), [(2,)], (2,)))
        entries.append(_entry([f"encoder.layers.{i}.ls1"], f"blocks.{i}.ls1.gamma", Op(kind="rename"), [(2,)], (2,)))
    rules = compress_rules(entries)
    import re

    for e in entries:
        hits = [re.sub(r.pattern, r.replace, e.source[0], count=1) for r in rules if re.match(r.pattern, e.source[0])]
        assert hits and set(hits) == {e.target}
    assert len(rules) < len(entries) / 3


@given(mappings())
def test_each_entry_line_is_json_dumps_of_the_entry(case):
    """The JSON writer serialises a tail once per distinct (op, confidence, evidence, shapes), by identity or by
    value: every line is still exactly ``json.dumps(entry.to_json())``."""
    from dataclasses import replace

    from keydiff._mapping import _entry_lines

    _, km = case
    # equal-valued but distinct evidence objects, as the full engine makes them, beside shared ones
    entries = tuple(replace(e, evidence=replace(e.evidence)) if i % 2 else e for i, e in enumerate(km.entries))
    want = [f"  {json.dumps(e.to_json(), ensure_ascii=False)}{',' if i < len(entries) - 1 else ''}\n"
            for i, e in enumerate(entries)]
    assert _entry_lines(entries) == want
    assert json.loads(km.dumps()) == km.to_json()
