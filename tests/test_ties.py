"""Tied weights (issue 11, class 1): a model key the checkpoint lacks because the model ties it to another is filled
from its twin's source, said so, and never counted missing; the shared source survives JSON, the writer, the emitted
Python and ``apply()``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import keydiff
from keydiff._cache import load_model_keys, store_model_keys
from keydiff._keys import KeySet, TensorInfo
from keydiff._mapping import KeyMap
from keydiff._ties import model_ties
from keydiff.cli import main

from llm_models import HEADS, LAYERS, POSITIONS, VOCAB, D, LinearGPT
from pairs import randomise


class TiedLinearGPT(LinearGPT):
    """``llm_models.LinearGPT`` with an output head tied to its token embedding (nanoGPT's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(ids))


def tied_linear_gpt() -> nn.Module:
    return TiedLinearGPT()


def _gpt2_lm() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """A randomised GPT-2 with its LM head tied, saved by ``save_pretrained`` (which drops the tied head)."""
    folder = tmp_path_factory.mktemp("gpt2")
    src = randomise(_gpt2_lm())
    src.save_pretrained(folder)
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    return folder, src


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _converted_all_ways(d: keydiff.Diff, ckpt: str, tmp_path) -> list[dict[str, torch.Tensor]]:
    """The converted state dict by ``apply()``, by the JSON mapping applied again, by the emitted Python, and as
    written by the writer (safetensors and torch)."""
    out = [d.apply()]
    path = tmp_path / "map.json"
    path.write_text(d.mapping.dumps(), encoding="utf-8")
    out.append(keydiff.load_mapping(path).apply(load_file(ckpt)))
    namespace: dict = {}
    exec(d.to_python(), namespace)
    out.append(namespace["checkpoint_filter_fn"](load_file(ckpt)))
    for suffix in (".safetensors", ".pt"):
        written = tmp_path / f"converted{suffix}"
        from keydiff._convert import write_converted

        write_converted(d.mapping, d.source, d.checkpoint, written)
        out.append(load_file(str(written)) if suffix == ".safetensors" else torch.load(written, weights_only=True))
    return out


def test_model_ties_of_a_transformers_model_on_the_meta_device():
    with torch.device("meta"):
        m = _gpt2_lm()
    assert model_ties(m, list(m.state_dict())) == (("transformer.wte.weight", "lm_head.weight"),)


def test_declared_ties_count_when_the_parameters_are_not_shared():
    m = _gpt2_lm()
    m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())  # the tie no longer shows as one object
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert model_ties(m, list(m.state_dict())) == (("transformer.wte.weight", "lm_head.weight"),)


def test_an_untied_model_has_no_ties():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=1, n_head=HEADS,
                                       tie_word_embeddings=False))
    assert model_ties(m, list(m.state_dict())) == ()


def test_ties_are_cached():
    keys = KeySet.from_items([("a.w", TensorInfo((4, 2), "float32")), ("b.w", TensorInfo((4, 2), "float32"))],
                             origin="tied_model", ties=(("a.w", "b.w"),))
    assert store_model_keys("tied_model", {}, keys) is not None
    assert load_model_keys("tied_model", {}).ties == (("a.w", "b.w"),)


def test_save_pretrained_into_the_same_model_fills_the_tied_head(saved_gpt2, tmp_path, capsys):
    folder, src = saved_gpt2
    ckpt = str(folder / "model.safetensors")
    d = keydiff.diff(str(folder), ckpt)
    assert d.ok and not d.mapping.missing and not d.mapping.unused
    (head,) = [e for e in d.mapping.entries if e.target == "lm_head.weight"]
    assert head.source == ("transformer.wte.weight",) and head.op.kind == "rename"
    assert head.evidence.method == "tied" and head.evidence.note == "tied to transformer.wte.weight in the model"
    assert "lm\\_head.weight = transformer.wte.weight" in d.to_markdown()  # markdown escapes underscores
    for sd in _converted_all_ways(d, ckpt, tmp_path):
        dst = _gpt2_lm()
        dst.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(dst(_ids()).logits, src(_ids()).logits)
    assert main([str(folder), ckpt, "-q"]) == 0


def test_save_pretrained_into_a_renamed_model_with_a_tied_head(saved_gpt2, tmp_path, capsys):
    folder, src = saved_gpt2
    ckpt = str(folder / "model.safetensors")
    d = keydiff.diff(tied_linear_gpt(), ckpt)
    assert d.ok, d.problem
    by_target = {e.target: e for e in d.mapping.entries}
    assert by_target["wte.weight"].source == by_target["head.weight"].source == ("transformer.wte.weight",)
    assert by_target["head.weight"].evidence.method == "tied"
    for sd in _converted_all_ways(d, ckpt, tmp_path):
        dst = TiedLinearGPT().eval()
        dst.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(dst(_ids()), src(_ids()).logits, atol=1e-4, rtol=1e-4)
    out = tmp_path / "cli.safetensors"
    assert main(["test_ties:tied_linear_gpt", ckpt, "-o", str(out)]) == 0, capsys.readouterr().out


def test_inverse_of_a_tie_restores_the_one_tensor(saved_gpt2):
    folder, _ = saved_gpt2
    d = keydiff.diff(str(folder), str(folder / "model.safetensors"))
    back = d.mapping.inverse()
    assert [e.target for e in back.entries].count("transformer.wte.weight") == 1
    again = KeyMap.from_json(json.loads(d.mapping.dumps()))
    assert [e.source for e in again.entries if e.target == "lm_head.weight"] == [("transformer.wte.weight",)]


def test_a_twin_whose_anchor_has_no_source_stays_missing_and_says_why(saved_gpt2, tmp_path):
    folder, _ = saved_gpt2
    sd = load_file(str(folder / "model.safetensors"))
    del sd["transformer.wte.weight"]
    path = tmp_path / "no_embedding.safetensors"
    save_file(sd, str(path))
    d = keydiff.diff(str(folder), str(path))
    assert not d.ok
    missing = {m.key: m.reason for m in d.mapping.missing}
    assert set(missing) == {"transformer.wte.weight", "lm_head.weight"}
    assert missing["lm_head.weight"].startswith("tied to transformer.wte.weight in the model, which is unresolved")
    assert not any(e.target in missing for e in d.proposals)


def _esm2() -> nn.Module:
    import esm

    return esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet="ESM-1b", token_dropout=False)


def shared_rotary_esm2() -> nn.Module:
    """fair-esm's ESM-2 with one rotary module for every layer, kept once in the state dict (``rot_emb.inv_freq``);
    ESM-2 keeps a copy in each attention layer."""
    m = _esm2()
    shared = m.layers[0].self_attn.rot_emb
    for layer in m.layers:
        del layer.self_attn._modules["rot_emb"]
        object.__setattr__(layer.self_attn, "rot_emb", shared)  # used, not registered: one key, at the top
    m.rot_emb = shared
    return m


def _esm_checkpoint(tmp_path, *, equal: bool) -> tuple[nn.Module, str]:
    src = randomise(_esm2())
    if equal:  # random, and the same in every layer, as a rotary table is
        with torch.no_grad():
            for layer in src.layers[1:]:
                layer.self_attn.rot_emb.inv_freq.copy_(src.layers[0].self_attn.rot_emb.inv_freq)
    path = tmp_path / "esm2.pt"
    torch.save({k: v.contiguous() for k, v in src.state_dict().items()}, path)  # as fair-esm saves: torch.save
    return src, str(path)


def test_equal_per_layer_copies_are_one_source(tmp_path):
    src, ckpt = _esm_checkpoint(tmp_path, equal=True)
    dst = shared_rotary_esm2()
    d = keydiff.diff(dst, ckpt)
    assert d.ok, d.problem
    (e,) = [e for e in d.mapping.entries if e.target == "rot_emb.inv_freq"]
    assert e.source == ("layers.0.self_attn.rot_emb.inv_freq",) and "read and equal" in e.evidence.note
    (copy,) = [u for u in d.mapping.unused if "inv_freq" in u.key]
    assert copy.key == "layers.1.self_attn.rot_emb.inv_freq" and copy.kind == "copy" and copy.explained
    dst.load_state_dict(d.apply(), strict=True)
    toks = torch.randint(4, 24, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dst(toks)["logits"], src(toks)["logits"])


def test_per_layer_copies_that_differ_fill_nothing(tmp_path):
    _, ckpt = _esm_checkpoint(tmp_path, equal=False)
    d = keydiff.diff(shared_rotary_esm2(), ckpt)
    assert not d.ok
    (m,) = d.mapping.missing
    assert m.key == "rot_emb.inv_freq" and "whose values differ" in m.reason
    assert not any(e.target == "rot_emb.inv_freq" for e in d.proposals)
