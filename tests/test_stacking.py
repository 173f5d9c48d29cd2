"""Several small tensors as one (issue 11, class 7): segment-anything's ``point_embeddings.{0..3}.weight [1, D]``
and a module that holds them as one ``point_embed.weight [4, D]``, both ways; a hole in the index set, or sizes that
do not sum, gather nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import keydiff
from keydiff._stacking import same_stem

from pairs import randomise

D = 16
SIZE = dict(embed_dim=D, image_embedding_size=(4, 4), input_image_size=(16, 16), mask_in_chans=8)


def prompt_encoder() -> nn.Module:
    from segment_anything.modeling import PromptEncoder

    return PromptEncoder(**SIZE)


class _Row:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


class _Rows:
    """``point_embeddings[i].weight`` read as row ``i`` of the owner's one ``point_embed`` tensor."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __getitem__(self, i: int) -> _Row:
        return _Row(self.owner.point_embed.weight[i: i + 1])


def _prompts():
    g = torch.Generator().manual_seed(0)
    points = (torch.rand(2, 3, 2, generator=g) * 16, torch.tensor([[0, 1, -1], [1, 1, 0]]))
    boxes = torch.rand(2, 4, generator=g) * 16
    masks = torch.randn(2, 1, 16, 16, generator=g)
    return points, boxes, masks


def _run(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    points, boxes, masks = _prompts()
    with torch.no_grad():
        a = m(points, None, masks)
        b = m(None, boxes, None)
    return torch.cat([a[0].flatten(), b[0].flatten()]), a[1]


class Holder(nn.Module):
    """One prompt encoder (as segment-anything's or as one point tensor) under a parent module name."""

    def __init__(self, parent: str, encoder: nn.Module) -> None:
        super().__init__()
        self.add_module(parent, encoder)
        self.parent = parent

    def forward(self, *args):
        return getattr(self, self.parent)(*args)


def _fused_flat(rows: int = 4) -> nn.Module:
    """A prompt encoder with one ``point_embed`` and every other key named as segment-anything names it."""
    from segment_anything.modeling import PromptEncoder

    class OnePoint(PromptEncoder):
        def __init__(self) -> None:
            super().__init__(**SIZE)
            del self._modules["point_embeddings"]
            self.point_embed = nn.Embedding(rows, D)

        @property
        def point_embeddings(self) -> _Rows:
            return _Rows(self)

    return OnePoint()


@pytest.mark.parametrize(("src_parent", "dst_parent"), [("prompt_encoder", "prompt_encoder"),
                                                        ("prompt_encoder", "prompt_enc")])
def test_point_embeddings_concatenated_into_one_tensor(src_parent, dst_parent, tmp_path):
    src = randomise(Holder(src_parent, prompt_encoder()))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / "sam.pth"  # as segment-anything distributes its checkpoints: torch.save, in module order
    torch.save(sd, path)
    dst = Holder(dst_parent, _fused_flat()).eval()
    d = keydiff.diff(dst, str(path))
    assert d.ok, d.problem
    (e,) = [e for e in d.mapping.entries if e.target == f"{dst_parent}.point_embed.weight"]
    assert e.source == tuple(f"{src_parent}.point_embeddings.{i}.weight" for i in range(4))
    assert e.op.kind == "concat" and e.op.dim == 0 and e.op.sizes == (1, 1, 1, 1) and e.target_shape == (4, D)
    assert "concatenated along dim 0 in index order" in e.evidence.note
    path_json = tmp_path / "map.json"
    path_json.write_text(d.mapping.dumps(), encoding="utf-8")
    namespace: dict = {}
    exec(d.to_python(), namespace)
    from keydiff._convert import write_converted

    written = tmp_path / "out.safetensors"
    write_converted(d.mapping, d.source, d.checkpoint, written)
    loaded = torch.load(path, weights_only=True)
    ways = [d.apply(), keydiff.load_mapping(path_json).apply(loaded), namespace["checkpoint_filter_fn"](loaded),
            load_file(str(written))]
    for out in ways:
        torch.testing.assert_close(out[f"{dst_parent}.point_embed.weight"],
                                   torch.cat([sd[k] for k in e.source]))
        dst.load_state_dict(out, strict=True)
        for a, b in zip(_run(dst), _run(src), strict=True):
            torch.testing.assert_close(a, b)


def test_one_tensor_split_into_point_embeddings(tmp_path):
    src = randomise(Holder("prompt_encoder", _fused_flat()))
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / "fused.safetensors"
    save_file(sd, str(path))
    dst = Holder("prompt_encoder", prompt_encoder()).eval()
    d = keydiff.diff(dst, str(path))
    assert d.ok, d.problem
    parts = sorted((e for e in d.mapping.entries if ".point_embeddings." in e.target), key=lambda e: e.op.index)
    assert [e.target for e in parts] == [f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]
    assert all(e.source == ("prompt_encoder.point_embed.weight",) and e.op.kind == "split" for e in parts)
    assert [e.op.index for e in parts] == [0, 1, 2, 3]
    namespace: dict = {}
    exec(d.to_python(), namespace)
    for out in (d.apply(), namespace["checkpoint_filter_fn"](load_file(str(path)))):
        dst.load_state_dict(out, strict=True)
        for a, b in zip(_run(dst), _run(src), strict=True):
            torch.testing.assert_close(a, b)
    # and back: the inverse concatenates the parts again
    again = d.mapping.inverse().apply(d.apply())
    torch.testing.assert_close(again["prompt_encoder.point_embed.weight"], sd["prompt_encoder.point_embed.weight"])


def test_a_hole_in_the_index_set_gathers_nothing(tmp_path):
    src = randomise(Holder("prompt_encoder", prompt_encoder()))
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if k != "prompt_encoder.point_embeddings.2.weight"}
    sd["prompt_encoder.point_embeddings.4.weight"] = torch.randn(1, D)  # still four rows: {0,1,3,4}
    path = tmp_path / "hole.safetensors"
    save_file(sd, str(path))
    d = keydiff.diff(Holder("prompt_encoder", _fused_flat()), str(path))
    assert not d.ok
    assert "prompt_encoder.point_embed.weight" in {m.key for m in d.mapping.missing}
    assert not any(e.target == "prompt_encoder.point_embed.weight" for e in d.proposals)


def test_sizes_that_do_not_sum_gather_nothing(tmp_path):
    src = randomise(Holder("prompt_encoder", prompt_encoder()))
    path = tmp_path / "four.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    d = keydiff.diff(Holder("prompt_encoder", _fused_flat(rows=5)), str(path))
    assert not d.ok
    assert not any(e.target == "prompt_encoder.point_embed.weight" for e in d.proposals)


def test_names_must_agree():
    assert same_stem("point_embeddings", "point_embed") and same_stem("blocks", "block")
    assert not same_stem("point_embeddings", "label_embed") and not same_stem("emb", "embeddings")
