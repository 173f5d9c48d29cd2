"""Tensor values: statistics (flags, chunked moments, every dtype) and value diffs through a mapping."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from safetensors.torch import load_file, save_file

import keydiff
from keydiff import _stats
from keydiff._errors import UsageError

from pairs import CORE_PAIRS, write_source

HF_VIT = next(p for p in CORE_PAIRS if p.name == "hf_vit")


def _text(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=160)
    console.print(renderable)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """An HF ViT checkpoint, the Diff against timm's ViT, and the converted checkpoint."""
    directory = tmp_path_factory.mktemp("hf")
    path, _ = write_source(HF_VIT, directory)
    d = keydiff.diff(HF_VIT.target, path, **HF_VIT.target_kwargs)
    converted = directory / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in d.apply().items()}, str(converted))
    return path, d, converted


# ----------------------------------------------------------------------------------------------------- stats


def test_stats_flag_injected_nan_inf_and_all_zero(hf, tmp_path):
    path, _, _ = hf
    sd = load_file(str(path))
    sd["layers.0.mlp.fc1.weight"][3, :5] = float("nan")
    sd["layers.1.attention.v_proj.bias"][2] = float("-inf")
    sd["layernorm.bias"].zero_()
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    frame = keydiff.stats(broken)
    flagged = frame[frame.flag != ""].set_index("key")
    assert flagged["flag"].to_dict() == {"layernorm.bias": "all zero", "layers.0.mlp.fc1.weight": "nan",
                                         "layers.1.attention.v_proj.bias": "inf"}
    assert flagged.loc["layers.0.mlp.fc1.weight", "nan"] == 5
    assert flagged.loc["layers.1.attention.v_proj.bias", "inf"] == 1
    # moments skip the non-finite elements rather than turning NaN
    w = sd["layers.0.mlp.fc1.weight"].double()
    finite = w[torch.isfinite(w)]
    row = frame.set_index("key").loc["layers.0.mlp.fc1.weight"]
    assert row["mean"] == pytest.approx(finite.mean().item())
    assert row["std"] == pytest.approx(finite.std(correction=0).item())
    assert row["abs_max"] == pytest.approx(finite.abs().max().item())


def test_stats_columns_and_values_match_torch(hf):
    path, d, _ = hf
    frame = d.stats()
    assert tuple(frame.columns) == _stats.STATS_COLUMNS
    assert list(frame.key) == list(d.checkpoint)
    assert frame.equals(keydiff.stats(path))
    sd = load_file(str(path))
    for r in frame.itertuples(index=False):
        t = sd[r.key].double()
        assert r.shape == tuple(t.shape) and r.numel == t.numel() and r.dtype == "float32"
        assert (r.mean, r.min, r.max) == pytest.approx((t.mean().item(), t.min().item(), t.max().item()))
        assert r.std == pytest.approx(t.std(correction=0).item(), rel=1e-9)
        assert r.zero_frac == (t == 0).double().mean().item() and r.flag == ""


def test_stats_of_integer_bool_half_complex_and_empty_tensors():
    frame = keydiff.stats({
        "steps": torch.tensor([0, 2, 4], dtype=torch.int64),
        "mask": torch.tensor([True, False, False, False]),
        "half": torch.tensor([1.0, -3.0], dtype=torch.bfloat16),
        "complex": torch.tensor([1 + 2j, 0 + 0j]),
        "empty": torch.zeros(0, 3),
        "off": torch.zeros(4, dtype=torch.int8),
    }).set_index("key")
    assert frame.loc["steps", "mean"] == 2.0 and frame.loc["steps", "max"] == 4.0
    assert frame.loc["mask", "mean"] == 0.25 and frame.loc["mask", "zero_frac"] == 0.75
    assert frame.loc["half", "abs_max"] == 3.0 and frame.loc["half", "dtype"] == "bfloat16"
    assert frame.loc["complex", "max"] == 2.0 and frame.loc["complex", "zero_frac"] == 0.5
    assert math.isnan(frame.loc["empty", "mean"]) and frame.loc["empty", "flag"] == ""
    assert frame.loc["off", "flag"] == "all zero"


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=60),
       chunk=st.integers(1, 17))
def test_chunked_moments_equal_one_pass_numpy(values, chunk):
    t = torch.tensor(values, dtype=torch.float32)
    old = _stats.CHUNK
    _stats.CHUNK = chunk
    try:
        row = dict(zip(_stats.STATS_COLUMNS, _stats._stats_row("x", t), strict=True))
    finally:
        _stats.CHUNK = old
    ref = t.double().numpy()
    assert row["mean"] == pytest.approx(np.mean(ref), rel=1e-9, abs=1e-6)
    assert row["std"] == pytest.approx(np.std(ref), rel=1e-6, abs=1e-6)
    assert (row["min"], row["max"]) == (ref.min(), ref.max())
    assert row["zero_frac"] == pytest.approx(np.mean(ref == 0))


# ---------------------------------------------------------------------------------------------------- compare


def test_tensor_loads_one_checkpoint_tensor_lazily(hf):
    path, d, _ = hf
    assert torch.equal(d.tensor("layers.1.mlp.fc2.bias"), load_file(str(path))["layers.1.mlp.fc2.bias"])


def test_a_conversion_is_confirmed_bit_exact_through_the_mapping(hf):
    path, _, converted = hf
    vd = keydiff.compare(converted, path)
    assert len(vd.changes) == 30 and all(c.identical for c in vd.changes)
    assert vd.unused == ("pooler.dense.bias", "pooler.dense.weight") and not vd.missing
    assert not vd.identical  # two tensors of B were not compared
    qkv = next(c for c in vd.changes if c.key == "blocks.0.attn.qkv.weight")
    assert qkv.op == "concat 3 along dim 0" and len(qkv.source) == 3
    text = _text(vd)
    assert "✓ all 30 compared tensors are bit-identical" in text
    assert "2 tensors of B not compared (unused by the mapping): pooler.dense.bias, pooler.dense.weight" in text


def test_fine_tuning_changes_are_measured_per_tensor_and_summarised_per_cluster(hf, tmp_path):
    path, _, _ = hf
    base = load_file(str(path))
    g = torch.Generator().manual_seed(3)
    tuned = {}
    for k, v in base.items():
        # deeper blocks change more, like fine-tuning with layer-wise lr decay; norms stay put
        scale = 0.0 if "layernorm" in k else 0.01 * (2 if k.startswith("layers.1.") else 1)
        tuned[k] = v + scale * torch.randn(v.shape, generator=g)
    other = tmp_path / "tuned.safetensors"
    save_file(tuned, str(other))
    vd = keydiff.compare(path, other)
    frame = vd.to_frame().set_index("key")
    a, b = base["layers.1.mlp.fc1.weight"].double(), tuned["layers.1.mlp.fc1.weight"].double()
    row = frame.loc["layers.1.mlp.fc1.weight"]
    assert row["rel_change"] == pytest.approx(((b - a).norm() / a.norm()).item(), rel=1e-9)
    assert row["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0).item())
    assert row["max_abs_diff"] == pytest.approx((b - a).abs().max().item())
    assert row["layer"] == 1 and row["cluster"] == "layers.{}.mlp.fc1.weight" and not row["identical"]
    assert frame.loc["layernorm.weight", "identical"] and frame.loc["layernorm.weight", "rel_change"] == 0
    clusters = vd.by_cluster()
    assert list(clusters.columns) == ["cluster", "tensors", "identical", "median_rel_change", "max_rel_change",
                                      "min_cosine", "max_abs_diff"]
    assert clusters.median_rel_change.is_monotonic_decreasing
    top = vd.clusters[0]
    assert top.tensors == 2 and top.cluster.startswith("layers.{0,1}.")
    assert str(top).startswith(f"{top.cluster}: median rel. change ")
    norms = clusters.set_index("cluster").loc["layers.{0,1}.layernorm_before.weight"]
    assert norms.identical == 2 and norms.median_rel_change == 0
    assert "changed" in _text(vd) and "<table>" in vd._repr_html_()


def test_nan_in_b_shows_as_a_non_finite_change(hf, tmp_path):
    path, _, converted = hf
    sd = load_file(str(path))
    sd["layers.1.attention.k_proj.weight"][0, 0] = float("nan")
    broken = tmp_path / "b.safetensors"
    save_file(sd, str(broken))
    vd = keydiff.compare(converted, broken)
    qkv = {c.key: c for c in vd.changes}["blocks.1.attn.qkv.weight"]
    assert math.isnan(qkv.rel_change) and not qkv.identical
    assert vd.clusters[0].cluster == "blocks.{0,1}.attn.qkv.weight"
    assert "✗ 1 of 30 compared tensors changed (29 bit-identical); 1 with no finite change" in _text(vd)


def test_bit_identity_means_bytes_not_values():
    a = {"w": torch.tensor([0.0, 1.0]), "h": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([-0.0, 1.0]), "h": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    changes = {c.key: c for c in keydiff.compare(a, b).changes}
    assert changes["w"].max_abs_diff == 0 and not changes["w"].identical  # -0.0 has other bytes
    assert changes["h"].rel_change == 0 and not changes["h"].identical  # same values, other dtype
    assert changes["h"].dtype_b == "float64"


def test_compare_accepts_a_module_and_refuses_a_model_name(hf):
    _, d, _ = hf
    model = HF_VIT.target_model()
    model.load_state_dict(d.apply(), strict=True)
    vd = keydiff.compare(model, d.apply())
    assert all(c.identical for c in vd.changes) and vd.identical
    with pytest.raises(UsageError, match="a model name has no trained values"):
        keydiff.compare("vit_base_patch16_224", {"w": torch.zeros(1)})


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3), min_size=1, max_size=4))
def test_a_checkpoint_compared_with_itself_is_identical(shapes):
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.w": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    vd = keydiff.compare(sd, {k: v.clone() for k, v in sd.items()})
    assert vd.identical and all(c.rel_change == 0 and c.cosine == pytest.approx(1) for c in vd.changes)


def test_progress_bar_goes_to_stderr_and_changes_nothing(hf, capsys):
    path, d, converted = hf
    assert d.stats(progress=True).equals(d.stats(progress=False))
    assert keydiff.compare(converted, path, progress=True).changes == keydiff.compare(converted, path).changes
    assert capsys.readouterr().out == ""


def test_a_tensor_zero_in_a_says_was_zero(hf, tmp_path):
    """Issue 13.9: a tensor all zero in A showed a relative change of inf and cosine 1, under a ✗ headline."""
    path, _, converted = hf
    a = load_file(str(converted))
    for k in ("blocks.0.norm1.bias", "blocks.1.norm1.bias", "blocks.0.attn.proj.bias"):
        a[k] = torch.zeros_like(a[k])
    zeros = tmp_path / "a.safetensors"
    save_file(a, str(zeros))
    vd = keydiff.compare(zeros, path)
    text = _text(vd)
    assert text.startswith("≠ 3 of 30 compared tensors changed (27 bit-identical)"), text
    assert "3 were zero in A" in text and "inf" not in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    norm = rows["blocks.{0,1}.norm1.bias"]
    assert norm.count("was zero") == 3 and " 1 " not in norm  # rel. changes and cosine: none exists
    assert "(1 was zero)" in rows["blocks.{0,1}.attn.proj.bias"]


def test_stats_list_nan_and_inf_before_all_zero_rows(hf, tmp_path, capsys):
    """Issue 13.10: an all-zero bias (often meant) was listed above a NaN weight (never meant)."""
    from keydiff.cli import main

    path, _, _ = hf
    sd = load_file(str(path))
    sd["layers.0.mlp.fc1.weight"][3, :5] = float("nan")
    sd["layers.1.attention.v_proj.bias"][2] = float("-inf")
    sd["embeddings.cls_token"].zero_()
    sd["layernorm.bias"].zero_()
    broken = tmp_path / "broken.safetensors"
    save_file(sd, str(broken))
    assert main(["stats", str(broken)]) == 1
    rows = [line.split("│")[4].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [r for r in rows if r] == ["nan", "inf", "all zero", "all zero"]
