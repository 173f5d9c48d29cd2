"""Source and target models of the text corpus (tests/pairs_text.py) that no installed package provides, written
after their public reference code with the same module names, so that their state dicts are the ones the field's
checkpoints carry.

- ``MetaLlama``: Meta's reference ``llama/model.py`` (Llama 2) on one device: ``tok_embeddings``,
  ``layers.N.attention.wq/wk/wv/wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``, ``norm``,
  ``output``; rotary embedding on interleaved pairs (complex multiplication), grouped-query k/v repeated per head.
  The model-parallel layers (fairscale's ``ColumnParallelLinear``, ``RowParallelLinear``, ``ParallelEmbedding``)
  are plain layers here; ``MP_SPLIT`` records the dim each one splits along in a ``consolidated.NN.pth`` shard.
- ``NanoGPT``: Karpathy's nanoGPT ``model.py``: GPT-2 with ``nn.Linear`` layers under GPT-2's names
  (``transformer.h.N.attn.c_attn``...), ``lm_head`` tied to ``transformer.wte``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# --- Meta's Llama ------------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    """``params.json`` of a Meta checkpoint (``max_batch_size``/``max_seq_len`` are run-time, not stored)."""

    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = 2
    vocab_size: int = 64
    multiple_of: int = 16
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 32
    num_experts: int = 0
    """Mixtral (mistral-inference's ``MoeArgs``): experts per layer, 0 for a dense feed-forward."""
    num_experts_per_tok: int = 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # consecutive pairs (0, 1), (2, 3), ... of each head are one complex number: the interleaved layout
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(bs, slen, n_kv_heads * n_rep,
                                                                                    head_dim)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.n_local_heads = args.n_heads
        self.n_rep = self.n_local_heads // self.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        keys, values = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> None:
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    """mistral-inference's ``MoeLayer``: a linear ``gate`` scores the experts, each token goes to its top k, weighted
    by the softmax of their scores."""

    def __init__(self, experts: list[nn.Module], gate: nn.Module, num_experts_per_tok: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.num_experts_per_tok = num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x.reshape(-1, x.shape[-1])
        weights, selected = torch.topk(self.gate(inputs), self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results.view_as(x)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        ffn = lambda: FeedForward(args.dim, 4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)  # noqa: E731
        if args.num_experts:
            self.feed_forward = MoeLayer([ffn() for _ in range(args.num_experts)],
                                         nn.Linear(args.dim, args.num_experts, bias=False), args.num_experts_per_tok)
        else:
            self.feed_forward = ffn()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlama(nn.Module):
    """Meta's ``Transformer`` (``llama/model.py``); ``forward(tokens)`` returns the logits of every position."""

    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # a plain attribute as in the reference, not a buffer: no checkpoint key
        self.freqs_cis = precompute_freqs_cis(params.dim // params.n_heads, params.max_seq_len * 2, params.rope_theta)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        _bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[start_pos: start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos)), mask]).type_as(h)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h)).float()


def meta_llama(**params: object) -> nn.Module:
    """``text_models:meta_llama`` for the CLI: ``-m`` arguments are ``params.json``'s fields."""
    return MetaLlama(ModelArgs(**params))  # type: ignore[arg-type]


# The dim each tensor splits along across model-parallel ranks (Llama 2's model.py: ParallelEmbedding splits the
# embedding dim, ColumnParallelLinear the output rows, RowParallelLinear the input columns); None: replicated.
MP_SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}


def mp_dim(key: str) -> int | None:
    """The split dim of a Meta checkpoint key (``layers.0.attention.wq.weight`` -> 0), None for a norm."""
    parts = key.split(".")
    return MP_SPLIT.get(parts[-2]) if len(parts) >= 2 else None


# --- nanoGPT -----------------------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's own)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's ``GPT``; ``forward(idx, targets)`` returns ``(logits, loss)``, every position's logits only when
    targets are given (as the reference does)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None


def nanogpt(**config: object) -> nn.Module:
    """``text_models:nanogpt`` for the CLI: ``-m`` arguments are ``GPTConfig``'s fields (nanoGPT's model_args)."""
    return NanoGPT(GPTConfig(**config))  # type: ignore[arg-type]


# --- openai-whisper as a CLI target --------------------------------------------------------------------------------


def openai_whisper(**dims: int) -> nn.Module:
    """``text_models:openai_whisper`` for the CLI: openai-whisper's ``Whisper`` from ``ModelDimensions``' fields (the
    ``dims`` a whisper checkpoint stores)."""
    from whisper.model import ModelDimensions, Whisper

    return Whisper(ModelDimensions(**dims))


# --- transformers' wav2vec2 with its weight norm folded (as exported for inference) ---------------------------------


def wav2vec2_folded(**config: object) -> nn.Module:
    """``text_models:wav2vec2_folded``: transformers' ``Wav2Vec2Model`` (``-m`` arguments go to its config) with the
    positional convolution's weight norm removed, the way a model is prepared for export: one plain ``weight``
    (``g * v / ||v||``) instead of ``parametrizations.weight.original0/original1``."""
    from torch.nn.utils import parametrize
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(**config))
    parametrize.remove_parametrizations(model.encoder.pos_conv_embed.conv, "weight", leave_parametrized=True)
    return model


# --- Megatron-LM's GPT (legacy model code) ---------------------------------------------------------------------------


class _MegatronAttention(nn.Module):
    """``ParallelAttention`` on one rank: ``query_key_value`` produces, per head, that head's q, k and v side by side
    (the ``[heads, 3, head_dim]`` row order of checkpoint version 2 and later)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        mixed = self.query_key_value(x).view(b, s, self.heads, 3 * (h // self.heads))
        q, k, v = mixed.chunk(3, dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(y.transpose(1, 2).reshape(b, s, h))


class _MegatronMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, 4 * hidden)
        self.dense_4h_to_h = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Megatron's fused bias-gelu is the tanh approximation
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class _MegatronLayer(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden, eps=1e-5)
        self.self_attention = _MegatronAttention(hidden, heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=1e-5)
        self.mlp = _MegatronMLP(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class MegatronGPT(nn.Module):
    """Megatron-LM's ``GPTModel`` (legacy code path) on one rank:
    ``language_model.embedding.{word,position}_embeddings``, ``language_model.encoder.layers.N...``,
    ``language_model.encoder.final_layernorm``; the output layer is the word embedding (``parallel_lm_logits``)."""

    def __init__(self, vocab: int = 64, positions: int = 16, hidden: int = 32, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.embedding = nn.Module()
        self.language_model.embedding.word_embeddings = nn.Embedding(vocab, hidden)
        self.language_model.embedding.position_embeddings = nn.Embedding(positions, hidden)
        self.language_model.encoder = nn.Module()
        self.language_model.encoder.layers = nn.ModuleList(_MegatronLayer(hidden, heads) for _ in range(layers))
        self.language_model.encoder.final_layernorm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.language_model.embedding
        x = emb.word_embeddings(tokens) + emb.position_embeddings(torch.arange(tokens.shape[1]))
        for layer in self.language_model.encoder.layers:
            x = layer(x)
        return self.language_model.encoder.final_layernorm(x) @ emb.word_embeddings.weight.t()
