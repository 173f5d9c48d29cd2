"""Mixture-of-experts layouts: per-expert tensors vs tensors stacked over experts (transformers v5 packing)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import keydiff


def _per_expert(layers: int, experts: int, d: int, inter: int, prefix: str = "layers") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        p = f"{prefix}.{i}.block_sparse_moe."
        sd[p + "gate.weight"] = torch.randn(experts, d, generator=g)
        for e in range(experts):
            sd[p + f"experts.{e}.w1.weight"] = torch.randn(inter, d, generator=g)
            sd[p + f"experts.{e}.w2.weight"] = torch.randn(d, inter, generator=g)
            sd[p + f"experts.{e}.w3.weight"] = torch.randn(inter, d, generator=g)
    return sd


def _packed(sd: dict[str, torch.Tensor], layers: int, experts: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        p = f"layers.{i}.block_sparse_moe."
        q = f"model.layers.{i}.mlp."
        out[q + "gate.weight"] = sd[p + "gate.weight"]
        out[q + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[p + f"experts.{e}.w1.weight"], sd[p + f"experts.{e}.w3.weight"]]) for e in range(experts)])
        out[q + "experts.down_proj"] = torch.stack([sd[p + f"experts.{e}.w2.weight"] for e in range(experts)])
    return out


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.integers(2, 6), st.sampled_from([(8, 12), (6, 6)]))
def test_per_expert_tensors_stack_into_packed_ones_and_back(layers, experts, dims):
    d, inter = dims
    per_expert = _per_expert(layers, experts, d, inter)
    packed = _packed(per_expert, layers, experts)
    forward = keydiff.diff(packed, per_expert)
    assert forward.ok, [m.key for m in forward.mapping.missing]
    converted = forward.apply()
    assert set(converted) == set(packed)
    for k, v in packed.items():
        assert torch.equal(converted[k], v), k
    back = keydiff.diff(per_expert, packed)
    assert back.ok
    restored = back.apply()
    for k, v in per_expert.items():
        assert torch.equal(restored[k], v), k
    # the mapping inverts itself too, bit for bit
    inverse = forward.mapping.inverse().apply(converted)
    for k, v in per_expert.items():
        assert torch.equal(inverse[k], v), k
