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


# --- keydiff MODEL CKPT --source: prove, or repair by running --------------------------------------------------

PLAIN = ["--source", "pairs:plain_vit"]


def _plain(tmp_path, act: str = "gelu"):
    """A checkpoint of ``pairs.plain_vit``: a timm ViT whose two norms per block are ``ln_a``/``ln_b``, ``ln_b``
    running first; safetensors sorts keys, so the file puts ``ln_a`` first."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pairs import plain_vit, randomise

    source = randomise(plain_vit(act))
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys.index("layer.0.ln_a.weight") < keys.index("layer.0.ln_b.weight")
    return path, source


def test_source_proves_a_right_conversion(tmp_path, capsys):
    pair, path = _hf_vit(tmp_path)
    mapping = tmp_path / "map.json"
    code = main([pair.target, str(path), *pair.model_args(), "--source", "transformers:ViTModel", *HF_ARGS,
                 "--json", str(mapping)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "✓ proven: all 30 model keys filled and the converted model reproduces the source's outputs" in out
    assert "changed by verification" not in out and "Checked: names, shapes, structure, and the function" in out
    doc = json.loads(mapping.read_text())
    assert doc["complete"] and not any(e["evidence"]["method"] == "verified" for e in doc["entries"])


def test_without_source_the_verdict_never_says_proven(tmp_path, capsys):
    pair, path = _hf_vit(tmp_path)
    assert main([pair.target, str(path), *pair.model_args()]) == 0
    out = capsys.readouterr().out
    assert "proven" not in out and "not checked: that the converted model computes the same function" in out


def test_source_repairs_role_ambiguous_norms(tmp_path, capsys):
    """The engine cannot tell ``ln_a`` from ``ln_b``: its proposal is wrong and unapplied. Running finds
    ``blocks.0.norm1`` as the first module that differs, swaps it with its sibling, and proves the result."""
    import timm
    import torch
    from safetensors.torch import load_file

    import keydiff

    from pairs import VIT

    path, source = _plain(tmp_path)
    before = keydiff.diff("vit_base_patch16_224", path, **VIT)
    assert not before.ok
    proposed = {e.target: e for e in before.proposals}
    assert proposed["blocks.0.norm1.weight"].source == ("layer.0.ln_a.weight",)  # wrong: ln_a runs second
    assert "blocks.0.norm1.weight" not in {e.target for e in before.mapping.entries}

    mapping, out_path = tmp_path / "map.json", tmp_path / "out.safetensors"
    model_args = [a for k, v in VIT.items() for a in ("-m", f"{k}={v!r}")]
    code = main(["vit_base_patch16_224", str(path), *model_args, *PLAIN, "--json", str(mapping), "-o", str(out_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "✓ proven: all 30 model keys filled" in out and "8 keys changed by verification" in out
    assert "What verification changed" in out and "swapped with blocks.0.norm2" in out
    by_target = {e["target"]: e for e in json.loads(mapping.read_text())["entries"]}
    norm1 = by_target["blocks.0.norm1.weight"]
    assert norm1["source"] == ["layer.0.ln_b.weight"] and norm1["evidence"]["method"] == "verified"
    assert "was proposed by order at 0.35" in norm1["evidence"]["note"]
    assert by_target["blocks.1.norm2.bias"]["source"] == ["layer.1.ln_a.bias"]
    # torch is the oracle: the written checkpoint loads strictly and computes what the source computes
    target = timm.create_model("vit_base_patch16_224", pretrained=False, **VIT).eval()
    target.load_state_dict(load_file(str(out_path)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.eval()(x))


def test_source_refuses_a_model_that_computes_another_function(tmp_path, capsys):
    """Same tensors, another activation: nothing a mapping can fix. Exit 1, nothing written."""
    from pairs import VIT

    path, _ = _plain(tmp_path, act="relu")
    mapping, out_path = tmp_path / "map.json", tmp_path / "out.safetensors"
    model_args = [a for k, v in VIT.items() for a in ("-m", f"{k}={v!r}")]
    code = main(["vit_base_patch16_224", str(path), *model_args, *PLAIN, "-s", "act=relu", "--json", str(mapping),
                 "-o", str(out_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert not mapping.exists() and not out_path.exists()
    assert "✗ not proven: the converted model does not reproduce the source's outputs" in out
    assert "Repair by running stopped: blocks.0.mlp.fc2 computes something else" in out
    assert "nothing it tried is kept" in out


def test_prove_replaces_a_wrong_applied_entry_and_keeps_nothing_it_cannot_prove(tmp_path):
    """Applied entries running disproves are replaced (was -> now); with no trials left nothing changes.

    Only the weights are swapped, so ``blocks.0.norm1`` takes its tensors from two source modules: the repair
    takes them all from one of them, trading with the entries that hold them."""
    from dataclasses import replace

    import transformers

    import keydiff
    from keydiff._model import parse_model_args

    pair, path = _hf_vit(tmp_path)
    d = keydiff.diff(pair.target, path, **pair.target_kwargs)
    assert d.with_entries(d.mapping.entries).mapping == d.mapping
    by_target = {e.target: e for e in d.mapping.entries}
    a, b = by_target["blocks.0.norm1.weight"], by_target["blocks.0.norm2.weight"]
    wrong = d.with_entries([replace(a, source=b.source), replace(b, source=a.source),
                            *(e for e in d.mapping.entries if e not in (a, b))])
    cfg = parse_model_args(HF_ARGS[1::2])

    def source():
        return transformers.ViTModel(transformers.ViTConfig(**cfg))

    proof = keydiff.prove(wrong, source(), pair.target_model())
    assert proof.proven and proof.trials <= 2
    assert [c.target for c in proof.changes] == ["blocks.0.norm1.weight", "blocks.0.norm2.weight"]
    assert proof.changes[0].was == "layers.0.layernorm_after.weight (cluster, 0.95)"
    assert proof.changes[0].why.startswith("took the tensors of layers.0.layernorm_before; blocks.0.norm1 computes")
    fixed = {e.target: e for e in proof.diff.mapping.entries}
    assert fixed[a.target].source == a.source and fixed[b.target].source == b.source
    assert {e.target for e in proof.diff.mapping.entries if e.evidence.method == "verified"} == {a.target, b.target}

    stuck = keydiff.prove(wrong, source(), pair.target_model(), max_trials=0)
    assert not stuck.proven and stuck.diff is wrong and not stuck.changes
    assert "stopped after 0 trials" in stuck.stopped


def test_prove_fills_empty_keys_from_unused_tensors_and_flips_a_square_transpose(tmp_path):
    from dataclasses import replace

    import timm

    import keydiff
    from keydiff._ops import Op

    from pairs import VIT, plain_vit

    path, _ = _plain(tmp_path)

    def run(d):
        return keydiff.prove(d, plain_vit(), timm.create_model("vit_base_patch16_224", pretrained=False, **VIT))

    proven = run(keydiff.diff("vit_base_patch16_224", path, **VIT)).diff
    # the norms' entries gone, their proposals too: only unused tensors can fill them
    rest = [e for e in proven.mapping.entries if ".norm" not in e.target]
    empty = replace(proven.with_entries(rest), proposals=tuple(rest))
    assert len(empty.mapping.missing) == 8
    proof = run(empty)
    assert proof.proven and len(proof.changes) == 8
    assert proof.changes[0].why.startswith("took the unused tensors of layer.0.ln_b")
    # a square weight transposed by a wrong convention guess
    flipped = proven.with_entries(replace(e, op=Op(kind="transpose")) if e.target.endswith("attn.proj.weight") else e
                                  for e in proven.mapping.entries)
    proof = run(flipped)
    assert proof.proven and [c.why.split(";")[0] for c in proof.changes] == ["not transposed"] * 2


def test_what_worked_once_is_tried_at_every_later_block_in_one_trial(tmp_path):
    """Block 0's swap, repeated over blocks 1-3 at once: two trials for four blocks."""
    import timm
    from safetensors.torch import save_file

    import keydiff

    from pairs import VIT, plain_vit, randomise

    deeper = dict(VIT, depth=4)
    path = tmp_path / "plain4.safetensors"
    save_file({k: v.contiguous() for k, v in randomise(plain_vit(depth=4)).state_dict().items()}, str(path))
    d = keydiff.diff("vit_base_patch16_224", path, **deeper)
    proof = keydiff.prove(d, plain_vit(depth=4), timm.create_model("vit_base_patch16_224", pretrained=False, **deeper))
    assert proof.proven and proof.trials == 2 and len(proof.changes) == 16


def _save_pretrained_vit(tmp_path):
    import transformers

    cfg = {a.split("=")[0]: eval(a.split("=")[1]) for a in HF_ARGS[1::2]}
    folder = tmp_path / "vit-hf"
    transformers.ViTModel(transformers.ViTConfig(**cfg)).save_pretrained(folder)
    return folder


def test_verify_loads_a_save_pretrained_file_the_way_transformers_does(tmp_path, capsys):
    """Issue 13.2: transformers 5 writes older names (encoder.layer.N.attention.attention.query) than its modules
    use (layers.N.attention.q_proj); the source is loaded through the library's own renames."""
    folder = _save_pretrained_vit(tmp_path)
    pair = next(p for p in CORE_PAIRS if p.name == "hf_vit")
    code = main(["verify", "transformers:ViTModel", str(folder / "model.safetensors"), pair.target, *HF_ARGS,
                 *pair.model_args()])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "✓ verified" in captured.out


def test_a_source_that_does_not_fit_gets_the_whole_error(tmp_path, capsys):
    """Issue 13.2: the message stopped at 'Error(s) in loading state_dict for ViTModel:'."""
    pair, path = _hf_vit(tmp_path)
    code = main(["verify", "transformers:ViTModel", str(path), pair.target, "-s", "hidden_size=64",
                 *pair.model_args()])
    err = capsys.readouterr().err
    assert code == 2 and "size mismatch for" in err and not err.rstrip().endswith(":"), err


def test_outputs_that_do_not_count_say_why(tmp_path, capsys, monkeypatch):
    """Issue 13.9: pooler_output differed next to '✓ verified' without a word; the target has no pooler."""
    monkeypatch.setenv("COLUMNS", "250")  # one table line per output
    pair, path = _hf_vit(tmp_path)
    assert main(["verify", "transformers:ViTModel", str(path), pair.target, *HF_ARGS, *pair.model_args()]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "does not count because" in out
    assert "computed from checkpoint tensors the target has no place for (pooler.dense" in out
