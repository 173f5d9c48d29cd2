"""Weight normalisation (issue 11, class 2): torch's legacy ``weight_g``/``weight_v`` and the parametrization's
``parametrizations.weight.original0``/``original1`` are one pair under two names; into a model without weight norm
the pair becomes ``w = g * v / ||v||`` along the dimension ``g`` keeps; a pair whose ``g`` does not fit is refused."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import keydiff
from keydiff._errors import MappingFileError
from keydiff._mapping import Entry, Evidence, KeyMap
from keydiff._ops import Op
from keydiff._weightnorm import weight_norm_dim
from keydiff.cli import main

from pairs import randomise

W2V = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
           conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
           num_conv_pos_embedding_groups=4, feat_extract_norm="group", do_stable_layer_norm=False)


def wav2vec2() -> nn.Module:
    """transformers' Wav2Vec2Model as it is built today: its positional conv normalised by the parametrization,
    along dim 2."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(**W2V)).eval()


def plain_wav2vec2() -> nn.Module:
    """The same model with the weight norm removed: its positional conv holds a plain ``weight``."""
    from torch.nn.utils import parametrize

    m = wav2vec2()
    parametrize.remove_parametrizations(m.encoder.pos_conv_embed.conv, "weight")
    return m


def _legacy_wav2vec2(monkeypatch) -> nn.Module:
    """Wav2Vec2Model built as transformers builds it where torch has no parametrization (the legacy weight-norm
    hook, ``weight_g``/``weight_v``): what older checkpoints hold."""
    with monkeypatch.context() as m:
        m.delattr(torch.nn.utils.parametrizations, "weight_norm")
        return randomise(wav2vec2())


def _audio() -> torch.Tensor:
    return torch.randn(2, 400, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def legacy(monkeypatch, tmp_path):
    src = _legacy_wav2vec2(monkeypatch)
    sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    assert {"encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v"} <= set(sd)
    path = tmp_path / "legacy.safetensors"
    save_file(sd, str(path))
    return src, str(path)


def _all_ways(d: keydiff.Diff, ckpt: str, tmp_path) -> list[dict[str, torch.Tensor]]:
    """The converted state dict by ``apply()``, the JSON mapping, the emitted Python and the writer."""
    from keydiff._convert import write_converted

    path = tmp_path / "map.json"
    path.write_text(d.mapping.dumps(), encoding="utf-8")
    namespace: dict = {}
    exec(d.to_python(), namespace)
    out = tmp_path / "converted.safetensors"
    write_converted(d.mapping, d.source, d.checkpoint, out)
    return [d.apply(), keydiff.load_mapping(path).apply(load_file(ckpt)),
            namespace["checkpoint_filter_fn"](load_file(ckpt)), load_file(str(out))]


def test_legacy_pair_renamed_to_the_parametrization(legacy, tmp_path):
    src, ckpt = legacy
    d = keydiff.diff(wav2vec2(), ckpt)
    assert d.ok, d.problem
    by_target = {e.target: e for e in d.mapping.entries}
    g = by_target["encoder.pos_conv_embed.conv.parametrizations.weight.original0"]
    v = by_target["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    assert g.source == ("encoder.pos_conv_embed.conv.weight_g",) and g.op.kind == "rename"
    assert v.source == ("encoder.pos_conv_embed.conv.weight_v",) and v.op.kind == "rename"
    assert "weight norm" in d.to_markdown()
    for sd in _all_ways(d, ckpt, tmp_path):
        dst = wav2vec2()
        dst.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(dst(_audio()).last_hidden_state, src(_audio()).last_hidden_state)


def test_legacy_pair_folded_into_a_plain_weight_along_dim_2(legacy, tmp_path, capsys):
    src, ckpt = legacy
    d = keydiff.diff(plain_wav2vec2(), ckpt)
    assert d.ok, d.problem
    (e,) = [e for e in d.mapping.entries if e.target == "encoder.pos_conv_embed.conv.weight"]
    assert e.source == ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v")
    assert e.op == Op(kind="weight_norm", dim=2)
    assert e.source_shapes == ((1, 1, 16), (32, 8, 16))
    # what torch itself makes of the pair, bit for bit (the source computes the same function after it)
    reference = torch.nn.utils.remove_weight_norm(src.encoder.pos_conv_embed.conv).weight.detach()
    for sd in _all_ways(d, ckpt, tmp_path):
        assert torch.equal(sd["encoder.pos_conv_embed.conv.weight"], reference)
        dst = plain_wav2vec2()
        dst.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(dst(_audio()).last_hidden_state, src(_audio()).last_hidden_state)
    assert main(["test_weightnorm:plain_wav2vec2", ckpt, "-q"]) == 0


def test_parametrization_folded_and_the_inverse_gives_back_an_exact_pair(tmp_path):
    src = randomise(wav2vec2())
    path = tmp_path / "current.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}, str(path))
    d = keydiff.diff(plain_wav2vec2(), str(path))
    assert d.ok, d.problem
    converted = d.apply()
    # plain weight into weight norm: g = ||w||, v = w, which gives w back exactly
    back = d.mapping.inverse().apply(converted)
    g = back["encoder.pos_conv_embed.conv.parametrizations.weight.original0"]
    v = back["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    torch.testing.assert_close(torch._weight_norm(v, g, 2), converted["encoder.pos_conv_embed.conv.weight"])
    again = wav2vec2()
    again.load_state_dict(back, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(_audio()).last_hidden_state, src(_audio()).last_hidden_state)


def test_encodec_legacy_weight_norm_into_plain_convs(tmp_path):
    from encodec.modules import SEANetDecoder, SEANetEncoder

    def build(norm: str) -> nn.Module:
        return nn.ModuleDict({"encoder": SEANetEncoder(dimension=8, n_filters=4, ratios=[2, 2], norm=norm),
                              "decoder": SEANetDecoder(dimension=8, n_filters=4, ratios=[2, 2], norm=norm)})

    src = randomise(build("weight_norm"))
    sd = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    assert any(k.endswith("weight_g") for k in sd)
    path = tmp_path / "encodec.safetensors"
    save_file(sd, str(path))
    dst = build("none")
    d = keydiff.diff(dst, str(path))
    assert d.ok, d.problem
    folded = [e for e in d.mapping.entries if e.op.kind == "weight_norm"]
    assert len(folded) == sum(k.endswith("weight_g") for k in sd)
    for e in folded:  # each from its own module's pair, g's kept dim read off its shape (0 for conv and transposed)
        assert e.source == (e.target + "_g", e.target + "_v") and e.op.dim == 0
    dst.load_state_dict(d.apply(), strict=True)
    x = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dst["decoder"](dst["encoder"](x)), src["decoder"](src["encoder"](x)))


def test_a_pair_whose_g_does_not_fit_v_is_not_applied(legacy, tmp_path):
    _, ckpt = legacy
    sd = load_file(ckpt)
    sd["encoder.pos_conv_embed.conv.weight_g"] = torch.randn(1, 1, 8)  # v is [32, 8, 16]: g must be [1, 1, 16]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    d = keydiff.diff(plain_wav2vec2(), str(bad))
    assert not d.ok
    assert not any(e.target == "encoder.pos_conv_embed.conv.weight" for e in d.proposals)
    unused = {u.key: u for u in d.mapping.unused}
    assert "not folded" in unused["encoder.pos_conv_embed.conv.weight_v"].reason
    assert not unused["encoder.pos_conv_embed.conv.weight_g"].explained


@pytest.mark.parametrize(("g", "v", "dim"), [((4, 1, 1), (4, 3, 2), 0), ((1, 1, 5), (4, 3, 5), 2),
                                             ((1, 3), (4, 3), 1), ((), (4, 3), -1), ((1, 1, 1), (1, 3, 2), 0)])
def test_weight_norm_dim_is_read_off_the_shapes(g, v, dim):
    assert weight_norm_dim(g, v) == dim


@pytest.mark.parametrize(("g", "v"), [((4, 1), (8, 3)), ((4, 3), (4, 3)), ((1, 1), (4, 3)), ((4, 1), (4, 3, 2))])
def test_weight_norm_dim_refuses_shapes_that_are_no_norm(g, v):
    assert weight_norm_dim(g, v) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_weight_norm_op_round_trips_applies_and_inverts(shape, data):
    dim = data.draw(st.integers(-1, len(shape) - 1))
    g_shape = () if dim == -1 else tuple(n if d == dim else 1 for d, n in enumerate(shape))
    gen = torch.Generator().manual_seed(len(shape) * 10 + dim)
    g, v = torch.rand(g_shape, generator=gen) + 0.5, torch.randn(tuple(shape), generator=gen)
    op = Op(kind="weight_norm", dim=dim)
    assert Op.from_json(op.to_json(), "op") == op and op.to_json() == {"kind": "weight_norm", "dim": dim}
    w = op.apply([g, v], shape)
    reduced = [d for d in range(len(shape)) if d != dim]
    norm = v.norm(2, dim=reduced, keepdim=True) if reduced else v.abs()  # the definition, written out
    torch.testing.assert_close(w, g * v / norm)
    entry = Entry(source=("m.weight_g", "m.weight_v"), target="m.weight", op=op, confidence=1.0,
                  evidence=Evidence(method="exact", shape="weight_norm"), source_shapes=(g_shape, tuple(shape)),
                  target_shape=tuple(shape))
    km = KeyMap.from_json(json.loads(KeyMap(entries=(entry,)).dumps()))
    assert km.entries == (entry,)
    out = km.apply({"m.weight_g": g, "m.weight_v": v})
    torch.testing.assert_close(out["m.weight"], w)
    back = km.inverse().apply(out)  # g = ||w||, v = w: another pair with the same weight
    torch.testing.assert_close(torch._weight_norm(back["m.weight_v"], back["m.weight_g"], dim), w)
    namespace: dict = {}
    from keydiff._render._python import emit_python

    exec(emit_python(km), namespace)
    torch.testing.assert_close(namespace["checkpoint_filter_fn"]({"m.weight_g": g, "m.weight_v": v})["m.weight"], w)


def test_a_weight_norm_entry_with_a_g_that_does_not_fit_is_a_malformed_mapping():
    entry = Entry(source=("g", "v"), target="w", op=Op(kind="weight_norm", dim=0), confidence=1.0,
                  evidence=Evidence(method="exact"), source_shapes=((3, 1), (4, 2)), target_shape=(4, 2))
    with pytest.raises(MappingFileError, match="cannot turn shapes"):
        KeyMap.from_json(json.loads(KeyMap(entries=(entry,)).dumps()))


def test_plain_weight_into_the_parametrization_is_split_exactly(tmp_path):
    src = randomise(plain_wav2vec2())
    path = tmp_path / "plain.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}, str(path))
    d = keydiff.diff(wav2vec2(), str(path))
    assert d.ok, d.problem
    by_target = {e.target: e for e in d.mapping.entries}
    g = by_target["encoder.pos_conv_embed.conv.parametrizations.weight.original0"]
    v = by_target["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    assert g.source == v.source == ("encoder.pos_conv_embed.conv.weight",)
    assert g.op == Op(kind="norm", dim=2) and v.op.kind == "rename" and "not unique" in g.evidence.note
    namespace: dict = {}
    exec(d.to_python(), namespace)
    for sd in (d.apply(), namespace["checkpoint_filter_fn"](load_file(str(path)))):
        dst = wav2vec2()
        dst.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(dst(_audio()).last_hidden_state, src(_audio()).last_hidden_state)
