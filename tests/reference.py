"""Ground truth for the corpus (issue 10): the correct converted tensors of each pair, and entry-level checking.

A *reference* is ``dict[target key, Tensor]``: what the target model must hold, computed from the source model's
own tensors without keydiff. It is proven by ``prove``: for a positive pair it loads strictly into the target and
the target then reproduces the source's outputs; for a negative pair it covers the part that has a counterpart.

Most references come from a trace: the modules that own tensors on both sides are paired by the order in which
their forward calls finish (as ``shared/bench/realpairs.py::trace_mapping`` does); the rest
are hand-written remaps (fused q/k/v, a transposed projection, a zero bias), and a few old-corpus pairs use
keydiff's own tensors, which are a reference only because the outputs prove them (``engine``).

``check_entries`` then judges every entry keydiff proposed, applied or not: the entry is *right* iff the tensor it
produces from the checkpoint, through keydiff's own op, equals the reference tensor for its target key.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from keydiff import Diff
    from keydiff._mapping import Entry

    from pairs import Pair

Reference = dict[str, torch.Tensor]
Forward = Callable[[nn.Module, torch.Tensor], Any]


# --- the trace ---------------------------------------------------------------------------------------------------

def _local_tensors(mod: nn.Module) -> list[tuple[str, torch.Tensor]]:
    items = [(n, p) for n, p in mod._parameters.items() if p is not None]
    items += [(n, b) for n, b in mod._buffers.items() if b is not None and n not in mod._non_persistent_buffers_set]
    return items


def execution_order(model: nn.Module, fwd: Forward, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Modules owning tensors (parameters or persistent buffers), in the order their forward calls finish."""
    names = {id(m): n for n, m in model.named_modules()}
    seq: list[nn.Module] = []
    seen: set[int] = set()

    def hook(mod: nn.Module, *_: Any) -> None:
        if id(mod) not in seen:
            seen.add(id(mod))
            seq.append(mod)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if _local_tensors(m)]
    try:
        with torch.no_grad():
            fwd(model, x)
    finally:
        for h in hooks:
            h.remove()
    return [(names[id(m)], m) for m in seq]


def trace_pairs(src: nn.Module, dst: nn.Module, x: torch.Tensor, src_fwd: Forward,
                dst_fwd: Forward) -> list[tuple[str, str]]:
    """``(source key, target key)`` for every tensor of the modules both forwards run, paired by execution order.

    Raises when the sequences or tensor sizes disagree (then the pair needs a hand-written remap)."""
    a, b = execution_order(src, src_fwd, x), execution_order(dst, dst_fwd, x)
    if len(a) != len(b):
        raise RuntimeError(f"trace: {len(a)} source modules vs {len(b)} target modules")
    out = []
    for (na, ma), (nb, mb) in zip(a, b, strict=True):
        la, lb = _local_tensors(ma), _local_tensors(mb)
        if len(la) != len(lb):
            raise RuntimeError(f"trace: {na} {[n for n, _ in la]} vs {nb} {[n for n, _ in lb]}")
        for (pa, ta), (pb, tb) in zip(la, lb, strict=True):
            if ta.numel() != tb.numel():
                raise RuntimeError(f"trace: {na}.{pa} {tuple(ta.shape)} vs {nb}.{pb} {tuple(tb.shape)}")
            out.append((f"{na}.{pa}" if na else pa, f"{nb}.{pb}" if nb else pb))
    return out


def tensors_of(pairs: Iterable[tuple[str, str]], src_sd: dict[str, torch.Tensor],
               dst_shapes: dict[str, torch.Size]) -> Reference:
    """The reference for renames and reshapes: each target key gets its source tensor in the target's shape."""
    return {t: src_sd[s].reshape(dst_shapes[t]) for s, t in pairs}


def trace_reference(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The trace of a pair on its own input, as tensors."""
    x = torch.randn(pair.input_shape, generator=torch.Generator().manual_seed(2))
    pairs = trace_pairs(src, dst, x, pair.src_out, pair.dst_out)
    shapes = {k: v.shape for k, v in dst.state_dict().items()}
    return tensors_of(pairs, src.state_dict(), shapes)


def shared_names(src: nn.Module, dst: nn.Module) -> Reference:
    """Same name and shape on both sides (a timm or torchvision checkpoint of another depth): the shared part."""
    shapes = {k: v.shape for k, v in dst.state_dict().items()}
    return {k: v for k, v in src.state_dict().items() if k in shapes and shapes[k] == v.shape}


# --- proving a reference -------------------------------------------------------------------------------------------

def prove(pair: Pair, src: nn.Module, ref: Reference, dst: nn.Module | None = None) -> float | None:
    """Load the reference into the target (``dst``, or a new one) and compare outputs; the max relative difference
    (None: negative pair, only checked to cover a part of the target with the right shapes)."""
    dst = pair.target_model() if dst is None else dst
    shapes = {k: v.shape for k, v in dst.state_dict().items()}
    bad = {k: (tuple(v.shape), tuple(shapes.get(k, ()))) for k, v in ref.items() if shapes.get(k) != v.shape}
    if bad:
        raise AssertionError(f"reference tensors that do not fit the target: {bad}")
    if pair.negative:
        return None
    dst.load_state_dict(ref, strict=True)
    from pairs import max_rel_diff

    return max_rel_diff(pair, src, dst)


# --- entry-level checking ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Judged:
    """One proposed entry and its verdict against the reference."""

    entry: Entry
    applied: bool
    right: bool
    why: str = ""


def produced(d: Diff, entry: Entry) -> torch.Tensor:
    """The tensor an entry makes from the checkpoint, through keydiff's own op (as ``KeyMap.apply`` does)."""
    return entry.op.apply([d.tensor(k) for k in entry.source], entry.target_shape)


def check_entries(d: Diff, ref: Reference) -> list[Judged]:
    """Judge every proposal of ``d``, applied (confidence >= ``d.min_confidence``) or not."""
    out = []
    for e in d.proposals:
        applied = e.confidence >= d.min_confidence
        want = ref.get(e.target)
        if want is None:
            out.append(Judged(e, applied, False, "no reference tensor (the target key has no source)"))
            continue
        try:
            got = produced(d, e)
        except Exception as exc:  # an entry that cannot even apply is wrong
            out.append(Judged(e, applied, False, f"does not apply: {exc}"))
            continue
        right = got.shape == want.shape and torch.equal(got, want.to(got.dtype))
        out.append(Judged(e, applied, right, "" if right else "tensor differs from the reference"))
    return out


def describe(j: Judged) -> str:
    """One line for a wrong entry: sources, target, op, confidence, evidence."""
    e = j.entry
    ev = e.evidence
    note = f"; {ev.note}" if ev.note else ""
    return (f"{', '.join(e.source)} -> {e.target} [{e.op.describe()}] conf {e.confidence:.2f} "
            f"{'applied' if j.applied else 'not applied'}, {ev.method}/{ev.shape}{note}: {j.why}")


# --- hand-written remaps -------------------------------------------------------------------------------------------

def renamed(sd: dict[str, torch.Tensor], rules: list[tuple[str, str | None]]) -> Reference:
    """Regex renames, first matching rule wins; a rule with ``None`` (or no rule) leaves the key out."""
    out = {}
    for k, v in sd.items():
        for pat, repl in rules:
            if re.search(pat, k):
                if repl is not None:
                    out[re.sub(pat, repl, k)] = v
                break
    return out


def fused(sd: dict[str, torch.Tensor], source: str, parts: tuple[str, ...], target: str) -> Reference:
    """Concatenate parts along dim 0: ``source`` has ``{i}`` for the layer index and ``{p}`` for the part
    (``layers.{i}.attention.{p}_proj.weight``), ``target`` has ``{i}``."""
    rx = re.compile(re.escape(source).replace(r"\{i\}", r"(\d+)").replace(r"\{p\}", re.escape(parts[0])))
    out = {}
    for k in sd:
        m = rx.fullmatch(k)
        if m:
            i = m.group(1)
            out[target.format(i=i)] = torch.cat([sd[source.format(i=i, p=p)] for p in parts])
    return out


def in_target_shapes(ref: Reference, dst: nn.Module) -> Reference:
    """Reshape each tensor to its target's shape (``[D] -> [1, 1, D]`` for a class token); sizes must agree."""
    shapes = {k: v.shape for k, v in dst.state_dict().items()}
    return {k: v.reshape(shapes[k]) if k in shapes else v for k, v in ref.items()}


# --- per-pair references -------------------------------------------------------------------------------------------

def beit(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers BEiT: separate q/k/v (k without bias) -> fused ``qkv.weight`` beside ``q_bias``/``v_bias``."""
    sd = src.state_dict()
    blk = r"^layers\.(\d+)\."
    ref = renamed(sd, [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (blk + r"lambda_(\d)$", r"blocks.\1.gamma_\2"),
        (blk + r"layernorm_before\.", r"blocks.\1.norm1."),
        (blk + r"layernorm_after\.", r"blocks.\1.norm2."),
        (blk + r"attention\.q_proj\.bias$", r"blocks.\1.attn.q_bias"),
        (blk + r"attention\.v_proj\.bias$", r"blocks.\1.attn.v_bias"),
        (blk + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (blk + r"relative_position_bias\.", r"blocks.\1.attn."),
        (blk + r"mlp\.", r"blocks.\1.mlp."),
        (r"^pooler\.layernorm\.", "fc_norm."),
    ])
    ref |= fused(sd, "layers.{i}.attention.{p}_proj.weight", ("q", "k", "v"), "blocks.{i}.attn.qkv.weight")
    return ref


def data2vec_vision(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers Data2VecVision (BEiT's older naming: query/key/value, intermediate/output) -> timm BEiT."""
    sd = src.state_dict()
    blk = r"^encoder\.layer\.(\d+)\."
    ref = renamed(sd, [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (blk + r"lambda_(\d)$", r"blocks.\1.gamma_\2"),
        (blk + r"layernorm_before\.", r"blocks.\1.norm1."),
        (blk + r"layernorm_after\.", r"blocks.\1.norm2."),
        (blk + r"attention\.attention\.query\.bias$", r"blocks.\1.attn.q_bias"),
        (blk + r"attention\.attention\.value\.bias$", r"blocks.\1.attn.v_bias"),
        (blk + r"attention\.attention\.relative_position_bias\.", r"blocks.\1.attn."),
        (blk + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (blk + r"intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (blk + r"output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"^pooler\.layernorm\.", "fc_norm."),
    ])
    ref |= fused(sd, "encoder.layer.{i}.attention.attention.{p}.weight", ("query", "key", "value"),
                 "blocks.{i}.attn.qkv.weight")
    return ref


def siglip(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers SigLIP vision tower with its attention-pooling head -> timm ViT with ``global_pool='map'``.

    The head's ``in_proj_weight`` [3D, D] splits unevenly: the first D rows are ``attn_pool.q``, the other 2D
    ``attn_pool.kv``."""
    sd = src.state_dict()
    blk = r"^encoder\.layers\.(\d+)\."
    ref = renamed(sd, [
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
        (blk + r"layer_norm(\d)\.", r"blocks.\1.norm\2."),
        (blk + r"self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (blk + r"mlp\.", r"blocks.\1.mlp."),
        (r"^post_layernorm\.", "norm."),
        (r"^head\.probe$", "attn_pool.latent"),
        (r"^head\.attention\.out_proj\.", "attn_pool.proj."),
        (r"^head\.layernorm\.", "attn_pool.norm."),
        (r"^head\.mlp\.", "attn_pool.mlp."),
    ])
    for kind in ("weight", "bias"):
        ref |= fused(sd, "encoder.layers.{i}.self_attn.{p}_proj." + kind, ("q", "k", "v"),
                     "blocks.{i}.attn.qkv." + kind)
        w = sd[f"head.attention.in_proj_{kind}"]
        d = w.shape[0] // 3
        ref[f"attn_pool.q.{kind}"], ref[f"attn_pool.kv.{kind}"] = w[:d], w[d:]
    return in_target_shapes(ref, dst)


def open_clip_image_tower(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """The image tower of a whole open_clip CLIP state dict -> timm's CLIP ViT with a head.

    open_clip computes ``pooled @ visual.proj`` ([width, out]); timm's ``head`` computes ``pooled @ W.T + b``: the
    weight is ``proj`` transposed and the bias, which has no source, is zero. The text tower has no counterpart."""
    sd = src.state_dict()
    blk = r"^visual\.transformer\.resblocks\.(\d+)\."
    ref = renamed(sd, [
        (r"^visual\.class_embedding$", "cls_token"),
        (r"^visual\.positional_embedding$", "pos_embed"),
        (r"^visual\.conv1\.", "patch_embed.proj."),
        (r"^visual\.ln_pre\.", "norm_pre."),
        (r"^visual\.ln_post\.", "norm."),
        (blk + r"ln_(\d)\.", r"blocks.\1.norm\2."),
        (blk + r"attn\.in_proj_", r"blocks.\1.attn.qkv."),
        (blk + r"attn\.out_proj\.", r"blocks.\1.attn.proj."),
        (blk + r"mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
        (blk + r"mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    ])
    ref["head.weight"] = sd["visual.proj"].t().contiguous()
    ref["head.bias"] = torch.zeros(sd["visual.proj"].shape[1])
    return in_target_shapes(ref, dst)


def pvt_v2(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers PVTv2 -> timm: separate key/value fuse into ``kv``; stage 0's patch embedding is the model's
    ``patch_embed``, the later ones are ``stages.{s}.downsample``."""
    sd = src.state_dict()
    blk = r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\."
    ref = renamed(sd, [
        (r"^encoder\.layers\.0\.patch_embedding\.proj\.", "patch_embed.proj."),
        (r"^encoder\.layers\.0\.patch_embedding\.layer_norm\.", "patch_embed.norm."),
        (r"^encoder\.layers\.(\d+)\.patch_embedding\.proj\.", r"stages.\1.downsample.proj."),
        (r"^encoder\.layers\.(\d+)\.patch_embedding\.layer_norm\.", r"stages.\1.downsample.norm."),
        (blk + r"layer_norm_(\d)\.", r"stages.\1.blocks.\2.norm\3."),
        (blk + r"attention\.query\.", r"stages.\1.blocks.\2.attn.q."),
        (blk + r"attention\.proj\.", r"stages.\1.blocks.\2.attn.proj."),
        (blk + r"attention\.spatial_reduction\.", r"stages.\1.blocks.\2.attn.sr."),
        (blk + r"attention\.layer_norm\.", r"stages.\1.blocks.\2.attn.norm."),
        (blk + r"mlp\.dense1\.", r"stages.\1.blocks.\2.mlp.fc1."),
        (blk + r"mlp\.dwconv\.dwconv\.", r"stages.\1.blocks.\2.mlp.dwconv."),
        (blk + r"mlp\.dense2\.", r"stages.\1.blocks.\2.mlp.fc2."),
        (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"stages.\1.norm."),
    ])
    for kind in ("weight", "bias"):
        for key in sd:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.key\." + kind, key)
            if m:
                s, b = m.groups()
                value = f"encoder.layers.{s}.blocks.{b}.attention.value.{kind}"
                ref[f"stages.{s}.blocks.{b}.attn.kv.{kind}"] = torch.cat([sd[key], sd[value]])
    return ref


def shared(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """Negative depth pairs (same library naming on both sides): the keys of equal name and shape."""
    return shared_names(src, dst)


def engine(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """keydiff's own converted tensors (from the state dict in memory), for old-corpus pairs the trace cannot pair
    (a fused qkv against separate q/k/v modules, a class token owned by the root module, swin's relative position
    tables). Circular on its own: it is a reference only because ``prove`` shows that the target then reproduces
    the source's outputs, with every tensor random (a swapped norm or q/k/v order would show)."""
    import keydiff

    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    return keydiff.diff(pair.target, sd, **pair.target_kwargs).apply()


# Old-corpus pairs (tests/pairs.py CORPUS_PAIRS) whose reference is not the plain trace.
SAME_NAMES = ("ddp_prefix", "lightning_compile", "ema_training_dict")  # timm under a wrapper: names are the truth
ENGINE_PROVEN = ("hf_vit", "tv_vit", "openclip_vit", "hf_deit_distilled", "hf_dinov2", "hf_clip_vision", "tv_swin_t",
                 "tv_regnet_y_400mf", "hf_vit_classifier", "hf_deit_with_teacher", "hf_swin_classifier")


def reference_for(pair: Pair) -> Callable[[Pair, nn.Module, nn.Module], Reference]:
    """The pair's reference function: its own, else by the tables above, else the plain trace."""
    if pair.reference is not None:
        return pair.reference
    if pair.name in SAME_NAMES:
        return shared
    if pair.name in ENGINE_PROVEN:
        return engine
    return trace_reference


# --- one pair, end to end ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Outcome:
    """What keydiff did with one pair, judged against the proven reference."""

    pair: Pair
    exit: int
    """The CLI's exit code for this diff: 0 every model key filled, 1 unresolved, 2 refused with an error."""
    rel: float | None
    """Max relative output difference of the converted target (None: not complete, or it does not load)."""
    judged: tuple[Judged, ...]
    error: str = ""
    """The error (exit 2), or why a complete mapping did not load."""
    diff: Diff | None = None
    seconds: float = 0.0
    """Time keydiff took to diff the pair."""
    ref_rel: float | None = None
    """The reference's own proof: the target loaded with it against the source (None: negative pair, shapes only)."""

    @property
    def ok(self) -> bool:
        return self.exit == 0

    @property
    def reproduces(self) -> bool:
        return self.rel is not None and self.rel < 1e-4

    @property
    def solved(self) -> bool:
        """Positive: complete and reproducing the outputs. Negative: unresolved (exit 1), every applied entry right."""
        if self.pair.negative:
            return self.exit == 1 and all(j.right for j in self.judged if j.applied)
        return self.ok and self.reproduces

    def count(self, applied: bool) -> tuple[int, int]:
        """``(right, total)`` over the applied (or the proposed-but-not-applied) entries."""
        js = [j for j in self.judged if j.applied == applied]
        return sum(j.right for j in js), len(js)


def evaluate(pair: Pair, directory: Any) -> Outcome:
    """Write the pair's checkpoint, diff it with keydiff, judge every proposal, and run the converted target."""
    import keydiff

    from pairs import max_rel_diff, write_source

    path, src = write_source(pair, directory)
    dst = pair.target_model()
    ref = reference_for(pair)(pair, src, dst)
    ref_rel = prove(pair, src, ref, dst)
    t0 = time.perf_counter()
    try:
        d = keydiff.diff(pair.target, str(path), **pair.target_kwargs)
    except keydiff.KeydiffError as exc:  # the CLI's exit 2
        return Outcome(pair, 2, None, (), f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0,
                       ref_rel=ref_rel)
    seconds = time.perf_counter() - t0
    judged = tuple(check_entries(d, ref))
    rel, error = None, ""
    if d.ok:
        dst = pair.target_model()
        try:
            dst.load_state_dict(d.apply(), strict=True)
            rel = max_rel_diff(pair, src, dst)
        except Exception as exc:  # a complete mapping that does not load is a finding, not a crash
            error = str(exc).splitlines()[0][:200]
    return Outcome(pair, 0 if d.ok else 1, rel, judged, error, d, seconds, ref_rel)


# --- the old negative controls (tests/test_corpus.py NEGATIVE) -------------------------------------------------------

def nothing(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """No tensor has a counterpart (another width, another architecture): every applied entry is wrong."""
    return {}


def as_positive(kwargs: dict[str, Any], base: Callable[[Pair, nn.Module, nn.Module], Reference]
                ) -> Callable[[Pair, nn.Module, nn.Module], Reference]:
    """The shared part of a depth mismatch: the reference of the same source against the target built with
    ``kwargs`` (the depth the source has), which the positive pair proves."""
    from dataclasses import replace

    def build(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
        positive = replace(pair, target_kwargs=kwargs, negative=False)
        return base(positive, src, positive.target_model())

    return build


def as_negative(pair: Pair) -> Pair:
    """An old negative control as a negative pair with its reference. A BasicBlock checkpoint against a
    Bottleneck model counts the keys of equal name and shape as the shared part (what ``strict=False`` loads; a
    block's ``bn1`` then normalises another convolution, but no other choice is more right)."""
    from dataclasses import replace

    from pairs import VIT

    refs = {"hf_vit_depth2": as_positive(VIT, engine), "hf_vit_width32": nothing, "tv_convnext_as_vit": nothing,
            "tv_resnet18_as_50": shared}
    return replace(pair, negative=True, reference=refs[pair.name])


def swinv2(pair: Pair, src: nn.Module, dst: nn.Module) -> Reference:
    """transformers Swin V2 -> timm: q/k/v (k without bias) into ``qkv.weight`` beside ``q_bias``/``v_bias``; the
    patch merging that ends stage ``s`` in transformers starts stage ``s + 1`` in timm."""
    sd = src.state_dict()
    blk = r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\."
    to = r"layers.\1.blocks.\2."
    ref = renamed(sd, [
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^embeddings\.norm\.", "patch_embed.norm."),
        (blk + r"attention\.self\.logit_scale$", to + "attn.logit_scale"),
        (blk + r"attention\.self\.continuous_position_bias_mlp\.", to + "attn.cpb_mlp."),
        (blk + r"attention\.self\.query\.bias$", to + "attn.q_bias"),
        (blk + r"attention\.self\.value\.bias$", to + "attn.v_bias"),
        (blk + r"attention\.output\.dense\.", to + "attn.proj."),
        (blk + r"layernorm_before\.", to + "norm1."),
        (blk + r"layernorm_after\.", to + "norm2."),
        (blk + r"intermediate\.dense\.", to + "mlp.fc1."),
        (blk + r"output\.dense\.", to + "mlp.fc2."),
        (r"^layernorm\.", "norm."),
    ])
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.+)", key)
        if m:
            ref[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = value
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.key\.weight", key)
        if m:
            s, b = m.groups()
            parts = [sd[f"encoder.layers.{s}.blocks.{b}.attention.self.{p}.weight"] for p in ("query", "key", "value")]
            ref[f"layers.{s}.blocks.{b}.attn.qkv.weight"] = torch.cat(parts)
    return ref
