"""``keydiff find``: which timm architecture a checkpoint is (issue 12), on a small index of six timm models built
here (the full index is never built by the tests)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import keydiff
from keydiff._find import _linear, _quadratic, fingerprint_scores
from keydiff._index import build_index, pack_index, read_index
from keydiff.cli import main

from pairs import randomise

NAMES = ["resnet10t", "resnet14t", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_tiny_patch16_384",
         "convnext_atto"]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    where = tmp_path_factory.mktemp("index")
    parts = build_index(NAMES, where / "parts.jsonl", workers=0)
    return read_index(pack_index(parts, where / "index.zip"))


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in randomise(model).state_dict().items()}, str(path))
    return str(path)


def _timm(tmp_path, name: str, **kwargs) -> str:
    return _save(timm.create_model(name, pretrained=False, **kwargs), tmp_path / f"{name}.safetensors")


def test_index_records_what_each_argument_reshapes(index):
    row = {r.name: r for r in index.rows}
    assert row["resnet10t"].probes["num_classes=0"]["removed"] == ["fc.weight", "fc.bias"]
    assert set(row["resnet10t"].probes["num_classes=17"]["reshaped"]) == {"fc.weight", "fc.bias"}
    assert set(row["resnet10t"].probes["in_chans=5"]["reshaped"]) == {"conv1.0.weight"}
    assert set(row["vit_tiny_patch16_224"].probes["img_size=448"]["reshaped"]) == {"pos_embed"}
    img = [v for k, v in row["resnet10t"].probes.items() if k.startswith("img_size=")]
    assert len(img) == 1 and "error" in img[0]  # a CNN takes no img_size
    # same keys and shapes, one key table
    assert row["vit_tiny_patch16_224"].table == row["deit_tiny_patch16_224"].table != row["resnet10t"].table


def test_fingerprint_is_name_independent(index, tmp_path):
    ckpt = keydiff.read_keys(_timm(tmp_path, "resnet14t"))
    renamed = keydiff.KeySet.from_items((f"backbone.{i}", info) for i, info in enumerate(ckpt.values()))
    assert fingerprint_scores(ckpt, index.rows) == fingerprint_scores(renamed, index.rows)
    scores = fingerprint_scores(ckpt, index.rows)
    by_name = {r.name: scores[r.table] for r in index.rows}
    # all of the model but its head (which an argument reshapes, so the index leaves it out) is in the checkpoint
    assert by_name["resnet14t"] == pytest.approx(1 - 2048 * 1001 / sum(i.numel for i in ckpt.values()), rel=1e-4)
    assert by_name["resnet14t"] > by_name["resnet10t"] > by_name["vit_tiny_patch16_224"]


def test_other_head_is_found_with_its_num_classes_and_ranked_first(index, tmp_path):
    found = keydiff.find(_timm(tmp_path, "resnet14t", num_classes=10), index=index, verify=1)
    best = found.best
    assert best.names == ("resnet14t",) and best.model_args() == {"num_classes": 10}
    assert best.fits and best.verified and best.filled == best.model_keys == best.by_name
    assert best.used == best.tensors
    assert not any(c.fits for c in found.candidates[1:])
    assert [c.rank_key for c in found.candidates] == sorted(c.rank_key for c in found.candidates)
    assert "-m num_classes=10" in best.command(found.checkpoint)


def test_head_removed_gives_num_classes_0(index, tmp_path):
    found = keydiff.find(_timm(tmp_path, "convnext_atto", num_classes=0), index=index, verify=1)
    assert found.best.name == "convnext_atto" and found.best.model_args() == {"num_classes": 0}
    assert found.best.fits and found.best.verified


def test_img_size_from_pos_embed_and_identical_architectures_are_one_candidate(index, tmp_path):
    found = keydiff.find(_timm(tmp_path, "vit_tiny_patch16_224", img_size=288, num_classes=5), index=index)
    best = found.best
    # one candidate: deit and vit tiny have the same keys, and the 384 model has them too at img_size=288
    assert set(best.names) == {"deit_tiny_patch16_224", "vit_tiny_patch16_224", "vit_tiny_patch16_384"}
    assert best.names[-1] == "vit_tiny_patch16_384"  # it needs one argument more than the others
    assert best.model_args("vit_tiny_patch16_224") == {"num_classes": 5, "img_size": 288}
    assert best.model_args("vit_tiny_patch16_384") == {"num_classes": 5, "img_size": 288}
    assert best.fits and best.verified
    assert "num_heads" in best.open_args  # the shapes cannot tell the number of heads
    assert sum("vit_tiny_patch16_224" in c.names for c in found.candidates) == 1


def test_foreign_names_find_the_timm_architecture_and_convert(index, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768, num_labels=7,
                                    layer_norm_eps=1e-6)
    source = randomise(transformers.ViTForImageClassification(config)).eval()
    path = tmp_path / "hf_vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    found = keydiff.find(str(path), index=index)
    best = found.best
    assert "vit_tiny_patch16_224" in best.names and best.model_args("vit_tiny_patch16_224") == {"num_classes": 7}
    assert best.fits and best.by_name == 0 and best.used == best.tensors
    # the first candidate converts, loads strictly and computes what the source computes
    d = keydiff.diff(best.name, str(path), **best.model_args())
    target = timm.create_model(best.name, pretrained=False, **best.model_args()).eval()
    target.load_state_dict(d.apply(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(pixel_values=x).logits, rtol=1e-4, atol=1e-4)


def test_result_presents_itself(index, tmp_path):
    found = keydiff.find(_timm(tmp_path, "resnet10t"), index=index, verify=0, top=2)
    frame = found.to_frame()
    assert frame["name"].iloc[0] == "resnet10t" and len(frame) <= 2
    assert {"args", "fits", "filled", "used", "cause", "command"} <= set(frame.columns)
    bundle = found._repr_mimebundle_()
    assert "resnet10t" in bundle["text/plain"] and "<table" in bundle["text/html"]
    assert found.best.verified is None  # verify=0 builds nothing


def test_cli_without_model_finds_it_says_why_and_converts(index, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEYDIFF_INDEX", str(index.path))
    ckpt = _timm(tmp_path, "resnet14t", num_classes=10)
    out = tmp_path / "converted.safetensors"
    assert main([ckpt, "-o", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "chose resnet14t with num_classes=10" in text and "320/320" not in text
    assert "out of 6 timm architectures" in text
    timm.create_model("resnet14t", num_classes=10).load_state_dict(load_file(str(out)), strict=True)


def test_cli_find_json_and_top(index, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEYDIFF_INDEX", str(index.path))
    ckpt = _timm(tmp_path, "vit_tiny_patch16_224", num_classes=0)
    out = tmp_path / "candidates.json"
    assert main(["find", ckpt, "--json", str(out), "--top", "2", "--verify", "0"]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "keydiff/find" and 1 <= len(doc["candidates"]) <= 2
    first = doc["candidates"][0]
    assert "vit_tiny_patch16_224" in first["names"] and first["args"]["vit_tiny_patch16_224"] == {"num_classes": 0}
    assert first["fits"] and "-m num_classes=0" in first["command"]
    assert "is deit_tiny_patch16_224" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("args, message", [
    (["find", "missing.safetensors"], "missing.safetensors"),
    (["find", "{ckpt}", "--top", "0"], "--top"),
    (["find", "{text}"], "text.pth"),
    (["find", "{ints}"], "no floating-point tensor"),
    (["not_a_file.pth"], "missing CHECKPOINT"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, index, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEYDIFF_INDEX", str(index.path))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    save_file({"step": torch.zeros(1, dtype=torch.int64)}, str(tmp_path / "ints.safetensors"))
    files = {"ckpt": _timm(tmp_path, "resnet10t") if "{ckpt}" in args else "", "text": str(tmp_path / "text.pth"),
             "ints": str(tmp_path / "ints.safetensors")}
    assert main([a.format(**files) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_arguments_are_solved_from_the_probes():
    # num_classes: the head's rows follow it one to one (1000 at the default, 17 in the probe)
    assert _linear((1000, 17), (1000, 17), 10) == 10
    # in_chans through a dimension that moves 3 -> 5; a width no argument value gives is None
    assert _linear((3, 5), (3, 5), 1) == 1 and _linear((3, 5), (6, 10), 7) is None
    # img_size through a position table: 1 + (side / 16)^2 tokens, probed at 224, 448, 672
    assert _quadratic((224, 448, 672), (197, 785, 1765), 1 + 18 * 18) == 288
    assert _quadratic((224, 448, 672), (197, 785, 1765), 200) is None  # no side gives 200 tokens
    # a 2-D grid side is linear in the image side
    assert _quadratic((224, 448, 672), (14, 28, 42), 24) == 384
