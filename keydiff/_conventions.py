"""Naming conventions across timm, transformers, torchvision, open_clip and original research repos.

These are facts about how libraries name the same parts, gathered once and used as evidence by the matcher: a
token's canonical form (``layernorm_before``, ``ln_1`` and ``norm1`` are all ``norm1``), tokens that say nothing
(``model``, ``encoder``), tokens that carry a repeat index (``encoder_layer_3``, ``blocks3``), and the parts that one
library keeps separate and another fuses (q/k/v into qkv). Nothing here names a model or a checkpoint.
"""

from __future__ import annotations

import re

__all__ = [
    "BLOCK_STEMS",
    "EXPERT_STEMS",
    "FUSIONS",
    "LEAVES",
    "NOISE",
    "PER_HEAD_FUSED",
    "ROTARY_VOCABULARIES",
    "canonical_token",
    "split_leaf",
    "weight_norm_key",
    "weight_norm_part",
]

# Tokens that carry a repeat index when digits are glued to them (``encoder_layer_3``, ``layer1``, ``blocks3``).
BLOCK_STEMS = frozenset(
    [
        "layer", "layers", "block", "blocks", "stage", "stages", "encoder_layer", "decoder_layer", "resblock",
        "resblocks", "level", "levels", "res", "cell", "cells", "group", "groups", "stack", "stacks", "expert",
        "experts",
    ]
)

# Tokens under which one library keeps a tensor per expert (``experts.7.w1``) and another one tensor stacked over
# experts (``experts.gate_up_proj`` [E, 2I, D]), as transformers v5 packs mixture-of-experts weights.
EXPERT_STEMS = frozenset({"experts", "expert"})

# Tokens that only say where a module sits, not what it is; they are left out of name similarity.
NOISE = frozenset(
    [
        "model", "module", "models", "encoder", "decoder", "backbone", "transformer", "embeddings", "embedding",
        "vision_model", "visual", "trunk", "net", "base_model", "features", "body", "_orig_mod",
    ]
)

# Parameter names, canonical: TF-style gamma/beta and layer-scale gamma mean weight/bias.
LEAVES = {
    "weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "scale": "weight",
    "running_mean": "running_mean", "running_var": "running_var", "num_batches_tracked": "num_batches_tracked",
    "moving_mean": "running_mean", "moving_variance": "running_var", "weight_g": "weight_g",
    "weight_v": "weight_v", "kernel": "weight", "lambda1": "weight",
}

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "block": ("layers", "layer", "blocks", "resblocks", "resblock", "h", "encoder_layer", "encoder_layers"),
    "stage": ("stages", "stage", "levels", "level"),
    "attn": ("attention", "attn", "self_attn", "self_attention", "selfattention", "mha", "msa", "attn_block"),
    "qkv": ("qkv", "in_proj", "c_attn", "query_key_value", "wqkv", "qkv_proj", "to_qkv"),
    "q": ("q", "q_proj", "query", "wq", "q_lin", "to_q"),
    "k": ("k", "k_proj", "key", "wk", "k_lin", "to_k"),
    "v": ("v", "v_proj", "value", "wv", "v_lin", "to_v"),
    "out": ("o_proj", "out_proj", "wo", "o", "out", "to_out", "out_lin", "proj_out"),
    "norm1": ("layernorm_before", "input_layernorm", "attention_norm", "pre_attention_layernorm", "attn_norm",
              "norm_1", "ln_1", "layer_norm1", "ln1"),
    "norm2": ("layernorm_after", "post_attention_layernorm", "ffn_norm", "mlp_norm", "norm_2", "ln_2",
              "layer_norm2", "ln2"),
    "norm": ("norm", "ln", "layernorm", "layer_norm", "ln_f", "final_layernorm", "norm_f", "ln_post",
             "post_layernorm", "fc_norm", "normalization", "bn", "batchnorm", "batch_norm", "norm_layer"),
    "norm_pre": ("ln_pre", "norm_pre", "pre_layernorm", "pre_layrnorm"),
    "mlp": ("mlp", "ffn", "feed_forward", "feedforward", "ff", "mlp_block", "block_sparse_moe", "sparse_moe", "moe"),
    "fc1": ("fc1", "c_fc", "lin1", "fc_1"),
    "fc2": ("fc2", "lin2", "fc_2"),
    "gate": ("gate_proj", "w1", "gate"),
    "gate_up": ("gate_up_proj", "gate_up", "w13"),
    "up": ("up_proj", "w3", "up"),
    "down": ("down_proj", "w2", "down"),
    "cls_token": ("cls_token", "class_token", "class_embedding", "cls_embedding", "cls_emb"),
    "dist_token": ("dist_token", "distillation_token"),
    "reg_token": ("reg_token", "register_tokens", "registers"),
    "mask_token": ("mask_token",),
    "pos_embed": ("pos_embed", "position_embeddings", "position_embedding", "pos_embedding", "positional_embedding",
                  "absolute_pos_embed", "pos_emb", "wpe"),
    "patch_embed": ("patch_embed", "patch_embeddings", "patch_embedding", "conv_proj", "to_patch_embedding"),
    "tok_embed": ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "token_embedding"),
    "proj": ("proj", "projection"),
    "conv": ("conv", "convolution"),
    "ls": ("ls", "layer_scale", "layerscale", "ls_"),
    "ls1": ("ls1", "gamma_1", "layer_scale1", "lambda_1", "layer_scale_1"),
    "ls2": ("ls2", "gamma_2", "layer_scale2", "lambda_2", "layer_scale_2"),
    "downsample": ("downsample", "shortcut", "downsample_layers", "skip"),
    "head": ("head", "heads", "classifier", "lm_head", "fc_head", "cls_classifier"),
    "head_dist": ("head_dist", "distillation_classifier", "dist_head", "head_distill"),
    "stem": ("stem", "embedder", "conv_stem"),
    "pool": ("pooler", "pool", "attn_pool"),
}
_CANON = {alias: canon for canon, aliases in _SYNONYMS.items() for alias in aliases}

# A token's meaning can depend on its parent: ``c_proj`` is the MLP's second layer under ``mlp`` and the output
# projection under ``attn``; ``proj`` under ``attn`` is the output projection.
_IN_CONTEXT = {
    ("mlp", "c_proj"): "fc2", ("mlp", "dense"): "fc2", ("mlp", "proj"): "fc2", ("mlp", "out"): "fc2",
    ("attn", "c_proj"): "out", ("attn", "proj"): "out", ("attn", "dense"): "out", ("attn", "output"): "out",
    ("intermediate", "dense"): "fc1", ("output", "dense"): "fc2",
    ("mlp", "gate"): "router",  # a mixture-of-experts router, not a gate projection
    ("", "output"): "head",  # Meta's original LLM names call the LM head ``output``
}

# Separate tensors that another library fuses along dim 0, in the order the fused tensor holds them.
FUSIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q", "k", "v")),
    ("kv", ("k", "v")),
    ("gate_up", ("gate", "up")),
)

# Naming conventions known to fix how the checkpoint's rotary query/key rows are laid out: (how the report names
# the convention, module paths (last one or two tokens) that must all be present, the pairing). Meta's reference
# code names its blocks ``attention.wq..wo``, ``feed_forward.w1..w3``, ``attention_norm``, ``ffn_norm`` and rotates
# interleaved pairs (complex multiplication); so do the codebases that kept its names (its Mistral reference, the
# training and inference rewrites that load its files). transformers' names fix nothing: most of its models with
# ``q_proj``/``gate_proj``/``input_layernorm`` rotate halves, and some of them interleaved pairs.
# Fused attention projections whose rows are grouped per head (``[heads, 3, head_dim]``: each head's q, k and v
# together), as Megatron-LM and the codebases that kept its layout store ``query_key_value``; most others stack
# q, k and v whole (``[3, heads, head_dim]``: ``qkv``, ``c_attn``, ``in_proj``). Renaming one into the other
# without reordering the rows loads and computes something else.
PER_HEAD_FUSED = frozenset({"query_key_value"})

ROTARY_VOCABULARIES: tuple[tuple[str, frozenset[str], str], ...] = (
    ("Meta's reference names: attention.wq, feed_forward.w1, attention_norm...",
     frozenset({"attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                "feed_forward.w3", "attention_norm", "ffn_norm"}), "interleaved"),
)

_NUMBERED = re.compile(r"([a-z][a-z_]*?)_?(\d+)")
_LEAF_SUFFIX = re.compile(r"(.+)_(weight|bias)")


def canonical_token(token: str, parent: str = "") -> str:
    """The canonical form of one key token, given the canonical form of its parent token.

    Example:
        >>> canonical_token("layernorm_before"), canonical_token("ln_2"), canonical_token("c_proj", "mlp")
        ('norm1', 'norm2', 'fc2')
    """
    low = token.lower()
    if (parent, low) in _IN_CONTEXT:
        return _IN_CONTEXT[parent, low]
    if low in _CANON:
        return _CANON[low]
    m = _NUMBERED.fullmatch(low)
    if m and m.group(1) in _CANON:
        return _CANON[m.group(1)] + m.group(2)
    return low


def split_leaf(key: str) -> tuple[str, str]:
    """Split a key into its module path and canonical parameter name.

    A bare parameter (``cls_token``, ``ls1``, ``layer_scale``) is a module of its own whose one parameter is a
    weight; ``in_proj_weight`` is the weight of ``in_proj``; a weight-norm parametrization's
    ``parametrizations.weight.original0``/``original1`` are its module's ``weight_g``/``weight_v``.

    Example:
        >>> split_leaf("blocks.0.attn.qkv.bias"), split_leaf("attn.in_proj_weight"), split_leaf("cls_token")
        (('blocks.0.attn.qkv', 'bias'), ('attn.in_proj', 'weight'), ('cls_token', 'weight'))
        >>> split_leaf("conv.parametrizations.weight.original1"), split_leaf("conv.weight_v")
        (('conv', 'weight_v'), ('conv', 'weight_v'))
    """
    m = _PARAM_PART.fullmatch(key)
    if m and m.group(1):  # a weight-norm parametrization's g and v are leaves of their module, as legacy names are
        return m.group(1), f"{m.group(2)}_{'gv'[int(m.group(3))]}"
    head, _, last = key.rpartition(".")
    if last in LEAVES and head:
        return head, LEAVES[last]
    m = _LEAF_SUFFIX.fullmatch(last)
    if m:
        return (f"{head}.{m.group(1)}" if head else m.group(1)), m.group(2)
    return key, "weight"


# Weight normalisation keeps a weight as ``g`` (its norm over every dimension but one) and ``v`` (its direction).
# torch names the pair two ways: the legacy hook (``torch.nn.utils.weight_norm``) as ``{name}_g``/``{name}_v`` beside
# the module's other tensors, the parametrization (``torch.nn.utils.parametrizations.weight_norm``) as
# ``parametrizations.{name}.original0``/``original1``, g then v.
WEIGHT_NORM_FORMS = ("legacy", "parametrizations")
_LEGACY_PART = re.compile(r"(?:(.*)\.)?([A-Za-z_]\w*)_([gv])")
_PARAM_PART = re.compile(r"(?:(.*)\.)?parametrizations\.([A-Za-z_]\w*)\.original([01])")


def weight_norm_part(key: str) -> tuple[str, str, str, str] | None:
    """``(module, tensor name, part g or v, form)`` of a weight-normalised tensor's key, else None.

    Example:
        >>> weight_norm_part("conv.weight_g"), weight_norm_part("conv.parametrizations.weight.original1")
        (('conv', 'weight', 'g', 'legacy'), ('conv', 'weight', 'v', 'parametrizations'))
    """
    if not key.endswith(("_g", "_v", "original0", "original1")):
        return None  # most keys: no pattern to try (100,000 of them in a large checkpoint)
    m = _PARAM_PART.fullmatch(key)
    if m:
        return m.group(1) or "", m.group(2), "gv"[int(m.group(3))], "parametrizations"
    m = _LEGACY_PART.fullmatch(key)
    if m:
        return m.group(1) or "", m.group(2), m.group(3), "legacy"
    return None


def weight_norm_key(module: str, name: str, part: str, form: str) -> str:
    """The key of part ``g`` or ``v`` of a weight-normalised tensor in the given form (``weight_norm_part``'s
    inverse); ``part`` empty: the plain tensor.

    Example:
        >>> weight_norm_key("conv", "weight", "g", "parametrizations"), weight_norm_key("conv", "weight", "", "")
        ('conv.parametrizations.weight.original0', 'conv.weight')
    """
    head = f"{module}." if module else ""
    if not part:
        return f"{head}{name}"
    if form == "legacy":
        return f"{head}{name}_{part}"
    return f"{head}parametrizations.{name}.original{'gv'.index(part)}"
