"""Causes in plain words, from the facts (issue 13.4: a ResNet's `fc` head)."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import save_file

import keydiff


def _resnet_checkpoint(tmp_path, **kwargs):
    path = tmp_path / "resnet.safetensors"
    with torch.device("meta"):
        model = timm.create_model("resnet18", **kwargs)
    save_file({k: torch.zeros(v.shape) for k, v in model.state_dict().items()}, str(path))
    return path


def test_classifier_of_another_size_on_an_fc_head_is_a_head_cause(tmp_path):
    """The model's pretrained_cfg names `fc` as its classifier; 1000 classes in the file, 10 in the model."""
    d = keydiff.diff("resnet18", str(_resnet_checkpoint(tmp_path)), num_classes=10)
    heads = [g for g in d.diagnoses if g.kind == "head"]
    assert heads and "checkpoint has 1000 classes, model 10 (fc.weight -> fc.weight)" in heads[0].message


def test_an_nn_module_brings_its_own_pretrained_cfg(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    d = keydiff.diff(model, str(_resnet_checkpoint(tmp_path)))
    assert any(g.kind == "head" for g in d.diagnoses)


def test_a_head_cause_is_not_also_a_width_cause(tmp_path):
    """fc.bias [1000] vs [10] changed the set of 1-D sizes, which read as 'different variant: width 1000'."""
    d = keydiff.diff("resnet18", str(_resnet_checkpoint(tmp_path)), num_classes=10)
    assert [g.kind for g in d.diagnoses if g.level == "warning"] == ["head"]
