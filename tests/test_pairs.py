"""Real pairs end to end through the CLI: exit 0, strict load, same outputs as the source model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from keydiff.cli import main

from pairs import CORE_PAIRS, Pair, max_rel_diff, write_source


@pytest.mark.parametrize("pair", CORE_PAIRS, ids=lambda p: p.name)
def test_pair_converts_and_computes_the_same_function(pair: Pair, tmp_path, capsys):
    src_path, src_model = write_source(pair, tmp_path)
    out, mapping = tmp_path / "out.safetensors", tmp_path / "map.json"
    code = main([pair.target, str(src_path), *pair.model_args(), "--json", str(mapping), "-o", str(out)])
    report = capsys.readouterr().out
    assert code == 0, report
    dst = pair.target_model()
    dst.load_state_dict(load_file(str(out)), strict=True)
    assert max_rel_diff(pair, src_model, dst) < 1e-4
    doc = json.loads(mapping.read_text())
    assert doc["complete"] and {e["target"] for e in doc["entries"]} == set(dst.state_dict())


@pytest.mark.parametrize("pair", [p for p in CORE_PAIRS if p.name in ("hf_vit", "tv_convnext")], ids=lambda p: p.name)
def test_saved_mapping_applies_again_from_cli_and_python(pair: Pair, tmp_path, capsys):
    import keydiff

    src_path, _ = write_source(pair, tmp_path)
    mapping = tmp_path / "map.json"
    assert main([pair.target, str(src_path), *pair.model_args(), "--json", str(mapping)]) == 0
    # a checkpoint with other values but the same layout converts with the saved mapping
    (tmp_path / "other").mkdir()
    other_path, other_model = write_source(pair, tmp_path / "other", seed=7)
    out = tmp_path / "again.safetensors"
    assert main(["apply", str(mapping), str(other_path), "-o", str(out)]) == 0
    dst = pair.target_model()
    dst.load_state_dict(load_file(str(out)), strict=True)
    assert max_rel_diff(pair, other_model, dst) < 1e-4
    sd = keydiff.load_mapping(mapping).apply(load_file(str(other_path)))
    for k, v in load_file(str(out)).items():
        assert torch.equal(sd[k], v)
