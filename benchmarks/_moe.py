"""A mixture-of-experts decoder under two naming conventions, for the key-scale benchmark.

Hugging Face Mixtral names (``model.layers.N.self_attn.q_proj``, ``block_sparse_moe.experts.E.w1``,
``input_layernorm``...) against the original Mistral names (``layers.N.attention.wq``, ``feed_forward.experts.E.w1``,
``attention_norm``...). Tensors are tiny but keep the real shape relations: grouped-query attention (k/v narrower
than q), a router of ``experts x dim``, expert ``w1``/``w3`` of ``ffn x dim`` and ``w2`` of ``dim x ffn``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

__all__ = ["moe_pair", "write_header_only"]

DIM, KV_DIM, FFN, VOCAB = 8, 4, 16, 32


def moe_pair(layers: int, experts: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """``(original key, Hugging Face key, shape)`` of every tensor, in the model's order.

    Example:
        >>> next(moe_pair(1, 2))
        ('tok_embeddings.weight', 'model.embed_tokens.weight', (32, 8))
        >>> sum(1 for _ in moe_pair(2, 4))  # 3 + layers * (7 + 3 * experts)
        41
    """
    yield "tok_embeddings.weight", "model.embed_tokens.weight", (VOCAB, DIM)
    for n in range(layers):
        orig, hf = f"layers.{n}.", f"model.layers.{n}."
        for o, h, shape in (("wq", "q_proj", (DIM, DIM)), ("wk", "k_proj", (KV_DIM, DIM)),
                            ("wv", "v_proj", (KV_DIM, DIM)), ("wo", "o_proj", (DIM, DIM))):
            yield f"{orig}attention.{o}.weight", f"{hf}self_attn.{h}.weight", shape
        yield f"{orig}feed_forward.gate.weight", f"{hf}block_sparse_moe.gate.weight", (experts, DIM)
        for e in range(experts):
            for w, shape in (("w1", (FFN, DIM)), ("w2", (DIM, FFN)), ("w3", (FFN, DIM))):
                yield (f"{orig}feed_forward.experts.{e}.{w}.weight", f"{hf}block_sparse_moe.experts.{e}.{w}.weight",
                       shape)
        yield f"{orig}attention_norm.weight", f"{hf}input_layernorm.weight", (DIM,)
        yield f"{orig}ffn_norm.weight", f"{hf}post_attention_layernorm.weight", (DIM,)
    yield "norm.weight", "model.norm.weight", (DIM,)
    yield "output.weight", "lm_head.weight", (VOCAB, DIM)


def write_header_only(path: str | os.PathLike[str], tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    """Write a valid bf16 safetensors file whose tensors are zeros (a sparse file: only the header takes space).

    Keys are sorted as ``safetensors.torch.save_file`` sorts them, so the file looks like a real export.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in sorted(tensors):
        n = 2
        for d in shape:
            n *= d
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
