"""keydiff verify: running source and converted target proves a conversion, and catches a wrong one."""

from __future__ import annotations

import json

from keydiff.cli import main

from pairs import CORE_PAIRS, write_source

HF_ARGS = ["-s", "hidden_size=32", "-s", "num_hidden_layers=2", "-s", "num_attention_heads=4",
           "-s", "intermediate_size=64", "-s", "image_size=32", "-s", "patch_size=8", "-s", "layer_norm_eps=1e-6"]


def _hf_vit(tmp_path):
    pair = next(p for p in CORE_PAIRS if p.name == "hf_vit")
    path, _ = write_source(pair, tmp_path)
    return pair, path


def test_verify_passes_on_a_right_conversion(tmp_path, capsys):
    pair, path = _hf_vit(tmp_path)
    code = main(["verify", "transformers:ViTModel", str(path), pair.target, *HF_ARGS, *pair.model_args()])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "✓ verified" in out and "last_hidden_state" in out


def test_verify_catches_a_wrong_mapping_that_loads(tmp_path, capsys):
    pair, path = _hf_vit(tmp_path)
    mapping = tmp_path / "map.json"
    assert main([pair.target, str(path), *pair.model_args(), "--json", str(mapping), "-q"]) == 0
    doc = json.loads(mapping.read_text())
    by_target = {e["target"]: e for e in doc["entries"]}
    a, b = by_target["blocks.0.norm1.weight"], by_target["blocks.0.norm2.weight"]
    a["source"], b["source"] = b["source"], a["source"]  # same shapes: still loads strictly
    mapping.write_text(json.dumps(doc))
    code = main(["verify", "transformers:ViTModel", str(path), pair.target, *HF_ARGS, *pair.model_args(),
                 "--mapping", str(mapping)])
    assert code == 1
    assert "✗ not verified" in capsys.readouterr().out


def test_verify_reports_a_source_that_does_not_fit_the_checkpoint(tmp_path, capsys):
    pair, path = _hf_vit(tmp_path)
    code = main(["verify", "transformers:ViTModel", str(path), pair.target, "-s", "hidden_size=64",
                 *pair.model_args()])
    assert code == 2
    assert "does not load into the source model" in capsys.readouterr().err


def test_transformers_spec_is_a_model_for_diff_too(tmp_path):
    """``transformers:ModelClass`` with config arguments names the model side of a diff, as it does for verify."""
    import transformers
    from safetensors.torch import save_file

    import keydiff

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
               patch_size=8)
    model = transformers.ViTModel(transformers.ViTConfig(**cfg))
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    d = keydiff.diff("transformers:ViTModel", str(path), **cfg)
    assert d.ok and d.exact == len(d.model) == len(model.state_dict())
