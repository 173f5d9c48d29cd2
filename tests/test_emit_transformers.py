"""``--emit transformers``: a ``key_mapping`` that ``from_pretrained(folder, key_mapping=...)`` loads a real
transformers model with, from a checkpoint that ``save_pretrained`` wrote and that was then renamed; an honest
refusal, naming the entries, when the mapping needs tensor ops."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from keydiff._mapping import Entry, Evidence, KeyMap, Unwrap
from keydiff._ops import Op
from keydiff._render._transformers import _single_group, key_mapping
from keydiff.cli import main

from pairs import randomise

RUFF = shutil.which("ruff")

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16)
# a research codebase's names for BERT's tensors (the test's renaming, not keydiff's)
FOREIGN = [
    (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"blocks.\1.attn."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"blocks.\1.norm2."),
    (r"^embeddings\.word_embeddings\.", "tok_embed."),
    (r"^embeddings\.LayerNorm\.", "embed_norm."),
    (r"^pooler\.dense\.", "pool."),
]


def _foreign(key: str, prefix: str = "", rename: bool = True) -> str:
    for pattern, replace in FOREIGN if rename else ():
        if re.match(pattern, key):
            return prefix + re.sub(pattern, replace, key, count=1)
    return prefix + key


@pytest.fixture
def saved(tmp_path):
    """A BERT saved by save_pretrained, and its reference tensors."""
    from transformers import BertConfig, BertModel

    randomise(BertModel(BertConfig(**BERT))).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", load_file(str(tmp_path / "bert" / "model.safetensors"))


def _rename_folder(saved, folder, prefix: str = "", fuse: bool = False, rename: bool = True):
    original, ref = saved
    folder.mkdir()
    shutil.copy(original / "config.json", folder / "config.json")
    sd = {_foreign(k, prefix, rename): v for k, v in ref.items()}
    if fuse:  # q, k and v in one tensor: a key_mapping cannot split it
        for i in range(BERT["num_hidden_layers"]):
            for leaf in ("weight", "bias"):
                parts = [sd.pop(f"{prefix}blocks.{i}.attn.{n}.{leaf}") for n in ("query", "key", "value")]
                sd[f"{prefix}blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _load(folder, mapping):
    from transformers import BertModel

    model, info = BertModel.from_pretrained(folder, key_mapping=mapping, output_loading_info=True)
    return model.state_dict(), info


@pytest.mark.parametrize(("suffix", "prefix", "rename"), [
    (".py", "", True), (".json", "", True), (".py", "module.", True), (".py", "module.", False)])
def test_emitted_key_mapping_loads_the_renamed_checkpoint(saved, tmp_path, capsys, suffix, prefix, rename):
    folder = _rename_folder(saved, tmp_path / "foreign", prefix, rename=rename)
    out = tmp_path / f"key_mapping{suffix}"
    assert main(["transformers:BertModel", str(folder / "model.safetensors"), "--emit", "transformers", str(out)]) == 0
    assert f"key_mapping written to {out}" in capsys.readouterr().out
    if suffix == ".py":
        assert "model = BertModel.from_pretrained(folder, key_mapping=KEY_MAPPING)" in out.read_text()
        if RUFF:
            lint = subprocess.run([RUFF, "check", "--isolated", "--no-cache", "--select", "E,F,W,I,B,UP,RUF,SIM",
                                   "--line-length", "120", str(out)], capture_output=True, text=True)
            assert lint.returncode == 0, lint.stdout
    mapping = runpy.run_path(str(out))["KEY_MAPPING"] if suffix == ".py" else json.loads(out.read_text())
    assert all(p.startswith("^") for p in mapping)
    if prefix and not rename:
        assert mapping == {r"^module\.": ""}  # a wrapper prefix alone is one rule
    state, info = _load(folder, mapping)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = saved[1]
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_without_the_key_mapping_the_same_folder_does_not_load(saved, tmp_path):
    """The control: the renamed checkpoint really needs the mapping."""
    folder = _rename_folder(saved, tmp_path / "foreign")
    _, info = _load(folder, None)
    assert len(info["missing_keys"]) > 30


def test_ops_prevent_a_key_mapping_and_say_which(saved, tmp_path, capsys):
    folder = _rename_folder(saved, tmp_path / "foreign", fuse=True)
    out = tmp_path / "key_mapping.py"
    code = main(["transformers:BertModel", str(folder / "model.safetensors"), "--emit", "transformers", str(out)])
    text = capsys.readouterr().out
    assert code == 1 and not out.exists()
    line = next(ln for ln in text.splitlines() if ln.startswith(f"no key_mapping written to {out}"))
    assert "key_mapping only renames keys: 'encoder.layer.0.attention.self.query.weight' needs split dim 0 into " \
           "(16, 16, 16), part 0 of 'blocks.0.attn.qkv.weight'" in line and "and 9 more" in line
    # the same mapping converts as a checkpoint: the ops are fine, only key_mapping cannot hold them
    assert main(["transformers:BertModel", str(folder / "model.safetensors"), "-o", str(tmp_path / "c.safetensors"),
                 "-q"]) == 0


@pytest.mark.parametrize(("args", "message"), [
    (["resnet18"], "MODEL 'resnet18' is not one"),
    (["transformers:BertModel", "--emit", "transformers", "out.txt"], "the suffix picks the format: .py"),
    (["transformers:BertModel", "--emit", "yaml", "out.py"], "--emit yaml: the formats are transformers"),
])
def test_emit_usage_errors_are_one_line_exit_2(saved, tmp_path, capsys, args, message):
    emit = [] if "--emit" in args else ["--emit", "transformers", str(tmp_path / "km.py")]
    assert main([args[0], str(saved[0] / "model.safetensors"), *args[1:], *emit]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _entry(source: str, target: str) -> Entry:
    return Entry(source=(source,), target=target, op=Op(kind="rename"), confidence=1.0,
                 evidence=Evidence(method="cluster"), source_shapes=((2,),), target_shape=(2,))


def _transformers_rename(rules, key: str) -> str:
    """A key renamed by transformers' own WeightRenaming objects, as from_pretrained builds them."""
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    return rename_source_key(key, [WeightRenaming(p, r) for p, r in rules], [])[0]


def test_several_index_groups_become_rules_with_one():
    """transformers fills only \\1: a nested rename is written once per value of its leading index."""
    keys = {f"stages.{s}.blocks.{b}.conv.weight": f"layers.{s}.units.{b}.block.conv.weight" for s in range(2)
            for b in range(3)}
    km = key_mapping(KeyMap(entries=tuple(_entry(k, t) for k, t in keys.items())))
    assert km.ok and all(r.count(r"(\d+)") <= 1 for r, _ in km.rules) and len(km.rules) == 2
    assert {k: _transformers_rename(km.rules, k) for k in keys} == keys
    one = _single_group(r"^a\.(\d+)\.b\.(\d+)\.", r"x.\1.y.\2.", ["a.3.b.1.w"])
    assert one == [(r"^a\.3\.b\.(\d+)\.", r"x.3.y.\1.")]


def test_renames_that_chain_are_refused_not_written():
    """transformers applies every matching rule in turn: a.w -> b.w and b.w -> c.w cannot both be rules."""
    km = key_mapping(KeyMap(entries=(_entry("x.a.w", "x.b.w"), _entry("x.b.w", "x.c.w"))))
    assert not km.ok and "the renames chain" in km.reason and "'x.a.w' would load as 'x.c.w'" in km.reason


def test_a_training_container_is_named_as_the_reason():
    km = key_mapping(KeyMap(entries=(_entry("enc.w", "w"),), unwrap=Unwrap(container="state_dict")))
    assert not km.ok and "the tensors sit in `state_dict`" in km.reason
