"""The model's dataflow (issue 10): execution order and feeding edges from one forward pass on the meta device, on
real timm, torchvision and transformers models and on tiny modules whose registration order lies."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keydiff._cache import load_model_keys
from keydiff._dataflow import example_inputs, meta_copy, trace_dataflow
from keydiff._keys import Dataflow
from keydiff._model import keyset_of, read_model

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = dict(embed_dim=8, depth=2, num_heads=2, img_size=16, patch_size=8, num_classes=0)
TINY_BERT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50,
                 max_position_embeddings=32)


def _meta(build):
    with torch.device("meta"):
        return build()


def _edge_in(flow: Dataflow, producer: str, consumer: str) -> bool:
    return (producer, consumer) in flow.feeds


# ------------------------------------------------------------------------------------------------ real models

def test_efficientnet_runs_depthwise_then_its_norm_and_pointwise_feeds_bn2():
    flow = read_model("efficientnet_b0").flow
    assert flow is not None and flow.ran, flow and flow.reason
    assert flow.position("blocks.0.0.bn1.weight") > flow.position("blocks.0.0.conv_dw.weight")
    assert flow.module_position("blocks.0.0.bn1") == flow.module_position("blocks.0.0.conv_dw") + 1
    assert _edge_in(flow, "blocks.0.0.conv_pw", "blocks.0.0.bn2")
    assert flow.fed_by("blocks.0.0.bn2") == ("blocks.0.0.conv_pw",)
    # squeeze-excite: the gate and the activations both feed the pointwise conv
    assert set(flow.fed_by("blocks.0.0.conv_pw")) == {"blocks.0.0.se.conv_expand", "blocks.0.0.bn1"}
    # in eval mode the batch counters are never read: each stays right after its norm's other tensors
    assert "blocks.0.0.bn1.num_batches_tracked" in flow.unused
    bn = [k for k in flow.param_order if k.startswith("blocks.0.0.bn1.")]
    assert bn[-1] == "blocks.0.0.bn1.num_batches_tracked"
    assert flow.param_order.index(bn[-1]) - flow.param_order.index(bn[0]) == len(bn) - 1


def test_vit_norm1_feeds_qkv_and_the_root_tokens_come_after_the_patch_embedding():
    keys = read_model("vit_tiny_patch16_224", TINY_VIT)
    flow = keys.flow
    assert flow.ran and flow.reason == "ran on float32[1, 3, 16, 16]"  # the size the model was built for
    assert _edge_in(flow, "blocks.0.norm1", "blocks.0.attn.qkv")
    assert flow.fed_by("blocks.0.attn.qkv") == ("blocks.0.norm1",)
    # the root owns cls_token and pos_embed: it appears where they are consumed, after the patch embedding
    assert list(keys)[:2] == ["cls_token", "pos_embed"]
    assert flow.param_order[:4] == ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed")
    assert flow.order[:3] == ("patch_embed.proj", "", "blocks.0.norm1")
    # a residual stream: the last branch is the nearest producer, and earlier ones are still there
    assert flow.fed_by("blocks.1.norm1")[0] == "blocks.0.mlp.fc2"
    assert {"blocks.0.attn.proj", ""} <= set(flow.fed_by("blocks.1.norm1"))
    assert flow.follows("norm") == ()  # num_classes=0: no head
    assert sorted(flow.param_order) == sorted(keys)


def test_torchvision_resnet_downsample_and_main_branch():
    torchvision = pytest.importorskip("torchvision")
    flow = trace_dataflow(_meta(lambda: torchvision.models.resnet18()))
    assert flow.ran, flow.reason
    assert flow.fed_by("layer1.0.bn1") == ("layer1.0.conv1",)
    assert flow.fed_by("layer2.0.downsample.1") == ("layer2.0.downsample.0",)
    assert set(flow.fed_by("layer2.0.downsample.0")) == set(flow.fed_by("layer2.0.conv1"))
    # the residual stream since the last downsample; torchvision computes the identity after the main branch
    assert flow.order[-1] == "fc"
    assert flow.fed_by("fc") == ("layer4.1.bn2", "layer4.0.downsample.1", "layer4.0.bn2")


def test_transformers_bert_embeddings_feed_their_norm():
    pytest.importorskip("transformers")
    flow = read_model("transformers:BertModel", TINY_BERT).flow
    assert flow.ran and "input_ids=int64[1, 16]" in flow.reason
    e = "embeddings."
    assert set(flow.fed_by(e + "LayerNorm")) == {e + "word_embeddings", e + "token_type_embeddings",
                                                  e + "position_embeddings"}
    assert flow.fed_by("encoder.layer.0.attention.self.query") == (e + "LayerNorm",)


def test_transformers_two_tower_model_gets_text_and_image_sized_from_its_sub_configurations():
    transformers = pytest.importorskip("transformers")
    tower = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    config = transformers.CLIPConfig(text_config=dict(tower, vocab_size=50, max_position_embeddings=32),
                                     vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=8)
    flow = trace_dataflow(_meta(lambda: transformers.CLIPModel(config)))
    assert flow.ran and flow.reason == "ran on input_ids=int64[1, 16], pixel_values=float32[1, 3, 32, 32]"
    assert flow.fed_by("visual_projection") == ("vision_model.post_layernorm",)


# ------------------------------------------------------------------------------------------------ tiny modules

class BeforeA(nn.Module):
    """Registers ``b`` before ``a``, runs ``a`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(8, 2)
        self.a = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class FarNorm(nn.Module):
    """A norm registered at the end, run right after the first conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4, 2)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(F.gelu(self.norm(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class OwnAndChildren(nn.Module):
    """Owns a tensor and has children; uses a child's weight without calling the child (a fused projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.inp = nn.Linear(4, 8)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(8))
        self.v_bias = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return F.linear(x, self.qkv.weight, bias) * self.scale.repeat(3)


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model needs a tokenizer")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 20, bias=False)
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


def test_execution_order_not_registration_order():
    flow = trace_dataflow(_meta(BeforeA))
    assert flow.ran and flow.reason == "ran on float32[1, 4]"  # from the first module that owns tensors
    assert flow.order == ("a", "b")
    assert flow.param_order == ("a.weight", "a.bias", "b.weight", "b.bias")
    assert flow.feeds == (("a", "b"),) and flow.follows("a") == ("b",) and flow.fed_by("a") == ()


def test_a_norm_registered_far_away_sits_after_its_conv():
    flow = trace_dataflow(_meta(FarNorm))
    assert flow.order == ("conv1", "norm", "conv2", "head")
    assert flow.feeds == (("conv1", "norm"), ("norm", "conv2"), ("conv2", "head"))
    assert flow.unused == ("norm.num_batches_tracked",)
    assert flow.position("norm.num_batches_tracked") == flow.position("norm.running_var") + 1


def test_tensors_of_a_container_and_weights_used_without_their_module():
    flow = trace_dataflow(_meta(OwnAndChildren))
    # qkv's forward never ran: its weight met the data in the parent's F.linear, with the parent's biases (which
    # were touched first, in the cat)
    assert flow.param_order == ("inp.weight", "inp.bias", "q_bias", "v_bias", "qkv.weight", "scale")
    assert flow.order == ("inp", "", "qkv")
    assert set(flow.fed_by("qkv")) == {"inp"} and set(flow.fed_by("")) == {"inp", "qkv"}


def test_tied_keys_are_used_where_their_own_module_runs():
    flow = trace_dataflow(_meta(Tied))
    assert flow.ran and flow.reason == "ran on int64[1, 16]"
    assert flow.param_order == ("embed.weight", "norm.weight", "norm.bias", "head.weight")
    assert flow.unused == () and flow.feeds == (("embed", "norm"), ("norm", "head"))


def test_tensors_a_forward_makes_without_a_device_are_on_meta_too():
    from llm_models import linear_gpt  # its attention builds its causal mask with torch.ones(n, n)

    flow = trace_dataflow(linear_gpt())
    assert flow.ran, flow.reason
    assert flow.order[:3] == ("wte", "wpe", "blocks.0.ln1") and set(flow.fed_by("blocks.0.ln1")) == {"wte", "wpe"}


def test_a_forward_that_fails_gives_registration_order_and_says_why():
    model = _meta(Broken)
    flow = trace_dataflow(model)
    assert not flow.ran and "this model needs a tokenizer" in flow.reason
    assert flow.param_order == tuple(model.state_dict()) and flow.order == ("b", "a") and flow.feeds == ()
    assert flow.position("a.bias") == 3
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_the_budget_stops_a_long_trace():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(600):
                x = self.lin(x)
            return x

    flow = trace_dataflow(_meta(Loop), budget=0.0)
    assert not flow.ran and "budget" in flow.reason and flow.param_order == ("lin.weight", "lin.bias")


def test_explicit_example_and_inputs_derived_from_the_first_module():
    conv1d = _meta(lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3)))
    assert [label for label, _, _ in example_inputs(conv1d)] == ["float32[1, 2, 256]", "float32[1, 4, 256]"]
    flow = trace_dataflow(BeforeA(), example=torch.zeros(3, 4))  # a CPU module and input: traced on meta
    assert flow.ran and flow.reason == "ran on float32[3, 4]" and flow.order == ("a", "b")


def test_keyset_of_a_module_traces_a_meta_copy_and_leaves_the_module_alone():
    model = FarNorm().train()
    keys = keyset_of(model)
    assert keys.flow is not None and keys.flow.order[:2] == ("conv1", "norm")
    assert model.training and model.norm.num_batches_tracked.item() == 0
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    copy = meta_copy(Tied())
    assert copy.head.weight is copy.embed.weight and copy.head.weight.device.type == "meta"
    assert keyset_of(dict(model.state_dict())).flow is None  # a mapping of tensors has no dataflow


# ------------------------------------------------------------------------------------------------ cache, determinism

def test_the_cache_keeps_the_dataflow_and_a_hit_imports_no_torch():
    built = read_model("vit_tiny_patch16_224", TINY_VIT)
    cached = load_model_keys("vit_tiny_patch16_224", TINY_VIT)
    assert cached.flow == built.flow and cached.flow.feeds == built.flow.feeds and cached == built
    code = ("import sys; from keydiff._model import read_model; "
            f"ks = read_model('vit_tiny_patch16_224', {TINY_VIT!r}); "
            "print(ks.flow.ran, ks.flow.order[1] == '', 'torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True, cwd=ROOT).stdout.split()
    assert out == ["True", "True", "False", "False"]


def test_a_failed_trace_is_cached_as_such():
    flow = Dataflow.from_registration(["b.w", "a.w"], reason="not run: x")
    from keydiff._cache import _flow_from_json, _flow_to_json
    from keydiff._keys import KeySet, TensorInfo

    ks = KeySet.from_items([("b.w", TensorInfo((1,), "float32")), ("a.w", TensorInfo((1,), "float32"))], flow=flow)
    assert _flow_from_json(_flow_to_json(ks), list(ks)) == flow


def test_the_trace_does_not_depend_on_the_hash_seed():
    code = ("import sys; sys.path.insert(0, 'tests'); import test_dataflow as t; "
            "print(repr(t.trace_dataflow(t._meta(t.OwnAndChildren))))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("1", "2", "3")}
    assert len(runs) == 1 and "ran=True" in runs.pop()


def test_two_traces_are_equal():
    import timm

    a = trace_dataflow(_meta(lambda: timm.create_model("efficientnet_b0")))
    b = trace_dataflow(_meta(lambda: timm.create_model("efficientnet_b0")))
    assert a == b and a.feeds == b.feeds and a.ran


_BUILT = []


@functools.lru_cache(maxsize=4)
def _index_table(n: int) -> torch.Tensor:
    # model code that caches a tensor built from sizes (transformers' BEiT: its relative position index)
    _BUILT.append(n)
    return torch.arange(n)


class _CachesATable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + _index_table(4).to(x.dtype)


def test_trace_leaves_no_meta_tensor_in_the_model_codes_caches():
    # regression: a trace filled transformers' lru caches with meta tensors, and the next real forward of that model
    # in the process (--source, a notebook) computed something else
    _index_table.cache_clear()
    model = _CachesATable()
    flow = trace_dataflow(model)
    assert flow.ran
    x = torch.ones(2, 4)
    out = model(x)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, model.proj(x) + torch.arange(4.0))
