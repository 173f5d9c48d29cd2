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


def _timm_into_transformers(src, model_cls, config_cls, config: dict, tmp_path, capsys) -> dict[str, dict]:
    """Convert a timm model's checkpoint into ``transformers:model_cls`` through the CLI, check the pooled outputs
    agree, and return the mapping's entries by target key."""
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    out, mapping = tmp_path / "hf.safetensors", tmp_path / "map.json"
    args = [a for k, v in config.items() for a in ("-m", f"{k}={v!r}")]
    code, report = _convert([f"transformers:{model_cls.__name__}", str(path), *args, "--json", str(mapping),
                             "-o", str(out)], capsys)
    assert code == 0, report
    dst = model_cls(config_cls(**config)).eval()
    dst.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = src.eval().forward_head(src.forward_features(x), pre_logits=True), dst(pixel_values=x).pooler_output
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    return {e["target"]: e for e in json.loads(mapping.read_text())["entries"]}


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
    entries = _timm_into_transformers(src, BeitModel, BeitConfig, HF_BEIT, tmp_path, capsys)
    assert entries["layers.0.attention.k_proj.weight"]["op"] == {"kind": "split", "dim": 0, "sizes": [32, 32, 32],
                                                                 "index": 1}
    assert entries["layers.0.attention.q_proj.bias"]["source"] == ["blocks.0.attn.q_bias"]
    assert entries["layers.0.attention.v_proj.bias"]["source"] == ["blocks.0.attn.v_bias"]


@pytest.mark.parametrize("text_width", [32, 24], ids=["text-as-wide", "text-narrower"])
def test_one_tower_of_a_whole_clip_checkpoint(text_width, tmp_path, capsys):
    """A whole open_clip CLIP state dict into timm's CLIP ViT: the vision tower is used, the text tower is reported
    as another tower (even when it is as wide, so its blocks would tie), and ``visual.proj`` (``x @ proj``) becomes
    the transposed head weight beside a head bias made as zeros, said in the report, the JSON and the code."""
    import timm
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    src = randomise(CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, mlp_ratio=2.0,
                                                                patch_size=8, image_size=32),
                         text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=text_width, heads=4, layers=2)))
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    kwargs = dict(VIT, num_classes=16, pre_norm=True)
    args = [a for k, v in kwargs.items() for a in ("-m", f"{k}={v!r}")]
    out, mapping, code_path = tmp_path / "out.safetensors", tmp_path / "map.json", tmp_path / "filter.py"
    code, report = _convert(["vit_base_patch16_clip_224", str(path), *args, "--json", str(mapping), "-o", str(out),
                             "--emit-python", str(code_path)], capsys)
    assert code == 0, report
    assert "head.bias has no tensor in the checkpoint: made as zeros beside visual.proj" in report
    dst = timm.create_model("vit_base_patch16_clip_224", **kwargs).eval()
    dst.load_state_dict(load_file(str(out)), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = src.eval().encode_image(x), dst(x)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    doc = json.loads(mapping.read_text())
    entries = {e["target"]: e for e in doc["entries"]}
    assert entries["head.weight"]["source"] == ["visual.proj"] and entries["head.weight"]["op"]["kind"] == "transpose"
    assert entries["head.bias"]["source"] == [] and entries["head.bias"]["op"]["kind"] == "zeros"
    assert "bare matrix" in entries["head.bias"]["evidence"]["note"]
    assert all(k.startswith("visual.") for e in doc["entries"] for k in e["source"])
    reasons = {u["key"]: u["reason"] for u in doc["unused"]}
    assert reasons["transformer.resblocks.0.ln_1.weight"] == (
        "another tower: `transformer.*` is outside `visual.`, which the model matches")
    assert set(reasons) == {k for k in src.state_dict() if not k.startswith("visual.")}
    ns: dict = {}
    exec(code_path.read_text(), ns)
    sd = ns["checkpoint_filter_fn"](load_file(str(path)))
    dst.load_state_dict({k: v for k, v in sd.items() if k in dst.state_dict()}, strict=True)
    assert torch.equal(sd["head.bias"], torch.zeros(16))


def test_siglip_both_ways_at_once_split_blocks_and_concat_the_head(tmp_path, capsys):
    """timm SigLIP into transformers: the blocks' qkv splits into q/k/v while the pooling head's q and kv
    concatenate into one in_proj, in the same diff (fusion is decided apart for blocks and the rest)."""
    import timm
    from transformers import SiglipVisionConfig, SiglipVisionModel

    kwargs = dict(VIT, global_pool="map", act_layer="gelu_tanh")
    src = randomise(timm.create_model("vit_base_patch16_siglip_224", **kwargs))
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8, layer_norm_eps=1e-6)
    entries = _timm_into_transformers(src, SiglipVisionModel, SiglipVisionConfig, config, tmp_path, capsys)
    assert entries["head.attention.in_proj_weight"]["source"] == ["attn_pool.q.weight", "attn_pool.kv.weight"]
    assert entries["head.attention.in_proj_weight"]["op"] == {"kind": "concat", "dim": 0, "sizes": [32, 64]}
    assert entries["encoder.layers.0.self_attn.k_proj.weight"]["op"]["kind"] == "split"
