"""The corpus of real pairs (issue 3): each solved end to end through the CLI, outputs matching the source model.

Also measures mapping precision: entries proposed vs entries that a trace of the two models confirms."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from keydiff.cli import main

from pairs import (
    CORE_PAIRS,
    CORPUS_PAIRS,
    VIT,
    Pair,
    hf_vit,
    logits,
    max_rel_diff,
    tokens,
    tv_convnext,
    tv_resnet,
    write_source,
)

EXTRA = [p for p in CORPUS_PAIRS if p not in CORE_PAIRS]


def test_corpus_has_at_least_twenty_pairs():
    assert len(CORPUS_PAIRS) >= 20
    assert len({p.name for p in CORPUS_PAIRS}) == len(CORPUS_PAIRS)


@pytest.mark.parametrize("pair", EXTRA, ids=lambda p: p.name)
def test_corpus_pair_converts_and_computes_the_same_function(pair: Pair, tmp_path, capsys):
    src_path, src_model = write_source(pair, tmp_path)
    out = tmp_path / "out.safetensors"
    code = main([pair.target, str(src_path), *pair.model_args(), "-o", str(out)])
    assert code == 0, capsys.readouterr().out
    dst = pair.target_model()
    dst.load_state_dict(load_file(str(out)), strict=True)
    assert max_rel_diff(pair, src_model, dst) < 1e-3


NEGATIVE = [
    ("shallower", Pair("hf_vit_depth2", hf_vit, "vit_base_patch16_224", dict(VIT, depth=4), tokens, tokens)),
    ("wider", Pair("hf_vit_width32", hf_vit, "vit_base_patch16_224", dict(VIT, embed_dim=64), tokens, tokens)),
    ("other architecture", Pair("tv_convnext_as_vit", tv_convnext, "vit_base_patch16_224", VIT, tokens, tokens)),
    ("basic vs bottleneck", Pair("tv_resnet18_as_50", tv_resnet, "resnet50", dict(layers=[1, 2, 1, 1], num_classes=6),
                                 logits, logits, fmt="pth")),
]


@pytest.mark.parametrize(("why", "pair"), NEGATIVE, ids=[w for w, _ in NEGATIVE])
def test_negative_controls_are_refused(why: str, pair: Pair, tmp_path, capsys):
    src_path, _ = write_source(pair, tmp_path)
    out = tmp_path / "out.safetensors"
    assert main([pair.target, str(src_path), *pair.model_args(), "-o", str(out)]) == 1
    assert not out.exists()
    assert "unresolved" in capsys.readouterr().out


def test_shallower_checkpoint_fills_only_same_index_blocks(tmp_path):
    import keydiff

    pair = NEGATIVE[0][1]
    src_path, _ = write_source(pair, tmp_path)
    d = keydiff.diff(pair.target, str(src_path), **pair.target_kwargs)
    for e in d.mapping.entries:
        if e.target.startswith("blocks."):
            assert e.target.split(".")[1] == e.source[0].split(".")[1]
    assert {m.key.split(".")[1] for m in d.mapping.missing if m.key.startswith("blocks.")} == {"2", "3"}
    assert any(dg.kind == "depth" for dg in d.diagnoses)
