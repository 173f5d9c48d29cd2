"""Layout conventions (issue 11, classes 3, 4 and 6): rotary row order, [in, out] weights under exact names, and
1x1 convolutions as linear layers; checked entry by entry against references and by the models' outputs."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import keydiff
from keydiff._errors import MappingFileError
from keydiff._keys import KeySet, Layout, TensorInfo
from keydiff._layouts import checkpoint_rotary, read_layout
from keydiff._mapping import Entry, Evidence, KeyMap
from keydiff._ops import Op, rotary_rows
from keydiff._render._python import emit_python
from keydiff.cli import main

from llm_models import hf_gpt2_lm, nano_gpt
from meta_llama import HF_ARGS, hf_llama, meta_llama, save_meta
from pairs import randomise

TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference, row by row: within each head, the even rows, then the odd ones."""
    d = w.shape[0] // heads
    order = [h * d + r for h in range(heads) for r in [*range(0, d, 2), *range(1, d, 2)]]
    return w[order]


# --- the op -------------------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 4), cols=st.integers(0, 3), to=st.sampled_from(["half",
                                                                                                    "interleaved"]))
def test_rotary_directions_invert_each_other_and_the_json_round_trips(heads, half, cols, to):
    rows = heads * 2 * half
    w = torch.randn((rows, cols) if cols else (rows,))
    op = Op(kind="rotary", heads=heads, to=to)
    out = op.apply([w], w.shape)
    assert torch.equal(op.inverse().apply([out], w.shape), w)
    assert Op.from_json(json.loads(json.dumps(op.to_json())), "op") == op
    if to == "half":
        assert torch.equal(out, interleaved_to_half(w, heads))


def test_rotary_entries_apply_invert_and_emit_the_same_tensors():
    w = torch.randn(16, 8)
    e = Entry(source=("wq",), target="q.weight", op=Op(kind="rotary", heads=2, to="half"), confidence=1.0,
              evidence=Evidence(method="cluster", shape="rotary"), source_shapes=((16, 8),), target_shape=(16, 8))
    km = KeyMap(entries=(e,))
    want = interleaved_to_half(w, 2)
    assert torch.equal(km.apply({"wq": w})["q.weight"], want)
    assert torch.equal(km.inverse().apply({"q.weight": want})["wq"], w)
    assert torch.equal(KeyMap.from_json(json.loads(json.dumps(km.to_json()))).apply({"wq": w})["q.weight"], want)
    ns: dict = {}
    exec(emit_python(km), ns)
    assert torch.equal(ns["checkpoint_filter_fn"]({"wq": w})["q.weight"], want)


def test_bad_rotary_ops_are_refused_at_their_location():
    doc = KeyMap(entries=()).to_json()
    doc["entries"] = [{"source": ["a"], "target": "b", "op": {"kind": "rotary", "heads": 3, "to": "half"},
                       "source_shapes": [[16, 4]], "target_shape": [16, 4]}]
    with pytest.raises(MappingFileError, match=r"entries\.0: op rotary cannot turn"):
        KeyMap.from_json(doc)
    doc["entries"][0]["op"] = {"kind": "rotary", "to": "sideways"}
    with pytest.raises(MappingFileError, match=r"entries\.0\.op: a rotary op needs heads"):
        KeyMap.from_json(doc)
    with pytest.raises(ValueError, match="cannot reorder 6 rows"):
        rotary_rows(torch.zeros(6), 2, "half")


# --- reading the model --------------------------------------------------------------------------------------------

def test_the_layout_is_read_from_the_forward_pass_on_the_meta_device():
    with torch.device("meta"):
        hf, meta, gpt2, nano = hf_llama(), meta_llama(), hf_gpt2_lm(), nano_gpt()
    assert dict((k, (lay, d)) for k, lay, d in read_layout(hf).rotary) == {
        f"model.layers.{i}.self_attn.{p}_proj.weight": ("half", 8) for i in (0, 1) for p in "qk"}
    assert dict((k, (lay, d)) for k, lay, d in read_layout(meta).rotary) == {
        f"layers.{i}.attention.w{p}.weight": ("interleaved", 8) for i in (0, 1) for p in "qk"}
    conv1d = read_layout(gpt2)
    assert conv1d.weight("transformer.h.0.attn.c_proj.weight") == "in_out"  # addmm(b, x, w): [in, out]
    assert conv1d.weight("lm_head.weight") == "out_in"
    linear = read_layout(nano)
    assert linear.weight("transformer.h.0.attn.c_proj.weight") == "out_in" and not linear.rotary


class Views(torch.nn.Module):
    """2-D weights used through views: ``x @ w.T`` and ``x @ w.data.t()`` are [out, in], ``F.linear(x, w.t())``
    and ``x @ w.to(x)`` [in, out]."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.a_weight = torch.nn.Parameter(torch.zeros(4, 8))
        self.b_weight = torch.nn.Parameter(torch.zeros(8, 4))
        self.c_weight = torch.nn.Parameter(torch.zeros(8, 4))
        self.d_weight = torch.nn.Parameter(torch.zeros(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x) @ self.a_weight.T
        x = x @ self.b_weight.data.t()
        x = torch.torch.nn.functional.linear(x, self.c_weight.t())
        return x @ self.d_weight.to(x)


def test_a_weight_is_followed_through_views_of_it_and_a_rotated_bias_with_its_weight():
    with torch.device("meta"):
        views = Views()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2))
    assert dict(read_layout(views).weights) == {"inp.weight": "out_in", "a_weight": "out_in", "b_weight": "out_in",
                                                "c_weight": "in_out", "d_weight": "in_out"}
    rotary = {k: (lay, d) for k, lay, d in read_layout(qwen).rotary}
    assert rotary == {f"model.layers.0.self_attn.{p}_proj.{leaf}": ("half", 8) for p in "qk"
                      for leaf in ("weight", "bias")}


def test_the_layout_is_cached_with_the_keys(tmp_path, monkeypatch):
    from keydiff._cache import load_model_keys, store_model_keys

    monkeypatch.setenv("KEYDIFF_CACHE_DIR", str(tmp_path))
    lay = Layout(weights=(("a.weight", "in_out"),), rotary=(("q.weight", "half", 8),), ran=True, reason="traced")
    keys = KeySet.from_items([("a.weight", TensorInfo((2, 3), "float32")), ("q.weight", TensorInfo((16, 4),
                                                                                                  "float32"))])
    from dataclasses import replace

    store_model_keys("demo_model", {}, replace(keys, layout=lay))
    assert load_model_keys("demo_model", {}).layout == lay


def test_only_a_naming_convention_known_to_fix_the_pairing_counts_as_evidence():
    meta = [f"layers.0.{m}.weight" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                             "attention_norm", "ffn_norm")]
    assert checkpoint_rotary(meta)[0] == "interleaved"
    assert checkpoint_rotary(meta[:4]) == ("", "")  # a part of the vocabulary is not the convention
    with torch.device("meta"):
        hf = hf_llama()
    assert checkpoint_rotary(hf.state_dict()) == ("", "")  # transformers' names: both pairings exist under them


# --- rotary: Meta's layout <-> transformers ----------------------------------------------------------------------

def _meta_checkpoint(tmp_path):
    src = randomise(meta_llama())
    return src, save_meta(src, tmp_path / "meta")


def test_meta_llama_converts_into_transformers_with_each_heads_rows_reordered(tmp_path, capsys):
    src, path = _meta_checkpoint(tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["transformers:LlamaForCausalLM", str(path), *HF_ARGS, "-o", str(out)]) == 0, capsys.readouterr()
    sd, conv = src.state_dict(), load_file(str(out))
    for i in (0, 1):
        a, m = f"model.layers.{i}.self_attn", f"layers.{i}.attention"
        assert torch.equal(conv[f"{a}.q_proj.weight"], interleaved_to_half(sd[f"{m}.wq.weight"], 4))
        assert torch.equal(conv[f"{a}.k_proj.weight"], interleaved_to_half(sd[f"{m}.wk.weight"], 2))  # GQA
        assert torch.equal(conv[f"{a}.v_proj.weight"], sd[f"{m}.wv.weight"])
        assert torch.equal(conv[f"{a}.o_proj.weight"], sd[f"{m}.wo.weight"])
        assert torch.equal(conv[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"layers.{i}.feed_forward.w1.weight"])
    dst = hf_llama()
    dst.load_state_dict(conv, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(dst(input_ids=TOKENS).logits, src(TOKENS), atol=1e-4, rtol=1e-4)


def test_the_rotary_op_and_its_evidence_are_in_the_report_and_the_generated_code(tmp_path):
    src, path = _meta_checkpoint(tmp_path)
    d = keydiff.diff("transformers:LlamaForCausalLM", str(path), **{a.split("=")[0]: eval(a.split("=")[1])
                                                                   for a in HF_ARGS[1::2]})
    e = next(e for e in d.mapping.entries if e.target == "model.layers.0.self_attn.k_proj.weight")
    assert e.op == Op(kind="rotary", heads=2, to="half")
    assert "interleaved" in e.evidence.note and "forward pass" in e.evidence.note
    ns: dict = {}
    exec(d.to_python(), ns)
    sd = {k: v.detach() for k, v in src.state_dict().items()}
    converted = ns["checkpoint_filter_fn"](dict(sd))
    for k, v in d.apply().items():
        assert torch.equal(converted[k], v), k


def test_transformers_llama_into_metas_layout_is_unproven_without_evidence(tmp_path, capsys):
    """transformers' names do not fix the pairing (some of its models interleave): the q/k rows of a file named so
    stay unproven, not silently renamed (exit 1), with the way to decide."""
    src = randomise(hf_llama())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert main(["meta_llama:meta_llama", str(path)]) == 1
    out = capsys.readouterr().out
    assert "unproven rotary layout" in out and "--source" in out
    d = keydiff.diff("meta_llama:meta_llama", str(path))
    assert {m.key for m in d.mapping.missing} == {f"layers.{i}.attention.w{p}.weight" for i in (0, 1) for p in "qk"}


def test_a_rotary_checkpoint_without_layout_evidence_never_exits_0(tmp_path, capsys):
    """Interleaved q/k rows under names no convention fixes, into a half-rotation model: a mapping by names alone
    would load and compute something else; it must end unresolved."""
    src = randomise(meta_llama())
    sd = src.state_dict()
    names = {"tok_embeddings": "embed", "attention.wq": "attn.query", "attention.wk": "attn.key",
             "attention.wv": "attn.value", "attention.wo": "attn.out", "feed_forward.w1": "mlp.gate",
             "feed_forward.w3": "mlp.up", "feed_forward.w2": "mlp.down", "attention_norm": "norm1",
             "ffn_norm": "norm2", "layers": "blocks", "output": "head"}
    renamed = {}
    for k, v in sd.items():
        for a, b in names.items():
            k = k.replace(a, b)
        renamed[k] = v.contiguous()
    path = tmp_path / "other.safetensors"
    save_file(renamed, str(path))
    assert main(["transformers:LlamaForCausalLM", str(path), *HF_ARGS, "-q"]) == 1
    d = keydiff.diff("transformers:LlamaForCausalLM", str(path), **{a.split("=")[0]: eval(a.split("=")[1])
                                                                   for a in HF_ARGS[1::2]})
    assert {m.key for m in d.mapping.missing} == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1)
                                                  for p in "qk"}


# --- [in, out] weights under exact names --------------------------------------------------------------------------

def test_gpt2_conv1d_into_nanogpt_transposes_the_square_exact_name_matches(tmp_path, capsys):
    src = randomise(hf_gpt2_lm())
    path = tmp_path / "pytorch_model.bin"
    torch.save(src.state_dict(), path)
    out = tmp_path / "out.safetensors"
    assert main(["llm_models:nano_gpt", str(path), "-o", str(out)]) == 0, capsys.readouterr().out
    sd, conv = src.state_dict(), load_file(str(out))
    for k, v in sd.items():
        want = v.t() if k.startswith("transformer.h.") and k.endswith("weight") and v.dim() == 2 else v
        assert torch.equal(conv[k], want), k
    dst = nano_gpt()
    dst.load_state_dict(conv, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(dst(TOKENS[:, :8]), src(input_ids=TOKENS[:, :8]).logits, atol=1e-4, rtol=1e-4)
    d = keydiff.diff("llm_models:nano_gpt", str(path))
    e = next(e for e in d.mapping.entries if e.target == "transformer.h.1.attn.c_proj.weight")
    assert e.op.kind == "transpose" and e.evidence.method == "exact" and "[in, out]" in e.evidence.note


def test_nanogpt_into_gpt2_conv1d_transposes_the_square_exact_name_matches(tmp_path, capsys):
    src = randomise(nano_gpt())
    path = tmp_path / "ckpt.pt"
    torch.save(src.state_dict(), path)
    out = tmp_path / "out.safetensors"
    assert main(["llm_models:hf_gpt2_lm", str(path), "-o", str(out)]) == 0, capsys.readouterr().out
    sd, conv = src.state_dict(), load_file(str(out))
    for k, v in sd.items():
        want = v.t() if k.startswith("transformer.h.") and k.endswith("weight") and v.dim() == 2 else v
        assert torch.equal(conv[k], want), k
    dst = hf_gpt2_lm()
    dst.load_state_dict(conv, strict=False)  # transformers ties lm_head to wte itself
    dst.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(dst(input_ids=TOKENS[:, :8]).logits, src(TOKENS[:, :8]), atol=1e-4, rtol=1e-4)


def test_a_family_with_disagreeing_non_square_weights_leaves_its_square_ones_ambiguous():
    """Half of a block's non-square weights stored [in, out], half [out, in]: the square one's layout is not known,
    so it is not applied (exit 1), even under its exact name."""
    info = {"blk.0.a.weight": (8, 4), "blk.0.a.bias": (8,), "blk.0.b.weight": (4, 8), "blk.0.b.bias": (4,),
            "blk.0.sq.weight": (4, 4), "blk.0.sq.bias": (4,)}
    model = KeySet.from_items([(k, TensorInfo(s, "float32")) for k, s in info.items()])
    model = model.__class__(model.items_, layout=Layout(weights=tuple((k, "out_in") for k in info
                                                                      if k.endswith("weight")), ran=True))
    ckpt = {"blk.0.a.weight": torch.zeros(4, 8), "blk.0.a.bias": torch.zeros(8), "blk.0.b.weight": torch.zeros(4, 8),
            "blk.0.b.bias": torch.zeros(4), "blk.0.sq.weight": torch.zeros(4, 4), "blk.0.sq.bias": torch.zeros(4)}
    d = keydiff.diff(model, ckpt)
    assert not d.ok
    (m,) = d.mapping.missing
    assert m.key == "blk.0.sq.weight" and "ambiguous" in m.reason


# --- 1x1 convolutions <-> linear layers ---------------------------------------------------------------------------

class LDMAttnBlock(torch.nn.Module):
    """The attention block of the original latent-diffusion autoencoder (``ldm/modules/diffusionmodules/model.py``):
    q, k, v and the output as 1x1 convolutions ``[C, C, 1, 1]``; ``order`` registers q/k/v in another order."""

    def __init__(self, channels: int = 16, order: tuple[str, ...] = ("q", "k", "v")) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.norm = torch.nn.GroupNorm(num_groups=4, num_channels=channels, eps=1e-6, affine=True)
        for name in order:
            setattr(self, name, conv(channels, channels, kernel_size=1, stride=1, padding=0))
        self.proj_out = conv(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        w_ = torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
        w_ = torch.nn.functional.softmax(w_, dim=2)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


def diffusers_attention() -> torch.nn.Module:
    """diffusers' Attention as its autoencoders build it: to_q/to_k/to_v/to_out.0 linear layers ``[C, C]``."""
    from diffusers.models.attention_processor import Attention

    return Attention(16, heads=1, dim_head=16, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=4,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()


@pytest.mark.parametrize("order", [("q", "k", "v"), ("v", "q", "k")])
def test_1x1_convs_reshape_into_linear_layers_by_name_whatever_their_order(tmp_path, order):
    src = randomise(LDMAttnBlock(order=order))
    path = tmp_path / "ldm.pth"
    torch.save(src.state_dict(), path)  # file order is the registration order
    d = keydiff.diff(diffusers_attention(), str(path))
    assert d.ok
    by_target = {e.target: e for e in d.mapping.entries}
    for t, s in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        assert by_target[f"{t}.weight"].source == (f"{s}.weight",) and by_target[f"{t}.weight"].op.kind == "reshape"
    dst = diffusers_attention()
    dst.load_state_dict(d.apply(), strict=True)
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=1e-5)


def test_linear_layers_reshape_into_1x1_convs(tmp_path):
    src = randomise(diffusers_attention())
    path = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    d = keydiff.diff(LDMAttnBlock(), str(path))
    assert d.ok
    conv = d.apply()
    for t, s in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        assert torch.equal(conv[f"{t}.weight"], src.state_dict()[f"{s}.weight"].reshape(16, 16, 1, 1))
    dst = LDMAttnBlock().eval()
    dst.load_state_dict(conv, strict=True)
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=1e-5, rtol=1e-5)


class _Anonymous(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, 16)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(16, 16, 1) for _ in range(3))
        self.proj_out = torch.nn.Conv2d(16, 16, 1)


def test_parallel_1x1_convs_named_by_position_only_stay_unproven(tmp_path):
    """``convs.0/1/2`` into q/k/v: same shapes, all fed by the norm; only the order of the code would pair them."""
    path = tmp_path / "anon.pth"
    torch.save(randomise(_Anonymous()).state_dict(), path)
    d = keydiff.diff(LDMAttnBlock(), str(path))
    assert not d.ok
    assert {m.key for m in d.mapping.missing} == {f"{p}.{leaf}" for p in "qkv" for leaf in ("weight", "bias")}
    assert all("parallel to" in m.reason for m in d.mapping.missing)


# --- verification tries the layouts' alternatives -----------------------------------------------------------------

SOURCE_ARGS = [a.replace("-m", "-s") for a in HF_ARGS]


def test_source_decides_the_rotary_pairing_and_the_report_lists_the_change(tmp_path, capsys):
    """transformers' Llama into Meta's layout: unproven by names (see above); running both models on token ids
    tries the rotary alternatives at the attention's output and keeps the one that reproduces it."""
    src = randomise(hf_llama())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    out = tmp_path / "out.safetensors"
    code = main(["meta_llama:meta_llama", str(path), "--source", "transformers:LlamaForCausalLM", *SOURCE_ARGS,
                 "-o", str(out)])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "rotary rows to interleaved" in report and "verified" in report
    sd, conv = src.state_dict(), load_file(str(out))
    for i in (0, 1):
        a, m = f"model.layers.{i}.self_attn", f"layers.{i}.attention"
        # the reference's inverse: half -> interleaved puts the rows back where interleaved_to_half took them
        assert torch.equal(interleaved_to_half(conv[f"{m}.wq.weight"], 4), sd[f"{a}.q_proj.weight"])
        assert torch.equal(interleaved_to_half(conv[f"{m}.wk.weight"], 2), sd[f"{a}.k_proj.weight"])
        assert torch.equal(conv[f"{m}.wv.weight"], sd[f"{a}.v_proj.weight"])
    dst = meta_llama()
    dst.load_state_dict(conv, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(dst(TOKENS), src(input_ids=TOKENS).logits, atol=1e-4, rtol=1e-4)


def test_source_proves_metas_layout_converted_by_names_and_keeps_the_rotary_op(tmp_path, capsys):
    _, path = _meta_checkpoint(tmp_path)
    code = main(["transformers:LlamaForCausalLM", str(path), *HF_ARGS, "--source", "meta_llama:meta_llama"])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "proven" in report and "rotary rows to half" in report


def test_verify_runs_language_models_on_token_ids(tmp_path, capsys):
    _, path = _meta_checkpoint(tmp_path)
    assert main(["verify", "meta_llama:meta_llama", str(path), "transformers:LlamaForCausalLM", *HF_ARGS]) == 0, \
        capsys.readouterr().out
