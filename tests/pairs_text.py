"""Real pairs beyond vision classifiers (issue 11): language models, speech and protein models.

Each source is built from its library's own code (transformers, openai-whisper, fair-esm; Meta's Llama and nanoGPT
after their reference code in tests/text_models.py), tiny, every tensor random, and saved the way that library
saves it. Each pair's reference (the correct converted tensors) follows the conversion the field documents
(transformers' ``convert_*`` scripts) and is proven by outputs in tests/test_pairs_text.py. ``CLASSES`` says
which of issue 11's failure classes each pair exercises.

Token models take a float input like every pair (``max_rel_diff`` draws ``torch.randn(input_shape)``): ``ids``
turns it into token ids deterministically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pairs import Pair
from reference import Reference, renamed

VOCAB = 64


def ids(x: torch.Tensor, vocab: int = VOCAB, low: int = 0, length: int = 8) -> torch.Tensor:
    """Token ids in ``[low, vocab)`` drawn from a float input: ``length`` per row."""
    flat = x.reshape(x.shape[0], -1)[:, :length]
    return (flat.abs() * 1e4).long() % (vocab - low) + low


# --- Meta's Llama <-> transformers -------------------------------------------------------------------------------

# the vocabulary is no multiple of a width, as in real models: a model-parallel shard's split dim then shows in its
# sizes (with vocab = 2 * dim, one rank's [dim, dim] slice of `output` fits either split)
LLAMA = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=72, multiple_of=16, norm_eps=1e-5)
HF_LLAMA = dict(vocab_size=72, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=32, tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=0, eos_token_id=0)


def meta_llama() -> nn.Module:
    from text_models import meta_llama as build

    return build(**LLAMA)


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**HF_LLAMA))


def meta_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(ids(x))


def hf_lm_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(input_ids=ids(x)).logits


def _params_json(directory: Path, args: dict[str, Any] | None = None) -> None:
    from text_models import ModelArgs

    fields = {k: v for k, v in asdict(ModelArgs(**(args or LLAMA))).items() if k != "max_seq_len"}
    experts = {k: fields.pop(k) for k in ("num_experts", "num_experts_per_tok")}
    if experts["num_experts"]:  # mistral-inference's MoeArgs
        fields["moe"] = experts
    (directory / "params.json").write_text(json.dumps(fields))


def save_consolidated(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """One ``consolidated.00.pth`` beside ``params.json`` (a model-parallel size of 1, Llama 3's layout: no
    ``rope.freqs``); the path given to keydiff is the .pth file."""
    _params_json(directory)
    path = directory / "consolidated.00.pth"
    torch.save(sd, path)
    return path


def save_consolidated_shards(sd: dict[str, torch.Tensor], directory: Path, n: int = 2) -> Path:
    """``consolidated.00.pth`` ... for ``n`` model-parallel ranks, as Llama 2's were published: each rank holds its
    slice of every split tensor (``text_models.MP_SPLIT``), the norms whole, and ``rope.freqs`` (the rotary
    frequencies, which the code recomputes). The path given to keydiff is the folder."""
    from text_models import mp_dim

    _params_json(directory)
    head_dim = LLAMA["dim"] // LLAMA["n_heads"]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for rank in range(n):
        shard = {}
        for k, v in sd.items():
            dim = mp_dim(k)
            shard[k] = v.clone() if dim is None else v.chunk(n, dim=dim)[rank].clone()
        shard["rope.freqs"] = freqs.clone()
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    return directory


def save_first_shard(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """The 2-rank layout of ``save_consolidated_shards``, and only rank 0's ``consolidated.00.pth`` copied out
    beside ``params.json`` (the other rank's file is not there to merge): half of every split tensor."""
    ranks = directory / "all_ranks"
    ranks.mkdir()
    save_consolidated_shards(sd, ranks)
    _params_json(directory)
    return (ranks / "consolidated.00.pth").rename(directory / "consolidated.00.pth")


def norms_only(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """One rank of a model-parallel checkpoint: only the replicated tensors (the RMSNorm weights) are whole."""
    return {k: v for k, v in meta_to_hf_llama(pair, src, dst).items() if k.endswith("norm.weight")}


# Mistral's original release (mistral-inference): the same module names and interleaved rotary as Meta's reference,
# one ``consolidated.safetensors`` (sorted keys: no registration order to read) beside ``params.json``.
MISTRAL = dict(LLAMA, n_kv_heads=1, rope_theta=1e6)
HF_MISTRAL = dict(HF_LLAMA, num_key_value_heads=1, head_dim=8, rope_theta=1e6, sliding_window=None)


def mistral() -> nn.Module:
    from text_models import meta_llama as build

    return build(**MISTRAL)


def save_mistral(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """mistral-inference's folder: ``params.json`` (with ``head_dim`` and ``hidden_dim``) and
    ``consolidated.safetensors``; the path given to keydiff is the file."""
    from safetensors.torch import save_file

    params = dict(dim=32, n_layers=2, head_dim=8, hidden_dim=96, n_heads=4, n_kv_heads=1, norm_eps=1e-5,
                  vocab_size=MISTRAL["vocab_size"], rope_theta=1e6)
    (directory / "params.json").write_text(json.dumps(params))
    path = directory / "consolidated.safetensors"
    save_file(sd, str(path))
    return path


def mistral_to_hf(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """As ``meta_to_hf_llama`` (transformers' ``convert_mistral_weights_to_hf.py`` permutes the same way), k with
    its single kv head."""
    ref = renamed(src.state_dict(), META_TO_HF)
    for k in ref:
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            heads = MISTRAL["n_heads"] if k.endswith("q_proj.weight") else MISTRAL["n_kv_heads"]
            ref[k] = rotary_rows(ref[k], heads, to_half=True)
    return ref


# Mixtral as mistral-inference stores it: each expert's w1/w2/w3 under ``feed_forward.experts.E``, beside the
# router ``feed_forward.gate``; transformers v5 packs the experts of a layer into 3-D tensors.
MIXTRAL = dict(MISTRAL, n_kv_heads=2, num_experts=4, num_experts_per_tok=2)
HF_MIXTRAL = dict(HF_LLAMA, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, sliding_window=None)


def mixtral() -> nn.Module:
    from text_models import meta_llama as build

    return build(**MIXTRAL)


def save_mixtral(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """mistral-inference's folder: ``params.json`` (with ``moe``) and ``consolidated.safetensors`` (the file)."""
    from safetensors.torch import save_file

    _params_json(directory, MIXTRAL)
    path = directory / "consolidated.safetensors"
    save_file(sd, str(path))
    return path


def mixtral_to_hf(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """``meta_to_hf_llama`` for attention and norms; per layer, ``mlp.gate`` is the router and the experts stack in
    index order: ``gate_up_proj[e] = [w1; w3]``, ``down_proj[e] = w2`` (transformers' v5 MoE packing)."""
    sd = src.state_dict()
    ref = meta_to_hf_llama(pair, src, dst)
    ref = {k: v for k, v in ref.items() if ".feed_forward." not in k and ".mlp." not in k}
    for i in range(MIXTRAL["n_layers"]):
        p, q = f"layers.{i}.feed_forward.", f"model.layers.{i}.mlp."
        experts = range(MIXTRAL["num_experts"])
        ref[q + "gate.weight"] = sd[p + "gate.weight"]
        ref[q + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[p + f"experts.{e}.w1.weight"], sd[p + f"experts.{e}.w3.weight"]]) for e in experts])
        ref[q + "experts.down_proj"] = torch.stack([sd[p + f"experts.{e}.w2.weight"] for e in experts])
    return ref


def save_pretrained(build: Callable[[], nn.Module]) -> Callable[[dict[str, torch.Tensor], Path], Path]:
    """transformers' own ``save_pretrained`` of the source (config.json + model.safetensors, tied keys dropped);
    the path given to keydiff is the folder."""

    def save(sd: dict[str, torch.Tensor], directory: Path) -> Path:
        model = build()
        model.load_state_dict(sd, strict=True)
        model.save_pretrained(directory)
        return directory

    return save


def rotary_rows(w: torch.Tensor, heads: int, to_half: bool) -> torch.Tensor:
    """Reorder the output rows of a q or k projection per head between the interleaved rotary layout (pairs
    ``(0, 1), (2, 3)...``, Meta's) and the half layout (pairs ``(i, i + d/2)``, transformers'), as
    ``convert_llama_weights_to_hf.py``'s ``permute`` documents."""
    rows, cols = w.shape
    half = rows // heads // 2
    if to_half:
        return w.view(heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


META_TO_HF = [
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attention\.wq\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^layers\.(\d+)\.attention\.wk\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^layers\.(\d+)\.attention\.wv\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
]


def meta_to_hf_llama(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """Renames, and q/k rows from interleaved to half rotary per head (k with the kv heads' count)."""
    ref = renamed(src.state_dict(), META_TO_HF)
    for k in ref:
        if k.endswith("q_proj.weight"):
            ref[k] = rotary_rows(ref[k], LLAMA["n_heads"], to_half=True)
        elif k.endswith("k_proj.weight"):
            ref[k] = rotary_rows(ref[k], LLAMA["n_kv_heads"], to_half=True)
    return ref


def hf_to_meta_llama(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The inverse: transformers' names back to Meta's, q/k rows from half to interleaved rotary."""
    inverse = {
        "model.embed_tokens.": "tok_embeddings.", "self_attn.q_proj.": "attention.wq.",
        "self_attn.k_proj.": "attention.wk.", "self_attn.v_proj.": "attention.wv.",
        "self_attn.o_proj.": "attention.wo.", "mlp.gate_proj.": "feed_forward.w1.",
        "mlp.down_proj.": "feed_forward.w2.", "mlp.up_proj.": "feed_forward.w3.",
        "input_layernorm.": "attention_norm.", "post_attention_layernorm.": "ffn_norm.", "model.norm.": "norm.",
        "lm_head.": "output.",
    }
    rules = [(r"^model\.layers\.(\d+)\." + re.escape(a), r"layers.\1." + b) for a, b in inverse.items()
             if not a.startswith(("model.", "lm_head."))]
    rules += [("^" + re.escape(a), b) for a, b in inverse.items() if a.startswith(("model.", "lm_head."))]
    ref = renamed(src.state_dict(), rules)
    for k in ref:
        if k.endswith("wq.weight"):
            ref[k] = rotary_rows(ref[k], LLAMA["n_heads"], to_half=False)
        elif k.endswith("wk.weight"):
            ref[k] = rotary_rows(ref[k], LLAMA["n_kv_heads"], to_half=False)
    return ref


# --- GPT-2 (transformers, Conv1D [in, out]) <-> nanoGPT (nn.Linear [out, in], same names) --------------------------

NANOGPT = dict(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
# nanoGPT's MLP uses the exact GELU: the transformers source is configured with it (the function, not the layout)
HF_GPT2 = dict(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, activation_function="gelu",
               bos_token_id=0, eos_token_id=0)
CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**HF_GPT2))


def nanogpt() -> nn.Module:
    from text_models import nanogpt as build

    return build(**NANOGPT)


def nanogpt_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = ids(x)
    return m(tokens, targets=tokens)[0]


def save_nanogpt(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """nanoGPT's ``train.py`` checkpoint: the compiled model's state dict (``_orig_mod.`` prefix), the optimizer,
    model_args, iter_num, best_val_loss, config."""
    model = nanogpt()
    model.load_state_dict(sd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4)
    path = directory / "ckpt.pt"
    torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}, "optimizer": optimizer.state_dict(),
                "model_args": dict(NANOGPT), "iter_num": 2000, "best_val_loss": torch.tensor(2.31),
                "config": {"batch_size": 12, "learning_rate": 6e-4, "compile": True}}, path)
    return path


def gpt2_layout(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """Same names both ways; every Conv1D weight transposed (``c_proj`` is square: its shape proves nothing); the
    tied ``lm_head.weight`` is ``transformer.wte.weight``."""
    sd = src.state_dict()
    ref = {k: v.t().contiguous() if CONV1D.search(k) else v for k, v in sd.items()}
    ref["lm_head.weight"] = sd["transformer.wte.weight"]
    return ref


def nanogpt_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nanoGPT's last hidden states (the input of its lm_head)."""
    hook = m.transformer.ln_f.register_forward_hook(lambda mod, args, out: setattr(mod, "_out", out))
    try:
        nanogpt_logits(m, x)
    finally:
        hook.remove()
    return m.transformer.ln_f.__dict__.pop("_out")


def hf_hidden(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(input_ids=ids(x)).last_hidden_state


def gpt2_body(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """``gpt2_layout`` without the head: GPT2Model has no ``lm_head`` (its tensor is also ``transformer.wte``), and
    its keys have no ``transformer.`` prefix."""
    ref = gpt2_layout(pair, src, dst)
    return {k.removeprefix("transformer."): v for k, v in ref.items() if k != "lm_head.weight"}


# --- Megatron-LM GPT -> transformers GPT-2: per-head q/k/v interleave, Conv1D, tied head ------------------------------

HF_GPT2_TANH = {k: v for k, v in HF_GPT2.items() if k != "activation_function"}  # gelu_new, Megatron's fused gelu


def megatron_gpt() -> nn.Module:
    from text_models import MegatronGPT

    return MegatronGPT()


def save_megatron(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """Megatron-LM's ``model_optim_rng.pt`` (one rank, ``iter_0001000/mp_rank_00/``): the model's
    ``state_dict_for_save_checkpoint`` nests the embedding per module and keeps the encoder's keys flat. Real files
    also carry the run's ``args`` (an argparse Namespace, pickled code): left out, so the file loads with
    ``weights_only=True``."""
    embedding: dict[str, Any] = {}
    encoder = {}
    for k, v in sd.items():
        rest = k.removeprefix("language_model.")
        if rest.startswith("embedding."):
            module, name = rest.removeprefix("embedding.").split(".")
            embedding.setdefault(module, {})[name] = v
        else:
            encoder[rest.removeprefix("encoder.")] = v
    folder = directory / "iter_0001000" / "mp_rank_00"
    folder.mkdir(parents=True)
    path = folder / "model_optim_rng.pt"
    torch.save({"model": {"language_model": {"embedding": embedding, "encoder": encoder}},
                "checkpoint_version": 3.0, "iteration": 1000}, path)
    return path


def save_nemo_weights(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """NeMo's Megatron GPT: ``model_weights.ckpt`` (inside the .nemo archive), one flat state dict of the same
    modules under ``model.``."""
    path = directory / "model_weights.ckpt"
    torch.save({"model." + k: v for k, v in sd.items()}, path)
    return path


def megatron_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(ids(x))


def megatron_to_gpt2(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers' ``convert_megatron_gpt2_checkpoint.py``: ``query_key_value`` rows from per-head
    ``[heads, 3, head_dim]`` to ``[3, heads, head_dim]`` (its ``fix_query_key_value_ordering``), then every linear
    weight transposed into Conv1D's ``[in, out]``; ``lm_head`` is the word embedding."""
    sd = src.state_dict()
    heads = HF_GPT2["n_head"]
    ref = {}
    for k, v in sd.items():
        m = re.fullmatch(r"language_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        if not m:
            continue
        i, module, kind = m.groups()
        if module == "self_attention.query_key_value":
            v = v.view(heads, 3, -1, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        if kind == "weight" and v.dim() == 2:
            v = v.t().contiguous()
        name = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
                "self_attention.query_key_value": "attn.c_attn", "self_attention.dense": "attn.c_proj",
                "mlp.dense_h_to_4h": "mlp.c_fc", "mlp.dense_4h_to_h": "mlp.c_proj"}[module]
        ref[f"transformer.h.{i}.{name}.{kind}"] = v
    wte = sd["language_model.embedding.word_embeddings.weight"]
    ref |= {"transformer.wte.weight": wte, "lm_head.weight": wte,
            "transformer.wpe.weight": sd["language_model.embedding.position_embeddings.weight"],
            "transformer.ln_f.weight": sd["language_model.encoder.final_layernorm.weight"],
            "transformer.ln_f.bias": sd["language_model.encoder.final_layernorm.bias"]}
    return ref


# --- openai-whisper -> transformers ----------------------------------------------------------------------------------

WHISPER_DIMS = dict(n_mels=16, n_audio_ctx=8, n_audio_state=32, n_audio_head=4, n_audio_layer=2, n_vocab=VOCAB,
                    n_text_ctx=8, n_text_state=32, n_text_head=4, n_text_layer=2)
HF_WHISPER = dict(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                  decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                  max_source_positions=8, max_target_positions=8, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                  decoder_start_token_id=0)


def whisper_model() -> nn.Module:
    from whisper.model import ModelDimensions, Whisper

    return Whisper(ModelDimensions(**WHISPER_DIMS))


def hf_whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(**HF_WHISPER))


def save_whisper(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """openai-whisper's own checkpoint: ``{"dims": asdict(dims), "model_state_dict": sd}``."""
    path = directory / "tiny.pt"
    torch.save({"dims": dict(WHISPER_DIMS), "model_state_dict": sd}, path)
    return path


def whisper_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x, ids(x))


def hf_whisper_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(input_features=x, decoder_input_ids=ids(x)).logits


_LAYER, _TO = r"^(encoder|decoder)\.blocks\.(\d+)\.", r"model.\1.layers.\2."
WHISPER_TO_HF = [
    (r"^encoder\.positional_embedding$", "model.encoder.embed_positions.weight"),
    (r"^decoder\.positional_embedding$", "model.decoder.embed_positions.weight"),
    (r"^encoder\.conv(\d)\.", r"model.encoder.conv\1."),
    (r"^encoder\.ln_post\.", "model.encoder.layer_norm."),
    (r"^decoder\.ln\.", "model.decoder.layer_norm."),
    (r"^decoder\.token_embedding\.", "model.decoder.embed_tokens."),
    (_LAYER + r"attn\.query\.", _TO + "self_attn.q_proj."),
    (_LAYER + r"attn\.key\.", _TO + "self_attn.k_proj."),
    (_LAYER + r"attn\.value\.", _TO + "self_attn.v_proj."),
    (_LAYER + r"attn\.out\.", _TO + "self_attn.out_proj."),
    (_LAYER + r"attn_ln\.", _TO + "self_attn_layer_norm."),
    (_LAYER + r"cross_attn\.query\.", _TO + "encoder_attn.q_proj."),
    (_LAYER + r"cross_attn\.key\.", _TO + "encoder_attn.k_proj."),
    (_LAYER + r"cross_attn\.value\.", _TO + "encoder_attn.v_proj."),
    (_LAYER + r"cross_attn\.out\.", _TO + "encoder_attn.out_proj."),
    (_LAYER + r"cross_attn_ln\.", _TO + "encoder_attn_layer_norm."),
    (_LAYER + r"mlp\.0\.", _TO + "fc1."),
    (_LAYER + r"mlp\.2\.", _TO + "fc2."),
    (_LAYER + r"mlp_ln\.", _TO + "final_layer_norm."),
]
"""openai-whisper -> transformers, the renames of transformers' ``convert_openai_to_hf.py``."""


def backwards(src: nn.Module, dst: nn.Module, rules: list[tuple[str, str | None]]) -> Reference:
    """The reverse of a forward rename table: each target key is renamed forwards, and takes the source tensor of
    the name it becomes (target keys that no rule renames, or whose name the source lacks, are left out)."""
    sd = src.state_dict()
    names = renamed({k: k for k in dst.state_dict()}, rules)
    return {target: sd[name] for name, target in names.items() if name in sd}


def whisper_to_hf(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """``WHISPER_TO_HF``; ``proj_out`` is tied to the token embedding."""
    sd = src.state_dict()
    ref = renamed(sd, WHISPER_TO_HF)
    ref["proj_out.weight"] = sd["decoder.token_embedding.weight"]
    return ref


def hf_to_whisper(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The inverse of ``WHISPER_TO_HF`` (the file lacks ``proj_out``, which whisper does not have either)."""
    return backwards(src, dst, WHISPER_TO_HF)


# --- fair-esm ESM-2 -> transformers ----------------------------------------------------------------------------------

ESM_ARGS = dict(num_layers=2, embed_dim=32, attention_heads=4, token_dropout=True)
HF_ESM = dict(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              position_embedding_type="rotary", token_dropout=True, mask_token_id=32, pad_token_id=1,
              emb_layer_norm_before=False, layer_norm_eps=1e-5, max_position_embeddings=64)
FAIRSEQ_PREFIX = re.compile(r"^(lm_head\.|contact_head\.)")


def esm2() -> nn.Module:
    """fair-esm's ESM2. Its rotary ``inv_freq`` is a persistent buffer of every layer that the code computes, not a
    weight: it is made non-persistent here so that ``randomise`` leaves it as computed, and the save puts it back."""
    from esm.model.esm2 import ESM2

    model = ESM2(alphabet="ESM-1b", **ESM_ARGS)
    for layer in model.layers:
        layer.self_attn.rot_emb._non_persistent_buffers_set.add("inv_freq")
    return model


def hf_esm() -> nn.Module:
    from transformers import EsmConfig, EsmForMaskedLM

    return EsmForMaskedLM(EsmConfig(**HF_ESM))


def save_esm(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """As ESM-2's released files (fairseq): ``{"model": ..., "cfg": {"model": ...}}``, the encoder's keys under
    ``encoder.sentence_encoder.``, the LM head under ``encoder.``, the contact regression merged in unprefixed (as
    fair-esm's loader merges the separate ``-contact-regression.pt``), every layer's ``rot_emb.inv_freq`` stored.
    fairseq's cfg holds an argparse Namespace; here plain dicts, so the file loads with ``weights_only=True``."""
    from esm.model.esm2 import ESM2

    full = dict(sd)
    for k, v in ESM2(alphabet="ESM-1b", **ESM_ARGS).state_dict().items():
        if k.endswith("rot_emb.inv_freq"):
            full[k] = v
    model = {}
    for k, v in full.items():
        if k.startswith("contact_head."):
            model[k] = v
        elif k.startswith("lm_head."):
            model["encoder." + k] = v
        else:
            model["encoder.sentence_encoder." + k] = v
    cfg = {"model": {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_attention_heads": 4,
                     "token_dropout": True, "_name": "ESM2"}}
    path = directory / "esm2_t2_tiny.pt"
    torch.save({"model": model, "cfg": cfg, "args": None}, path)
    return path


def esm_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(ids(x, 29, 4))["logits"]


def hf_esm_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(input_ids=ids(x, 29, 4)).logits


_ELAYER, _ETO = r"^layers\.(\d+)\.", r"esm.encoder.layer.\1."
ESM_TO_HF = [
    (r"^embed_tokens\.", "esm.embeddings.word_embeddings."),
    (_ELAYER + r"self_attn\.q_proj\.", _ETO + "attention.self.query."),
    (_ELAYER + r"self_attn\.k_proj\.", _ETO + "attention.self.key."),
    (_ELAYER + r"self_attn\.v_proj\.", _ETO + "attention.self.value."),
    (_ELAYER + r"self_attn\.out_proj\.", _ETO + "attention.output.dense."),
    (_ELAYER + r"self_attn\.rot_emb\.inv_freq$", None),
    (_ELAYER + r"self_attn_layer_norm\.", _ETO + "attention.LayerNorm."),
    (_ELAYER + r"fc1\.", _ETO + "intermediate.dense."),
    (_ELAYER + r"fc2\.", _ETO + "output.dense."),
    (_ELAYER + r"final_layer_norm\.", _ETO + "LayerNorm."),
    (r"^emb_layer_norm_after\.", "esm.encoder.emb_layer_norm_after."),
    (r"^contact_head\.", "esm.contact_head."),
    (r"^lm_head\.weight$", "lm_head.decoder.weight"),
    (r"^lm_head\.", "lm_head."),
]
"""fair-esm ESM-2 -> transformers, the renames of transformers' ``convert_esm.py`` (the per-layer rotary
frequencies apart: transformers keeps one copy for the model)."""


def esm_to_hf(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """``ESM_TO_HF``; the tied ``lm_head.decoder.weight`` is the token embedding, and the one model-level
    ``rotary_embeddings.inv_freq`` is every layer's (equal) ``rot_emb.inv_freq``."""
    ref = renamed(src.state_dict(), ESM_TO_HF)
    ref["esm.rotary_embeddings.inv_freq"] = src.layers[0].self_attn.rot_emb.inv_freq.clone()
    return ref


def hf_to_esm(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The inverse of ``ESM_TO_HF``: fair-esm's tied ``lm_head.weight`` is the word embedding (the file lacks the
    tied ``lm_head.decoder.weight``), and every layer's ``rot_emb.inv_freq`` is the model's one copy."""
    sd = src.state_dict()
    ref = backwards(src, dst, ESM_TO_HF)
    ref["lm_head.weight"] = ref["embed_tokens.weight"]
    for k in dst.state_dict():
        if k.endswith("rot_emb.inv_freq"):
            ref[k] = sd["esm.rotary_embeddings.inv_freq"]
    return ref


# --- wav2vec2: legacy weight norm (old Hub pytorch_model.bin) -> the current transformers module --------------------

HF_WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
                   conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
LEGACY_NORM = [(r"parametrizations\.weight\.original0$", "weight_g"), (r"parametrizations\.weight\.original1$",
                                                                        "weight_v")]


def hf_wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(**HF_WAV2VEC2))


def save_legacy_bin(sd: dict[str, torch.Tensor], directory: Path) -> Path:
    """An old Hub ``pytorch_model.bin``: ``torch.nn.utils.weight_norm``'s ``weight_g``/``weight_v`` where today's
    transformers registers ``parametrizations.weight.original0/original1`` (its loader renames them back)."""
    legacy = {}
    for k, v in sd.items():
        for pattern, repl in LEGACY_NORM:
            k = re.sub(pattern, repl, k)
        legacy[k] = v
    path = directory / "pytorch_model.bin"
    torch.save(legacy, path)
    return path


def hidden_states(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x).last_hidden_state


def same_names(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The source's own tensors under its own names (the file renamed them; the model did not change)."""
    return dict(src.state_dict())


def folded_weight_norm(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The source's tensors; the positional convolution's ``weight = g * v / ||v||``, the norm over every dim but
    the one weight norm keeps (``dim=2`` in wav2vec2: g has shape [1, 1, K])."""
    ref = dict(src.state_dict())
    conv = "encoder.pos_conv_embed.conv."
    g = ref.pop(conv + "parametrizations.weight.original0")
    v = ref.pop(conv + "parametrizations.weight.original1")
    # torch's own kernel, as remove_weight_norm computes it (g * v / ||v|| written out differs in the last bits)
    ref[conv + "weight"] = torch._weight_norm(v, g, 2)
    assert torch.allclose(ref[conv + "weight"], v * (g / v.norm(dim=(0, 1), keepdim=True)), atol=1e-6)
    return ref


# --- T5: one shared embedding, three tied keys ----------------------------------------------------------------------

HF_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
             relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(**HF_T5))


def t5_logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = ids(x)
    return m(input_ids=tokens, decoder_input_ids=tokens.flip(1)).logits


def t5_tied(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The model's own tensors: ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` are
    ``shared.weight`` (``save_pretrained`` keeps only ``shared.weight``)."""
    return dict(src.state_dict())


# --- the pairs -------------------------------------------------------------------------------------------------------

PAIRS = [
    Pair("meta_llama_to_hf", meta_llama, "transformers:LlamaForCausalLM", HF_LLAMA, meta_logits, hf_lm_logits,
         input_shape=(2, 8), save=save_consolidated, reference=meta_to_hf_llama, tags=("llm",)),
    Pair("meta_llama_2shards_to_hf", meta_llama, "transformers:LlamaForCausalLM", HF_LLAMA, meta_logits,
         hf_lm_logits, input_shape=(2, 8), save=save_consolidated_shards, reference=meta_to_hf_llama, tags=("llm",)),
    Pair("hf_llama_to_meta", hf_llama, "text_models:meta_llama", LLAMA, hf_lm_logits, meta_logits,
         input_shape=(2, 8), save=save_pretrained(hf_llama), reference=hf_to_meta_llama, tags=("llm",)),
    Pair("mistral_consolidated_to_hf", mistral, "transformers:MistralForCausalLM", HF_MISTRAL, meta_logits,
         hf_lm_logits, input_shape=(2, 8), save=save_mistral, reference=mistral_to_hf, tags=("llm",)),
    Pair("mixtral_consolidated_to_hf", mixtral, "transformers:MixtralForCausalLM", HF_MIXTRAL, meta_logits,
         hf_lm_logits, input_shape=(2, 8), save=save_mixtral, reference=mixtral_to_hf,
         tags=("llm",)),
    Pair("hf_gpt2_to_nanogpt", hf_gpt2, "text_models:nanogpt", NANOGPT, hf_lm_logits, nanogpt_logits,
         input_shape=(2, 8), save=save_pretrained(hf_gpt2), reference=gpt2_layout, tags=("llm",)),
    Pair("nanogpt_to_hf_gpt2", nanogpt, "transformers:GPT2LMHeadModel", HF_GPT2, nanogpt_logits, hf_lm_logits,
         input_shape=(2, 8), save=save_nanogpt, reference=gpt2_layout, tags=("llm",)),
    Pair("megatron_gpt_to_hf_gpt2", megatron_gpt, "transformers:GPT2LMHeadModel", HF_GPT2_TANH, megatron_logits,
         hf_lm_logits, input_shape=(2, 8), save=save_megatron, reference=megatron_to_gpt2, tags=("llm",)),
    Pair("nemo_megatron_gpt_to_hf_gpt2", megatron_gpt, "transformers:GPT2LMHeadModel", HF_GPT2_TANH,
         megatron_logits, hf_lm_logits, input_shape=(2, 8), save=save_nemo_weights, reference=megatron_to_gpt2,
         tags=("llm",)),
    Pair("whisper_to_hf", whisper_model, "transformers:WhisperForConditionalGeneration", HF_WHISPER, whisper_logits,
         hf_whisper_logits, input_shape=(2, 16, 16), save=save_whisper, reference=whisper_to_hf, tags=("speech",)),
    Pair("hf_whisper_to_openai", hf_whisper, "text_models:openai_whisper", WHISPER_DIMS, hf_whisper_logits,
         whisper_logits, input_shape=(2, 16, 16), save=save_pretrained(hf_whisper), reference=hf_to_whisper,
         tags=("speech",)),
    Pair("esm2_to_hf", esm2, "transformers:EsmForMaskedLM", HF_ESM, esm_logits, hf_esm_logits, input_shape=(2, 8),
         save=save_esm, reference=esm_to_hf, tags=("protein",)),
    Pair("hf_esm_to_fair_esm", hf_esm, "esm.model.esm2:ESM2", ESM_ARGS, hf_esm_logits, esm_logits,
         input_shape=(2, 8), save=save_pretrained(hf_esm), reference=hf_to_esm, tags=("protein",)),
    Pair("wav2vec2_weight_norm_folded", hf_wav2vec2, "text_models:wav2vec2_folded", HF_WAV2VEC2, hidden_states,
         hidden_states, input_shape=(2, 400), save=save_legacy_bin, reference=folded_weight_norm, tags=("speech",)),
    Pair("nanogpt_to_hf_gpt2_body", nanogpt, "transformers:GPT2Model", HF_GPT2, nanogpt_hidden, hf_hidden,
         input_shape=(2, 8), save=save_nanogpt, reference=gpt2_body, tags=("llm",)),
    Pair("hf_t5_save_pretrained", hf_t5, "transformers:T5ForConditionalGeneration", HF_T5, t5_logits, t5_logits,
         input_shape=(2, 8), save=save_pretrained(hf_t5), reference=t5_tied, tags=("llm",)),
    Pair("wav2vec2_legacy_weight_norm", hf_wav2vec2, "transformers:Wav2Vec2Model", HF_WAV2VEC2, hidden_states,
         hidden_states, input_shape=(2, 400), save=save_legacy_bin, reference=same_names, tags=("speech",)),
]

# Negative pairs: no complete correct mapping exists (the target is deeper than the checkpoint); they must end
# unresolved (exit 1), every applied entry equal to the reference of the shared part.
PAIRS += [
    Pair("meta_llama_2_layers_as_4", meta_llama, "transformers:LlamaForCausalLM", dict(HF_LLAMA, num_hidden_layers=4),
         meta_logits, hf_lm_logits, input_shape=(2, 8), save=save_consolidated, reference=meta_to_hf_llama,
         negative=True, tags=("llm",)),
    Pair("meta_llama_one_shard_of_2", meta_llama, "transformers:LlamaForCausalLM", HF_LLAMA, meta_logits,
         hf_lm_logits, input_shape=(2, 8), save=save_first_shard, reference=norms_only, negative=True,
         tags=("llm",)),
    Pair("whisper_2_decoder_layers_as_3", whisper_model, "transformers:WhisperForConditionalGeneration",
         dict(HF_WHISPER, decoder_layers=3), whisper_logits, hf_whisper_logits, input_shape=(2, 16, 16),
         save=save_whisper, reference=whisper_to_hf, negative=True, tags=("speech",)),
]

CLASSES: dict[str, tuple[str, ...]] = {
    "meta_llama_to_hf": ("3 rotary layout",),
    "meta_llama_2shards_to_hf": ("3 rotary layout", "containers: consolidated shards"),
    "hf_llama_to_meta": ("3 rotary layout",),
    "mistral_consolidated_to_hf": ("3 rotary layout (one kv head; safetensors: no order)",),
    "mixtral_consolidated_to_hf": ("3 rotary layout", "7 several tensors into one (experts stacked, w1/w3 fused)"),
    "hf_gpt2_to_nanogpt": ("1 tied weights", "4 same name, other layout"),
    "nanogpt_to_hf_gpt2": ("4 same name, other layout",),
    "megatron_gpt_to_hf_gpt2": ("per-head q/k/v interleave", "4 same name, other layout", "1 tied weights",
                                "containers: nested dicts"),
    "nemo_megatron_gpt_to_hf_gpt2": ("per-head q/k/v interleave", "4 same name, other layout", "1 tied weights"),
    "whisper_to_hf": ("1 tied weights",),
    "hf_whisper_to_openai": ("renames only (the tied proj_out has no counterpart)",),
    "esm2_to_hf": ("1 tied weights (per-layer inv_freq, lm head)",),
    "hf_esm_to_fair_esm": ("1 tied weights (one inv_freq for every layer, lm head)",),
    "wav2vec2_weight_norm_folded": ("2 weight normalisation (value op g * v / ||v||)",),
    "nanogpt_to_hf_gpt2_body": ("4 same name, other layout", "8 a subtree with no counterpart (lm_head)"),
    "hf_t5_save_pretrained": ("1 tied weights (three keys share one tensor)",),
    "wav2vec2_legacy_weight_norm": ("2 weight normalisation",),
    "meta_llama_2_layers_as_4": ("negative: depth", "3 rotary layout"),
    "meta_llama_one_shard_of_2": ("negative: one model-parallel rank of two (half of every split tensor)",),
    "whisper_2_decoder_layers_as_3": ("negative: decoder depth", "1 tied weights"),
}
"""Issue 11's classes each pair exercises."""
