"""Matching evidence: shapes, names, fusion, ambiguity, negative controls."""

from __future__ import annotations

import random

import pytest

from keydiff import KeySet, TensorInfo, compare_keys
from keydiff._match import name_similarity, shape_relation


def ks(items, order_is_evidence=True) -> KeySet:
    return KeySet.from_items(((k, TensorInfo(tuple(s), "float32")) for k, s in items),
                             order_is_evidence=order_is_evidence)


def vit_keys(prefix: str, depth: int, d: int = 8, names: dict | None = None) -> list:
    n = names or {}
    out = [(n.get("cls", "cls_token"), (1, 1, d))]
    for i in range(depth):
        p = f"{prefix}.{i}."
        norm1, norm2, qkv = n.get("norm1", "norm1"), n.get("norm2", "norm2"), n.get("qkv", "attn.qkv")
        out += [(p + norm1 + ".weight", (d,)), (p + norm1 + ".bias", (d,)),
                (p + qkv + ".weight", (3 * d, d)), (p + qkv + ".bias", (3 * d,)),
                (p + norm2 + ".weight", (d,)), (p + norm2 + ".bias", (d,)),
                (p + n.get("fc1", "mlp.fc1") + ".weight", (4 * d, d)),
                (p + n.get("fc2", "mlp.fc2") + ".weight", (d, 4 * d))]
    return out


def test_shape_relations():
    assert shape_relation((4, 3), (4, 3)) == "same"
    assert shape_relation((8,), (1, 1, 8)) == "reshape"
    assert shape_relation((8, 1, 1), (8,)) == "reshape"
    assert shape_relation((8, 3, 2, 2), (8, 12)) == "reshape"
    assert shape_relation((4, 3), (3, 4)) == "transpose"
    assert shape_relation((4, 4), (2, 8)) is None
    assert shape_relation((4,), (5,)) is None


def test_synonyms_score_higher_than_other_parts():
    assert name_similarity("layers.{}.layernorm_before", "blocks.{}.norm1") > name_similarity(
        "layers.{}.layernorm_before", "blocks.{}.norm2")
    assert name_similarity("resblocks.{}.mlp.c_proj", "blocks.{}.mlp.fc2") > name_similarity(
        "resblocks.{}.mlp.c_proj", "blocks.{}.mlp.fc1")


def test_renamed_blocks_map_by_index_and_name():
    model = ks(vit_keys("blocks", 3))
    ckpt = ks(vit_keys("encoder.layer", 3, names={"norm1": "ln_1", "norm2": "ln_2", "cls": "class_token",
                                                  "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}), order_is_evidence=False)
    d = compare_keys(model, ckpt)
    assert d.ok
    got = {e.target: e.source[0] for e in d.mapping.entries}
    assert got["blocks.2.norm2.weight"] == "encoder.layer.2.ln_2.weight"
    assert got["blocks.1.mlp.fc2.weight"] == "encoder.layer.1.mlp.c_proj.weight"


def test_separate_qkv_is_fused_in_name_order_not_file_order():
    d_ = 4
    model = ks([("blocks.0.attn.qkv.weight", (3 * d_, d_))])
    ckpt = ks([("layers.0.attention.value.weight", (d_, d_)), ("layers.0.attention.query.weight", (d_, d_)),
               ("layers.0.attention.key.weight", (d_, d_))])
    (entry,) = compare_keys(model, ckpt).mapping.entries
    assert entry.op.kind == "concat"
    assert entry.source == ("layers.0.attention.query.weight", "layers.0.attention.key.weight",
                            "layers.0.attention.value.weight")


def test_fused_in_proj_is_split_for_separate_q_k_v():
    model = ks([(f"layers.0.self_attn.{p}_proj.weight", (4, 4)) for p in "qkv"])
    ckpt = ks([("blocks.0.attn.in_proj_weight", (12, 4))])
    entries = compare_keys(model, ckpt).mapping.entries
    assert [(e.target, e.op.kind, e.op.index) for e in entries] == [
        ("layers.0.self_attn.q_proj.weight", "split", 0), ("layers.0.self_attn.k_proj.weight", "split", 1),
        ("layers.0.self_attn.v_proj.weight", "split", 2)]


def test_opaque_same_shaped_norms_are_not_guessed():
    """Two same-shaped norms whose names say nothing, in an order that says nothing: unresolved, not a coin flip."""
    model = ks([("blocks.0.norm1.weight", (8,)), ("blocks.0.norm2.weight", (8,))])
    ckpt = ks([("layers.0.xa.weight", (8,)), ("layers.0.xb.weight", (8,))], order_is_evidence=False)
    d = compare_keys(model, ckpt, min_confidence=0.75)
    assert not d.ok


def test_shallower_checkpoint_never_fills_deeper_blocks():
    model = ks(vit_keys("blocks", 4))
    ckpt = ks(vit_keys("encoder.layers", 2), order_is_evidence=False)
    d = compare_keys(model, ckpt)
    assert not d.ok
    for e in d.mapping.entries:
        if e.target.startswith("blocks."):
            assert e.target.split(".")[1] == e.source[0].split(".")[2]
    assert any(dg.kind == "depth" for dg in d.diagnoses)


def test_wider_checkpoint_is_refused_with_a_diagnosis():
    d = compare_keys(ks(vit_keys("blocks", 2, d=8)), ks(vit_keys("blocks", 2, d=16)))
    assert not d.ok and not d.mapping.entries
    assert any("width 16 in the checkpoint, 8 in the model" in dg.message for dg in d.diagnoses)


def test_output_is_deterministic_under_permuted_input():
    model = ks(vit_keys("blocks", 3))
    items = vit_keys("encoder.layer", 3, names={"norm1": "ln_1", "norm2": "ln_2"})
    first = compare_keys(model, ks(items, order_is_evidence=False)).mapping.dumps()
    for seed in range(3):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        assert compare_keys(model, ks(shuffled, order_is_evidence=False)).mapping.dumps() == first


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "model.module.", "backbone."])
def test_wrapper_prefixes_are_found_by_overlap(prefix):
    model = ks(vit_keys("blocks", 2))
    d = compare_keys(model, ks([(prefix + k, s) for k, s in vit_keys("blocks", 2)]))
    assert d.ok and d.mapping.unwrap.strip_prefix == prefix
    assert all(e.evidence.method == "prefix" for e in d.mapping.entries)
    assert any(dg.kind == "prefix" and prefix in dg.message for dg in d.diagnoses)


def test_head_reinitialisation_is_diagnosed():
    model = ks([*vit_keys("blocks", 1), ("head.weight", (10, 8)), ("head.bias", (10,))])
    ckpt = ks([*vit_keys("blocks", 1), ("head.weight", (1000, 8)), ("head.bias", (1000,))])
    d = compare_keys(model, ckpt)
    assert not d.ok
    assert any("checkpoint has 1000 classes, model 10" in dg.message for dg in d.diagnoses)


def test_every_checkpoint_tensor_is_mapped_or_reported():
    model = ks(vit_keys("blocks", 2))
    ckpt = ks([*vit_keys("encoder.layers", 2), ("pooler.dense.weight", (8, 8)), ("extra", (3,))])
    d = compare_keys(model, ckpt)
    used = {k for e in d.mapping.entries for k in e.source}
    unused = {u.key: u.reason for u in d.mapping.unused}
    assert used | set(unused) == set(ckpt) and not used & set(unused)
    assert all(unused.values())


def test_position_embedding_size_differences_are_named():
    base = vit_keys("blocks", 1)
    one_token = compare_keys(ks([*base, ("pos_embed", (1, 17, 8))]), ks([*base, ("pos_embed", (1, 16, 8))]))
    assert any("by one token (class token)" in dg.message for dg in one_token.diagnoses)
    grid = compare_keys(ks([*base, ("pos_embed", (1, 197, 8))]), ks([*base, ("pos_embed", (1, 577, 8))]))
    assert any("by grid size" in dg.message for dg in grid.diagnoses)


def test_order_and_uniqueness_do_not_carry_a_block_tensor_into_the_head():
    """Issue 10: the blocks are matched as clusters; a tensor left over inside a matched block (an extra norm of
    block 1) must not fill the head's norm, the only other tensor of its shape, nor the reverse."""
    names = {"norm1": "ln_1", "norm2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
    model = ks([*vit_keys("blocks", 2), ("head.norm.weight", (8,)), ("head.norm.bias", (8,))])
    ckpt = ks([*vit_keys("encoder.layers", 2, names=names), ("encoder.layers.1.extra_ln.weight", (8,)),
               ("encoder.layers.1.extra_ln.bias", (8,))])
    d = compare_keys(model, ckpt)
    assert {e.target for e in d.mapping.entries} == {k for k, _ in vit_keys("blocks", 2)}
    assert {m.key for m in d.mapping.missing} == {"head.norm.weight", "head.norm.bias"}
    # the same head norm outside any block is paired: the constraint is about the boundary, not about heads
    ckpt = ks([*vit_keys("encoder.layers", 2, names=names), ("pooler.ln.weight", (8,)), ("pooler.ln.bias", (8,))])
    got = {e.target: e.source[0] for e in compare_keys(model, ckpt).mapping.entries}
    assert got["head.norm.weight"] == "pooler.ln.weight"


def test_uneven_split_of_in_proj_into_q_and_kv_follows_the_names():
    d_ = 4
    model = ks([("attn_pool.q.weight", (d_, d_)), ("attn_pool.kv.weight", (2 * d_, d_))])
    ckpt = ks([("head.attention.in_proj_weight", (3 * d_, d_))])
    entries = compare_keys(model, ckpt).mapping.entries
    assert [(e.target, e.op.kind, e.op.index, e.op.sizes) for e in entries] == [
        ("attn_pool.q.weight", "split", 0, (d_, 2 * d_)), ("attn_pool.kv.weight", "split", 1, (d_, 2 * d_))]
    # and the reverse: q and kv concatenate into one in_proj
    (entry,) = compare_keys(ckpt, model).mapping.entries
    assert entry.op.kind == "concat" and entry.source == ("attn_pool.q.weight", "attn_pool.kv.weight")


def test_partial_biases_beside_a_fused_weight_pair_by_name():
    d_ = 4
    model = ks([("blocks.0.attn.q_bias", (d_,)), ("blocks.0.attn.v_bias", (d_,)),
                ("blocks.0.attn.qkv.weight", (3 * d_, d_))])
    ckpt = ks([("layers.0.attention.query.weight", (d_, d_)), ("layers.0.attention.query.bias", (d_,)),
               ("layers.0.attention.key.weight", (d_, d_)), ("layers.0.attention.value.weight", (d_, d_)),
               ("layers.0.attention.value.bias", (d_,))])
    d = compare_keys(model, ckpt)
    assert d.ok and not d.mapping.unused
    got = {e.target: (e.source, e.op.kind) for e in d.mapping.entries}
    assert got["blocks.0.attn.q_bias"] == (("layers.0.attention.query.bias",), "rename")
    assert got["blocks.0.attn.v_bias"] == (("layers.0.attention.value.bias",), "rename")
    assert got["blocks.0.attn.qkv.weight"][1] == "concat"


@pytest.mark.parametrize("holes", [False, True])
def test_pair_cache_gives_what_members_and_quality_give(holes):
    """The per-case cache of cluster pairing (index sets and leaf profiles repeat) against the direct answers."""
    from keydiff._match import _cluster_quality, _members, _PairCache
    from keydiff._patterns import build_clusters, build_units

    def side(prefix, drop):
        items = [(f"{prefix}.{n}.experts.{e}.{w}.weight", TensorInfo((4, 2) if w != "w2" else (2, 4), "float32"))
                 for n in range(3) for e in range(5) for w in ("w1", "w2", "w3") if (n, e, w) != drop]
        items += [(f"{prefix}.{n}.norm.weight", TensorInfo((4,), "float32" if n else "float16")) for n in range(3)]
        ks = KeySet.from_items(items)
        return build_clusters(build_units(ks, ks))

    src, dst = side("a", (1, 2, "w1") if holes else None), side("b", (2, 4, "w3") if holes else None)
    cache = _PairCache()
    for a in src:
        for b in dst:
            pairs = _members(a, b)
            assert cache.members(a, b) == pairs
            if pairs:
                assert cache.quality(a, b, cache.positions(a, b)) == _cluster_quality(pairs)


# --- dataflow: a norm goes with the conv it follows (issue 10) ------------------------------------------------

def _hf_to_timm(tmp_path, hf_model, target: str, **kwargs):
    import timm
    import torch
    from safetensors.torch import save_file

    import keydiff

    from pairs import randomise

    src = randomise(hf_model)
    path = tmp_path / "source.safetensors"  # sorted keys: the file's order says nothing about run order
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    d = keydiff.diff(target, str(path), **kwargs)
    dst = timm.create_model(target, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    if d.ok:
        dst.load_state_dict(d.apply(), strict=True)
        with torch.no_grad():
            a, b = src(pixel_values=x).pooler_output.flatten(1), dst(x)
        return d, ((a - b).abs().max() / a.abs().max()).item()
    return d, None


def test_inverted_residual_norms_follow_their_convs(tmp_path):
    # transformers' EfficientNet: the first block is depthwise-separable (bn1 after conv_dw), the others inverted
    # residual (bn1 after conv_pw, bn2 after conv_dw), every norm of a block the same width: names cannot decide
    from transformers import EfficientNetConfig, EfficientNetModel

    cfg = EfficientNetConfig(image_size=64, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280)
    d, rel = _hf_to_timm(tmp_path, EfficientNetModel(cfg), "tf_efficientnet_b0", num_classes=0)
    assert d.ok, d.problem
    assert rel is not None and rel < 1e-4
    moved = [e for e in d.mapping.entries if "siblings" in e.evidence.note]
    assert moved  # the cluster pairing alone put expansion norms on depthwise norms


def test_flat_numbering_into_nested_stages_with_stem_block(tmp_path):
    # transformers' MobileNetV2: `layer.{0..15}` -> `blocks.{S}.{B}`; the stem's 3x3 and 1x1 convs are the
    # target's first block; the expansion and depthwise norms have the same width
    from transformers import MobileNetV2Config, MobileNetV2Model

    cfg = MobileNetV2Config(image_size=64, depth_multiplier=0.35, layer_norm_eps=1e-5, tf_padding=False)
    d, rel = _hf_to_timm(tmp_path, MobileNetV2Model(cfg), "mobilenetv2_035", num_classes=0)
    assert d.ok, d.problem
    assert rel is not None and rel < 1e-4
    assert any(e.evidence.note.startswith("dataflow") for e in d.mapping.entries)


def test_role_ambiguous_norms_without_dataflow_stay_unresolved(tmp_path, monkeypatch):
    # the same pair with the dataflow evidence switched off: the role-ambiguous norms must not be applied on
    # cluster uniqueness alone (150 of 358 entries were applied wrong with exit 0 before issue 10)
    from transformers import EfficientNetConfig, EfficientNetModel

    import keydiff._match as match

    monkeypatch.setattr(match._Followers, "repair", lambda self: 0)
    monkeypatch.setattr(match._Followers, "coherent", lambda self, s, t: False)
    cfg = EfficientNetConfig(image_size=64, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280)
    d, _ = _hf_to_timm(tmp_path, EfficientNetModel(cfg), "tf_efficientnet_b0", num_classes=0)
    assert not d.ok
    unproven = [m for m in d.mapping.missing if "unproven" in m.reason]
    assert unproven and len(unproven) == len(d.mapping.missing)
    # every applied entry agrees with the mapping the dataflow evidence proves right
    monkeypatch.undo()
    right, _ = _hf_to_timm(tmp_path, EfficientNetModel(cfg), "tf_efficientnet_b0", num_classes=0)
    proven = {e.target: e.source for e in right.mapping.entries}
    assert all(proven[e.target] == e.source for e in d.mapping.entries)


def test_order_step_aligns_against_the_run_order(tmp_path):
    # the target declares `late` before `early` but runs `early` first; the checkpoint (a torch file: its order is
    # the source's, which declares and runs in one order) gives names that say nothing: run order decides
    import torch
    from torch import nn

    import keydiff

    class Target(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(8, 8)
            self.early = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.relu(self.early(x)))

    class Source(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Linear(8, 8)
            self.omega = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.omega(torch.relu(self.alpha(x)))

    src, dst = Source(), Target()
    path = tmp_path / "source.pth"
    torch.save(src.state_dict(), path)
    d = keydiff.diff(dst, str(path))
    assert d.ok
    assert {e.target: e.source[0] for e in d.mapping.entries}["early.weight"] == "alpha.weight"
    dst.load_state_dict(d.apply(), strict=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(dst(x), src(x))
