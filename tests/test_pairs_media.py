"""Issue 11's measuring stick beyond vision classifiers: segmentation, diffusion, audio codec and vocoder pairs
(tests/pairs_media.py), each from its library's own code with a reference proven by outputs.

Three tests per pair: the reference is proven; precision (if keydiff exits 0 the converted target reproduces the
source, and every applied entry equals the reference, whatever the exit code); end to end through the CLI (exit 0,
a converted file that loads strictly and reproduces the source). The xfail marks are strict and record, per pair,
which of issue 11's classes blocks it today: a fix shows as XPASS, and then the mark goes.
"""

from __future__ import annotations

import re
from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file

from keydiff.cli import main

from pairs import Pair, max_rel_diff, write_source
from pairs_media import LDM_VAE, PAIRS, REQUIRES, SAM, SAM2
from reference import check_entries, describe, prove

# How each pair fails today. Precision failures are the serious ones: a wrong entry applied, or exit 0 with other
# outputs; end-to-end failures include every pair keydiff does not solve yet.
FAILS_PRECISION = {
    "sam2_video_to_transformers_image": "class 8: the memory attention and memory encoder (no counterpart) fill 10 "
                                        "kept targets; class 7: point_embeddings.{0..3} [1, D] are not stacked into "
                                        "point_embed [4, D]; class 1: the shared Fourier matrix is filled from "
                                        "maskmem_tpos_enc",
    "sd_checkpoint_unet_to_diffusers": "class 8: the autoencoder tower (first_stage_model, no counterpart) fills 40 "
                                       "UNet targets; inside the UNet a spatial transformer's GroupNorm and its "
                                       "block's LayerNorm (same shape) trade places (12 wrong)",
}
FAILS_END_TO_END = {
    **FAILS_PRECISION,
    "sam_to_transformers": "class 1: the tied Fourier matrix shared_image_embedding.positional_embedding is absent "
                           "from the file (the prompt encoder's copy fills it)",
    "ldm_vae_to_diffusers": "class 5: the decoder's up.{i} is up_blocks.{n-1-i}; equal-width levels cannot show it "
                            "by shapes, and position pairing that maps them in no order stays unproven (exit 1)",
    "segformer_mmseg_to_transformers": "class 5: 1-based indices inside a name (patch_embed1, norm1) are the "
                                       "0-based stages.0 (24 keys unresolved)",
}


def _installed(pair: Pair) -> list:
    lib = REQUIRES.get(pair.name)
    return [pytest.mark.skipif(lib is not None and find_spec(lib) is None, reason=f"{lib} is not installed")]


def _marked(fails: dict[str, str]) -> list:
    return [pytest.param(p, id=p.name, marks=_installed(p) + ([pytest.mark.xfail(strict=True, reason=fails[p.name])]
                                                              if p.name in fails else [])) for p in PAIRS]


def test_media_corpus_has_seven_pairs_from_four_domains_with_a_reason_per_failure():
    names = [p.name for p in PAIRS]
    assert len(names) >= 7 and len(set(names)) == len(names)
    assert len({p.tags[0] for p in PAIRS}) >= 4
    assert set(FAILS_PRECISION) <= set(FAILS_END_TO_END) <= set(names)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each pair's checkpoint (saved as its library saves it), source model, reference and target, built once."""
    cache = {}

    def build(pair: Pair):
        if pair.name not in cache:
            path, src = write_source(pair, tmp_path_factory.mktemp(pair.name))
            dst = pair.target_model()
            cache[pair.name] = path, src, pair.reference(pair, src, dst), dst
        return cache[pair.name]

    return build


@pytest.mark.parametrize("pair", _marked({}))
def test_reference_is_proven(pair: Pair, built):
    _, src, ref, dst = built(pair)
    assert prove(pair, src, ref, dst) < 1e-4


@pytest.mark.parametrize("pair", _marked(FAILS_PRECISION))
def test_precision(pair: Pair, built):
    import keydiff

    path, src, ref, _ = built(pair)
    d = keydiff.diff(pair.target, str(path), **pair.target_kwargs)
    wrong = [describe(j) for j in check_entries(d, ref) if j.applied and not j.right]
    assert not wrong, "\n".join(wrong)
    if d.ok:  # exit 0 means right: the converted target computes the source's function
        dst = pair.target_model()
        dst.load_state_dict(d.apply(), strict=True)
        assert max_rel_diff(pair, src, dst) < 1e-4


@pytest.mark.parametrize("pair", _marked(FAILS_END_TO_END))
def test_end_to_end_through_the_cli(pair: Pair, built, tmp_path, capsys):
    path, src, _, _ = built(pair)
    out = tmp_path / "out.safetensors"
    code = main([pair.target, str(path), *pair.model_args(), "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr()
    dst = pair.target_model()
    dst.load_state_dict(load_file(str(out)), strict=True)
    assert max_rel_diff(pair, src, dst) < 1e-4


def test_reversed_decoder_index_is_what_the_outputs_prove(built):
    """The proof is sensitive to class 5: the LDM decoder's ``up.{i}`` as ``up_blocks.{i}`` (equal shapes at the
    two 64-wide levels, so it loads) computes another function."""
    pytest.importorskip("diffusers")
    _, src, ref, _ = built(LDM_VAE)
    unreversed = dict(ref)
    for key, value in src.state_dict().items():
        m = re.fullmatch(r"decoder\.up\.([12])\.(block|upsample)\.(.+)", key)
        if m:  # up.1 and up.2 (the 64-wide levels) in index order: up_blocks.0 and up_blocks.1
            part = "resnets" if m.group(2) == "block" else "upsamplers.0"
            target = f"decoder.up_blocks.{int(m.group(1)) - 1}.{part}.{m.group(3)}"
            assert unreversed[target].shape == value.shape
            unreversed[target] = value
    assert prove(LDM_VAE, src, unreversed) > 1e-2


def test_mlp_layers_by_exact_name_are_not_proven(built):
    """And to class 4: SAM's ``layers.0`` taken as the target's ``layers.0`` (same name, same shape) is wrong."""
    pytest.importorskip("segment_anything")
    _, src, ref, _ = built(SAM)
    sd = src.state_dict()
    by_name = dict(ref)
    for kind in ("weight", "bias"):
        head = "mask_decoder.iou_prediction_head"
        by_name[f"{head}.layers.0.{kind}"] = sd[f"{head}.layers.0.{kind}"]
        by_name[f"{head}.proj_in.{kind}"] = sd[f"{head}.layers.1.{kind}"]
    assert prove(SAM, src, by_name) > 1e-2


def test_stacked_point_embeddings_order_is_what_the_outputs_prove(built):
    """And to class 7: SAM 2's four ``point_embeddings.{i}`` stack into ``point_embed`` in index order."""
    pytest.importorskip("sam2")
    _, src, ref, _ = built(SAM2)
    swapped = dict(ref, **{"prompt_encoder.point_embed.weight": ref["prompt_encoder.point_embed.weight"][[1, 0, 2, 3]]})
    assert prove(SAM2, src, swapped) > 1e-3  # ten times the proof threshold


def test_a_checkpoint_without_the_subtree_keeps_the_dropped_part_out(built, tmp_path):
    """Class 8's control: the image encoder's tensors alone convert into SamVisionModel with every entry right, so
    the whole-checkpoint failure above comes from the subtree with no counterpart, not from the encoder's names."""
    import keydiff

    pytest.importorskip("segment_anything")
    pair = next(p for p in PAIRS if p.name == "sam_image_encoder_only")
    _, src, ref, _ = built(pair)
    encoder_only = {k: v for k, v in src.state_dict().items() if k.startswith("image_encoder.")}
    path = tmp_path / "encoder.pth"
    torch.save(encoder_only, path)
    d = keydiff.diff(pair.target, str(path), **pair.target_kwargs)
    judged = check_entries(d, ref)
    assert d.ok and judged and all(j.right for j in judged), [describe(j) for j in judged if not j.right]
    dst = pair.target_model()
    dst.load_state_dict(d.apply(), strict=True)
    assert max_rel_diff(pair, src, dst) < 1e-4
