"""Both sides accounted (issue 10): unused checkpoint tensors carry a true kind, extra blocks block exit 0, depth
causes are true and say which model argument fixes them, a block path is never taken for a wrapper prefix."""

from __future__ import annotations

import pytest
import torch

import keydiff
from keydiff._account import account_unused, depth_differences
from keydiff._keys import KeySet, TensorInfo
from keydiff._mapping import KeyMap
from keydiff._normalize import find_prefix
from keydiff.cli import main


def _timm_sd(name: str, **kwargs) -> dict[str, torch.Tensor]:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs).state_dict()


def _keys(d: dict[str, tuple[int, ...]]) -> KeySet:
    return KeySet.from_items(((k, TensorInfo(s, "float32")) for k, s in d.items()), origin="t")


def test_block_path_is_not_a_wrapper_prefix():
    # regression (issue 10): `layer4.2.` was stripped from a resnet34 checkpoint and collided with the stem
    deeper = list(_timm_sd("resnet34"))
    model = set(_timm_sd("resnet18"))
    p = find_prefix(deeper, model)
    assert (p.strip, p.add) == ("", "")


def test_deeper_checkpoint_exits_1_with_depth_cause_and_fix(tmp_path, capsys):
    path = tmp_path / "vit4.pth"
    torch.save(_timm_sd("vit_tiny_patch16_224", depth=4, img_size=32, patch_size=8), path)
    out = tmp_path / "out.safetensors"
    code = main(["vit_tiny_patch16_224", str(path), "-m", "depth=2", "-m", "img_size=32", "-m", "patch_size=8",
                 "-o", str(out)])
    text = capsys.readouterr().out.replace("\n", " ")
    assert code == 1
    assert not out.exists()
    assert "the checkpoint has 4 blocks in `blocks`" in text and "the model 2" in text
    assert "-m depth=4" in text
    d = keydiff.diff("vit_tiny_patch16_224", str(path), depth=2, img_size=32, patch_size=8)
    assert d.mapping.complete and not d.ok
    assert {u.kind for u in d.mapping.unused} == {"depth"}
    assert {u.key.split(".")[1] for u in d.mapping.unused} == {"2", "3"}


def test_deeper_checkpoint_with_partial_keeps_the_model_blocks(tmp_path):
    path = tmp_path / "vit4.pth"
    torch.save(_timm_sd("vit_tiny_patch16_224", depth=4, img_size=32, patch_size=8), path)
    out = tmp_path / "out.safetensors"
    assert main(["vit_tiny_patch16_224", str(path), "-m", "depth=2", "-m", "img_size=32", "-m", "patch_size=8",
                 "-o", str(out), "--partial", "-q"]) == 1
    assert out.exists()


@pytest.mark.parametrize(("model", "ckpt", "fix"), [("resnet18", "resnet34", "layers=[3, 4, 6, 3]"),
                                                     ("resnet34", "resnet18", "layers=[2, 2, 2, 2]")])
def test_depth_both_directions_true_cause(model, ckpt, fix, tmp_path, capsys):
    path = tmp_path / f"{ckpt}.pth"
    torch.save(_timm_sd(ckpt), path)
    assert main([model, str(path)]) == 1
    text = capsys.readouterr().out.replace("\n", " ")
    assert f"-m {fix}" in text
    assert "width" not in text  # regression: "width 64 in the checkpoint, 256 in the model" was claimed
    assert "error" not in text


def test_width_variant_still_named():
    d = keydiff.diff(_keys({"a.weight": (8,), "b.weight": (8, 8)}), _keys({"a.weight": (16,), "b.weight": (16, 16)}))
    assert any(dg.kind == "width" for dg in d.diagnoses)


def test_unused_kinds_are_true():
    ckpt = _keys({"blocks.0.w": (4,), "blocks.1.w": (4,), "pooler.dense.weight": (4, 4), "head.weight": (3, 4),
                  "embeddings.mask_token": (1, 4), "text.layers.0.w": (4,), "text.proj": (4, 4)})
    used = {"blocks.0.w", "blocks.1.w"}
    unused = [k for k in ckpt if k not in used]
    kinds = {k: u.kind for k, u in account_unused(unused, ckpt, used, rename=lambda k: k,
                                                  model={"blocks.0.w", "blocks.1.w"}).items()}
    assert kinds == {"pooler.dense.weight": "head", "head.weight": "head", "embeddings.mask_token": "training",
                     "text.layers.0.w": "tower", "text.proj": "tower"}


def test_numbered_module_that_is_not_a_repeat_is_not_depth():
    # classifier.0 (a norm) used, classifier.2 (a linear) unused: another module, not another block
    ckpt = _keys({"classifier.0.weight": (8,), "classifier.2.weight": (3, 8), "blocks.0.w": (8,)})
    used = {"classifier.0.weight", "blocks.0.w"}
    got = account_unused(["classifier.2.weight"], ckpt, used, rename=lambda k: k,
                         model={"head.norm.weight", "blocks.0.w"})
    assert got["classifier.2.weight"].kind == "head"


def test_unexplained_unused_tensor_blocks_exit_0():
    model = _keys({"a.weight": (4, 4)})
    ckpt = _keys({"a.weight": (4, 4), "mystery.weight": (7, 3)})
    d = keydiff.diff(model, ckpt)
    assert d.mapping.complete and not d.ok
    assert d.mapping.unused[0].kind == "unexplained"
    assert "unused without a reason" in d.problem


def test_leftover_kind_round_trips_through_json():
    model = _keys({"a.weight": (4, 4)})
    ckpt = _keys({"a.weight": (4, 4), "head.weight": (3, 4)})
    d = keydiff.diff(model, ckpt)
    assert d.ok
    km = KeyMap.from_json(d.mapping.to_json())
    assert km.unused[0].kind == "head" and km.accounted


def test_depth_differences_keeps_every_stage():
    model = [f"layer{s}.{b}.w" for s in (1, 2) for b in range(2)]
    ckpt = [f"layer{s}.{b}.w" for s, n in ((1, 2), (2, 3)) for b in range(n)]
    got = depth_differences(model, ckpt)
    assert [(d.container, len(d.checkpoint), len(d.model)) for d in got] == [("layer1", 2, 2), ("layer2", 3, 2)]
