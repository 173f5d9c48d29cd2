"""Issue 10, precision on unseen architectures: real pairs whose parts differ in kind, split unevenly, or sit in one
tower of a multi-tower checkpoint; each converted end to end through the CLI and checked on its outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from keydiff.cli import main

from pairs import HF_BEIT, ISSUE10_PAIRS, VIT, Pair, max_rel_diff, randomise, write_source


def _convert(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().out


@pytest.mark.parametrize("pair", ISSUE10_PAIRS, ids=lambda p: p.name)
def test_pair_converts_and_computes_the_same_function(pair: Pair, tmp_path, capsys):
    src_path, src_model = write_source(pair, tmp_path)
    out, mapping = tmp_path / "out.safetensors", tmp_path / "map.json"
    code, report = _convert([pair.target, str(src_path), *pair.model_args(), "--json", str(mapping), "-o", str(out)],
                            capsys)
    assert code == 0, report
    dst = pair.target_model()
    dst.load_state_dict(load_file(str(out)), strict=True)
    assert max_rel_diff(pair, src_model, dst) < 1e-4
    doc = json.loads(mapping.read_text())
    assert doc["complete"] and not doc["unused"]


def test_beit_partial_biases_fuse_the_weights_and_rename_the_biases(tmp_path, capsys):
    """timm BEiT keeps ``qkv.weight`` fused beside ``q_bias``/``v_bias``; transformers keeps q/k/v apart, k without
    a bias. Both directions: concat the weights, rename the biases; split the weight, rename the biases."""
    import timm
    from transformers import BeitConfig, BeitModel

    src = randomise(timm.create_model("beit_base_patch16_224", **VIT))
    path = tmp_path / "timm_beit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    out, mapping = tmp_path / "hf.safetensors", tmp_path / "map.json"
    hf_args = [a for k, v in HF_BEIT.items() for a in ("-m", f"{k}={v!r}")]
    code, report = _convert(["transformers:BeitModel", str(path), *hf_args, "--json", str(mapping), "-o", str(out)],
                            capsys)
    assert code == 0, report
    dst = BeitModel(BeitConfig(**HF_BEIT)).eval()
    dst.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = src.eval().forward_head(src.forward_features(x), pre_logits=True), dst(pixel_values=x).pooler_output
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    entries = {e["target"]: e for e in json.loads(mapping.read_text())["entries"]}
    assert entries["layers.0.attention.k_proj.weight"]["op"] == {"kind": "split", "dim": 0, "sizes": [32, 32, 32],
                                                                 "index": 1}
    assert entries["layers.0.attention.q_proj.bias"]["source"] == ["blocks.0.attn.q_bias"]
    assert entries["layers.0.attention.v_proj.bias"]["source"] == ["blocks.0.attn.v_bias"]
