"""Real pairs beyond vision classifiers (issue 11): segmentation, diffusion, audio codecs and vocoders.

Each source is built from its library's own code (or, for research code no package ships, a faithful test module:
``ldm_vae.py``, ``ldm_unet.py``, ``hifigan.py``, ``segformer_mit.py``), with every tensor random, and saved the way
that library saves it. Each reference (the correct converted tensors) is written from the known conversion, without
keydiff, and proven by outputs in tests/test_pairs_media.py. The issue 11 classes a pair exercises are in its tags.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from pairs import Pair, logits
from reference import Reference, renamed

# --- diffusion: the original LDM / Stable Diffusion autoencoder -> diffusers AutoencoderKL ----------------------

DIFFUSERS_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                     latent_channels=4, norm_num_groups=32, sample_size=16)


def ldm_vae() -> nn.Module:
    from ldm_vae import tiny_vae

    return tiny_vae()


def save_ldm_ckpt(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As a CompVis training run saves it: Lightning's ``.ckpt`` with the weights under ``state_dict``."""
    path = directory / "vae.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 840000}, path)
    return path


def ldm_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def diffusers_vae_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x, sample_posterior=False).sample


def ldm_vae_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """diffusers' single-file conversion facts: ``down.{i}.block.{j}`` -> ``down_blocks.{i}.resnets.{j}``; the
    decoder's ``up.{i}`` is ``up_blocks.{n-1-i}`` (built in reverse, then prepended); ``mid.block_{1,2}`` ->
    ``mid_block.resnets.{0,1}``; ``nin_shortcut`` -> ``conv_shortcut``; the mid attention's 1x1 convolutions
    ``q/k/v/proj_out`` [C, C, 1, 1] are the Linear ``to_q/to_k/to_v/to_out.0`` [C, C]."""
    sd = src.state_dict()
    n = len(src.decoder.up)
    ref = {}
    for key, value in sd.items():
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
        k = re.sub(r"\.down\.(\d+)\.block\.(\d+)\.", r".down_blocks.\1.resnets.\2.", k)
        k = re.sub(r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"\.up\.(\d+)\.block\.", lambda m: f".up_blocks.{n - 1 - int(m.group(1))}.resnets.", k)
        k = re.sub(r"\.up\.(\d+)\.upsample\.", lambda m: f".up_blocks.{n - 1 - int(m.group(1))}.upsamplers.0.", k)
        k = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k)
        k = k.replace(".nin_shortcut.", ".conv_shortcut.")
        k = k.replace(".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm.")
        m = re.fullmatch(r"(.+)\.mid\.attn_1\.(q|k|v|proj_out)\.(weight|bias)", k)
        if m:
            name = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[m.group(2)]
            k = f"{m.group(1)}.mid_block.attentions.0.{name}.{m.group(3)}"
            value = value.flatten(1) if m.group(3) == "weight" else value  # 1x1 conv -> Linear
        ref[k] = value
    return ref


LDM_VAE = Pair("ldm_vae_to_diffusers", ldm_vae, "diffusers:AutoencoderKL", DIFFUSERS_VAE, ldm_out, diffusers_vae_out,
               input_shape=(1, 3, 16, 16), save=save_ldm_ckpt, reference=ldm_vae_reference,
               tags=("diffusion", "class5", "class6"))

PAIRS: list[Pair] = [LDM_VAE]


# --- segmentation: segment-anything SAM -> transformers SamModel ---------------------------------------------------

SAM_D, SAM_PATCH, SAM_IMG = 32, 8, 64
HF_SAM = dict(vision_config=dict(hidden_size=SAM_D, output_channels=SAM_D, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=SAM_IMG, patch_size=SAM_PATCH, window_size=4, global_attn_indexes=[1],
                                 mlp_dim=2 * SAM_D, num_pos_feats=SAM_D // 2),
              prompt_encoder_config=dict(hidden_size=SAM_D, image_size=SAM_IMG, patch_size=SAM_PATCH,
                                         mask_input_channels=4),
              mask_decoder_config=dict(hidden_size=SAM_D, mlp_dim=2 * SAM_D, num_attention_heads=2,
                                       iou_head_hidden_dim=SAM_D))


def sam() -> nn.Module:
    """``segment_anything.build_sam._build_sam`` at test size (image 64, patch 8, width 32, a windowed block and a
    global one, two-way transformer of depth 2)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = SAM_IMG // SAM_PATCH
    return Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=SAM_D, img_size=SAM_IMG, mlp_ratio=2,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=SAM_PATCH,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=4,
                                      out_chans=SAM_D),
        prompt_encoder=PromptEncoder(embed_dim=SAM_D, image_embedding_size=(grid, grid),
                                     input_image_size=(SAM_IMG, SAM_IMG), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=SAM_D, mlp_dim=2 * SAM_D, num_heads=2), transformer_dim=SAM_D, iou_head_depth=3,
            iou_head_hidden_dim=SAM_D),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def save_sam_pth(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As Meta released ``sam_vit_b_01ec64.pth``: a plain state dict, ``torch.save``."""
    path = directory / "sam_vit_t.pth"
    torch.save(sd, path)
    return path


def _prompts(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two points (foreground, background), one box and a low-resolution mask, fixed for every run."""
    g = torch.Generator().manual_seed(3)
    points = torch.rand(1, 2, 2, generator=g) * SAM_IMG
    labels = torch.tensor([[1, 0]])
    box = torch.tensor([[8.0, 12.0, 40.0, 52.0]])
    mask = torch.randn(1, 1, 4 * SAM_IMG // SAM_PATCH, 4 * SAM_IMG // SAM_PATCH, generator=g)
    return points, labels, box, mask


def sam_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Low-resolution mask logits and IoU scores of the three masks (the image as given: no resizing)."""
    points, labels, box, mask = _prompts(x)
    emb = m.image_encoder(x)
    sparse, dense = m.prompt_encoder(points=(points, labels), boxes=box, masks=mask)
    masks, iou = m.mask_decoder(image_embeddings=emb, image_pe=m.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=True)
    return torch.cat([masks.flatten(), iou.flatten()])


def hf_sam_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    points, labels, box, mask = _prompts(x)
    out = m(pixel_values=x, input_points=points[:, None], input_labels=labels[:, None], input_boxes=box[:, None],
            input_masks=mask, multimask_output=True)
    return torch.cat([out.pred_masks.flatten(), out.iou_scores.flatten()])


_SAM_RULES = [
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^image_encoder\.", "vision_encoder."),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^prompt_encoder\.pe_layer\.", None),  # two targets: below
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    # the three-layer MLPs: layers.{0,1,2} are proj_in, layers.0, proj_out (layers.0 on both sides, other meanings)
    (r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.0\.", r"\1.proj_in."),
    (r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.1\.", r"\1.layers.0."),
    (r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.2\.", r"\1.proj_out."),
    (r"^(prompt_encoder|mask_decoder)\.", r"\1."),
]


def sam_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers' SAM conversion facts: renamed modules (``neck.{0..3}``, ``mask_downscaling.{0,1,3,4,6}``,
    ``output_upscaling.{0,1,3}``), the MLP heads' ``layers.{0,1,2}`` -> ``proj_in, layers.0, proj_out``, and the
    prompt encoder's random Fourier matrix is the model's ``shared_image_embedding``, which the target's prompt
    encoder shares (one tensor, two keys)."""
    sd = src.state_dict()
    ref = renamed(sd, _SAM_RULES)
    gauss = sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    shapes = dst.state_dict()
    for key in ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding"):
        if key in shapes:
            ref[key] = gauss
    return {k: v for k, v in ref.items() if k in shapes}


SAM = Pair("sam_to_transformers", sam, "transformers:SamModel", HF_SAM, sam_out, hf_sam_out,
           input_shape=(1, 3, SAM_IMG, SAM_IMG), save=save_sam_pth, reference=sam_reference,
           tags=("segmentation", "class1", "class4"))

PAIRS.append(SAM)


# --- audio codec: encodec -> transformers EncodecModel ---------------------------------------------------------------

# 800 Hz and a hop of 8 give 100 frames a second, so bandwidths of 1 and 2 kbps use one and two codebooks of 1024.
HF_ENCODEC = dict(sampling_rate=800, target_bandwidths=[1.0, 2.0], hidden_size=16, num_filters=4,
                  num_residual_layers=1, upsampling_ratios=[4, 2], codebook_size=1024, codebook_dim=16,
                  num_lstm_layers=2, norm_type="weight_norm", use_causal_conv=True)


def encodec_model() -> nn.Module:
    """``encodec.EncodecModel._get_model`` at test size: SEANet encoder and decoder with weight-normalised causal
    convolutions (``torch.nn.utils.weight_norm``: ``weight_g``/``weight_v``), two LSTM layers, two codebooks."""
    from encodec import EncodecModel
    from encodec.modules import SEANetDecoder, SEANetEncoder
    from encodec.quantization import ResidualVectorQuantizer

    seanet = dict(channels=1, dimension=16, n_filters=4, n_residual_layers=1, ratios=[4, 2], lstm=2,
                  norm="weight_norm", causal=True)
    model = EncodecModel(SEANetEncoder(**seanet), SEANetDecoder(**seanet),
                         ResidualVectorQuantizer(dimension=16, n_q=2, bins=1024), [1.0, 2.0], 800, 1)
    model.set_target_bandwidth(2.0)
    return model


def save_encodec_th(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As facebookresearch/encodec publishes ``encodec_24khz-d7cc33bc.th``: a plain state dict, ``torch.save``."""
    path = directory / "encodec_tiny.th"
    torch.save(sd, path)
    return path


def encodec_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder's embeddings and the audio decoded from the codes at 2 kbps (the codes themselves, integers up to
    1023, would dwarf the rest in the relative difference)."""
    emb = m.encoder(x)
    codes = m.quantizer.encode(emb, m.frame_rate, 2.0)
    return torch.cat([emb.flatten(), m.decoder(m.quantizer.decode(codes)).flatten()])


def hf_encodec_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    emb = m.encoder(x)
    codes = m.quantizer.encode(emb, 2.0)
    return torch.cat([emb.flatten(), m.decoder(m.quantizer.decode(codes)).flatten()])


def encodec_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers' encodec conversion facts: ``model.N`` -> ``layers.N``; the doubled wrappers ``conv.conv`` and
    ``convtr.convtr`` -> ``conv``; legacy weight norm ``weight_g``/``weight_v`` -> the parametrisation's
    ``original0``/``original1`` (same dim 0, same shapes); ``quantizer.vq.layers.N._codebook`` ->
    ``quantizer.layers.N.codebook``."""
    return renamed(src.state_dict(), [
        (r"^(encoder|decoder)\.model\.(\d+)\.(conv\.conv|convtr\.convtr)\.weight_g$",
         r"\1.layers.\2.conv.parametrizations.weight.original0"),
        (r"^(encoder|decoder)\.model\.(\d+)\.(conv\.conv|convtr\.convtr)\.weight_v$",
         r"\1.layers.\2.conv.parametrizations.weight.original1"),
        (r"^(encoder|decoder)\.model\.(\d+)\.(conv\.conv|convtr\.convtr)\.bias$", r"\1.layers.\2.conv.bias"),
        (r"^(encoder|decoder)\.model\.(\d+)\.(block\.\d+|shortcut)\.conv\.conv\.weight_g$",
         r"\1.layers.\2.\3.conv.parametrizations.weight.original0"),
        (r"^(encoder|decoder)\.model\.(\d+)\.(block\.\d+|shortcut)\.conv\.conv\.weight_v$",
         r"\1.layers.\2.\3.conv.parametrizations.weight.original1"),
        (r"^(encoder|decoder)\.model\.(\d+)\.(block\.\d+|shortcut)\.conv\.conv\.bias$", r"\1.layers.\2.\3.conv.bias"),
        (r"^(encoder|decoder)\.model\.(\d+)\.lstm\.", r"\1.layers.\2.lstm."),
        (r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.codebook."),
    ])


ENCODEC = Pair("encodec_to_transformers", encodec_model, "transformers:EncodecModel", HF_ENCODEC, encodec_out,
               hf_encodec_out, input_shape=(1, 1, 160), save=save_encodec_th, reference=encodec_reference,
               tags=("audio codec", "class2"))

PAIRS.append(ENCODEC)


# --- vocoder: a HiFi-GAN training checkpoint (weight norm) -> the inference generator (plain weights) ---------------

def hifigan_training() -> nn.Module:
    from hifigan import training_generator

    return training_generator()


def save_hifigan_generator(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As jik876/hifi-gan's train.py saves it: ``{'generator': state_dict}`` to ``g_NNNNNNNN``, no suffix."""
    path = directory / "g_02500000"
    torch.save({"generator": sd}, path)
    return path


def weight_normed(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``weight = g * v / ||v||``, the norm over every dim but 0 (``torch.nn.utils.weight_norm``'s default dim), as
    torch's own kernel computes it (what ``remove_weight_norm`` gives; the formula written out differs in the last
    bits)."""
    out = torch._weight_norm(v, g, 0)
    assert torch.allclose(out, g * v / v.flatten(1).norm(dim=1).reshape(g.shape), atol=1e-6)
    return out


def hifigan_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """Same names; each ``weight_g``/``weight_v`` pair becomes one ``weight`` (what ``remove_weight_norm`` does)."""
    sd = src.state_dict()
    ref = {k: v for k, v in sd.items() if not k.endswith(("weight_g", "weight_v"))}
    for key in sd:
        if key.endswith(".weight_g"):
            stem = key[: -len("_g")]
            ref[stem] = weighted = weight_normed(sd[key], sd[stem + "_v"])
            assert weighted.shape == sd[stem + "_v"].shape
    return ref


HIFIGAN = Pair("hifigan_weight_norm_removed", hifigan_training, "hifigan:inference_generator", {}, logits, logits,
               input_shape=(1, 80, 12), save=save_hifigan_generator, reference=hifigan_reference,
               tags=("vocoder", "class2"))

PAIRS.append(HIFIGAN)


# --- segmentation: the whole SAM checkpoint -> transformers SamVisionModel (the image encoder alone) ----------------

def sam_image_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.image_encoder(x)


def hf_sam_vision_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(pixel_values=x).last_hidden_state


# The prompt encoder and the mask decoder have no counterpart: dropped whole, they must feed no kept target.
SAM_VISION = Pair("sam_image_encoder_only", sam, "transformers:SamVisionModel", HF_SAM["vision_config"], sam_image_out,
                  hf_sam_vision_out, input_shape=(1, 3, SAM_IMG, SAM_IMG), save=save_sam_pth,
                  reference=sam_reference, tags=("segmentation", "class8"))

PAIRS.append(SAM_VISION)


# --- diffusion: a diffusers checkpoint written before 0.14 (legacy attention names) -> diffusers today -------------

def diffusers_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**DIFFUSERS_VAE)


def save_legacy_diffusers(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As diffusers before 0.14 saved a VAE: ``diffusion_pytorch_model.bin`` (``torch.save``), the mid-block
    attention's Linear layers named ``query/key/value/proj_attn`` (what ``_convert_deprecated_attention_blocks``
    in diffusers' ``modeling_utils.py`` renames on load)."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(.+\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
        out[f"{m.group(1)}.{legacy[m.group(2)]}.{m.group(3)}" if m else key] = value
    path = directory / "diffusion_pytorch_model.bin"
    torch.save(out, path)
    return path


def same_names(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The source model is the target's class: every tensor under its own name is the truth."""
    return dict(src.state_dict())


DIFFUSERS_LEGACY_ATTENTION = Pair(
    "diffusers_legacy_attention_names", diffusers_vae, "diffusers:AutoencoderKL", DIFFUSERS_VAE, diffusers_vae_out,
    diffusers_vae_out, input_shape=(1, 3, 16, 16), save=save_legacy_diffusers, reference=same_names,
    tags=("diffusion", "renames"))

PAIRS.append(DIFFUSERS_LEGACY_ATTENTION)


# --- segmentation: the original SegFormer (mmseg) -> transformers SegformerForSemanticSegmentation -----------------

HF_SEGFORMER = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 3, 4],
                    decoder_hidden_size=16, num_labels=5)


def segformer() -> nn.Module:
    from segformer_mit import segformer_b0_tiny

    return segformer_b0_tiny()


def save_mmseg_pth(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As mmcv's ``save_checkpoint`` writes ``segformer.b0.512x512.ade.160k.pth``: ``meta``, ``state_dict`` and the
    optimizer's state."""
    path = directory / "segformer.b0.tiny.ade.pth"
    meta = {"mmseg_version": "0.11.0+", "CLASSES": ("wall", "building", "sky", "floor", "tree"), "iter": 160000}
    torch.save({"meta": meta, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def hf_segmentation_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(pixel_values=x).logits


def segformer_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers' SegFormer conversion facts (stage names as transformers 5 spells them): the original's
    1-based ``patch_embed{s}``, ``block{s}``, ``norm{s}``, ``linear_c{s}`` are the 0-based ``stages.{s-1}`` and
    ``linear_projections.{s-1}``; the fused ``kv`` [2C, C] splits into ``k_proj`` (first C rows) and ``v_proj``;
    ``linear_fuse.conv``/``linear_fuse.bn`` are ``linear_fuse``/``batch_norm``, ``linear_pred`` the ``classifier``.
    mmseg's ``conv_seg`` (built by ``BaseDecodeHead``, never called by this head) has no counterpart."""
    sd = src.state_dict()
    shift = lambda m: f"segformer.stages.{int(m.group(1)) - 1}."  # noqa: E731
    ref = {}
    for key, value in sd.items():
        k = re.sub(r"^backbone\.patch_embed(\d)\.norm\.", lambda m: shift(m) + "patch_embeddings.layer_norm.", key)
        k = re.sub(r"^backbone\.patch_embed(\d)\.", lambda m: shift(m) + "patch_embeddings.", k)
        k = re.sub(r"^backbone\.norm(\d)\.", lambda m: shift(m) + "layer_norm.", k)
        k = re.sub(r"^backbone\.block(\d)\.", lambda m: shift(m) + "blocks.", k)
        k = re.sub(r"\.norm1\.", ".layernorm_before.", k)
        k = re.sub(r"\.norm2\.", ".layernorm_after.", k)
        k = re.sub(r"\.attn\.q\.", ".attention.q_proj.", k)
        k = re.sub(r"\.attn\.proj\.", ".attention.o_proj.", k)
        k = re.sub(r"\.attn\.sr\.", ".attention.sequence_reduction.sequence_reduction.", k)
        k = re.sub(r"\.attn\.norm\.", ".attention.sequence_reduction.layer_norm.", k)
        k = re.sub(r"^decode_head\.linear_c(\d)\.", lambda m: f"decode_head.linear_projections.{int(m.group(1)) - 1}.",
                   k)
        k = k.replace("decode_head.linear_fuse.conv.", "decode_head.linear_fuse.")
        k = k.replace("decode_head.linear_fuse.bn.", "decode_head.batch_norm.")
        k = k.replace("decode_head.linear_pred.", "decode_head.classifier.")
        if k.startswith("decode_head.conv_seg."):
            continue
        m = re.fullmatch(r"(.+)\.attn\.kv\.(weight|bias)", k)
        if m:
            half = value.shape[0] // 2
            ref[f"{m.group(1)}.attention.k_proj.{m.group(2)}"] = value[:half]
            ref[f"{m.group(1)}.attention.v_proj.{m.group(2)}"] = value[half:]
            continue
        ref[k] = value
    return ref


SEGFORMER = Pair("segformer_mmseg_to_transformers", segformer, "transformers:SegformerForSemanticSegmentation",
                 HF_SEGFORMER, logits, hf_segmentation_logits, input_shape=(1, 3, 64, 64), save=save_mmseg_pth,
                 reference=segformer_reference, tags=("segmentation", "class5", "class7"))

PAIRS.append(SEGFORMER)


# --- segmentation: SAM 2 (image and video) -> transformers Sam2Model (images only) ----------------------------------

SAM2_D = 32
# sam2.1_hiera_t.yaml at test size (image 64, Hiera stages of 1, 2, 1, 1 blocks, a global one inside stage 2,
# width 32), with build_sam2's post-processing overrides; the mask decoder's 8 heads, MLP 2048 and IoU head 256 are
# fixed in SAM2Base.
SAM2_OVERRIDES = [
    "++model.image_size=64", "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.stages=[1,2,1,1]", "++model.image_encoder.trunk.global_att_blocks=[2]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,2]", f"++model.image_encoder.neck.d_model={SAM2_D}",
    f"++model.image_encoder.neck.position_encoding.num_pos_feats={SAM2_D}",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    f"++model.memory_attention.d_model={SAM2_D}", f"++model.memory_attention.layer.d_model={SAM2_D}",
    "++model.memory_attention.layer.dim_feedforward=64", "++model.memory_attention.num_layers=1",
    f"++model.memory_attention.layer.self_attention.embedding_dim={SAM2_D}",
    "++model.memory_attention.layer.self_attention.feat_sizes=[4,4]",
    f"++model.memory_attention.layer.cross_attention.embedding_dim={SAM2_D}",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[4,4]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16", "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.position_encoding.num_pos_feats=16", f"++model.memory_encoder.fuser.layer.dim={SAM2_D}",
    "++model.memory_encoder.fuser.num_layers=1", "++model.num_maskmem=2",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
]
HF_SAM2 = dict(
    vision_config=dict(
        backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1,
                             image_size=[64, 64], window_positional_embedding_background_size=[4, 4],
                             blocks_per_stage=[1, 2, 1, 1], embed_dim_per_stage=[8, 16, 32, 64],
                             num_attention_heads_per_stage=[1, 2, 4, 8], window_size_per_stage=[4, 4, 4, 2],
                             global_attention_blocks=[2]),
        backbone_channel_list=[64, 32, 16, 8], backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=SAM2_D),
    prompt_encoder_config=dict(hidden_size=SAM2_D, image_size=64, patch_size=16, mask_input_channels=16),
    mask_decoder_config=dict(hidden_size=SAM2_D, mlp_dim=2048, num_attention_heads=8, iou_head_hidden_dim=256))


def sam2() -> nn.Module:
    """``sam2.build_sam.build_sam2`` on ``sam2.1_hiera_t.yaml`` (hydra), at test size: image encoder, SAM heads,
    memory attention, memory encoder and object pointers."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module("sam2", version_base="1.2"):
        cfg = compose(config_name="configs/sam2.1/sam2.1_hiera_t.yaml", overrides=SAM2_OVERRIDES)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


def save_sam2_pt(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As Meta released ``sam2.1_hiera_tiny.pt``: ``{"model": state_dict}``, ``torch.save``."""
    path = directory / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sd}, path)
    return path


def sam2_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``SAM2ImagePredictor.set_image`` then ``predict`` with two points and three masks, on the image as given."""
    points, labels, _, _ = _prompts(x)
    _, feats, _, sizes = m._prepare_backbone_features(m.forward_image(x))
    feats[-1] = feats[-1] + m.no_mem_embed  # directly_add_no_mem_embed, as the image predictor does
    maps = [f.permute(1, 2, 0).view(1, -1, *s) for f, s in zip(feats, sizes, strict=True)]
    sparse, dense = m.sam_prompt_encoder(points=(points, labels), boxes=None, masks=None)
    masks, iou, _, _ = m.sam_mask_decoder(image_embeddings=maps[-1], image_pe=m.sam_prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=True, repeat_image=False, high_res_features=maps[:-1])
    return torch.cat([masks.flatten(), iou.flatten()])


def hf_sam2_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    points, labels, _, _ = _prompts(x)
    out = m(pixel_values=x, input_points=points[:, None], input_labels=labels[:, None], multimask_output=True)
    return torch.cat([out.pred_masks.flatten(), out.iou_scores.flatten()])


_SAM2_MLP = r"^sam_mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)"
_SAM2_LAYER = r"^sam_mask_decoder\.transformer\.layers\.(\d+)\."
_SAM2_RULES = [
    (r"^no_mem_embed$", "no_memory_embedding"),
    (r"^image_encoder\.trunk\.patch_embed\.proj\.", "vision_encoder.backbone.patch_embed.projection."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.backbone.blocks.\1.layer_norm\2."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.0\.", r"vision_encoder.backbone.blocks.\1.mlp.proj_in."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.1\.", r"vision_encoder.backbone.blocks.\1.mlp.proj_out."),
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^sam_prompt_encoder\.(no_mask_embed|not_a_point_embed)\.", r"prompt_encoder.\1."),
    (_SAM2_LAYER + r"norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (_SAM2_LAYER + r"mlp\.layers\.0\.", r"mask_decoder.transformer.layers.\1.mlp.proj_in."),
    (_SAM2_LAYER + r"mlp\.layers\.1\.", r"mask_decoder.transformer.layers.\1.mlp.proj_out."),
    (r"^sam_mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^sam_mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^sam_mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^sam_mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (_SAM2_MLP + r"\.layers\.0\.", r"mask_decoder.\1.proj_in."),
    (_SAM2_MLP + r"\.layers\.1\.", r"mask_decoder.\1.layers.0."),
    (_SAM2_MLP + r"\.layers\.2\.", r"mask_decoder.\1.proj_out."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
]


def sam2_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers' SAM 2 conversion facts: SAM's renames (``mask_downscaling``, ``output_upscaling``, the MLP
    heads' ``layers.{0,1,2}`` -> ``proj_in, layers.0, proj_out``), ``out_proj`` -> ``o_proj``, the four
    ``point_embeddings.{0..3}.weight`` [1, D] stacked into ``point_embed.weight`` [4, D], the Fourier matrix shared
    by ``shared_image_embedding`` and the prompt encoder; the memory attention, memory encoder and object-pointer
    modules (video tracking) have no counterpart in the image model and are left out whole."""
    sd = src.state_dict()
    ref = {re.sub(r"\.out_proj\.", ".o_proj.", k): v for k, v in renamed(sd, _SAM2_RULES).items()}
    ref["prompt_encoder.point_embed.weight"] = torch.cat(
        [sd[f"sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)])
    gauss = sd["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    ref["shared_image_embedding.positional_embedding"] = gauss
    ref["prompt_encoder.shared_embedding.positional_embedding"] = gauss
    shapes = dst.state_dict()
    return {k: v for k, v in ref.items() if k in shapes}


SAM2 = Pair("sam2_video_to_transformers_image", sam2, "transformers:Sam2Model", HF_SAM2, sam2_out, hf_sam2_out,
            input_shape=(1, 3, 64, 64), save=save_sam2_pt, reference=sam2_reference,
            tags=("segmentation", "class1", "class4", "class7", "class8"))

PAIRS.append(SAM2)

# The library each source needs beyond the dev extras (tests skip a pair whose library is not installed).
REQUIRES = {"ldm_vae_to_diffusers": "diffusers", "sam_to_transformers": "segment_anything",
            "encodec_to_transformers": "encodec", "sam_image_encoder_only": "segment_anything",
            "diffusers_legacy_attention_names": "diffusers", "sam2_video_to_transformers_image": "sam2"}


# --- diffusion: a whole Stable Diffusion v1 checkpoint -> diffusers UNet2DConditionModel ---------------------------

DIFFUSERS_UNET = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",
                      "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                      layers_per_block=1, cross_attention_dim=16, attention_head_dim=2, norm_num_groups=32)
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


class LatentDiffusion(nn.Module):
    """The tensors of ``ldm.models.diffusion.ddpm.LatentDiffusion`` as SD v1 holds them, in its registration order:
    ``model.diffusion_model`` (the UNet), the noise schedule's buffers, ``first_stage_model`` (the autoencoder)
    and ``cond_stage_model.transformer`` (FrozenCLIPEmbedder's transformers ``CLIPTextModel``). Runs the UNet."""

    def __init__(self) -> None:
        from ldm_unet import tiny_unet
        from transformers import CLIPTextConfig, CLIPTextModel

        from ldm_vae import tiny_vae

        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = tiny_unet()
        for name in SCHEDULE:
            self.register_buffer(name, torch.linspace(0.1, 0.9, 10))
        self.first_stage_model = tiny_vae()
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.transformer = CLIPTextModel(CLIPTextConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.model.diffusion_model(x, t, context)


def latent_diffusion() -> nn.Module:
    return LatentDiffusion()


def _denoise_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.tensor([7] * x.shape[0]), torch.randn(x.shape[0], 5, 16, generator=g)


def ldm_unet_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t, context = _denoise_inputs(x)
    return m(x, t, context)


def diffusers_unet_out(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t, context = _denoise_inputs(x)
    return m(x, t, encoder_hidden_states=context).sample


def ldm_unet_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """diffusers' single-file conversion facts (``convert_ldm_unet_checkpoint``) for one res block per level:
    ``input_blocks.{i}`` (i >= 1) is down level ``(i-1)//2``, its ``.0`` a resnet (or the downsampler ``.0.op``
    when it is the level's second), its ``.1`` the attention; ``middle_block.{0,1,2}`` -> ``mid_block.resnets.0,
    attentions.0, resnets.1``; ``output_blocks.{i}`` is up level ``i//2``, resnet ``i%2``, then attention or the
    upsampler; resnets' ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection`` ->
    ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``; the spatial transformers keep their names. The
    autoencoder, the text encoder and the noise schedule have no counterpart in the UNet."""
    unet = src.model.diffusion_model
    has_attn = [any(isinstance(m, type(unet.middle_block[1])) for m in blk) for blk in unet.output_blocks]
    resnet = [(r"in_layers\.0\.", "norm1."), (r"in_layers\.2\.", "conv1."), (r"emb_layers\.1\.", "time_emb_proj."),
              (r"out_layers\.0\.", "norm2."), (r"out_layers\.3\.", "conv2."), (r"skip_connection\.", "conv_shortcut.")]
    ref = {}
    for key, value in unet.state_dict().items():
        k = key
        for pat, repl in [(r"^time_embed\.0\.", "time_embedding.linear_1."),
                          (r"^time_embed\.2\.", "time_embedding.linear_2."), (r"^input_blocks\.0\.0\.", "conv_in."),
                          (r"^out\.0\.", "conv_norm_out."), (r"^out\.2\.", "conv_out.")]:
            k = re.sub(pat, repl, k)
        m = re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", k)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            level, slot = (i - 1) // 2, (i - 1) % 2
            if slot == 1:
                k = f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
            else:
                k = f"down_blocks.{level}.{'resnets' if j == 0 else 'attentions'}.0.{rest}"
        m = re.match(r"middle_block\.(\d)\.(.*)", k)
        if m:
            k = f"mid_block.{['resnets.0', 'attentions.0', 'resnets.1'][int(m.group(1))]}.{m.group(2)}"
        m = re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", k)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            level, slot = i // 2, i % 2
            if j == 0:
                k = f"up_blocks.{level}.resnets.{slot}.{rest}"
            elif j == 1 and has_attn[i]:
                k = f"up_blocks.{level}.attentions.{slot}.{rest}"
            else:
                k = f"up_blocks.{level}.upsamplers.0.{rest}"
        if ".resnets." in k:
            for pat, repl in resnet:
                k = re.sub(pat, repl, k)
        ref[k] = value
    return ref


def save_sd_ckpt(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As CompVis released ``sd-v1-4.ckpt``: Lightning's ``.ckpt``, ``state_dict`` holding every part."""
    path = directory / "sd-v1-tiny.ckpt"
    torch.save({"state_dict": sd, "epoch": 6, "global_step": 470000}, path)
    return path


SD_UNET = Pair("sd_checkpoint_unet_to_diffusers", latent_diffusion, "diffusers:UNet2DConditionModel", DIFFUSERS_UNET,
               ldm_unet_out, diffusers_unet_out, input_shape=(1, 4, 8, 8), save=save_sd_ckpt,
               reference=ldm_unet_reference, tags=("diffusion", "class5", "class8"))

PAIRS.append(SD_UNET)
REQUIRES["sd_checkpoint_unet_to_diffusers"] = "diffusers"
