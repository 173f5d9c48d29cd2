"""Checkpoints as the field stores them (issue 11): whisper's ``{dims, model_state_dict}``, fair-esm's ``{model,
args, cfg}``, SAM 2's ``{model}`` in a ``.pt``/``.th``, the Hub's old ``pytorch_model.bin`` (sharded too), and Meta's
model-parallel ``consolidated.NN.pth`` shards, merged. Every model is its library's own, with random weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from keydiff._errors import CheckpointError
from keydiff._parallel import plan_merge
from keydiff._sources import read_checkpoint
from keydiff.cli import main

from pairs import randomise

WHISPER = dict(n_mels=16, n_audio_ctx=8, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_vocab=60,
               n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)


def tiny_whisper() -> torch.nn.Module:
    from whisper.model import ModelDimensions, Whisper

    return Whisper(ModelDimensions(**WHISPER))


def tiny_esm() -> torch.nn.Module:
    import esm
    from esm.model.esm2 import ESM2

    return ESM2(num_layers=2, embed_dim=32, attention_heads=4, alphabet=esm.data.Alphabet.from_architecture("ESM-1b"))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in randomise(model).state_dict().items()}


def _same(ckpt, sd: dict[str, torch.Tensor]) -> None:
    assert list(ckpt.keys) == list(sd)
    for key, tensor in ckpt.tensors(list(sd)):
        assert torch.equal(tensor, sd[key]), key


# ----------------------------------------------------------------------------------------- training containers


def test_whisper_dims_and_model_state_dict(tmp_path, capsys):
    sd = _state(tiny_whisper())
    path = tmp_path / "tiny.pt"
    # openai-whisper's own layout (whisper.load_model reads checkpoint["dims"] and checkpoint["model_state_dict"])
    torch.save({"dims": dict(WHISPER), "model_state_dict": sd}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.container == "model_state_dict" and ckpt.other_entries == ("dims",)
    _same(ckpt, sd)
    assert main(["test_containers:tiny_whisper", str(path)]) == 0
    assert "weights taken from `model_state_dict`" in capsys.readouterr().out


def test_fair_esm_model_args_cfg(tmp_path, capsys):
    sd = _state(tiny_esm())
    path = tmp_path / "esm2_tiny.pt"
    # fair-esm's checkpoints: the weights under "model" beside the training args (a Namespace) and the cfg
    torch.save({"model": sd, "args": argparse.Namespace(layers=2, embed_dim=32),
                "cfg": {"model": {"encoder_layers": 2}}}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.container == "model" and set(ckpt.other_entries) == {"args", "cfg"}
    _same(ckpt, sd)
    assert main(["test_containers:tiny_esm", str(path), "-q"]) == 0


@pytest.mark.parametrize("name", ["sam2_tiny.pt", "weights.th"])
def test_sam2_style_model_container_and_th_files(tmp_path, name):
    sd = _state(tiny_esm())
    torch.save({"model": sd}, tmp_path / name)
    ckpt = read_checkpoint(tmp_path / name)
    assert ckpt.container == "model"
    _same(ckpt, sd)
    assert read_checkpoint(tmp_path).container == "model"  # the folder's one torch file, .th included


def test_the_one_tensor_dict_is_taken_whatever_its_name(tmp_path):
    """No list of names decides: the only dict of tensors among plain siblings is the one, and it is reported."""
    sd = _state(tiny_esm())
    torch.save({"meta": {"step": 3, "note": "x"}, "weights_of_the_net": sd, "lr": 0.1}, tmp_path / "x.pt")
    ckpt = read_checkpoint(tmp_path / "x.pt")
    assert ckpt.container == "weights_of_the_net" and ckpt.alternatives == ()
    assert set(ckpt.other_entries) == {"meta", "lr"}


def _hf_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    return randomise(BertModel(cfg))


@pytest.mark.parametrize("sharded", [False, True])
def test_old_hub_pytorch_model_bin(tmp_path, sharded):
    model = _hf_bert()
    model.config.save_pretrained(tmp_path)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if sharded:
        keys = list(sd)
        names = {k: f"pytorch_model-0000{1 + (i >= len(keys) // 2)}-of-00002.bin" for i, k in enumerate(keys)}
        for shard in sorted(set(names.values())):
            torch.save({k: sd[k] for k in keys if names[k] == shard}, tmp_path / shard)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": names}))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.fmt == ("torch-sharded" if sharded else "torch-zip")
    _same(ckpt, sd)
    assert main(["transformers:BertModel", str(tmp_path), "-q"]) == 0  # sized by the folder's config.json


# ------------------------------------------------------------------------------------- model-parallel shards

# a Llama in Meta's layout, sized so that every split is decidable from the sizes: width 32, 2 key/value heads of 8,
# MLP 80, vocabulary 100
META = dict(vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16)


def meta_llama_state() -> dict[str, torch.Tensor]:
    """A transformers Llama's random weights under Meta's original names (the test fixture's rename table)."""
    import re

    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_models import META_NAMES

    sd = _state(LlamaForCausalLM(LlamaConfig(**META)))
    out = {}
    for key, value in sd.items():
        for pattern, replace in META_NAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, replace, key, count=1)] = value
                break
    out["rope.freqs"] = torch.rand(4)
    return out


def _meta_split_dim(key: str) -> int | None:
    """How Meta's model-parallel code lays out each tensor (transformers' convert_llama_weights_to_hf.py merges
    them back the same way): column-parallel layers cut their outputs (dim 0), row-parallel ones their inputs
    (dim 1), the embedding its width (Llama 1/2); norms and rope frequencies are replicated. Test knowledge only."""
    leaf = key.split(".")[-2]
    if leaf in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0
    if leaf in ("wo", "w2", "tok_embeddings"):
        return 1
    return None


def write_consolidated(sd: dict[str, torch.Tensor], folder: Path, ranks: int, params: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(ranks):
        part = {k: v if _meta_split_dim(k) is None else v.chunk(ranks, _meta_split_dim(k))[r].clone()
                for k, v in sd.items()}
        torch.save(part, folder / f"consolidated.{r:02d}.pth")
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("ranks", [2, 4])
def test_consolidated_shards_merge_to_the_whole_model(tmp_path, ranks):
    sd = meta_llama_state()
    write_consolidated(sd, tmp_path / "llama", ranks, {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1})
    for spec in (tmp_path / "llama", tmp_path / "llama" / "consolidated.00.pth"):
        ckpt = read_checkpoint(spec)
        assert ckpt.fmt == f"torch-consolidated ({ranks} model-parallel shards merged)"
        assert {k: i.shape for k, i in ckpt.keys.items()} == {k: tuple(v.shape) for k, v in sd.items()}
        _same(ckpt, sd)


def test_consolidated_shards_diff_and_convert_like_the_whole_file(tmp_path, capsys):
    sd = meta_llama_state()
    save_file(sd, str(tmp_path / "whole.safetensors"))
    write_consolidated(sd, tmp_path / "llama", 2)
    assert main([str(tmp_path / "whole.safetensors"), str(tmp_path / "llama"), "--values", "--all"]) == 0
    out = capsys.readouterr().out
    assert "torch-consolidated (2 model-parallel shards merged)" in out and "bit-identical" in out


def test_vocabulary_parallel_embedding_is_told_by_the_output_layer(tmp_path):
    """The embedding cut along its rows (Llama 3) or its columns (Llama 1/2) is told apart by sizes alone."""
    sd = meta_llama_state()
    names = ["consolidated.00.pth", "consolidated.01.pth"]
    for dim in (0, 1):
        shapes = [{k: tuple(v.chunk(2, dim if k == "tok_embeddings.weight" else (_meta_split_dim(k) or 0))[0].shape)
                   if _meta_split_dim(k) is not None else tuple(v.shape) for k, v in sd.items()}] * 2
        plan = plan_merge(names, shapes, identical=lambda k: _meta_split_dim(k) is None, where="x")
        assert plan["tok_embeddings.weight"] == dim
        assert {k: plan[k] for k in sd if k != "tok_embeddings.weight"} == {
            k: _meta_split_dim(k) for k in sd if k != "tok_embeddings.weight"}


def test_undecidable_split_is_an_error_not_a_guess():
    # a square slice whose both readings are full sizes of the model: [32, 32] could be [64, 32] or [32, 64]
    shapes = [{"norm1": (32,), "norm2": (32,), "w": (16, 32), "sq": (32, 32)}] * 2
    with pytest.raises(CheckpointError, match=r"cannot tell along which dim .* 'sq' \(each \[32, 32\]\) were split: "
                                              r"either dim fits the model's full sizes \(32, 64\)"):
        plan_merge(["s0", "s1"], shapes, identical=lambda k: k.startswith("norm"), sizes=[64], where="x")
    decidable = [{k: v for k, v in shapes[0].items() if k != "sq"}] * 2
    assert plan_merge(["s0", "s1"], decidable, identical=lambda k: k.startswith("norm"), where="x")["w"] == 0


def _break(folder: Path, how: str) -> None:
    if how == "missing shard":
        (folder / "consolidated.01.pth").unlink()
    elif how == "corrupt shard":
        data = (folder / "consolidated.02.pth").read_bytes()
        (folder / "consolidated.02.pth").write_bytes(data[: len(data) // 3])
    elif how == "mismatched shapes":
        part = torch.load(folder / "consolidated.01.pth", weights_only=True)
        part["layers.0.attention.wq.weight"] = part["layers.0.attention.wq.weight"][:4]
        torch.save(part, folder / "consolidated.01.pth")
    elif how == "missing tensor":
        part = torch.load(folder / "consolidated.02.pth", weights_only=True)
        del part["layers.1.feed_forward.w2.weight"]
        torch.save(part, folder / "consolidated.02.pth")


@pytest.mark.parametrize(("how", "message"), [
    ("missing shard", "model-parallel shard consolidated.01.pth is missing (found 3 of 4)"),
    ("corrupt shard", "consolidated.02.pth: not a readable PyTorch or safetensors file"),
    ("mismatched shapes", "disagree on the shape of 'layers.0.attention.wq.weight': [8, 32] in consolidated.00.pth, "
                          "[4, 32] in consolidated.01.pth"),
    ("missing tensor", "'layers.1.feed_forward.w2.weight' is in consolidated.00.pth but not in consolidated.02.pth"),
])
def test_broken_shards_are_one_line_errors(tmp_path, capsys, how, message):
    sd = meta_llama_state()
    save_file(sd, str(tmp_path / "whole.safetensors"))
    write_consolidated(sd, tmp_path / "llama", 4)
    _break(tmp_path / "llama", how)
    for spec in (tmp_path / "llama", tmp_path / "llama" / "consolidated.00.pth"):
        assert main([str(tmp_path / "whole.safetensors"), str(spec)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
