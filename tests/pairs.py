"""Real checkpoint pairs for the tests: a source model from another library (or a training wrapper), random
weights in every tensor, and the timm model it should convert into. Shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

VIT = dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, img_size=32, patch_size=8, num_classes=0)


@dataclass(frozen=True)
class Pair:
    """A source model, how its checkpoint is stored, and the timm target it converts into."""

    name: str
    source: Callable[[], nn.Module]
    target: str
    target_kwargs: dict[str, Any]
    src_out: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    dst_out: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    input_shape: tuple[int, ...] = (2, 3, 32, 32)
    fmt: str = "safetensors"
    wrap: Callable[[dict], Any] | None = None
    tags: tuple[str, ...] = field(default=())
    negative: bool = False
    """True when no complete correct mapping exists (a depth mismatch): the pair must end unresolved (exit 1)."""
    save: Callable[[dict[str, torch.Tensor], Path], Path] | None = None
    """``(state dict, directory) -> path to give keydiff``: how the source's library saves it, when that is neither
    plain safetensors nor a plain ``torch.save`` (whisper's ``{dims, model_state_dict}``, Meta's consolidated shards
    in a folder, ``pytorch_model.bin``). Overrides ``fmt`` and ``wrap``."""
    reference: Callable[[Pair, nn.Module, nn.Module], dict[str, torch.Tensor]] | None = None
    """``(pair, source model, target model) -> {target key: tensor}``, the correct converted tensors (for a negative
    pair, those of the part with a counterpart); None: the plain trace (``reference.trace_reference``)."""

    def model_args(self) -> list[str]:
        """``-m KEY=VALUE`` arguments for the CLI."""
        return [a for k, v in self.target_kwargs.items() for a in ("-m", f"{k}={v!r}")]

    def target_model(self) -> nn.Module:
        """The target with its own initial weights: a timm name, or any spec the CLI takes (``module:callable``,
        ``transformers:Class``, ``diffusers:Class``, a folder with a config.json), built on the CPU."""
        if ":" in self.target or "/" in self.target:
            from keydiff._model import model_factory

            return model_factory(self.target)(**self.target_kwargs).eval()
        import timm

        return timm.create_model(self.target, pretrained=False, **self.target_kwargs).eval()


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct random values in every float tensor, so that a swapped norm or a wrong q/k/v order shows.

    Only the tensors of the state dict: a non-persistent buffer is derived, not a weight (Swin V2's
    ``relative_coords_table``), and the target rebuilds its own."""
    g = torch.Generator().manual_seed(seed)
    saved = set(model.state_dict())  # a non-persistent buffer (Swin V2's coordinates table) is the code's, not data
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or name not in saved:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if t.dim() == 1 and "weight" in name else 0.0))
    return model.eval()


def write_source(pair: Pair, directory: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """Build the source model with random weights and store its checkpoint as the pair says."""
    model = randomise(pair.source(), seed)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if pair.save is not None:
        return pair.save(sd, directory), model
    payload = pair.wrap(sd) if pair.wrap else sd
    if pair.fmt == "pth":
        path = directory / "source.pth"
        torch.save(payload, path)
    else:
        from safetensors.torch import save_file

        path = directory / "source.safetensors"
        save_file(payload, str(path))
    return path, model


def max_rel_diff(pair: Pair, src: nn.Module, dst: nn.Module) -> float:
    x = torch.randn(pair.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = pair.src_out(src.eval(), x), pair.dst_out(dst.eval(), x)
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def tokens(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.forward_features(x)


def pooled(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.forward_head(m.forward_features(x), pre_logits=True)


def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


# --- transformers ---------------------------------------------------------------------------------------------

def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=32, patch_size=8, layer_norm_eps=1e-6))


def hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[1, 2, 1, 1],
                                    layer_type="bottleneck"))


# --- torchvision ----------------------------------------------------------------------------------------------

def tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=7)


def tv_vit_tokens(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = m._process_input(x)
    return m.encoder(torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1))


def tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 2), CNBlockConfig(32, 48, 1),
                     CNBlockConfig(48, None, 1)], num_classes=5)


def tv_convnext_pooled(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.classifier[1](m.classifier[0](m.avgpool(m.features(x))))


def tv_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 2, 1, 1], num_classes=6)


# --- open_clip ------------------------------------------------------------------------------------------------

def oc_vit() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)


def oc_pooled(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj, m.proj = m.proj, None
    try:
        return m(x)
    finally:
        m.proj = proj


def timm_source(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


CORE_PAIRS = [
    Pair("hf_vit", hf_vit, "vit_base_patch16_224", VIT, lambda m, x: m(pixel_values=x).last_hidden_state, tokens),
    Pair("tv_vit", tv_vit, "vit_base_patch16_224", VIT, tv_vit_tokens, tokens),
    Pair("openclip_vit", oc_vit, "vit_base_patch16_clip_224", dict(VIT, pre_norm=True, global_pool="token"),
         oc_pooled, lambda m, x: m.forward_features(x)[:, 0]),
    Pair("tv_convnext", tv_convnext, "convnext_tiny", dict(depths=(1, 2, 1, 1), dims=(8, 16, 32, 48), num_classes=0),
         tv_convnext_pooled, pooled, input_shape=(2, 3, 64, 64)),
    Pair("hf_resnet", hf_resnet, "resnet50",
         dict(layers=[1, 2, 1, 1], num_classes=0),
         lambda m, x: m(pixel_values=x).pooler_output.flatten(1), pooled, input_shape=(2, 3, 64, 64)),
    Pair("tv_resnet18", tv_resnet, "resnet18", dict(layers=[1, 2, 1, 1], num_classes=6), logits, logits,
         input_shape=(2, 3, 64, 64)),
    Pair("ddp_prefix", timm_source("resnet18", layers=[1, 1, 1, 1], num_classes=3), "resnet18",
         dict(layers=[1, 1, 1, 1], num_classes=3), logits, logits, input_shape=(2, 3, 64, 64), fmt="pth",
         wrap=lambda sd: {"module." + k: v for k, v in sd.items()}),
    Pair("lightning_compile", timm_source("vit_base_patch16_224", **VIT), "vit_base_patch16_224", VIT, tokens,
         tokens, fmt="pth",
         wrap=lambda sd: {"epoch": 2, "global_step": 10,
                          "state_dict": {"model._orig_mod." + k: v for k, v in sd.items()},
                          "optimizer_states": [{"state": {}, "param_groups": []}], "hyper_parameters": {"lr": 0.1}}),
]


# --- the wider corpus: more libraries and families --------------------------------------------------------------

HF_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8)


def hf(config: str, model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kwargs))

    return build


def tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(**kwargs)

    return build


def hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(pixel_values=x).last_hidden_state


def hf_pooled(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(pixel_values=x).pooler_output.flatten(1)


def hf_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(pixel_values=x).logits


def tv_features_pooled(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.adaptive_avg_pool2d(m.features(x), 1).flatten(1)


def ema_wrap(sd: dict) -> dict:
    return {"model": sd, "model_ema": {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 7}


CONVNEXT_T = dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 48), num_classes=0)

CORPUS_PAIRS = [
    *CORE_PAIRS,
    Pair("hf_deit_distilled", hf("DeiTConfig", "DeiTModel", **HF_VIT), "deit_tiny_distilled_patch16_224", VIT,
         hidden, tokens),
    Pair("hf_dinov2", hf("Dinov2Config", "Dinov2Model", mlp_ratio=2, **HF_VIT), "vit_small_patch14_dinov2",
         dict(VIT, init_values=1.0), hidden, tokens),
    Pair("hf_clip_vision", hf("CLIPVisionConfig", "CLIPVisionModel", **HF_VIT), "vit_base_patch16_clip_224",
         dict(VIT, pre_norm=True, act_layer="quick_gelu", global_pool="token"),
         lambda m, x: m(pixel_values=x).pooler_output, pooled),
    Pair("hf_convnext", hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[8, 16, 32, 48], depths=[1, 1, 2, 1]),
         "convnext_tiny", CONVNEXT_T, hf_pooled, pooled, input_shape=(2, 3, 64, 64)),
    Pair("hf_convnextv2", hf("ConvNextV2Config", "ConvNextV2Model", hidden_sizes=[8, 16, 32, 48],
                             depths=[1, 1, 2, 1]), "convnextv2_tiny", CONVNEXT_T, hf_pooled, pooled,
         input_shape=(2, 3, 64, 64)),
    Pair("hf_regnet_y", hf("RegNetConfig", "RegNetModel", embedding_size=32, hidden_sizes=[24, 56, 152, 368],
                           depths=[1, 1, 4, 7], groups_width=8, layer_type="y"), "regnety_002", dict(num_classes=0),
         hf_pooled, pooled, input_shape=(2, 3, 64, 64)),
    Pair("tv_swin_t", tv("swin_t", num_classes=5), "swin_tiny_patch4_window7_224", dict(num_classes=0),
         lambda m, x: m.flatten(m.avgpool(m.permute(m.norm(m.features(x))))), pooled, input_shape=(1, 3, 224, 224)),
    Pair("tv_efficientnet_b0", tv("efficientnet_b0", num_classes=5), "efficientnet_b0", dict(num_classes=0),
         tv_features_pooled, pooled, input_shape=(2, 3, 64, 64)),
    Pair("tv_regnet_y_400mf", tv("regnet_y_400mf", num_classes=5), "regnety_004", dict(num_classes=0),
         lambda m, x: m.avgpool(m.trunk_output(m.stem(x))).flatten(1), pooled, input_shape=(2, 3, 64, 64)),
    Pair("tv_mobilenet_v2", tv("mobilenet_v2", num_classes=5), "mobilenetv2_100", dict(num_classes=0),
         tv_features_pooled, pooled, input_shape=(2, 3, 64, 64)),
    Pair("tv_resnet50", tv("resnet50", num_classes=5), "resnet50", dict(num_classes=5), logits, logits,
         input_shape=(2, 3, 64, 64)),
    Pair("tv_convnext_tiny_pth", tv("convnext_tiny", num_classes=5), "convnext_tiny", dict(num_classes=0),
         tv_convnext_pooled, pooled, input_shape=(1, 3, 64, 64), fmt="pth"),
    Pair("hf_vit_classifier", hf("ViTConfig", "ViTForImageClassification", num_labels=10, **HF_VIT),
         "vit_base_patch16_224", dict(VIT, num_classes=10), hf_logits, logits),
    Pair("hf_deit_with_teacher", hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", num_labels=10, **HF_VIT),
         "deit_tiny_distilled_patch16_224", dict(VIT, num_classes=10), hf_logits, logits),
    Pair("hf_convnext_classifier", hf("ConvNextConfig", "ConvNextForImageClassification", num_labels=7,
                                      hidden_sizes=[8, 16, 32, 48], depths=[1, 1, 2, 1]),
         "convnext_tiny", dict(CONVNEXT_T, num_classes=7), hf_logits, logits, input_shape=(2, 3, 64, 64)),
    Pair("hf_resnet_classifier", hf("ResNetConfig", "ResNetForImageClassification", num_labels=7, embedding_size=64,
                                    hidden_sizes=[256, 512, 1024, 2048], depths=[1, 1, 1, 1], layer_type="bottleneck"),
         "resnet50", dict(layers=[1, 1, 1, 1], num_classes=7), hf_logits, logits, input_shape=(2, 3, 64, 64)),
    Pair("hf_swin_classifier", hf("SwinConfig", "SwinForImageClassification", num_labels=7, image_size=224,
                                  embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=7),
         "swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=7,
                                              num_classes=7), hf_logits, logits, input_shape=(1, 3, 224, 224)),
    Pair("ema_training_dict", timm_source("resnet18", layers=[1, 1, 1, 1], num_classes=3), "resnet18",
         dict(layers=[1, 1, 1, 1], num_classes=3), logits, logits, input_shape=(2, 3, 64, 64), fmt="pth",
         wrap=ema_wrap),
]


# --- issue 10: parts that differ, uneven splits, one tower of a multi-tower checkpoint ---------------------------

HF_BEIT = dict(HF_VIT, use_relative_position_bias=True, use_absolute_position_embeddings=False,
               use_mean_pooling=True, layer_scale_init_value=0.1, layer_norm_eps=1e-6)
BEIT = dict(VIT)

def hf_data2vec_vision() -> nn.Module:
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    return Data2VecVisionModel(Data2VecVisionConfig(**HF_BEIT), add_pooling_layer=True)


ISSUE10_PAIRS = [
    # q and v carry a bias, k does not: the weights fuse into qkv, the biases pair with q_bias / v_bias by name
    Pair("hf_beit", hf("BeitConfig", "BeitModel", **HF_BEIT), "beit_base_patch16_224", BEIT, hf_pooled, pooled),
    Pair("hf_data2vec_vision", hf_data2vec_vision, "beit_base_patch16_224", BEIT, hf_pooled, pooled),
    Pair("hf_swinv2", hf("Swinv2Config", "Swinv2Model", image_size=64, patch_size=4, embed_dim=16, depths=[1, 2],
                         num_heads=[1, 2], window_size=4), "swinv2_tiny_window8_256",
         dict(img_size=64, patch_size=4, embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=4, num_classes=0),
         hf_pooled, pooled, input_shape=(2, 3, 64, 64)),
    # the attention-pooling head's in_proj [3D, D] splits unevenly into timm's q [D, D] and kv [2D, D]
    Pair("hf_siglip_map_head", hf("SiglipVisionConfig", "SiglipVisionModel", layer_norm_eps=1e-6, **HF_VIT),
         "vit_base_patch16_siglip_224", dict(VIT, global_pool="map", act_layer="gelu_tanh"), hf_pooled, pooled),
]


# --- a source whose names give no hint of the roles (for verification's repair) --------------------------------

class _PlainBlock(nn.Module):
    """A pre-norm transformer block whose two norms are named ``ln_a``/``ln_b``: ``ln_b`` runs first, so the
    names' alphabetical order (a sorted safetensors file's order) is the reverse of the run order."""

    def __init__(self, dim: int, heads: int, hidden: int, act: type[nn.Module]) -> None:
        from timm.layers import Mlp
        from timm.models.vision_transformer import Attention

        super().__init__()
        self.ln_a = nn.LayerNorm(dim, eps=1e-6)
        self.ln_b = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, heads, qkv_bias=True)
        self.ffn = Mlp(dim, hidden, act_layer=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_b(x))
        return x + self.ffn(self.ln_a(x))


class PlainViT(nn.Module):
    """timm's ``vit_base_patch16_224`` (``VIT``'s arguments, or others) under other names; ``act="relu"`` makes it
    compute another function from the same tensors."""

    def __init__(self, act: str = "gelu", **kwargs: Any) -> None:
        super().__init__()
        cfg = {**VIT, **kwargs}
        dim, patch, grid = cfg["embed_dim"], cfg["patch_size"], cfg["img_size"] // cfg["patch_size"]
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        act_layer = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
        self.layer = nn.ModuleList(_PlainBlock(dim, cfg["num_heads"], int(dim * cfg["mlp_ratio"]), act_layer)
                                   for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.layer:
            x = block(x)
        return self.norm(x)


def plain_vit(act: str = "gelu", **kwargs: Any) -> nn.Module:
    """The ``package.module:callable`` for ``--source pairs:plain_vit`` (``-s depth=12`` and so on)."""
    return PlainViT(act, **kwargs)


# --- issue 10: architectures the engine was never tuned for -------------------------------------------------------
# Each pair's reference (``reference``: the correct converted tensors) is proven in tests/test_corpus.py. Negative
# pairs (a depth mismatch) have no complete correct mapping: they must end unresolved, every applied entry right.

def hf_with_pooler(config: str, model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kwargs), add_pooling_layer=True)

    return build


def open_clip_whole() -> nn.Module:
    from open_clip.model import CLIP

    return CLIP(16, dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2.0),
                dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1))


def torchvision_resnet(name: str) -> Callable[[], nn.Module]:
    return tv(name, num_classes=6)


def _refs() -> Any:
    import reference

    return reference


def ref(name: str) -> Callable[[Pair, nn.Module, nn.Module], dict[str, torch.Tensor]]:
    """A reference function of tests/reference.py by name (imported late: reference.py imports this module)."""
    return lambda pair, src, dst: getattr(_refs(), name)(pair, src, dst)


HF_BEIT = dict(HF_VIT, use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
               layer_norm_eps=1e-6)
BEIT = dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, img_size=32, patch_size=8, num_classes=0)
SIGLIP = dict(VIT, global_pool="map")
VIT4 = dict(VIT, depth=4)
RESNET = dict(num_classes=6)

UNSEEN_PAIRS = [
    # heterogeneous blocks: a depthwise-separable first block, then inverted residuals with squeeze-excite;
    # transformers pads the TF way, which timm's efficientnet_b0 does with pad_type='same'
    Pair("hf_efficientnet_b0", hf("EfficientNetConfig", "EfficientNetModel", width_coefficient=1.0,
                                  depth_coefficient=1.0, hidden_dim=1280, image_size=64, batch_norm_eps=1e-5),
         "efficientnet_b0", dict(num_classes=0, pad_type="same"), hidden, tokens, input_shape=(2, 3, 64, 64)),
    # flat layer.{0..15} into nested blocks.{S}.{B}; the stem's 3x3 depthwise + 1x1 are the target's blocks.0.0
    Pair("hf_mobilenet_v2", hf("MobileNetV2Config", "MobileNetV2Model", tf_padding=False, layer_norm_eps=1e-5,
                               image_size=64), "mobilenetv2_100", dict(num_classes=0), hidden, tokens,
         input_shape=(2, 3, 64, 64)),
    Pair("hf_mobilenet_v1", hf("MobileNetV1Config", "MobileNetV1Model", tf_padding=False, layer_norm_eps=1e-5,
                               image_size=64), "mobilenetv1_100", dict(num_classes=0), hidden, tokens,
         input_shape=(2, 3, 64, 64)),
    # partial biases beside a fused weight: q_bias and v_bias, no k bias, one qkv.weight
    Pair("hf_beit", hf_with_pooler("BeitConfig", "BeitModel", **HF_BEIT), "beit_base_patch16_224", BEIT, hf_pooled,
         pooled, reference=ref("beit")),
    Pair("hf_data2vec_vision", hf_with_pooler("Data2VecVisionConfig", "Data2VecVisionModel", **HF_BEIT),
         "beit_base_patch16_224", BEIT, hf_pooled, pooled, reference=ref("data2vec_vision")),
    # an uneven split: the pooling head's in_proj [3D, D] is q [D] + kv [2D]
    Pair("hf_siglip_map", hf("SiglipVisionConfig", "SiglipVisionModel", hidden_act="gelu", **HF_VIT),
         "vit_base_patch16_siglip_224", SIGLIP, hf_pooled, pooled, reference=ref("siglip")),
    # separate key/value into kv, spatial-reduction attention, a depthwise conv inside the MLP
    Pair("hf_pvt_v2", hf("PvtV2Config", "PvtV2Model", hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1],
                         num_attention_heads=[1, 2, 2, 4], image_size=64), "pvt_v2_b0",
         dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), num_classes=0), hidden,
         tokens, input_shape=(2, 3, 64, 64), reference=ref("pvt_v2")),
    # one tower of a whole two-tower checkpoint; visual.proj [width, out] is head.weight transposed, head.bias zero
    Pair("openclip_whole_clip", open_clip_whole, "vit_base_patch16_clip_224",
         dict(VIT, pre_norm=True, global_pool="token", num_classes=16), lambda m, x: m.encode_image(x), logits,
         reference=ref("open_clip_image_tower")),
    # depth mismatches both ways: no complete correct mapping; blocks of equal index are the shared part
    Pair("timm_vit_depth4_as_2", timm_source("vit_base_patch16_224", **VIT4), "vit_base_patch16_224", VIT, tokens,
         tokens, negative=True, reference=ref("shared")),
    Pair("timm_vit_depth2_as_4", timm_source("vit_base_patch16_224", **VIT), "vit_base_patch16_224", VIT4, tokens,
         tokens, negative=True, reference=ref("shared")),
    Pair("tv_resnet34_as_18", torchvision_resnet("resnet34"), "resnet18", RESNET, logits, logits,
         input_shape=(2, 3, 64, 64), negative=True, reference=ref("shared")),
    Pair("timm_resnet18_as_34", timm_source("resnet18", **RESNET), "resnet34", RESNET, logits, logits,
         input_shape=(2, 3, 64, 64), negative=True, reference=ref("shared")),
]

UNSEEN_PAIRS.append(
    # Swin V2: partial biases beside a fused weight again, and the patch merging moves to the next stage
    Pair("hf_swinv2", hf("Swinv2Config", "Swinv2Model", image_size=64, patch_size=4, embed_dim=16, depths=[1, 2],
                         num_heads=[1, 2], window_size=4), "swinv2_tiny_window8_256",
         dict(img_size=64, embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=4, num_classes=0), hf_pooled,
         pooled, input_shape=(2, 3, 64, 64), reference=ref("swinv2")),
)
